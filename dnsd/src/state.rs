//! The state shared by dnsd's tasks: authenticated ingest feeding the fleet state.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use gpuha_liveness::{DropReason, FleetState, FleetView, Frame, Ingest, IngestCounters, KeyRing};

/// Milliseconds since the Unix epoch: the only clock dnsd reads; everything below takes `now_ms`.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Inner {
    ingest: Ingest,
    fleet: FleetState,
}

/// Ingest and fleet behind one lock: a frame is decoded, ordered and applied atomically.
#[derive(Debug)]
pub struct AppState {
    inner: Mutex<Inner>,
    forget_after_ms: u64,
    pub started_ms: u64,
}

impl AppState {
    pub fn new(keys: KeyRing, max_skew_ms: u64, forget_after_ms: u64, started_ms: u64) -> Self {
        AppState {
            inner: Mutex::new(Inner {
                ingest: Ingest::new(keys).with_max_skew_ms(max_skew_ms),
                fleet: FleetState::new(started_ms),
            }),
            forget_after_ms,
            started_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping ingest would: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one datagram received at `now_ms`.
    pub fn ingest(&self, bytes: &[u8], now_ms: u64) -> Result<(), DropReason> {
        let mut g = self.lock();
        let frame: Frame = g.ingest.accept(bytes, now_ms)?;
        g.fleet.observe(frame, now_ms);
        Ok(())
    }

    pub fn counters(&self) -> IngestCounters {
        self.lock().ingest.counters().clone()
    }

    pub fn view(&self, now_ms: u64) -> FleetView {
        self.lock().fleet.view(now_ms)
    }

    /// Runs `f` with the fleet state (for the DNS tier's answers).
    pub fn with_fleet<R>(&self, f: impl FnOnce(&FleetState) -> R) -> R {
        f(&self.lock().fleet)
    }

    /// Forgets workers silent for longer than the configured time.
    pub fn housekeeping(&self, now_ms: u64) {
        let mut g = self.lock();
        if g.fleet.forget_silent(now_ms, self.forget_after_ms) > 0 {
            let Inner { ingest, fleet } = &mut *g;
            ingest.retain(|id| fleet.worker(id).is_some());
        }
    }
}
