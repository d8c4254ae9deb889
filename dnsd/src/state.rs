//! The state shared by dnsd's tasks: authenticated ingest feeding the fleet state.
//!
//! **One lock, and who may hold it.** Ingest and the DNS tier's outlook refresh take the lock
//! that guards the fleet; nothing whose cost a client controls runs under it. HTTP readers
//! (`/v1/fleet`, `/metrics`) work from a [`FleetSnapshot`]: a shared copy of every worker's
//! state, taken under the lock at O(workers) reference counts and at most once per
//! [`SNAPSHOT_DUTY`] times its own cost, then read by any number of requests without it.
//! Measured before the split (5 000 workers, 4 clients each naming 1 000 pools in `pool=`): DNS
//! p99 382 ms, while the filter of each query ran under this lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuha_liveness::fleet::{view_of_workers, WorkerState};
use gpuha_liveness::{Ages, DropReason, FleetState, FleetView, Ingest, IngestCounters, KeyRing, PoolOutlook};

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

/// A new [`FleetSnapshot`] is taken no sooner than this many times the previous one's cost after
/// it: taking snapshots holds the ingest lock at most 1/20 of the time, however many readers
/// ask. A small fleet is copied in microseconds, so its readers see every frame at once; 20 000
/// workers cost about a millisecond, so their views are at most a few tens of ms behind.
pub const SNAPSHOT_DUTY: u32 = 20;

/// Every worker's state at one instant, shared with the fleet (see the module docs).
#[derive(Debug, Default)]
pub struct FleetSnapshot {
    workers: Vec<Arc<WorkerState>>,
    /// [`AppState`]'s generation when it was taken: it is current while that has not moved.
    generation: u64,
}

impl FleetSnapshot {
    /// [`FleetState::view_of`] of the snapshot's workers. Ages count to `now_ms` from the
    /// snapshot's evidence of life, so a view from a snapshot a little behind the frames
    /// overstates ages by that much, never understates them: no worker is kept past the gate.
    pub fn view_of(&self, now_ms: u64, pools: &[String], ages: Ages) -> FleetView {
        view_of_workers(self.workers.iter().map(|w| &**w), now_ms, pools, ages)
    }

    /// The snapshot's workers.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerState> {
        self.workers.iter().map(|w| &**w)
    }

    /// Workers known, and how many of them are fresh at `now_ms`.
    pub fn fresh_of(&self, now_ms: u64) -> (usize, usize) {
        (self.workers.len(), self.workers.iter().filter(|w| w.is_fresh(now_ms)).count())
    }
}

#[derive(Debug)]
struct SnapshotClock {
    /// No new snapshot before this instant (see [`SNAPSHOT_DUTY`]).
    not_before: Option<Instant>,
}

/// Ingest and fleet behind one lock: a frame is decoded, ordered and applied atomically.
#[derive(Debug)]
pub struct AppState {
    inner: Mutex<Inner>,
    /// Moved (under the lock) by every change to the fleet: whether the snapshot is current.
    generation: AtomicU64,
    snapshot: RwLock<Arc<FleetSnapshot>>,
    /// Serialises taking snapshots, so readers that find it stale wait here, not on the lock.
    snapshot_clock: Mutex<SnapshotClock>,
    forget_after_ms: u64,
    /// Worker ids tracked at most (`ingest.max_workers`).
    pub max_workers: usize,
    pub started_ms: u64,
}

impl AppState {
    pub fn new(keys: KeyRing, max_skew_ms: u64, forget_after_ms: u64, max_workers: usize, started_ms: u64) -> Self {
        AppState {
            inner: Mutex::new(Inner {
                ingest: Ingest::new(keys).with_max_skew_ms(max_skew_ms).with_max_workers(max_workers),
                fleet: FleetState::new(started_ms),
                watches: Vec::new(),
            }),
            generation: AtomicU64::new(0),
            snapshot: RwLock::new(Arc::new(FleetSnapshot::default())),
            snapshot_clock: Mutex::new(SnapshotClock { not_before: None }),
            forget_after_ms,
            max_workers,
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
        let Inner { ingest, fleet, watches } = &mut *g;
        let frame = ingest.accept_ref(bytes, now_ms)?;
        let changed = fleet.observe_ref(&frame, now_ms);
        self.generation.fetch_add(1, Ordering::Release);
        if changed != u64::MAX {
            for w in watches.iter() {
                w.fetch_min(changed, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Handles datagrams received together at `now_ms` under one lock; `dropped` hears of each
    /// one refused (its sender and why). Frames are applied in order, as one by one.
    pub fn ingest_batch<'a>(&self, datagrams: impl Iterator<Item = (&'a [u8], Option<std::net::SocketAddr>)>, now_ms: u64, mut dropped: impl FnMut(Option<std::net::SocketAddr>, DropReason)) {
        let mut g = self.lock();
        let Inner { ingest, fleet, .. } = &mut *g;
        let mut earliest = u64::MAX;
        let mut any = false;
        for (bytes, from) in datagrams {
            // Strings borrowed from the datagram: a known worker's frame allocates nothing.
            match ingest.accept_ref(bytes, now_ms) {
                Ok(frame) => {
                    earliest = earliest.min(fleet.observe_ref(&frame, now_ms));
                    any = true;
                }
                Err(reason) => dropped(from, reason),
            }
        }
        if any {
            self.generation.fetch_add(1, Ordering::Release);
        }
        if earliest != u64::MAX {
            for w in &g.watches {
                w.fetch_min(earliest, Ordering::AcqRel);
            }
        }
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

    /// Replaces the frame keys (a reload).
    pub fn set_keys(&self, keys: KeyRing) {
        self.lock().ingest.set_keys(keys);
    }

    pub fn counters(&self) -> IngestCounters {
        self.lock().ingest.counters().clone()
    }

    /// The fleet view at `now_ms`, from the latest snapshot ([`Self::snapshot`]).
    pub fn view(&self, now_ms: u64) -> FleetView {
        self.snapshot().view_of(now_ms, &[], Ages::Exact)
    }

    /// The latest [`FleetSnapshot`]: current, unless frames arrived since and the previous one
    /// was taken too recently ([`SNAPSHOT_DUTY`]). Readers build views from it without the lock.
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        let latest = || self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone();
        let current = latest();
        if current.generation == self.generation.load(Ordering::Acquire) {
            return current;
        }
        let mut clock = self.snapshot_clock.lock().unwrap_or_else(|e| e.into_inner());
        // Another reader may have taken one while this one waited.
        let current = latest();
        if current.generation == self.generation.load(Ordering::Acquire) || clock.not_before.is_some_and(|t| Instant::now() < t) {
            return current;
        }
        let (snap, cost) = {
            let g = self.lock();
            // The cost of the copy itself, not of waiting for the lock.
            let t0 = Instant::now();
            let snap = Arc::new(FleetSnapshot { workers: g.fleet.snapshot(), generation: self.generation.load(Ordering::Acquire) });
            (snap, t0.elapsed())
        };
        clock.not_before = Some(Instant::now() + cost.saturating_mul(SNAPSHOT_DUTY).min(Duration::from_secs(1)));
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snap.clone();
        snap
    }

    /// Runs `f` with the fleet state, under the ingest lock: for tests and tools, never for a
    /// request path (see the module docs).
    pub fn with_fleet<R>(&self, f: impl FnOnce(&FleetState) -> R) -> R {
        f(&self.lock().fleet)
    }

    /// Forgets workers silent for longer than the configured time.
    pub fn housekeeping(&self, now_ms: u64) {
        let mut g = self.lock();
        if g.fleet.forget_silent(now_ms, self.forget_after_ms) > 0 {
            self.generation.fetch_add(1, Ordering::Release);
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
