//! Authenticated ingest: turns datagrams into accepted frames, dropping (and counting) forged,
//! garbled, replayed and badly timed ones. A dropped datagram changes nothing else.

use std::collections::HashMap;

use crate::frame::{Frame, FrameError, KeyRing};

/// Frames whose send time is further than this from the receive time are dropped.
pub const DEFAULT_MAX_SKEW_MS: u64 = 5_000;

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
    /// Same boot id and a sequence number not newer than one already accepted, or an older boot.
    Replay,
    /// Send time too far from the receive time (stale capture or a broken clock).
    ClockSkew,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::UnsupportedVersion,
        DropReason::UnknownKey,
        DropReason::BadMac,
        DropReason::Replay,
        DropReason::ClockSkew,
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
    dropped: [u64; 6],
}

impl IngestCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

#[derive(Debug, Clone, Copy)]
struct Last {
    boot_id: u64,
    seq: u64,
    sent_ms: u64,
}

/// Decode + authenticate + order. Holds, per worker id, the newest accepted (boot, seq).
#[derive(Debug)]
pub struct Ingest {
    keys: KeyRing,
    max_skew_ms: u64,
    last: HashMap<String, Last>,
    counters: IngestCounters,
}

impl Ingest {
    pub fn new(keys: KeyRing) -> Self {
        Ingest { keys, max_skew_ms: DEFAULT_MAX_SKEW_MS, last: HashMap::new(), counters: IngestCounters::default() }
    }

    pub fn with_max_skew_ms(mut self, ms: u64) -> Self {
        self.max_skew_ms = ms;
        self
    }

    pub fn counters(&self) -> &IngestCounters {
        &self.counters
    }

    /// Accepts one datagram received at `now_ms`, or says why it was dropped.
    pub fn accept(&mut self, bytes: &[u8], now_ms: u64) -> Result<Frame, DropReason> {
        let r = self.check(bytes, now_ms);
        match &r {
            Ok(_) => self.counters.accepted += 1,
            Err(reason) => self.counters.dropped[reason.index()] += 1,
        }
        r
    }

    fn check(&mut self, bytes: &[u8], now_ms: u64) -> Result<Frame, DropReason> {
        let frame = Frame::decode(bytes, &self.keys).map_err(|e| DropReason::from(&e))?;
        if frame.sent_ms.abs_diff(now_ms) > self.max_skew_ms {
            return Err(DropReason::ClockSkew);
        }
        if let Some(last) = self.last.get(&frame.worker_id) {
            let replay = if frame.boot_id == last.boot_id {
                frame.seq <= last.seq
            } else {
                // A new boot id is a restart only if it is newer than what we hold; otherwise an
                // old boot's frame is being played back at us.
                frame.sent_ms < last.sent_ms
            };
            if replay {
                return Err(DropReason::Replay);
            }
        }
        self.last.insert(
            frame.worker_id.clone(),
            Last { boot_id: frame.boot_id, seq: frame.seq, sent_ms: frame.sent_ms },
        );
        Ok(frame)
    }

    /// Forgets ordering state for workers not in `keep` (called when the fleet forgets them).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.last.retain(|k, _| keep(k));
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
    fn forged_frame_does_not_advance_sequence() {
        let mut ing = ingest();
        let mut f = sample();
        f.sent_ms = NOW;
        f.seq = 1_000;
        assert_eq!(ing.accept(&f.encode(b"evil").unwrap(), NOW), Err(DropReason::BadMac));
        f.seq = 1;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    }
}
