//! The busy list: one shared-data entry naming the workers this router may have requests in
//! flight to, so that a pick over a wide near-best band (a uniform fleet: every worker scores the
//! same) reads one entry instead of one in-flight slot ([`crate::inflight`]) per worker. A worker
//! the list does not name has no request of this router in flight: its own load is 0 without a
//! read.
//!
//! The per-worker slot stays the truth; the list only says which slots can be non-zero, and may
//! name more (a stale entry costs one read, never a wrong load). The invariant is the other way:
//! **a slot that holds a request is on the list**, or the start that put it there is about to add
//! it. It is kept with the slots' compare-and-swap tokens, without a lock:
//!
//! * A slot carries a trailing [`LISTED`] byte (after its 12-byte records, which
//!   [`Flights::decode`] ignores) while its worker is on the list. A start ([`Start`]) writes the
//!   byte with its count; when the slot had no byte (the worker was not listed, or its slot did
//!   not exist), the start then writes the list, even when it already names the worker, so that
//!   the list's token changes under a concurrent sweep.
//! * The sweep ([`Sweep`], once per poll on one Envoy thread, off the request path) reads the list,
//!   then each named slot. A slot with nothing in flight (ended, or only buckets older than
//!   `in_flight_max_age_ms`: a missed end) is emptied and its byte dropped with the slot's token,
//!   and its worker leaves the list written with the list's token. A start that lands on that
//!   slot after the sweep read it makes the sweep's slot write fail (the worker stays); one that
//!   lands after the sweep's slot write finds no byte, so it writes the list, and the sweep's list
//!   write then fails (it starts over) or came first (the start adds the worker back).
//! * An end ([`End`]) keeps the byte; it never removes a worker from the list (the sweep does), so
//!   ends cost what they cost before.
//! * A start that cannot write the list (contention, a host error) drops the byte again, so the
//!   next start tries; until then picks read that worker's load as 0 (one pick's worth of error
//!   that would be there anyway: picks read the slots one by one, not atomically).
//! * The first write of the list (and of a slot) cannot be conditional (Envoy has no
//!   create-if-absent), so two threads creating it at once may lose an entry. A start whose pick
//!   read a list that does not name its worker lists it, whatever the slot's byte says: a lost
//!   entry heals at that worker's next start, which comes soon (its load reads as 0 meanwhile).
//!
//! The list cannot grow forever: the sweep drops every worker with nothing in flight (an expired
//! slot included) past the first [`IDLE_KEPT`]. Its size is the workers with requests in flight,
//! those whose last request ended since the last sweep, and at most [`IDLE_KEPT`] idle ones.
//!
//! Each operation is a small state machine over a [`Store`] that makes one store call per
//! [`Start::step`] (and the like): the filter drives it with the host's shared data, the tests
//! interleave the steps of several operations on one in-memory store to simulate Envoy threads
//! racing.

use crate::inflight::Flights;
use crate::slots::{flight_key, BUSY_KEY};

/// The trailing byte of an in-flight slot whose worker is on the busy list.
pub const LISTED: u8 = b'L';
/// Compare-and-swap attempts before an operation gives up.
pub const TRIES: u32 = 8;
/// Slots a pick reads directly before it reads the busy list instead: a small fleet (or a
/// narrow band) costs what it did without the list.
pub const DIRECT_READS: usize = 4;
/// Idle workers a sweep leaves on the list ([`Sweep::new`]): a small fleet's workers then stay
/// listed between requests, so their starts write no list (the list is read only by picks over
/// more than [`DIRECT_READS`] workers, which then read at most this many idle slots).
pub const IDLE_KEPT: usize = 8;

mod load;
pub use load::BusyLoad;

/// A shared-data value and its compare-and-swap token, as read (`None`: no such key).
pub type Read = (Option<Vec<u8>>, Option<u32>);

/// The answer to a write with a compare-and-swap token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetResult {
    Ok,
    CasMismatch,
    Failed,
}

/// Shared data as the operations see it (the Proxy-Wasm host's, or an in-memory one in tests).
/// `set` with a token fails with [`SetResult::CasMismatch`] when the key was written since the
/// read that gave it; with `None` it writes unconditionally (Envoy's `cas == 0`).
pub trait Store {
    fn get(&mut self, key: &str) -> Read;
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SetResult;
}

/// Whether a slot's bytes carry the [`LISTED`] byte.
pub fn slot_listed(b: Option<&[u8]>) -> bool {
    b.is_some_and(|b| b.len() % 12 == 1 && b.last() == Some(&LISTED))
}

fn slot_bytes(f: &Flights, listed: bool) -> Vec<u8> {
    let mut b = f.encode();
    if listed {
        b.push(LISTED);
    }
    b
}

/// The list's addresses (comma-separated). `None`: not text (then nothing may be skipped).
pub fn decode_list(b: &[u8]) -> Option<Vec<&str>> {
    std::str::from_utf8(b).ok().map(|s| s.split(',').filter(|x| !x.is_empty()).collect())
}

/// The list with `addr` on it (once).
pub fn list_with(b: Option<&[u8]>, addr: &str) -> Vec<u8> {
    let mut list = b.and_then(decode_list).unwrap_or_default();
    if !list.contains(&addr) {
        list.push(addr);
    }
    list.join(",").into_bytes()
}

/// How an operation ended, for the filter's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Ok,
    /// The slot could not be written: this request is not counted.
    SlotLost,
    /// The worker could not be listed and its byte was dropped ([`Start`]).
    Unlisted,
    /// Neither: the slot keeps a byte for a worker the list may not name, until the sweep or a
    /// later start (picks may read its load as 0 meanwhile).
    ListLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartPhase {
    Slot,
    List,
    Unflag,
}

/// A request to `addr` starts at `now_ms`: count it in the slot, then list the worker when the
/// slot had no [`LISTED`] byte, or when this pick read the list and it does not name the worker
/// (an entry lost to the only unconditional list write: the first, when two threads create the
/// key at once; Envoy has no create-if-absent). The reads a pick already made are reused (their tokens spare a
/// read when nothing changed since).
#[derive(Debug, Clone)]
pub struct Start {
    addr: String,
    now_ms: u64,
    max_age_ms: u64,
    phase: StartPhase,
    slot: Option<Read>,
    list: Option<Read>,
    tries: u32,
    heal: bool,
}

impl Start {
    /// `slot`, `list`: this pick's reads of the worker's slot and of the list, if it made them.
    pub fn new(addr: &str, now_ms: u64, max_age_ms: u64, slot: Option<Read>, list: Option<Read>) -> Self {
        // A list read that does not name the worker: list it whatever its slot says (a lost
        // entry heals at the next start a pick with the list makes).
        let heal = list.as_ref().is_some_and(|(b, _)| b.as_deref().map_or(Some(Vec::new()), decode_list).is_none_or(|l| !l.contains(&addr)));
        Start { addr: addr.to_string(), now_ms, max_age_ms, phase: StartPhase::Slot, slot, list, tries: 0, heal }
    }

    /// One store call; `Some` when done.
    pub fn step(&mut self, store: &mut dyn Store) -> Option<Done> {
        let key = flight_key(&self.addr);
        match self.phase {
            StartPhase::Slot => {
                let Some((cur, cas)) = self.slot.take() else {
                    self.slot = Some(store.get(&key));
                    return None;
                };
                let mut f = Flights::decode(cur.as_deref().unwrap_or_default());
                f.start(self.now_ms, self.max_age_ms);
                match store.set(&key, &slot_bytes(&f, true), cas) {
                    SetResult::Ok if slot_listed(cur.as_deref()) && !self.heal => Some(Done::Ok),
                    SetResult::Ok => {
                        self.phase = StartPhase::List;
                        self.tries = 0;
                        None
                    }
                    SetResult::CasMismatch if self.tries + 1 < TRIES => {
                        self.tries += 1;
                        None
                    }
                    _ => Some(Done::SlotLost),
                }
            }
            StartPhase::List => {
                let Some((cur, cas)) = self.list.take() else {
                    self.list = Some(store.get(BUSY_KEY));
                    return None;
                };
                // Written even when the list names the worker: a sweep that read the list before
                // must see the token change.
                match store.set(BUSY_KEY, &list_with(cur.as_deref(), &self.addr), cas) {
                    SetResult::Ok => Some(Done::Ok),
                    SetResult::CasMismatch if self.tries + 1 < TRIES => {
                        self.tries += 1;
                        None
                    }
                    _ => {
                        self.phase = StartPhase::Unflag;
                        self.tries = 0;
                        None
                    }
                }
            }
            StartPhase::Unflag => {
                let Some((cur, cas)) = self.slot.take() else {
                    self.slot = Some(store.get(&key));
                    return None;
                };
                if !slot_listed(cur.as_deref()) {
                    return Some(Done::Unlisted);
                }
                let f = Flights::decode(cur.as_deref().unwrap_or_default());
                match store.set(&key, &slot_bytes(&f, false), cas) {
                    SetResult::Ok => Some(Done::Unlisted),
                    SetResult::CasMismatch if self.tries + 1 < TRIES => {
                        self.tries += 1;
                        None
                    }
                    _ => Some(Done::ListLost),
                }
            }
        }
    }
}

/// The request to `addr` that started at `started_ms` ends at `now_ms`. The slot keeps its
/// [`LISTED`] byte; nothing is written when nothing changes (an end never started, or already
/// counted).
#[derive(Debug, Clone)]
pub struct End {
    addr: String,
    started_ms: u64,
    now_ms: u64,
    max_age_ms: u64,
    slot: Option<Read>,
    tries: u32,
}

impl End {
    pub fn new(addr: &str, started_ms: u64, now_ms: u64, max_age_ms: u64) -> Self {
        End { addr: addr.to_string(), started_ms, now_ms, max_age_ms, slot: None, tries: 0 }
    }

    /// One store call; `Some` when done.
    pub fn step(&mut self, store: &mut dyn Store) -> Option<Done> {
        let key = flight_key(&self.addr);
        let Some((cur, cas)) = self.slot.take() else {
            self.slot = Some(store.get(&key));
            return None;
        };
        let Some(cur) = cur else { return Some(Done::Ok) };
        let mut f = Flights::decode(&cur);
        f.end(self.started_ms, self.now_ms, self.max_age_ms);
        let new = slot_bytes(&f, slot_listed(Some(&cur)));
        if new == cur {
            return Some(Done::Ok);
        }
        match store.set(&key, &new, cas) {
            SetResult::Ok => Some(Done::Ok),
            SetResult::CasMismatch if self.tries + 1 < TRIES => {
                self.tries += 1;
                None
            }
            _ => Some(Done::SlotLost),
        }
    }
}

#[derive(Debug, Clone)]
enum SweepPhase {
    List,
    /// Checking the `i`-th listed worker; `claim`: its slot as read, to be emptied.
    Slot { i: usize, claim: Option<Option<u32>> },
    Write,
}

/// Drops from the list the workers with nothing in flight at `now_ms`, but `keep_idle` of them
/// (see the module doc).
#[derive(Debug, Clone)]
pub struct Sweep {
    now_ms: u64,
    max_age_ms: u64,
    phase: SweepPhase,
    list: Read,
    names: Vec<String>,
    keep: Vec<bool>,
    rounds: u32,
    keep_idle: usize,
    idle: usize,
}

impl Sweep {
    /// `keep_idle`: idle workers left on the list (the first in its order; [`IDLE_KEPT`]).
    pub fn new(now_ms: u64, max_age_ms: u64, keep_idle: usize) -> Self {
        Sweep { now_ms, max_age_ms, phase: SweepPhase::List, list: (None, None), names: Vec::new(), keep: Vec::new(), rounds: 0, keep_idle, idle: 0 }
    }

    /// One store call; `Some` when done (with how many workers the list keeps, if it is text).
    pub fn step(&mut self, store: &mut dyn Store) -> Option<Option<usize>> {
        match std::mem::replace(&mut self.phase, SweepPhase::Write) {
            SweepPhase::List => {
                self.list = store.get(BUSY_KEY);
                let Some(names) = self.list.0.as_deref().map_or(Some(Vec::new()), decode_list) else {
                    // Not ours to repair by guessing: a start rewrites it whole.
                    return Some(None);
                };
                if names.len() <= self.keep_idle {
                    // Nothing to drop: no slot read.
                    return Some(Some(names.len()));
                }
                self.names = names.into_iter().map(str::to_string).collect();
                self.keep = vec![true; self.names.len()];
                self.idle = 0;
                self.next_slot(0)
            }
            SweepPhase::Slot { i, claim: None } => {
                let (cur, cas) = store.get(&flight_key(&self.names[i]));
                let busy = Flights::decode(cur.as_deref().unwrap_or_default()).total(self.now_ms, self.max_age_ms) > 0;
                if busy {
                    return self.next_slot(i + 1);
                }
                if self.idle < self.keep_idle {
                    self.idle += 1;
                    return self.next_slot(i + 1);
                }
                if slot_listed(cur.as_deref()) || cur.as_ref().is_some_and(|b| !b.is_empty()) {
                    // Empty it (expired buckets and the byte) with its token.
                    self.phase = SweepPhase::Slot { i, claim: Some(cas) };
                    return None;
                }
                // No byte, nothing in flight: a start that lands now writes the list itself.
                self.keep[i] = false;
                self.next_slot(i + 1)
            }
            SweepPhase::Slot { i, claim: Some(cas) } => {
                let emptied = store.set(&flight_key(&self.names[i]), &[], cas) == SetResult::Ok;
                self.keep[i] = !emptied;
                self.next_slot(i + 1)
            }
            SweepPhase::Write => {
                let kept: Vec<&str> = self.names.iter().zip(&self.keep).filter(|(_, k)| **k).map(|(n, _)| n.as_str()).collect();
                match store.set(BUSY_KEY, kept.join(",").as_bytes(), self.list.1) {
                    SetResult::Ok => Some(Some(kept.len())),
                    SetResult::CasMismatch if self.rounds + 1 < TRIES => {
                        // Workers dropped from slots stay correct: a start on them writes the list.
                        self.rounds += 1;
                        self.phase = SweepPhase::List;
                        None
                    }
                    _ => Some(Some(self.names.len())),
                }
            }
        }
    }

    /// Moves to slot `i`, or to the list's write (or done, when nothing changes).
    fn next_slot(&mut self, i: usize) -> Option<Option<usize>> {
        if i < self.names.len() {
            self.phase = SweepPhase::Slot { i, claim: None };
            return None;
        }
        if self.keep.iter().all(|k| *k) {
            return Some(Some(self.names.len()));
        }
        self.phase = SweepPhase::Write;
        None
    }
}

/// Runs `op`'s steps until it is done.
pub fn run<T>(store: &mut dyn Store, mut step: impl FnMut(&mut dyn Store) -> Option<T>) -> T {
    loop {
        if let Some(out) = step(store) {
            return out;
        }
    }
}

impl<S: Store + ?Sized> Store for &mut S {
    fn get(&mut self, key: &str) -> Read {
        (**self).get(key)
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SetResult {
        (**self).set(key, value, cas)
    }
}

#[cfg(test)]
mod tests;
