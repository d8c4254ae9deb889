//! Requests in flight from this router to each worker, and what they add to the load a
//! worker's last frame reported.
//!
//! A frame is up to a poll interval plus a sidecar interval old; requests sent since then are
//! not in its numbers. Counting *sends* since the frame over-counts (a request that already
//! finished still counts, so a busy worker looks busier than it is, the more so the shorter its
//! requests). So the picker counts **attempts in flight**: one started when it lists a worker
//! first, ended when the request is done (the picker's `on_done`, which Envoy calls for every
//! stream). The count lives in one shared-data slot per worker ([`Flights`]) so that every
//! Envoy thread sees every thread's requests.
//!
//! Robustness: each request is counted in the bucket of its start time ([`BUCKET_MS`]); its end
//! decrements that bucket, saturating at zero, so counts never go negative (an end whose start
//! was never counted, or was expired, changes nothing). A missed end (a Wasm VM that died with
//! requests in flight) can leak a count, but only:
//! * until the next frame: in-flight requests started well before a frame was taken must be in
//!   that frame's `running + waiting` (or be done at the engine), so the estimate caps the older
//!   part by the frame's numbers ([`Flights::estimate`]);
//! * and at most `max_age_ms`: older buckets are dropped (a stream running longer than that
//!   stops counting; a frame still shows it).
//!
//! The bucket list is bounded ([`MAX_BUCKETS`]), 12 bytes a bucket.

/// Width of a start-time bucket.
pub const BUCKET_MS: u64 = 1_000;
/// Buckets kept per worker; the oldest go first beyond this.
pub const MAX_BUCKETS: usize = 600;
/// Requests started this long before a frame was taken are in that frame's numbers if they are
/// at the engine at all (covers upload and proxy time).
pub const FRAME_SLACK_MS: u64 = 2_000;

/// One worker's in-flight requests by start-time bucket (bucket id = start / [`BUCKET_MS`]),
/// ascending ids, no zero counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flights {
    buckets: Vec<(u64, u32)>,
}

impl Flights {
    /// A slot's bytes: 12-byte records (bucket id u64 LE, count u32 LE). Unreadable records
    /// (a short tail, out-of-order ids, zero counts) are dropped, never a panic.
    pub fn decode(b: &[u8]) -> Flights {
        let mut buckets: Vec<(u64, u32)> = Vec::with_capacity(b.len() / 12);
        for r in b.chunks_exact(12) {
            let mut id = [0u8; 8];
            let mut n = [0u8; 4];
            id.copy_from_slice(&r[..8]);
            n.copy_from_slice(&r[8..]);
            let (id, n) = (u64::from_le_bytes(id), u32::from_le_bytes(n));
            if n > 0 && buckets.last().is_none_or(|l| l.0 < id) && buckets.len() < MAX_BUCKETS {
                buckets.push((id, n));
            }
        }
        Flights { buckets }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.buckets.len() * 12);
        for (id, n) in &self.buckets {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        b
    }

    /// Drops buckets older than `max_age_ms`.
    fn expire(&mut self, now_ms: u64, max_age_ms: u64) {
        let oldest = now_ms.saturating_sub(max_age_ms) / BUCKET_MS;
        self.buckets.retain(|(id, _)| *id >= oldest);
    }

    /// A request started at `now_ms`.
    pub fn start(&mut self, now_ms: u64, max_age_ms: u64) {
        self.expire(now_ms, max_age_ms);
        let id = now_ms / BUCKET_MS;
        match self.buckets.binary_search_by_key(&id, |b| b.0) {
            Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(1),
            Err(i) => {
                self.buckets.insert(i, (id, 1));
                if self.buckets.len() > MAX_BUCKETS {
                    self.buckets.remove(0);
                }
            }
        }
    }

    /// The request started at `started_ms` ended (at `now_ms`). Saturating: never below zero.
    pub fn end(&mut self, started_ms: u64, now_ms: u64, max_age_ms: u64) {
        self.expire(now_ms, max_age_ms);
        let id = started_ms / BUCKET_MS;
        if let Ok(i) = self.buckets.binary_search_by_key(&id, |b| b.0) {
            self.buckets[i].1 -= 1;
            if self.buckets[i].1 == 0 {
                self.buckets.remove(i);
            }
        }
    }

    /// Requests in flight (started within `max_age_ms`).
    pub fn total(&self, now_ms: u64, max_age_ms: u64) -> u64 {
        let oldest = now_ms.saturating_sub(max_age_ms) / BUCKET_MS;
        self.buckets.iter().filter(|(id, _)| *id >= oldest).map(|(_, n)| u64::from(*n)).sum()
    }

    /// This router's load on the worker for the picker: its in-flight requests, those started
    /// more than [`FRAME_SLACK_MS`] before the frame taken at `frame_local_ms` capped by the
    /// frame's `running + waiting` (`frame_load`; they are in it, or done at the engine).
    pub fn estimate(&self, now_ms: u64, max_age_ms: u64, frame_local_ms: u64, frame_load: f64) -> f64 {
        let oldest = now_ms.saturating_sub(max_age_ms) / BUCKET_MS;
        let cut = frame_local_ms.saturating_sub(FRAME_SLACK_MS);
        let (mut old, mut recent) = (0u64, 0u64);
        for (id, n) in self.buckets.iter().filter(|(id, _)| *id >= oldest) {
            // The whole bucket started before the cut.
            if (id + 1).saturating_mul(BUCKET_MS) <= cut {
                old += u64::from(*n);
            } else {
                recent += u64::from(*n);
            }
        }
        let frame_load = if frame_load.is_finite() { frame_load.max(0.0) } else { 0.0 };
        (old as f64).min(frame_load) + recent as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AGE: u64 = 600_000;

    #[test]
    fn starts_and_ends_count_in_flight() {
        let mut f = Flights::default();
        f.start(10_000, AGE);
        f.start(10_500, AGE);
        f.start(12_000, AGE);
        assert_eq!(f.total(12_000, AGE), 3);
        f.end(10_500, 13_000, AGE);
        assert_eq!(f.total(13_000, AGE), 2);
        // An end that was never started (or already ended) changes nothing.
        f.end(50_000, 13_000, AGE);
        f.end(12_000, 13_000, AGE);
        f.end(12_000, 13_000, AGE);
        assert_eq!(f.total(13_000, AGE), 1);
        assert_eq!(Flights::decode(&f.encode()), f);
    }

    #[test]
    fn a_missed_end_expires_and_is_capped_by_the_next_frame() {
        let mut f = Flights::default();
        for _ in 0..5 {
            f.start(1_000, AGE);
        }
        // A frame taken 10 s later shows 1 request at the engine: the 5 cannot all be in flight.
        assert_eq!(f.estimate(11_000, AGE, 11_000, 1.0), 1.0);
        // Requests sent after the frame are not in it: counted in full.
        f.start(11_000, AGE);
        assert_eq!(f.estimate(11_000, AGE, 11_000, 1.0), 2.0);
        // After max_age the leaked ones are gone even without a frame.
        assert_eq!(f.total(1_000 + AGE + BUCKET_MS, AGE), 1);
    }

    #[test]
    fn bad_bytes_decode_to_something_bounded() {
        assert_eq!(Flights::decode(&[1, 2, 3]), Flights::default());
        let mut raw = Vec::new();
        for id in [5u64, 3, 7] {
            raw.extend_from_slice(&id.to_le_bytes());
            raw.extend_from_slice(&1u32.to_le_bytes());
        }
        raw.extend_from_slice(&9u64.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(Flights::decode(&raw).buckets, vec![(5, 1), (7, 1)]);
        let mut f = Flights::default();
        for t in 0..(MAX_BUCKETS as u64 + 50) {
            f.start(t * BUCKET_MS, u64::MAX);
        }
        assert_eq!(f.buckets.len(), MAX_BUCKETS);
    }

    proptest! {
        /// Any interleaving of starts and ends, some ends lost, ends with nothing in flight:
        /// the count is never negative, never above the requests started and not
        /// ended, and exact when every end arrives once (within max_age).
        #[test]
        fn never_negative_never_leaks_past_max_age(
            ops in proptest::collection::vec((0u64..20_000, 0u8..4), 0..200), max_age in 1_000u64..30_000,
        ) {
            let mut f = Flights::default();
            let mut live: Vec<u64> = Vec::new();
            let mut lost = 0usize;
            let mut now = 0u64;
            for (dt, op) in ops {
                now += dt / 10;
                match op {
                    0 | 1 => { f.start(now, max_age); live.push(now); }
                    2 if !live.is_empty() => {
                        let s = live.remove(0);
                        f.end(s, now, max_age);
                    }
                    // An end with nothing in flight: nothing to take (never below zero).
                    2 if f.buckets.is_empty() => f.end(now, now, max_age),
                    _ if !live.is_empty() => { live.remove(0); lost += 1; }
                    _ => {}
                }
                let counted = f.total(now, max_age);
                let oldest = now.saturating_sub(max_age) / BUCKET_MS;
                let young = live.iter().filter(|s| **s / BUCKET_MS >= oldest).count() as u64;
                prop_assert!(counted >= young, "{} < {}", counted, young);
                prop_assert!(counted <= young + lost as u64);
                if lost == 0 { prop_assert_eq!(counted, young); }
                prop_assert!(f.estimate(now, max_age, now, 0.0) >= 0.0);
                prop_assert_eq!(Flights::decode(&f.encode()), f.clone());
            }
            // Long after everything: nothing left, lost ends included.
            prop_assert_eq!(f.total(now + max_age + BUCKET_MS, max_age), 0);
        }
    }
}
