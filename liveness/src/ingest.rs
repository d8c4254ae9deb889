//! Authenticated ingest: turns datagrams into accepted frames, dropping (and counting) forged,
//! garbled, replayed and badly timed ones. A dropped datagram changes nothing else.
//!
//! # The replay rule
//!
//! Per worker, frames are ordered by `(sent_ms, boot_id, seq)`, compared lexicographically,
//! and a frame is accepted only if it is strictly newer in that order than every frame already
//! accepted from that worker (and its `sent_ms` is within the skew allowance of the receive
//! time). Because the order is total and accepted frames must strictly increase in it, no frame
//! is ever accepted twice and no frame older than an accepted one is accepted, whatever the
//! interleaving of boots, sequences and clocks an attacker replays. `boot_id` and `seq` only
//! break ties between frames sent in the same millisecond.
//!
//! Rules that compare `seq` within a boot and `sent_ms` across boots are not an order: two
//! captured boots can then be played back in turn forever (A, B, an older B, A again). So a
//! new boot gets no special treatment: a restart is accepted once its clock is past the newest
//! frame accepted from the worker.
//!
//! The price is a bounded stall when a worker's clock goes backwards: after a restart (or an
//! NTP step within a boot) whose clock is behind the last accepted frame, its frames are
//! dropped as replays until its clock passes that frame. Every accepted frame was within
//! `max_skew_ms` of its receive time, and so is every frame that passes the skew check, so the
//! stall is at most `2 * max_skew_ms` after the last accepted frame (10 s by default; after a
//! frame dated now + 4.9 s by a fast clock, a restart with a right clock waits 4.9 s). It never
//! locks a worker out, because a replayed frame can only be as new as the worker's own clock
//! was. Only a holder of the HMAC key can date a frame into the future, and it can do worse.
//!
//! Ordering state outlives the fleet forgetting a worker until no frame it ordered can pass the
//! skew check any more (see [`Ingest::retain`]): forgetting it sooner would make its recent
//! frames acceptable once more.
//!
//! # A bound on tracked workers
//!
//! Ordering state is kept per worker id, and a receiver's fleet state only holds ids this
//! ingest accepted, so bounding the ids here bounds both (about 1.9 KB per worker in dnsd:
//! 100 000 ids took 188 MB). Past [`Ingest::with_max_workers`] ids, a frame from a new id is
//! dropped as [`DropReason::TooManyWorkers`]; a known id is never evicted to make room, so a
//! flood of new ids (a key holder gone wrong, worker ids that change on every restart) cannot
//! push a live worker out. Room comes back as the fleet forgets silent workers.

use std::collections::HashMap;

use crate::frame::{Frame, FrameError, FrameRef, KeyRing};
use crate::worker_key::WorkerKey;

/// Frames whose send time is further than this from the receive time are dropped.
pub const DEFAULT_MAX_SKEW_MS: u64 = 5_000;
/// Worker ids tracked at most (see the module doc): ten times the largest fleet we plan for.
pub const DEFAULT_MAX_WORKERS: usize = 20_000;

/// Why a datagram was dropped. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a frame at all, truncated, over 512 bytes, or fields out of range.
    Malformed,
    /// A frame version this build does not read.
    UnsupportedVersion,
    /// Signed with a key id this receiver does not hold.
    UnknownKey,
    /// The HMAC did not verify: forged, or signed with another key.
    BadMac,
    /// Not newer, in the per-worker `(sent_ms, boot_id, seq)` order, than a frame already
    /// accepted from that worker (see the module doc).
    Replay,
    /// Send time too far from the receive time (stale capture or a broken clock).
    ClockSkew,
    /// A worker id not tracked yet, while the bound on tracked ids is reached (module doc).
    TooManyWorkers,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnsupportedVersion,
        DropReason::UnknownKey,
        DropReason::BadMac,
        DropReason::Replay,
        DropReason::ClockSkew,
        DropReason::TooManyWorkers,
    ];

    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnsupportedVersion => "unsupported_version",
            DropReason::UnknownKey => "unknown_key",
            DropReason::BadMac => "bad_mac",
            DropReason::Replay => "replay",
            DropReason::ClockSkew => "clock_skew",
            DropReason::TooManyWorkers => "too_many_workers",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<&FrameError> for DropReason {
    fn from(e: &FrameError) -> Self {
        match e {
            FrameError::UnsupportedVersion(_) => DropReason::UnsupportedVersion,
            FrameError::UnknownKey(_) => DropReason::UnknownKey,
            FrameError::BadMac => DropReason::BadMac,
            _ => DropReason::Malformed,
        }
    }
}

/// Accepted and dropped datagrams, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestCounters {
    pub accepted: u64,
    dropped: [u64; DropReason::ALL.len()],
}

impl IngestCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// Where a frame sits in its worker's order: fields in comparison order, so the derived `Ord`
/// is the lexicographic order of the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Order {
    sent_ms: u64,
    boot_id: u64,
    seq: u64,
}

impl Order {
    fn of(frame: &FrameRef<'_>) -> Self {
        Order { sent_ms: frame.sent_ms, boot_id: frame.boot_id, seq: frame.seq }
    }
}

/// Decode + authenticate + order. Holds, per worker id, the newest accepted frame's order (`sent_ms`, `boot_id`, `seq`).
#[derive(Debug)]
pub struct Ingest {
    keys: KeyRing,
    max_skew_ms: u64,
    max_workers: usize,
    last: HashMap<WorkerKey, Order>,
    counters: IngestCounters,
}

impl Ingest {
    pub fn new(keys: KeyRing) -> Self {
        Ingest { keys, max_skew_ms: DEFAULT_MAX_SKEW_MS, max_workers: DEFAULT_MAX_WORKERS, last: HashMap::new(), counters: IngestCounters::default() }
    }

    /// Tracks at most `n` worker ids (see the module doc).
    pub fn with_max_workers(mut self, n: usize) -> Self {
        self.max_workers = n;
        self
    }

    /// Worker ids tracked now.
    pub fn tracked(&self) -> usize {
        self.last.len()
    }

    pub fn with_max_skew_ms(mut self, ms: u64) -> Self {
        self.max_skew_ms = ms;
        self
    }

    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    /// Replaces the key ring (a reload): frames are checked against the new keys from the next
    /// one on; replay order and counters are kept.
    pub fn set_keys(&mut self, keys: KeyRing) {
        self.keys = keys;
    }

    /// Accepts one datagram received at `now_ms`, or says why it was dropped.
    /// ([`Self::accept_ref`], then the frame's strings copied.)
    pub fn accept(&mut self, bytes: &[u8], now_ms: u64) -> Result<Frame, DropReason> {
        self.accept_ref(bytes, now_ms).map(|f| f.to_frame())
    }

    /// [`Self::accept`], with the accepted frame's strings borrowed from `bytes`: a known
    /// worker's frame is checked and ordered without allocating.
    pub fn accept_ref<'b>(&mut self, bytes: &'b [u8], now_ms: u64) -> Result<FrameRef<'b>, DropReason> {
        let r = self.check(bytes, now_ms);
        match &r {
            Ok(_) => self.counters.accepted += 1,
            Err(reason) => self.counters.dropped[reason.index()] += 1,
        }
        r
    }

    fn check<'b>(&mut self, bytes: &'b [u8], now_ms: u64) -> Result<FrameRef<'b>, DropReason> {
        let frame = FrameRef::decode(bytes, &self.keys).map_err(|e| DropReason::from(&e))?;
        if frame.sent_ms.abs_diff(now_ms) > self.max_skew_ms {
            return Err(DropReason::ClockSkew);
        }
        let order = Order::of(&frame);
        let full = self.last.len() >= self.max_workers;
        match self.last.get_mut(frame.worker_id.as_bytes()) {
            Some(last) if order <= *last => return Err(DropReason::Replay),
            Some(last) => *last = order,
            None if full => return Err(DropReason::TooManyWorkers),
            None => {
                self.last.insert(WorkerKey::new(frame.worker_id), order);
            }
        }
        Ok(frame)
    }

    /// Forgets ordering state for workers not in `keep` (called when the fleet forgets them),
    /// but only once a frame not newer than the last accepted one would fail the skew check at
    /// `now_ms`: until then a replay of it would be accepted again.
    pub fn retain(&mut self, now_ms: u64, mut keep: impl FnMut(&str) -> bool) {
        let skew = self.max_skew_ms;
        self.last.retain(|k, last| keep(k.as_str()) || now_ms <= last.sent_ms.saturating_add(skew));
    }
}

#[cfg(test)]
mod tests;
