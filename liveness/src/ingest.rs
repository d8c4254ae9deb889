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
mod tests {
    use super::*;
    use crate::frame::tests::sample;

    const NOW: u64 = 1_800_000_000_000;

    fn ingest() -> Ingest {
        Ingest::new(KeyRing::single(1, b"k".to_vec()))
    }

    #[test]
    fn accepts_in_order_and_drops_replays() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        let b7 = f.encode(b"k").unwrap();
        assert!(ing.accept(&b7, NOW).is_ok());
        assert_eq!(ing.accept(&b7, NOW), Err(DropReason::Replay));
        f.seq = 6;
        assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::Replay));
        f.seq = 8;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
        assert_eq!(ing.counters().accepted, 2);
        assert_eq!(ing.counters().dropped(DropReason::Replay), 2);
    }

    #[test]
    fn restart_with_new_boot_is_accepted_but_old_boot_is_replay() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        let old = f.encode(b"k").unwrap();
        assert!(ing.accept(&old, NOW).is_ok());
        let mut g = f.clone();
        g.boot_id = 99;
        g.seq = 1;
        g.sent_ms = NOW + 500;
        assert!(ing.accept(&g.encode(b"k").unwrap(), NOW + 500).is_ok());
        // The old boot's frame played back after the restart.
        assert_eq!(ing.accept(&old, NOW + 600), Err(DropReason::Replay));
    }

    #[test]
    fn forged_garbage_and_skew_are_counted_by_reason() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        assert_eq!(ing.accept(&f.encode(b"wrong").unwrap(), NOW), Err(DropReason::BadMac));
        assert_eq!(ing.accept(b"\x00\x01garbage", NOW), Err(DropReason::Malformed));
        f.key_id = 3;
        assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::UnknownKey));
        f.key_id = 1;
        f.sent_ms = NOW - 60_000;
        assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::ClockSkew));
        let c = ing.counters();
        assert_eq!(c.accepted, 0);
        assert_eq!(c.dropped_total(), 4);
        for r in [DropReason::BadMac, DropReason::Malformed, DropReason::UnknownKey, DropReason::ClockSkew] {
            assert_eq!(c.dropped(r), 1, "{}", r.as_str());
        }
    }

    #[test]
    fn truncated_frame_is_counted_as_malformed() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        let b = f.encode(b"k").unwrap();
        for cut in [61, 62, b.len() - 1] {
            assert_eq!(ing.accept(&b[..cut], NOW), Err(DropReason::Malformed), "cut at {cut}");
        }
        assert_eq!(ing.counters().dropped(DropReason::BadMac), 0);
    }

    /// Past the bound, new ids are dropped and counted; known ids go on, and room comes back
    /// when the fleet forgets a worker.
    #[test]
    fn new_ids_past_the_bound_are_dropped_never_known_ones() {
        let mut ing = ingest().with_max_workers(2);
        let mut f = sample();
        f.sent_ms = NOW;
        for (id, seq) in [("a", 1), ("b", 1)] {
            f.worker_id = id.into();
            f.seq = seq;
            assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
        }
        f.worker_id = "c".into();
        assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::TooManyWorkers));
        f.worker_id = "a".into();
        f.seq = 2;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok(), "a known worker is never pushed out");
        assert_eq!((ing.tracked(), ing.counters().dropped(DropReason::TooManyWorkers)), (2, 1));
        // The fleet forgot "b" and no replay of it can pass the skew check: room for "c".
        ing.retain(NOW + DEFAULT_MAX_SKEW_MS + 1, |id| id == "a");
        f.worker_id = "c".into();
        f.sent_ms = NOW + DEFAULT_MAX_SKEW_MS + 1;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW + DEFAULT_MAX_SKEW_MS + 1).is_ok());
    }

    /// The order map is looked up by the id borrowed from the datagram and updated in place:
    /// per worker, a replay and a frame older than an accepted one are still dropped, other
    /// workers (ids sharing a prefix) are their own, and the frame given back is the one sent.
    #[test]
    fn borrowed_accept_orders_per_worker() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        let mut sent = Vec::new();
        for (id, seq) in [("w", 5), ("w1", 5), ("w10", 5), ("w", 6), ("w1", 7)] {
            f.worker_id = id.into();
            f.seq = seq;
            let b = f.encode(b"k").unwrap();
            let got = ing.accept_ref(&b, NOW).map(|r| r.to_frame());
            assert_eq!(got, Ok(f.clone()), "{id} seq {seq}");
            sent.push(b);
        }
        for b in &sent {
            assert_eq!(ing.accept_ref(b, NOW).err(), Some(DropReason::Replay), "a replay");
        }
        // Reordered: "w1" seq 6 after seq 7; "w10" seq 6 is news for it.
        f.worker_id = "w1".into();
        f.seq = 6;
        assert_eq!(ing.accept_ref(&f.encode(b"k").unwrap(), NOW).err(), Some(DropReason::Replay));
        f.worker_id = "w10".into();
        assert!(ing.accept_ref(&f.encode(b"k").unwrap(), NOW).is_ok());
        assert_eq!((ing.tracked(), ing.counters().accepted, ing.counters().dropped(DropReason::Replay)), (3, 6, 6));
    }

    #[test]
    fn forged_frame_does_not_advance_sequence() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        f.seq = 1_000;
        assert_eq!(ing.accept(&f.encode(b"evil").unwrap(), NOW), Err(DropReason::BadMac));
        f.seq = 1;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    }

    /// The captured sequence from the fuzzer: two boots with the same send time, replayed in
    /// turn. Each frame must be accepted at most once, and nothing older than an accepted frame.
    #[test]
    fn alternating_boots_with_equal_send_times_are_not_replayed() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        f.boot_id = 255;
        f.seq = 1;
        let a = f.encode(b"k").unwrap();
        f.boot_id = 65;
        let b = f.encode(b"k").unwrap();
        f.seq = 2;
        f.sent_ms = NOW - 1_000;
        let c = f.encode(b"k").unwrap();
        assert!(ing.accept(&a, NOW).is_ok());
        assert_eq!(ing.accept(&b, NOW), Err(DropReason::Replay), "B is older in the order than A");
        assert_eq!(ing.accept(&c, NOW), Err(DropReason::Replay));
        assert_eq!(ing.accept(&a, NOW), Err(DropReason::Replay), "A accepted twice");
        assert_eq!(ing.counters().accepted, 1);
    }

    /// Within one boot a frame sent earlier than an accepted one is older, whatever its seq:
    /// otherwise it re-opens the door for the boot that came before it.
    #[test]
    fn same_boot_frame_sent_earlier_is_replay() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
        f.seq += 1;
        f.sent_ms = NOW - 1;
        assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::Replay));
    }

    /// After a future-dated frame (the worker's clock ran 4.9 s ahead), a restart whose clock is
    /// right is dropped only until its clock passes that frame: a bounded stall, never a lockout.
    #[test]
    fn restart_after_future_dated_frame_is_accepted_once_its_clock_passes_it() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW + 4_900;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
        f.boot_id = 1;
        f.seq = 1;
        let mut t = NOW + 500;
        let mut first_ok = None;
        while t < NOW + 2 * DEFAULT_MAX_SKEW_MS + 1_000 {
            f.sent_ms = t;
            f.seq += 1;
            if ing.accept(&f.encode(b"k").unwrap(), t).is_ok() {
                first_ok = Some(t);
                break;
            }
            t += 500;
        }
        assert_eq!(first_ok, Some(NOW + 5_000));
    }

    /// Forgetting a worker must not forget what it sent while those frames can still pass the
    /// skew check: a forgotten worker's last frame replayed a moment later is still a replay.
    #[test]
    fn forgetting_a_worker_keeps_its_order_while_replays_could_pass_the_skew_check() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        let b = f.encode(b"k").unwrap();
        assert!(ing.accept(&b, NOW).is_ok());
        ing.retain(NOW + 100, |_| false);
        assert_eq!(ing.accept(&b, NOW + 200), Err(DropReason::Replay));
        ing.retain(NOW + DEFAULT_MAX_SKEW_MS + 1, |_| false);
        assert_eq!(ing.accept(&b, NOW + DEFAULT_MAX_SKEW_MS + 2), Err(DropReason::ClockSkew));
        assert!(ing.last.is_empty(), "state is dropped once no replay can pass the skew check");
    }

    mod replay_model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        const SKEW: u64 = DEFAULT_MAX_SKEW_MS;

        /// What happens next, to the worker, the network or the attacker.
        #[derive(Debug, Clone)]
        enum Op {
            /// Time passes (ms).
            Wait(u64),
            /// The worker sends a frame; the attacker captures it; `delivered` says whether the
            /// network delivers it now or loses (or withholds) it.
            Send { delivered: bool },
            /// The sidecar restarts with a new boot id and a clock off by `offset` ms.
            Restart { boot: u64, offset: i64 },
            /// The worker's clock is stepped (NTP) to `offset` ms, same boot.
            Step { offset: i64 },
            /// The attacker sends any frame captured so far.
            Replay(prop::sample::Index),
        }

        fn op() -> impl Strategy<Value = Op> {
            let off = -(SKEW as i64)..=SKEW as i64;
            prop_oneof![
                4 => (1u64..3_000).prop_map(Op::Wait),
                4 => any::<bool>().prop_map(|delivered| Op::Send { delivered }),
                1 => (prop_oneof![0u64..4, any::<u64>()], off.clone()).prop_map(|(boot, offset)| Op::Restart { boot, offset }),
                1 => off.prop_map(|offset| Op::Step { offset }),
                4 => any::<prop::sample::Index>().prop_map(Op::Replay),
            ]
        }

        fn key(f: &Frame) -> (u64, u64, u64) {
            (f.sent_ms, f.boot_id, f.seq)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever the interleaving of boots, clock jumps, losses and replays: no frame is
            /// accepted twice, every accepted frame is newer in the order than all accepted
            /// before it, and a genuine frame sent more than 2 x skew after the worker's last
            /// restart or clock step is accepted.
            #[test]
            fn no_replay_and_restart_is_accepted_within_bound(ops in proptest::collection::vec(op(), 1..120),
                                                               offset0 in -(SKEW as i64)..=SKEW as i64) {
                let mut ing = ingest();
                let mut now = NOW;
                let (mut boot, mut seq, mut offset, mut changed_at) = (7u64, 0u64, offset0, NOW);
                let mut captured: Vec<Vec<u8>> = Vec::new();
                let mut accepted: HashSet<Vec<u8>> = HashSet::new();
                let mut newest: Option<(u64, u64, u64)> = None;
                let mut f = sample();
                for op in ops {
                    let (bytes, genuine_now) = match op {
                        Op::Wait(ms) => { now += ms; continue; }
                        Op::Restart { boot: b, offset: o } => { boot = b; seq = 0; offset = o; changed_at = now; continue; }
                        Op::Step { offset: o } => { offset = o; changed_at = now; continue; }
                        Op::Send { delivered } => {
                            seq += 1;
                            f.boot_id = boot;
                            f.seq = seq;
                            f.sent_ms = now.saturating_add_signed(offset);
                            let b = f.encode(b"k").unwrap();
                            captured.push(b.clone());
                            // One frame per millisecond at most, as a real sidecar.
                            now += 1;
                            if !delivered { continue; }
                            (b, true)
                        }
                        Op::Replay(i) => {
                            if captured.is_empty() { continue; }
                            (captured[i.index(captured.len())].clone(), false)
                        }
                    };
                    let rx = if genuine_now { now - 1 } else { now };
                    match ing.accept(&bytes, rx) {
                        Ok(fr) => {
                            prop_assert!(accepted.insert(bytes), "frame accepted twice: {:?}", key(&fr));
                            if let Some(n) = newest {
                                prop_assert!(key(&fr) > n, "accepted {:?} after newer {:?}", key(&fr), n);
                            }
                            newest = Some(key(&fr));
                        }
                        Err(r) => {
                            prop_assert!(matches!(r, DropReason::Replay | DropReason::ClockSkew), "{r:?}");
                            prop_assert!(!(genuine_now && rx > changed_at + 2 * SKEW),
                                         "genuine frame {}ms after the last restart or clock step dropped: {r:?}", rx - changed_at);
                        }
                    }
                }
            }
        }
    }
}
