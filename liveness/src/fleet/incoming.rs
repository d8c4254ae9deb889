//! What [`super::FleetState`] records: an owned frame, or one borrowed from its datagram.

use crate::frame::{Frame, FrameRef, Metrics};

/// A frame [`super::FleetState`] records: owned (moved in) or borrowed from its datagram (copied into
/// the worker's state, reusing its allocations).
pub(super) trait Incoming {
    fn worker_id(&self) -> &str;
    fn pool_id(&self) -> &str;
    fn boot_id(&self) -> u64;
    fn sent_ms(&self) -> u64;
    fn metrics(&self) -> &Metrics;
    /// Makes `dst`, a frame of the same worker id, equal to this frame.
    fn store(self, dst: &mut Frame);
    fn into_frame(self) -> Frame;
}

impl Incoming for Frame {
    fn worker_id(&self) -> &str {
        &self.worker_id
    }
    fn pool_id(&self) -> &str {
        &self.pool_id
    }
    fn boot_id(&self) -> u64 {
        self.boot_id
    }
    fn sent_ms(&self) -> u64 {
        self.sent_ms
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn store(self, dst: &mut Frame) {
        *dst = self;
    }
    fn into_frame(self) -> Frame {
        self
    }
}

impl Incoming for &FrameRef<'_> {
    fn worker_id(&self) -> &str {
        self.worker_id
    }
    fn pool_id(&self) -> &str {
        self.pool_id
    }
    fn boot_id(&self) -> u64 {
        self.boot_id
    }
    fn sent_ms(&self) -> u64 {
        self.sent_ms
    }
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    fn store(self, dst: &mut Frame) {
        // `dst` is the state of the worker this frame was looked up by.
        self.assign_to_same_worker(dst);
    }
    fn into_frame(self) -> Frame {
        self.to_frame()
    }
}

#[cfg(test)]
mod tests {
    use crate::fleet::{FleetState, WorkerState};
    use crate::frame::tests::sample;
    use crate::frame::{Frame, FrameRef, KeyRing};
    use proptest::prelude::*;
    use std::sync::Arc;

    const T0: u64 = 1_800_000_000_000;
    const NAMES: [&str; 4] = ["tiny", "meta-llama/Llama-3.1-8B-Instruct", "sql-lora", "x"];

    fn names(mask: u8) -> Vec<String> {
        NAMES.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, n)| (*n).to_owned()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Recording a frame borrowed from its datagram leaves the fleet exactly as recording
        /// the owned frame does, and says the same about when pool liveness may change: through
        /// restarts, pool moves, changed model and adapter lists, idle and frozen engines, and
        /// with snapshots sharing the workers' states (which keep what they saw).
        #[test]
        fn borrowed_frames_record_what_owned_frames_do(
            events in proptest::collection::vec((0u8..3, 0u8..2, 0u8..2, 0u8..16, 0u8..16, 0u8..3, 0u64..12_000, any::<bool>()), 1..40)
        ) {
            let ring = KeyRing::single(1, b"k".to_vec());
            let (mut owned, mut borrowed) = (FleetState::new(T0), FleetState::new(T0));
            let mut snapshots: Vec<(Vec<Arc<WorkerState>>, Vec<WorkerState>)> = Vec::new();
            let (mut now, mut seq) = (T0, 0u64);
            for (worker, pool, boot, models, adapters, engine, dt, snap) in events {
                now += dt;
                seq += 1;
                let mut f: Frame = sample();
                f.worker_id = format!("worker-{worker}");
                f.pool_id = format!("pool-{pool}");
                f.boot_id = u64::from(boot);
                f.seq = seq;
                f.sent_ms = now;
                f.models = names(models);
                f.adapters = names(adapters);
                match engine {
                    0 => f.metrics.engine_steps = Some(seq as f64),
                    1 => (f.metrics.running, f.metrics.waiting) = (Some(0.0), Some(0.0)),
                    _ => {}
                }
                let bytes = f.encode(b"k").unwrap();
                let r = FrameRef::decode(&bytes, &ring).unwrap();
                prop_assert_eq!(owned.observe_tracked(f, now), borrowed.observe_ref(&r, now));
                for id in 0..3 {
                    let id = format!("worker-{id}");
                    prop_assert_eq!(owned.worker(&id), borrowed.worker(&id));
                }
                if snap {
                    let shared = borrowed.snapshot();
                    let copy = shared.iter().map(|w| (**w).clone()).collect();
                    snapshots.push((shared, copy));
                }
            }
            prop_assert_eq!(owned.len(), borrowed.len());
            for (shared, copy) in snapshots {
                let now: Vec<WorkerState> = shared.iter().map(|w| (**w).clone()).collect();
                prop_assert_eq!(now, copy, "a snapshot changed after it was taken");
            }
        }
    }
}
