//! Fleet state: the latest accepted frame per worker, values derived between consecutive
//! frames, worker freshness (3 s gate) and pool liveness (10 s window); and [`FleetView`], the
//! compact snapshot that dnsd serves on `GET /v1/fleet` and the Envoy filter polls.
//!
//! (Over 500 lines on purpose: the fleet state and the view it serves change together — every
//! field a frame brings is derived, aged and published here; its tests are in `fleet/tests.rs`.)
//!
//! **Liveness is progress, not just frames.** A hung engine (a CUDA or NCCL hang, a wedged
//! device) is not silent: vLLM's API server keeps answering `/metrics` with frozen counters and
//! its requests still counted as running. So a worker's age is the time since its last
//! *evidence of life*: a frame that shows progress (engine steps, generated or prompt tokens
//! advanced since the previous frame) or that shows it idle (nothing running or waiting: an
//! idle worker is never stalled). A busy worker whose counters stop ages exactly like a silent
//! one: no new requests after the 3 s gate, out of its pool's count after the 10 s window. A
//! worker whose frames carry none of the counters cannot be judged this way and counts every
//! frame (no data is not death). Which numbers, and why KV-cache usage among them (the only one
//! that moves during a long chunked prefill): [`evidence`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, FrameRef, Metrics};

mod incoming;
use crate::worker_key::WorkerKey;
use incoming::Incoming;
use crate::{EVICTION_WINDOW_MS, FRESHNESS_GATE_MS};

/// Frozen frames make a stall only once they span this long after the last frame that showed
/// life ([`WorkerState::is_stalled`]): most of one 500 ms scrape interval, so that answers to
/// overlapping scrapes arriving together are one snapshot, not a freeze.
pub const FROZEN_MIN_MS: u64 = 400;

/// A worker back from silence (or new) counts towards its pool's liveness only after sending
/// for this long. It keeps a pool from flapping on one stray frame, and it gives every Envoy
/// picker (which polls the fleet view every 250 ms) time to see the worker fresh before DNS
/// sends clients to its router: without it a client that follows the failback answer at once
/// can reach a router whose view still has no fresh worker.
pub const FAILBACK_HOLD_DOWN_MS: u64 = 1_000;

/// Values derived from two consecutive frames of the same boot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Derived {
    /// Mean time to first token of the requests that finished their first token between the
    /// two frames, from the histogram's `_sum`/`_count` deltas. Kept until a newer one exists.
    pub ttft_recent_ms: Option<f64>,
    /// Generated tokens per second between the two frames.
    pub gen_tps: Option<f64>,
    /// Prompt tokens per second between the two frames.
    pub prompt_tps: Option<f64>,
    /// Decode pace: generated tokens per second per running sequence, smoothed over frames
    /// (exponential average, [`PACE_SMOOTHING`]); what gray failures are judged by.
    pub pace: Option<f64>,
}

/// Weight of the newest frame pair in [`Derived::pace`].
pub const PACE_SMOOTHING: f64 = 0.25;

/// What the fleet knows about one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerState {
    pub frame: Frame,
    /// When the newest accepted frame was received (receiver's clock).
    pub last_rx_ms: u64,
    /// When the newest frame that showed progress or an idle engine was received ([`evidence`]):
    /// what keeps the worker in its pool's window. Equal to `last_rx_ms` unless the engine is stuck.
    pub last_progress_ms: u64,
    /// The last sure evidence of life, what the worker's age counts from (freshness, stall, the
    /// view's age): `last_progress_ms`, except for counters that moved across a silence past the
    /// gate, which moved at an unknown instant after the frame before it ([`life_ms`]).
    pub life_ms: u64,
    /// When the current run of frames began: the first frame after the worker was out of the
    /// eviction window (or new). Failback waits for [`FAILBACK_HOLD_DOWN_MS`] of it.
    pub streak_start_ms: u64,
    pub derived: Derived,
}

impl WorkerState {
    fn new(frame: Frame, now_ms: u64, streak_start_ms: u64) -> Self {
        WorkerState { frame, last_rx_ms: now_ms, last_progress_ms: now_ms, life_ms: now_ms, streak_start_ms, derived: Derived::default() }
    }

    /// Time since the last sure evidence of life (`life_ms`): frames that show progress or an
    /// idle engine.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.life_ms)
    }

    /// A hang with `/metrics` still answering: no sure sign of life for longer than the
    /// freshness gate, and the newest frame showed the busy engine frozen; either that frame is
    /// within the gate, or frozen frames kept coming for longer than the gate after the last
    /// frame that showed life, which no silence since undoes: a hung engine whose `/metrics`
    /// then went unanswered too (the real CPU build: frozen frames for seconds, then none for
    /// 9 s) is still hung, and the guard's stall clock keeps running through the silence.
    ///
    /// A frame whose counters moved is never a stall, even when it is dated at the frame
    /// before ([`life_ms`]): a live engine whose telemetry comes in bursts seconds apart (a busy
    /// host's `/metrics`) is unsure, not hung (not fresh, not stalled: silent), and the guard
    /// moves none of its requests. One frozen frame and then silence is silence.
    ///
    /// Frozen means frozen over time: the frozen frames must span [`FROZEN_MIN_MS`] from the
    /// last frame that showed life (`last_progress_ms`; the newest frame is frozen exactly when
    /// it came after that one). A busy `/metrics` that answers several overlapping scrapes at
    /// once (the sidecar keeps up to 8 in flight) gives frames milliseconds apart with the same
    /// numbers: one snapshot, not a freeze.
    pub fn is_stalled(&self, now_ms: u64) -> bool {
        let since_frame = now_ms.saturating_sub(self.last_rx_ms);
        let frozen_for = self.last_rx_ms.saturating_sub(self.last_progress_ms);
        self.age_ms(now_ms) > FRESHNESS_GATE_MS
            && ((since_frame <= FRESHNESS_GATE_MS && frozen_for >= FROZEN_MIN_MS) || frozen_for > FRESHNESS_GATE_MS)
    }

    /// Fresh workers may get new requests.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) <= FRESHNESS_GATE_MS
    }

    /// Time since the newest accepted frame, whatever it showed.
    pub fn since_frame_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_rx_ms)
    }

    /// What an operator is told about this worker: one of three, by the freshness gate.
    pub fn condition(&self, now_ms: u64) -> Condition {
        if self.is_fresh(now_ms) {
            Condition::Alive
        } else if self.is_stalled(now_ms) {
            Condition::Stalled
        } else {
            Condition::Silent
        }
    }

    /// Heard from within the pool eviction window: a frame that showed progress or an idle
    /// engine, dated at its arrival (`last_progress_ms`). Not the sure age: a worker whose
    /// telemetry comes in bursts seconds apart (a busy host's `/metrics`) keeps its pool.
    pub fn is_in_window(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_progress_ms) <= EVICTION_WINDOW_MS
    }

    /// In the window, and has been sending for at least the failback hold-down.
    pub fn counts_for_pool(&self, now_ms: u64) -> bool {
        self.is_in_window(now_ms) && now_ms.saturating_sub(self.streak_start_ms) >= FAILBACK_HOLD_DOWN_MS
    }

    /// The instants `[from, to]` (inclusive) at which [`Self::counts_for_pool`] holds: from the
    /// end of the hold-down to the end of the window. `from > to` when it never holds.
    pub fn counting_span(&self) -> (u64, u64) {
        (
            self.streak_start_ms.saturating_add(FAILBACK_HOLD_DOWN_MS),
            self.last_progress_ms.saturating_add(EVICTION_WINDOW_MS),
        )
    }
}

/// When the last sure evidence of life was, once a frame that is evidence of life
/// ([`evidence`]) arrives at `now_ms`: the frame before it arrived at `prev_rx_ms`, and the
/// last sure evidence before was at `life_ms`. Its arrival, unless its only evidence is counters
/// that moved (`moved`: the engine busy, its numbers changed) after a silence past the
/// freshness gate: they moved at some instant after the frame before, unknown, so the frame
/// before is the last sure sign. A hung engine whose telemetry went quiet shows, in its first
/// frame back, the tokens it made before it hung; dated at that frame's arrival it was fresh
/// again for 3 s and its streams' stall clock started over (the streams ended 22 s after the
/// hang, not 13). A live engine shows progress again in its next frame (500 ms later); an idle
/// one, or a frame with nothing to judge by, is dated at its arrival.
pub fn life_ms(prev_rx_ms: u64, life_ms: u64, now_ms: u64, moved: bool) -> u64 {
    if moved && now_ms.saturating_sub(prev_rx_ms) > FRESHNESS_GATE_MS {
        prev_rx_ms.max(life_ms)
    } else {
        now_ms
    }
}

/// What a frame says of its engine's life, against the frame before ([`evidence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Nothing running or waiting: never stalled.
    Idle,
    /// No counters to judge by: every frame counts.
    Unjudged,
    /// Busy, and a counter, gauge or queue length changed since the frame before.
    Moved,
    /// Busy, and every number frozen.
    Frozen,
}

/// Whether `next` (the frame after `prev`, same boot) is evidence of life, and which: the
/// engine is idle (nothing running or waiting), or any number its engine reports moved: engine
/// steps, generated or prompt tokens, KV-cache usage, preemptions, the running or waiting count.
/// A hung engine freezes every one of them (its API server keeps exporting the last stats the
/// engine sent). KV-cache usage is the one that moves on every step of a long chunked prefill:
/// vLLM counts steps and tokens only on steps that emit a token (measured: 2.6-4 s of a 30k-token
/// prefill with all three frozen; `deploy/vllm/results/stall-window.md`). Frames that carry none
/// of these cannot be judged: every one counts (no data is not death). A counter that went down
/// was reset: a change too. Anything but [`Evidence::Frozen`] is life.
pub fn evidence(prev: &Metrics, next: &Metrics) -> Evidence {
    let busy = next.running.unwrap_or(0.0) + next.waiting.unwrap_or(0.0) > 0.0;
    if !busy {
        return Evidence::Idle;
    }
    // The engine's counters and gauges; a frame with none of them (only the queue lengths)
    // cannot be judged.
    let counters = |m: &Metrics| [m.engine_steps, m.generation_tokens, m.prompt_tokens, m.kv_usage, m.preemptions];
    let queues = |m: &Metrics| [m.running, m.waiting];
    let moved = |a: &[Option<f64>], b: &[Option<f64>]| a.iter().zip(b).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b));
    let judged = counters(prev).iter().zip(counters(next).iter()).any(|(a, b)| a.is_some() && b.is_some());
    if !judged {
        Evidence::Unjudged
    } else if moved(&counters(prev), &counters(next)) || moved(&queues(prev), &queues(next)) {
        Evidence::Moved
    } else {
        Evidence::Frozen
    }
}

/// The earliest instant at which a worker counting over `old` instead of `new` (inclusive spans,
/// empty when `from > to`) changes any pool count; `u64::MAX` when the two agree everywhere.
fn first_difference(old: Option<(u64, u64)>, new: Option<(u64, u64)>) -> u64 {
    let nonempty = |s: Option<(u64, u64)>| s.filter(|(a, b)| a <= b);
    match (nonempty(old), nonempty(new)) {
        (None, None) => u64::MAX,
        (Some((a, _)), None) | (None, Some((a, _))) => a,
        (Some((a, b)), Some((c, d))) => {
            let start = if a != c { a.min(c) } else { u64::MAX };
            let end = if b != d { b.min(d).saturating_add(1) } else { u64::MAX };
            start.min(end)
        }
    }
}

/// Several pools' liveness at one instant, and the span of time around it during which none of
/// them can change unless a frame arrives (see [`FleetState::pool_outlook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOutlook {
    /// Indexed like the `pools` asked for.
    pub states: Vec<Liveness>,
    /// The states hold for every instant in `valid_from..valid_until`.
    pub valid_from: u64,
    pub valid_until: u64,
}

/// A worker as operators see it (metrics, the fleet page, alerts): exactly one holds at a time.
/// Stalled and silent workers both get no new requests; they differ in what to look at: a
/// stalled engine is hung behind a live API server (frames came, numbers frozen), a silent one
/// is dead, cut off, or its telemetry too slow to vouch for it (no frame, or no sure one,
/// within the gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// Fresh: evidence of life within the freshness gate.
    Alive,
    /// The busy engine has shown no progress for longer than the gate, its newest frame frozen
    /// ([`WorkerState::is_stalled`]).
    Stalled,
    /// Neither: no frame within the gate, or only counters that moved at an unknown instant.
    Silent,
}

impl Condition {
    pub const ALL: [Condition; 3] = [Condition::Alive, Condition::Stalled, Condition::Silent];

    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Alive => "alive",
            Condition::Stalled => "stalled",
            Condition::Silent => "silent",
        }
    }
}

/// A pool's state as the DNS tier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// At least `min_workers` workers sent a valid frame within the eviction window.
    Alive,
    /// Not enough workers heard from yet, but the receiver started less than one window ago:
    /// no data is not death, so it is treated as alive.
    ColdStart,
    /// Evicted: never answered.
    Dead,
}

impl Liveness {
    pub fn is_answerable(self) -> bool {
        !matches!(self, Liveness::Dead)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::ColdStart => "cold_start",
            Liveness::Dead => "dead",
        }
    }
}

/// Per-worker state for the whole fleet. Pure: `now_ms` is always passed in.
///
/// Each worker's state sits behind an [`Arc`] so that [`Self::snapshot`] costs one reference
/// count per worker: a receiver copies the fleet under its ingest lock and builds views from the
/// copy outside it. A frame for a worker whose state a snapshot still shares copies that one
/// state first (copy on write).
#[derive(Debug, Clone)]
pub struct FleetState {
    started_ms: u64,
    workers: HashMap<WorkerKey, Arc<WorkerState>>,
}

fn delta(new: Option<f64>, old: Option<f64>) -> Option<f64> {
    match (new, old) {
        // A counter that went down was reset: no delta this time.
        (Some(n), Some(o)) if n >= o => Some(n - o),
        _ => None,
    }
}

fn derive(prev: &Metrics, prev_sent: u64, next: &Metrics, next_sent: u64, old: Derived) -> Derived {
    let dt_s = next_sent.saturating_sub(prev_sent) as f64 / 1000.0;
    let rate = |n, o| delta(n, o).filter(|_| dt_s > 0.0).map(|d| d / dt_s);
    let ttft = match (delta(next.ttft_sum_s, prev.ttft_sum_s), delta(next.ttft_count, prev.ttft_count)) {
        (Some(ds), Some(dc)) if dc > 0.0 => Some(ds / dc * 1000.0),
        _ => old.ttft_recent_ms,
    };
    let gen_tps = rate(next.generation_tokens, prev.generation_tokens);
    // Sequences decoding over the interval: the mean of both frames' running counts.
    let running = match (prev.running, next.running) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => Some((a + b) / 2.0),
        _ => None,
    };
    let pace = match (gen_tps, running) {
        (Some(t), Some(r)) if r >= 1.0 => {
            let now = t / r;
            Some(old.pace.map_or(now, |p| p * (1.0 - PACE_SMOOTHING) + now * PACE_SMOOTHING))
        }
        _ => old.pace,
    };
    Derived {
        ttft_recent_ms: ttft,
        gen_tps,
        prompt_tps: rate(next.prompt_tokens, prev.prompt_tokens),
        pace,
    }
}

impl FleetState {
    /// `started_ms` is when the receiver started; it bounds the cold-start grace.
    pub fn new(started_ms: u64) -> Self {
        FleetState { started_ms, workers: HashMap::new() }
    }

    /// Records an accepted frame (see [`crate::Ingest::accept`]) received at `now_ms`.
    pub fn observe(&mut self, frame: Frame, now_ms: u64) {
        self.observe_tracked(frame, now_ms);
    }

    /// [`Self::observe`], and returns the earliest instant at which any pool's liveness may
    /// differ from before the frame (`u64::MAX`: nowhere). A caller that cached a
    /// [`PoolOutlook`] may keep using it strictly before that instant.
    pub fn observe_tracked(&mut self, frame: Frame, now_ms: u64) -> u64 {
        self.observe_incoming(frame, now_ms)
    }

    /// [`Self::observe_tracked`] of a frame borrowed from its datagram
    /// ([`crate::Ingest::accept_ref`]): a known worker's state is updated in place, its strings
    /// copied only where they changed.
    pub fn observe_ref(&mut self, frame: &FrameRef<'_>, now_ms: u64) -> u64 {
        self.observe_incoming(frame, now_ms)
    }

    fn observe_incoming(&mut self, frame: impl Incoming, now_ms: u64) -> u64 {
        match self.workers.get_mut(frame.worker_id().as_bytes()) {
            Some(w) => {
                let w = Arc::make_mut(w);
                let old_span = w.counting_span();
                let same_pool = w.frame.pool_id == frame.pool_id();
                if w.frame.boot_id == frame.boot_id() {
                    let seen = evidence(&w.frame.metrics, frame.metrics());
                    let alive = seen != Evidence::Frozen;
                    if alive && !w.is_in_window(now_ms) {
                        w.streak_start_ms = now_ms;
                    }
                    w.derived = derive(&w.frame.metrics, w.frame.sent_ms, frame.metrics(), frame.sent_ms(), w.derived);
                    frame.store(&mut w.frame);
                    if alive {
                        w.life_ms = life_ms(w.last_rx_ms, w.life_ms, now_ms, seen == Evidence::Moved);
                        w.last_progress_ms = now_ms;
                    }
                    w.last_rx_ms = now_ms;
                } else {
                    // A restart (new boot id): derived values start over; the streak goes on if
                    // the worker never left the window (a quick sidecar restart is no failback).
                    let streak_start_ms = if w.is_in_window(now_ms) { w.streak_start_ms } else { now_ms };
                    // `WorkerState::new`, in place.
                    frame.store(&mut w.frame);
                    w.last_rx_ms = now_ms;
                    w.last_progress_ms = now_ms;
                    w.life_ms = now_ms;
                    w.streak_start_ms = streak_start_ms;
                    w.derived = Derived::default();
                }
                let new = w.counting_span();
                if same_pool {
                    first_difference(Some(old_span), Some(new))
                } else {
                    // Moved to another pool: it leaves one count and joins another.
                    first_difference(Some(old_span), None).min(first_difference(None, Some(new)))
                }
            }
            None => {
                let w = WorkerState::new(frame.into_frame(), now_ms, now_ms);
                let changed = first_difference(None, Some(w.counting_span()));
                self.workers.insert(WorkerKey::new(&w.frame.worker_id), Arc::new(w));
                changed
            }
        }
    }

    pub fn worker(&self, id: &str) -> Option<&WorkerState> {
        self.workers.get(id.as_bytes()).map(|w| &**w)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerState> {
        self.workers.values().map(|w| &**w)
    }

    /// Every worker's state as it is now, shared: O(workers) reference counts, no deep copy.
    /// [`view_of_workers`] builds the same views from it as [`Self::view_of`].
    pub fn snapshot(&self) -> Vec<Arc<WorkerState>> {
        self.workers.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }


    /// Whether each `(pool, min_workers)` may be answered at `now_ms` — alive with `min_workers`
    /// (each heard from within the window, and sending for the failback hold-down), or still in
    /// cold start — in one pass over the
    /// workers, with the span around `now_ms` in which none of the answers changes as long as
    /// no frame arrives: every worker counts over one closed span of time
    /// ([`WorkerState::counting_span`]), so a pool's count is constant between consecutive span
    /// ends (and the cold-start end). dnsd answers DNS queries from it without a scan.
    pub fn pool_outlook(&self, pools: &[(&str, usize)], now_ms: u64) -> PoolOutlook {
        let mut counted = vec![0usize; pools.len()];
        let cold_end = self.started_ms.saturating_add(EVICTION_WINDOW_MS);
        let (mut from, mut until) = (0u64, u64::MAX);
        let mut event = |t: u64| {
            if t <= now_ms {
                from = from.max(t);
            } else {
                until = until.min(t);
            }
        };
        event(cold_end);
        for w in self.workers.values() {
            let Some(i) = pools.iter().position(|(p, _)| *p == w.frame.pool_id) else { continue };
            let (a, b) = w.counting_span();
            if a > b {
                continue;
            }
            counted[i] += usize::from(a <= now_ms && now_ms <= b);
            event(a);
            event(b.saturating_add(1));
        }
        let states = pools
            .iter()
            .zip(counted)
            .map(|((_, min), n)| {
                if n >= (*min).max(1) {
                    Liveness::Alive
                } else if now_ms < cold_end {
                    Liveness::ColdStart
                } else {
                    Liveness::Dead
                }
            })
            .collect();
        PoolOutlook { states, valid_from: from, valid_until: until }
    }

    /// Drops workers silent (no frame at all) for longer than `forget_after_ms`; returns how
    /// many were dropped. Silence, not age: a hung engine that still sends frames is kept, as
    /// stalled; forgotten, its next frame would make it a new worker, fresh for a moment.
    pub fn forget_silent(&mut self, now_ms: u64, forget_after_ms: u64) -> usize {
        let before = self.workers.len();
        self.workers.retain(|_, w| now_ms.saturating_sub(w.last_rx_ms) <= forget_after_ms);
        before - self.workers.len()
    }

    /// The snapshot served on `/v1/fleet`, workers sorted by id.
    pub fn view(&self, now_ms: u64) -> FleetView {
        self.view_of(now_ms, &[], Ages::Exact)
    }

    /// The view of the workers of `pools` (every pool when empty), with ages as `ages` says.
    /// With [`Ages::Bounded`] the view does not change while the fleet does not (see there),
    /// and its `now_ms` is 0.
    pub fn view_of(&self, now_ms: u64, pools: &[String], ages: Ages) -> FleetView {
        view_of_workers(self.workers(), now_ms, pools, ages)
    }
}

/// [`FleetState::view_of`] over any set of worker states (a [`FleetState::snapshot`]). Its cost
/// is O(workers + pools) whatever `pools` names (a client chooses them): a set lookup per
/// worker, one map entry per pool.
pub fn view_of_workers<'a>(states: impl Iterator<Item = &'a WorkerState>, now_ms: u64, pools: &[String], ages: Ages) -> FleetView {
    let wanted: HashSet<&str> = pools.iter().map(String::as_str).collect();
    // Pool counts from the states: the window counts from the last progress frame's arrival,
    // which the view's (sure) age may be older than (`WorkerState::is_in_window`).
    let mut by_pool: BTreeMap<&str, PoolView> = BTreeMap::new();
    let mut workers: Vec<WorkerView> = states
        .filter(|w| wanted.is_empty() || wanted.contains(w.frame.pool_id.as_str()))
        .map(|w| {
            let v = WorkerView::of(w, now_ms);
            let p = by_pool.entry(w.frame.pool_id.as_str()).or_insert_with(|| PoolView { pool: v.pool.clone(), workers: 0, fresh: 0, in_window: 0 });
            p.workers += 1;
            p.fresh += usize::from(v.fresh);
            p.in_window += usize::from(w.is_in_window(now_ms));
            v
        })
        .collect();
    if ages == Ages::Bounded {
        for w in &mut workers {
            w.age_ms = bounded_age_ms(w.age_ms);
        }
    }
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    mark_slow_workers(&mut workers);
    let pools = by_pool.into_values().collect();
    let now_ms = if ages == Ages::Bounded { 0 } else { now_ms };
    FleetView { now_ms, workers, pools }
}

/// How [`FleetState::view_of`] reports worker ages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ages {
    /// Each worker's exact age at `now_ms`: changes on every call.
    Exact,
    /// Each age as [`bounded_age_ms`] reports it, which changes only when it matters to the
    /// freshness gate or a few times in a stale worker's life, so that dnsd can serve an
    /// unchanged fleet with `304 Not Modified` and the filter need not re-read it. The ages are relative to the moment the view is
    /// served (its `200` or a later `304` for the same content).
    Bounded,
}

/// Ages below this are reported as this in a [`Ages::Bounded`] view: a worker that sends
/// every 500 ms is always "under a second old", which does not change between polls.
pub const VIEW_AGE_FLOOR_MS: u64 = 1_000;
/// Ages past the freshness gate are reported as at least this in a [`Ages::Bounded`] view: the
/// worker is stale.
pub const VIEW_AGE_STALE_MS: u64 = FRESHNESS_GATE_MS + 1;

/// Past the gate, a [`Ages::Bounded`] view reports the largest of these that the age has
/// reached (at least [`VIEW_AGE_STALE_MS`]): how long a worker has shown no sign of life, to
/// within a few seconds, with a few changes of the view in a stale worker's life. The guard
/// reads it to judge a hang that it first sees late (a hung engine's `/metrics` can go
/// unanswered for seconds, then answer with frozen numbers), and the pool window (10 s) stays
/// exact.
pub const VIEW_AGE_STALE_STEPS_MS: [u64; 6] = [5_000, EVICTION_WINDOW_MS + 1, 15_000, 20_000, 30_000, 60_000];

/// A worker's age as an [`Ages::Bounded`] view reports it: never below the true age while the
/// worker is fresh (so a reader that adds its own elapsed time never keeps a worker longer
/// than the gate), exact from [`VIEW_AGE_FLOOR_MS`] up to the gate, and past it never above
/// the true age: [`VIEW_AGE_STALE_MS`] or the last of [`VIEW_AGE_STALE_STEPS_MS`] reached. A
/// reader that polls at least every `gate - VIEW_AGE_FLOOR_MS` (2 s) makes exactly the gate
/// decisions exact ages would give (see the property test `bounded_ages_keep_gate_decisions`).
pub fn bounded_age_ms(age_ms: u64) -> u64 {
    if age_ms > FRESHNESS_GATE_MS {
        VIEW_AGE_STALE_STEPS_MS.iter().rev().find(|&&s| s <= age_ms).copied().unwrap_or(VIEW_AGE_STALE_MS)
    } else {
        age_ms.max(VIEW_AGE_FLOOR_MS)
    }
}

/// `GET /v1/fleet`: every known worker, as the filter needs it.
///
/// Ages are relative to the server's clock at `now_ms`, so a reader on another host never
/// compares two clocks: it adds its own elapsed time since the fetch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    pub now_ms: u64,
    pub workers: Vec<WorkerView>,
    /// Per pool seen in frames: how many workers are known, fresh, and within the eviction
    /// window (a pool with `in_window == 0` is dead whatever its `min_workers`).
    #[serde(default)]
    pub pools: Vec<PoolView>,
}

/// One pool in [`FleetView`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub pool: String,
    pub workers: usize,
    pub fresh: usize,
    pub in_window: usize,
}

/// One worker in [`FleetView`]. Absent numbers are omitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: String,
    pub pool: String,
    pub models: Vec<String>,
    /// LoRA adapters loaded on the worker, most recently active first (`crate::lora`); omitted
    /// when none, so a fleet without LoRA reads as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
    /// Serving address `ip:port` (IPv6 in brackets), as Envoy's cluster knows it.
    pub addr: String,
    pub age_ms: u64,
    pub fresh: bool,
    /// Frames arrive but the busy engine shows no progress (see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stalled: bool,
    pub boot: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_tps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemptions: Option<f64>,
    /// Decode pace (see [`Derived::pace`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pace: Option<f64>,
    /// Gray failure: this worker decodes far slower than its pool's peers, by this factor
    /// ([`mark_slow_workers`]); the picker multiplies its predicted time to first token by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<f64>,
    /// An operator drained it (or its pool, once safe): the picker gives it no new requests;
    /// requests in flight finish ([`crate::admin`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

/// A worker decoding below this share of its peers' median pace is slow (a throttled or
/// degraded GPU). A third, not a half: with short requests the pace of one frame interval is
/// noisy (a sequence in its prefill counts as running and decodes nothing), and a half marked
/// healthy workers 2-2.5x slow in the anti-herding drill; a throttled GPU at a fifth is marked.
pub const GRAY_PACE_RATIO: f64 = 1.0 / 3.0;
/// The largest penalty a slow worker gets.
pub const GRAY_MAX_PENALTY: f64 = 8.0;

/// Gray failures, judged against peers: a fresh, busy worker whose decode pace (generated
/// tokens per second per running sequence, smoothed over its frames: [`Derived::pace`]) is below
/// [`GRAY_PACE_RATIO`] of the median pace of the other fresh, busy workers of its pool gets
/// `slow = median / pace` (at most [`GRAY_MAX_PENALTY`]): a worker at a fifth of its peers'
/// pace scores 5x worse and gets proportionally fewer new requests. A fleet-wide slowdown (a
/// big batch everywhere) moves the median with it and changes nothing; a worker with no peer
/// to compare with is never judged.
///
/// O(n log n): each pool's paces are sorted once, and a worker's peer median is read from them
/// with its own pace left out (every fleet view runs this over every worker it lists).
pub fn mark_slow_workers(workers: &mut [WorkerView]) {
    let pace = |w: &WorkerView| -> Option<f64> {
        w.running.filter(|r| r.is_finite() && *r >= 1.0)?;
        let p = w.pace.filter(|p| p.is_finite() && *p >= 0.0)?;
        w.fresh.then_some(p)
    };
    let mut by_pool: HashMap<&str, Vec<f64>> = HashMap::new();
    for w in workers.iter() {
        if let Some(p) = pace(w) {
            by_pool.entry(w.pool.as_str()).or_default().push(p);
        }
    }
    for paces in by_pool.values_mut() {
        paces.sort_by(f64::total_cmp);
    }
    let mut marks: Vec<(usize, f64)> = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let Some(mine) = pace(w) else { continue };
        let Some(median) = by_pool.get(w.pool.as_str()).and_then(|paces| median_without(paces, mine)) else { continue };
        if median > 0.0 && mine < median * GRAY_PACE_RATIO {
            let f = if mine > 0.0 { (median / mine).min(GRAY_MAX_PENALTY) } else { GRAY_MAX_PENALTY };
            marks.push((i, (f * 10.0).round() / 10.0));
        }
    }
    for (i, f) in marks {
        workers[i].slow = Some(f);
    }
}

/// The median of `sorted` (ascending, holding `x`) with one element equal to `x` left out;
/// `None` when nothing is left.
fn median_without(sorted: &[f64], x: f64) -> Option<f64> {
    let n = sorted.len().checked_sub(1).filter(|n| *n > 0)?;
    // Any element equal to `x` leaves the same multiset behind: take the first.
    let k = sorted.partition_point(|v| v.total_cmp(&x).is_lt());
    let at = |j: usize| if j < k { sorted[j] } else { sorted[j + 1] };
    let mid = n / 2;
    Some(if n.is_multiple_of(2) { (at(mid - 1) + at(mid)) / 2.0 } else { at(mid) })
}

impl WorkerView {
    fn of(w: &WorkerState, now_ms: u64) -> Self {
        let m = &w.frame.metrics;
        WorkerView {
            id: w.frame.worker_id.clone(),
            pool: w.frame.pool_id.clone(),
            models: w.frame.models.clone(),
            adapters: w.frame.adapters.clone(),
            addr: w.frame.addr.to_string(),
            age_ms: w.age_ms(now_ms),
            fresh: w.is_fresh(now_ms),
            stalled: w.is_stalled(now_ms),
            boot: w.frame.boot_id,
            running: m.running,
            waiting: m.waiting,
            kv: m.kv_usage,
            ttft_ms: w.derived.ttft_recent_ms,
            gen_tps: w.derived.gen_tps,
            prompt_tps: w.derived.prompt_tps,
            preemptions: m.preemptions,
            pace: w.derived.pace.map(|p| (p * 10.0).round() / 10.0),
            slow: None,
            drained: false,
        }
    }
}

impl FleetView {
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"now_ms\":0,\"workers\":[],\"pools\":[]}"))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests;
