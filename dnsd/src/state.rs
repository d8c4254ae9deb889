//! The state shared by dnsd's tasks: authenticated ingest feeding the fleet state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use gpuha_liveness::{Ages, DropReason, FleetState, FleetView, Frame, Ingest, IngestCounters, KeyRing, PoolOutlook};

/// Milliseconds since the Unix epoch: the only clock dnsd reads; everything below takes `now_ms`.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Inner {
    ingest: Ingest,
    fleet: FleetState,
    /// One cell per [`OutlookWatch`]: the earliest instant at which pool liveness may differ
    /// from the watch's latest [`AppState::pool_outlook`]. Lowered by every frame, under this lock.
    watches: Vec<Arc<AtomicU64>>,
}

/// A reader of [`AppState::pool_outlook`] that is told, through [`OutlookValidity`], when
/// frames make its latest outlook stale.
#[derive(Debug, Clone, Copy)]
pub struct OutlookWatch(usize);

/// Whether a [`PoolOutlook`] taken from [`AppState::pool_outlook`] still holds.
#[derive(Debug)]
pub struct OutlookValidity {
    from: u64,
    /// The outlook's own end, lowered by frames that arrive after it was taken.
    until: Arc<AtomicU64>,
}

impl OutlookValidity {
    /// Whether the outlook's states are still the pools' states at `now_ms`. Lock-free.
    pub fn holds_at(&self, now_ms: u64) -> bool {
        self.from <= now_ms && now_ms < self.until.load(Ordering::Acquire)
    }
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
                watches: Vec::new(),
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
        let changed = g.fleet.observe_tracked(frame, now_ms);
        if changed != u64::MAX {
            for w in &g.watches {
                w.fetch_min(changed, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Registers a reader of [`Self::pool_outlook`].
    pub fn watch_outlook(&self) -> OutlookWatch {
        let mut g = self.lock();
        g.watches.push(Arc::new(AtomicU64::new(0)));
        OutlookWatch(g.watches.len() - 1)
    }

    /// [`FleetState::pool_outlook`] at `now_ms`, and a validity that frames arriving later
    /// shorten, so the caller can answer from the outlook without this lock until it lapses.
    /// A newer call for the same `watch` supersedes the previous validity (which then only
    /// lapses with time): callers keep the latest one.
    pub fn pool_outlook(&self, watch: OutlookWatch, pools: &[(&str, usize)], now_ms: u64) -> (PoolOutlook, OutlookValidity) {
        let mut g = self.lock();
        let outlook = g.fleet.pool_outlook(pools, now_ms);
        let until = Arc::new(AtomicU64::new(outlook.valid_until));
        if let Some(cell) = g.watches.get_mut(watch.0) {
            *cell = until.clone();
        }
        let validity = OutlookValidity { from: outlook.valid_from, until };
        (outlook, validity)
    }

    pub fn counters(&self) -> IngestCounters {
        self.lock().ingest.counters().clone()
    }

    pub fn view(&self, now_ms: u64) -> FleetView {
        self.lock().fleet.view(now_ms)
    }

    /// [`FleetState::view_of`]: the workers of `pools` (all when empty), ages as `ages` says.
    pub fn view_of(&self, now_ms: u64, pools: &[String], ages: Ages) -> FleetView {
        self.lock().fleet.view_of(now_ms, pools, ages)
    }

    /// Runs `f` with the fleet state (for the DNS tier's answers).
    pub fn with_fleet<R>(&self, f: impl FnOnce(&FleetState) -> R) -> R {
        f(&self.lock().fleet)
    }

    /// Forgets workers silent for longer than the configured time.
    pub fn housekeeping(&self, now_ms: u64) {
        let mut g = self.lock();
        if g.fleet.forget_silent(now_ms, self.forget_after_ms) > 0 {
            let Inner { ingest, fleet, watches } = &mut *g;
            ingest.retain(now_ms, |id| fleet.worker(id).is_some());
            // A forgotten worker may still have counted (forget_after_ms shorter than the
            // window): outlooks are taken again.
            for w in watches.iter() {
                w.store(0, Ordering::Release);
            }
        }
    }
}
