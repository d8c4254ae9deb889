//! One Envoy thread's Proxy-Wasm contexts, as Envoy's Wasm host keeps them per VM: a root
//! context per filter configuration, created on the thread's first request of that
//! configuration, and an HTTP context per filter instance, each with the Envoy filter it acts on.
//!
//! It also keeps each configuration's tick seat: the one live HTTP context of the thread whose
//! Envoy scheduler delivers the root context's ticks (a dynamic module has no per-thread timer;
//! a filter's scheduler runs its events on the filter's thread). When the seat's filter ends,
//! another live filter of the configuration on the thread takes it.

use foldhash::HashMap;

/// A configuration, by its serial number (never reused in the process).
pub type ConfigKey = u64;

pub struct Contexts<F: Copy> {
    next_id: u32,
    roots: HashMap<ConfigKey, u32>,
    http: HashMap<u32, Http<F>>,
    seats: HashMap<ConfigKey, u32>,
}

#[derive(Clone, Copy)]
struct Http<F> {
    config: ConfigKey,
    filter: F,
}

impl<F: Copy> Default for Contexts<F> {
    fn default() -> Self {
        Contexts { next_id: 1, roots: HashMap::default(), http: HashMap::default(), seats: HashMap::default() }
    }
}

impl<F: Copy> Contexts<F> {
    /// An id no live context has, never 0 (the SDK's "no root"). The counter wraps after 2³²
    /// contexts (weeks, for a thread serving a thousand requests a second, two contexts each):
    /// it then skips the ids still in use, the roots made at the thread's start among them. (The
    /// SDK and this host key contexts by id: a second live context with an id panics the SDK when
    /// both are of one kind, which aborts Envoy, and mixes up a root's calls with an HTTP
    /// context's when not.)
    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.http.contains_key(&id) && !self.is_root(id) {
                return id;
            }
        }
    }

    /// The root context of `config` on this thread, and whether it was created just now (the
    /// caller then runs the SDK's create, start and configure on it).
    pub fn root(&mut self, config: ConfigKey) -> (u32, bool) {
        if let Some(&id) = self.roots.get(&config) {
            return (id, false);
        }
        let id = self.fresh_id();
        self.roots.insert(config, id);
        (id, true)
    }

    pub fn is_root(&self, id: u32) -> bool {
        self.roots.values().any(|&r| r == id)
    }

    /// Forgets a root whose configuration failed (its next request tries again).
    pub fn drop_root(&mut self, config: ConfigKey) {
        self.roots.remove(&config);
    }

    /// Forgets the roots of the configurations `live` says Envoy no longer holds (and their
    /// tick seats); their ids, for the SDK's done and delete. Envoy destroys a configuration
    /// only after its filters, so no HTTP context of theirs is left.
    pub fn retire(&mut self, live: impl Fn(ConfigKey) -> bool) -> Vec<u32> {
        let gone: Vec<ConfigKey> = self.roots.keys().copied().filter(|&k| !live(k)).collect();
        gone.iter()
            .filter_map(|k| {
                self.seats.remove(k);
                self.roots.remove(k)
            })
            .collect()
    }

    /// A new HTTP context of `config` on `filter`; `true` when it takes the configuration's
    /// tick seat (none was held on this thread).
    pub fn open(&mut self, config: ConfigKey, filter: F) -> (u32, bool) {
        let id = self.fresh_id();
        self.http.insert(id, Http { config, filter });
        let seat = !self.seats.contains_key(&config);
        if seat {
            self.seats.insert(config, id);
        }
        (id, seat)
    }

    /// The Envoy filter of a live HTTP context.
    pub fn filter(&self, id: u32) -> Option<F> {
        self.http.get(&id).map(|h| h.filter)
    }

    /// Ends an HTTP context. When it held its configuration's tick seat: `Some(successor)`, the
    /// live context that takes the seat now (`None` inside when none is left).
    pub fn close(&mut self, id: u32) -> Option<Option<(u32, F)>> {
        let h = self.http.remove(&id)?;
        if self.seats.get(&h.config) != Some(&id) {
            return None;
        }
        let next = self.http.iter().find(|(_, o)| o.config == h.config).map(|(&i, o)| (i, o.filter));
        match next {
            Some((i, _)) => self.seats.insert(h.config, i),
            None => self.seats.remove(&h.config),
        };
        Some(next)
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_made_once_per_configuration() {
        let mut c: Contexts<u8> = Contexts::default();
        let (r1, new1) = c.root(1);
        let (r1b, new1b) = c.root(1);
        let (r2, new2) = c.root(2);
        assert!(new1 && !new1b && new2);
        assert_eq!(r1, r1b);
        assert_ne!(r1, r2);
        c.drop_root(1);
        assert!(c.root(1).1);
    }

    #[test]
    fn roots_of_removed_configurations_are_retired_once() {
        let mut c: Contexts<u8> = Contexts::default();
        let (r1, _) = c.root(1);
        let (r2, _) = c.root(2);
        let (r3, _) = c.root(3);
        c.open(2, 20);
        let mut gone = c.retire(|k| k == 3);
        gone.sort_unstable();
        assert_eq!(gone, vec![r1, r2]);
        assert!(c.retire(|k| k == 3).is_empty(), "retired once");
        assert!(!c.is_root(r1) && !c.is_root(r2) && c.is_root(r3));
        // A configuration seen again (it never is: serials are not reused) gets a fresh root.
        assert!(c.root(1).1);
    }

    #[test]
    fn ids_in_use_are_skipped_when_the_counter_wraps() {
        let mut c: Contexts<u8> = Contexts::default();
        let (root, _) = c.root(1);
        let (kept, _) = c.open(1, 10);
        assert_eq!((root, kept), (1, 2));
        c.next_id = u32::MAX - 1;
        let mut ids: Vec<u32> = (0..4).map(|i| c.open(1, i).0).collect();
        // A root made across the wrap is fresh too.
        ids.push(c.root(2).0);
        assert_eq!(ids, vec![u32::MAX - 1, u32::MAX, 3, 4, 5]);
        assert_eq!(c.filter(kept), Some(10), "the live context kept its filter");
    }

    #[test]
    fn the_tick_seat_passes_to_a_live_filter_of_the_same_configuration() {
        let mut c: Contexts<u8> = Contexts::default();
        let (a, seat_a) = c.open(1, 10);
        let (b, seat_b) = c.open(1, 11);
        let (x, seat_x) = c.open(2, 20);
        assert!(seat_a && !seat_b && seat_x);
        // A context without the seat ends: nothing moves.
        assert_eq!(c.close(b), None);
        let (d, _) = c.open(1, 12);
        // The seat's holder ends: the other live one of configuration 1 takes it.
        assert_eq!(c.close(a), Some(Some((d, 12))));
        assert_eq!(c.close(d), Some(None));
        // No seat held now: the next one takes it.
        assert!(c.open(1, 13).1);
        assert_eq!(c.filter(x), Some(20));
        assert_eq!(c.close(999), None);
    }
}
