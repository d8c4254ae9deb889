//! [`BusyLoad`]: the in-flight slots as one pick reads them, through the busy list.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use super::{decode_list, run, Done, Read, Start, Store, DIRECT_READS};
use crate::inflight::Flights;
use crate::slots::{flight_key, BUSY_KEY};

/// FNV-1a: the list's addresses are short, and a pick over a wide band looks up every worker.
#[derive(Default)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvBuild = std::hash::BuildHasherDefault<Fnv>;

/// The names on the list, as a pick looks them up for every worker of a wide band: a short list
/// by comparing, a long one by hash.
enum Names {
    Few(Vec<String>),
    Many(HashSet<String, FnvBuild>),
}

impl Names {
    const FEW: usize = 16;

    fn new(l: Vec<&str>) -> Self {
        if l.len() <= Self::FEW {
            Names::Few(l.into_iter().map(str::to_string).collect())
        } else {
            Names::Many(l.into_iter().map(str::to_string).collect())
        }
    }

    fn contains(&self, addr: &str) -> bool {
        match self {
            Names::Few(l) => l.iter().any(|n| n == addr),
            Names::Many(h) => h.contains(addr),
        }
    }
}

/// A slot as one pick read it: the address, the read (with its token) and its requests.
type SlotRead = (String, Read, Flights);

/// The in-flight slots as one pick reads them ([`crate::pick::LoadView`]): the first
/// [`DIRECT_READS`] workers' slots directly, then the busy list once, and after that only the
/// slots it names (every other worker's own load is 0, without a read). Each slot is read at
/// most once and kept with its token for the pick's [`Start`].
pub struct BusyLoad<S: Store> {
    store: RefCell<S>,
    now_ms: u64,
    max_age_ms: u64,
    /// Slots read before the list (at most [`DIRECT_READS`]).
    direct: RefCell<Vec<SlotRead>>,
    /// The list as read, and its names (`None`: not text, every slot is read).
    list: RefCell<Option<(Read, Option<Names>)>>,
    /// Slots read after it, by address.
    listed: RefCell<HashMap<String, (Read, Flights), FnvBuild>>,
}

impl<S: Store> BusyLoad<S> {
    pub fn new(store: S, now_ms: u64, max_age_ms: u64) -> Self {
        BusyLoad { store: store.into(), now_ms, max_age_ms, direct: Default::default(), list: Default::default(), listed: Default::default() }
    }

    /// The [`Start`] of a request to `addr` at this pick's time, with this pick's reads.
    pub fn start_op(&self, addr: &str) -> Start {
        let direct = self.direct.borrow().iter().find(|d| d.0 == addr).map(|d| d.1.clone());
        let slot = direct.or_else(|| self.listed.borrow().get(addr).map(|(r, _)| r.clone()));
        let list = self.list.borrow().as_ref().map(|(r, _)| r.clone());
        Start::new(addr, self.now_ms, self.max_age_ms, slot, list)
    }

    /// Counts a request to `addr` starting now (the filter's start of an attempt).
    pub fn start(&self, addr: &str) -> Done {
        let mut op = self.start_op(addr);
        run(&mut *self.store.borrow_mut(), |s| op.step(s))
    }

    /// Slots read so far (for tests and the bench).
    pub fn slot_reads(&self) -> usize {
        self.direct.borrow().len() + self.listed.borrow().len()
    }

    fn read(&self, addr: &str) -> (Read, Flights) {
        let read = self.store.borrow_mut().get(&flight_key(addr));
        let f = Flights::decode(read.0.as_deref().unwrap_or_default());
        (read, f)
    }

    /// This pick's requests in flight to `addr`, reading its slot when needed.
    fn flights<T>(&self, addr: &str, with: impl FnOnce(&Flights) -> T, idle: T) -> T {
        if self.list.borrow().is_none() {
            if let Some(d) = self.direct.borrow().iter().find(|d| d.0 == addr) {
                return with(&d.2);
            }
            if self.direct.borrow().len() < DIRECT_READS {
                let (read, f) = self.read(addr);
                let out = with(&f);
                self.direct.borrow_mut().push((addr.to_string(), read, f));
                return out;
            }
            let read = self.store.borrow_mut().get(BUSY_KEY);
            let direct = self.direct.borrow();
            let names = read.0.as_deref().map_or(Some(Vec::new()), decode_list).map(|mut l| {
                // A slot read before the list answers the same all pick long, listed or not.
                l.extend(direct.iter().filter(|d| d.1 .0.as_ref().is_some_and(|b| b.len() >= 12)).map(|d| d.0.as_str()));
                Names::new(l)
            });
            drop(direct);
            *self.list.borrow_mut() = Some((read, names));
        }
        if let Some((_, Some(names))) = &*self.list.borrow() {
            if !names.contains(addr) {
                return idle;
            }
        }
        if let Some(d) = self.direct.borrow().iter().find(|d| d.0 == addr) {
            return with(&d.2);
        }
        if let Some((_, f)) = self.listed.borrow().get(addr) {
            return with(f);
        }
        let (read, f) = self.read(addr);
        let out = with(&f);
        self.listed.borrow_mut().insert(addr.to_string(), (read, f));
        out
    }
}

impl<S: Store> crate::pick::LoadView for BusyLoad<S> {
    fn ours(&self, addr: &str, frame_local_ms: u64, frame_load: f64) -> f64 {
        self.flights(addr, |f| f.estimate(self.now_ms, self.max_age_ms, frame_local_ms, frame_load), 0.0)
    }
}
