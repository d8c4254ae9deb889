//! Fleet state: the latest accepted frame per worker, values derived between consecutive
//! frames, worker freshness (3 s gate) and pool liveness (10 s window); and [`FleetView`], the
//! compact snapshot that dnsd serves on `GET /v1/fleet` and the Envoy filter polls.
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
//! that moves during a long chunked prefill): [`progress`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, Metrics};
use crate::{EVICTION_WINDOW_MS, FRESHNESS_GATE_MS};

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
    /// When the newest frame that showed progress or an idle engine was received: the last
    /// evidence of life ([`progress`]). Equal to `last_rx_ms` unless the engine is stuck.
    pub last_progress_ms: u64,
    /// When the current run of frames began: the first frame after the worker was out of the
    /// eviction window (or new). Failback waits for [`FAILBACK_HOLD_DOWN_MS`] of it.
    pub streak_start_ms: u64,
    pub derived: Derived,
}

impl WorkerState {
    fn new(frame: Frame, now_ms: u64, streak_start_ms: u64) -> Self {
        WorkerState { frame, last_rx_ms: now_ms, last_progress_ms: now_ms, streak_start_ms, derived: Derived::default() }
    }

    /// Time since the last evidence of life: frames that show progress or an idle engine.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_progress_ms)
    }

    /// Frames still arrive, but the busy engine has shown no progress for longer than the
    /// freshness gate: a hang with `/metrics` still answering.
    pub fn is_stalled(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_rx_ms) <= FRESHNESS_GATE_MS && self.age_ms(now_ms) > FRESHNESS_GATE_MS
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

    /// Heard from within the pool eviction window.
    pub fn is_in_window(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) <= EVICTION_WINDOW_MS
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

/// Whether `next` (the frame after `prev`, same boot) is evidence of life: the engine is idle
/// (nothing running or waiting), or any number its engine reports moved: engine steps,
/// generated or prompt tokens, KV-cache usage, preemptions, the running or waiting count. A
/// hung engine freezes every one of them (its API server keeps exporting the last stats the
/// engine sent). KV-cache usage is the one that moves on every step of a long chunked prefill:
/// vLLM counts steps and tokens only on steps that emit a token (measured: 2.6-4 s of a 30k-token
/// prefill with all three frozen; `deploy/vllm/results/stall-window.md`). Frames that carry none
/// of these cannot be judged: every one counts (no data is not death). A counter that went down
/// was reset: a change too.
pub fn progress(prev: &Metrics, next: &Metrics) -> bool {
    let busy = next.running.unwrap_or(0.0) + next.waiting.unwrap_or(0.0) > 0.0;
    if !busy {
        return true;
    }
    // The engine's counters and gauges; a frame with none of them (only the queue lengths)
    // cannot be judged.
    let counters = |m: &Metrics| [m.engine_steps, m.generation_tokens, m.prompt_tokens, m.kv_usage, m.preemptions];
    let queues = |m: &Metrics| [m.running, m.waiting];
    let moved = |a: &[Option<f64>], b: &[Option<f64>]| a.iter().zip(b).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if a != b));
    let judged = counters(prev).iter().zip(counters(next).iter()).any(|(a, b)| a.is_some() && b.is_some());
    !judged || moved(&counters(prev), &counters(next)) || moved(&queues(prev), &queues(next))
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
/// stalled engine is hung behind a live API server (frames come, numbers frozen), a silent one
/// is dead or cut off (no frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// Fresh: evidence of life within the freshness gate.
    Alive,
    /// Frames arrive within the gate, but the busy engine has shown no progress for longer.
    Stalled,
    /// No frame within the gate.
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
    workers: HashMap<String, Arc<WorkerState>>,
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
        match self.workers.get_mut(&frame.worker_id) {
            Some(w) => {
                let w = Arc::make_mut(w);
                let old = (w.counting_span(), std::mem::take(&mut w.frame.pool_id));
                if w.frame.boot_id == frame.boot_id {
                    let alive = progress(&w.frame.metrics, &frame.metrics);
                    if alive && !w.is_in_window(now_ms) {
                        w.streak_start_ms = now_ms;
                    }
                    w.derived = derive(&w.frame.metrics, w.frame.sent_ms, &frame.metrics, frame.sent_ms, w.derived);
                    w.frame = frame;
                    w.last_rx_ms = now_ms;
                    if alive {
                        w.last_progress_ms = now_ms;
                    }
                } else {
                    // A restart (new boot id): derived values start over; the streak goes on if
                    // the worker never left the window (a quick sidecar restart is no failback).
                    let streak_start_ms = if w.is_in_window(now_ms) { w.streak_start_ms } else { now_ms };
                    *w = WorkerState::new(frame, now_ms, streak_start_ms);
                }
                let new = w.counting_span();
                if old.1 == w.frame.pool_id {
                    first_difference(Some(old.0), Some(new))
                } else {
                    // Moved to another pool: it leaves one count and joins another.
                    first_difference(Some(old.0), None).min(first_difference(None, Some(new)))
                }
            }
            None => {
                let w = WorkerState::new(frame, now_ms, now_ms);
                let changed = first_difference(None, Some(w.counting_span()));
                self.workers.insert(w.frame.worker_id.clone(), Arc::new(w));
                changed
            }
        }
    }

    pub fn worker(&self, id: &str) -> Option<&WorkerState> {
        self.workers.get(id).map(|w| &**w)
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
    let mut workers: Vec<WorkerView> =
        states.filter(|w| wanted.is_empty() || wanted.contains(w.frame.pool_id.as_str())).map(|w| WorkerView::of(w, now_ms)).collect();
    if ages == Ages::Bounded {
        for w in &mut workers {
            w.age_ms = bounded_age_ms(w.age_ms);
        }
    }
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    mark_slow_workers(&mut workers);
    let mut by_pool: BTreeMap<&str, PoolView> = BTreeMap::new();
    for w in &workers {
        let p = by_pool.entry(w.pool.as_str()).or_insert_with(|| PoolView { pool: w.pool.clone(), workers: 0, fresh: 0, in_window: 0 });
        p.workers += 1;
        p.fresh += usize::from(w.fresh);
        p.in_window += usize::from(w.age_ms <= EVICTION_WINDOW_MS);
    }
    let pools = by_pool.into_values().collect();
    let now_ms = if ages == Ages::Bounded { 0 } else { now_ms };
    FleetView { now_ms, workers, pools }
}

/// How [`FleetState::view_of`] reports worker ages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ages {
    /// Each worker's exact age at `now_ms`: changes on every call.
    Exact,
    /// An upper bound on each age that only changes when it matters to the freshness gate
    /// ([`bounded_age_ms`]), so that dnsd can serve an unchanged fleet with `304 Not Modified`
    /// and the filter need not re-read it. The ages are relative to the moment the view is
    /// served (its `200` or a later `304` for the same content).
    Bounded,
}

/// Ages below this are reported as this in a [`Ages::Bounded`] view: a worker that sends
/// every 500 ms is always "under a second old", which does not change between polls.
pub const VIEW_AGE_FLOOR_MS: u64 = 1_000;
/// Ages past the freshness gate are reported as this in a [`Ages::Bounded`] view: the worker
/// is stale, and by how much no longer matters to a picker.
pub const VIEW_AGE_STALE_MS: u64 = FRESHNESS_GATE_MS + 1;

/// A worker's age as an [`Ages::Bounded`] view reports it: never below the true age while the
/// worker is fresh (so a reader that adds its own elapsed time never keeps a worker longer
/// than the gate), exact from [`VIEW_AGE_FLOOR_MS`] up to the gate, and
/// [`VIEW_AGE_STALE_MS`] past it. A reader that polls at least every
/// `gate - VIEW_AGE_FLOOR_MS` (2 s) makes exactly the gate decisions exact ages would give
/// (see the property test `bounded_ages_keep_gate_decisions`).
pub fn bounded_age_ms(age_ms: u64) -> u64 {
    if age_ms > FRESHNESS_GATE_MS {
        VIEW_AGE_STALE_MS
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
mod tests {
    impl FleetState {
        /// The oracle of [`FleetState::pool_outlook`]: whether `pool` may be answered: alive with `min_workers` (each heard from within the
        /// window, and sending for the failback hold-down), or still in cold start.
        fn pool_liveness(&self, pool: &str, min_workers: usize, now_ms: u64) -> Liveness {
            let counted = self.workers.values().filter(|w| w.frame.pool_id == pool && w.counts_for_pool(now_ms)).count();
            if counted >= min_workers.max(1) {
                Liveness::Alive
            } else if now_ms.saturating_sub(self.started_ms) < EVICTION_WINDOW_MS {
                Liveness::ColdStart
            } else {
                Liveness::Dead
            }
        }
    }

    use super::*;
    use crate::frame::tests::sample;
    use proptest::prelude::*;

    const T0: u64 = 1_800_000_000_000;

    fn frame(worker: &str, pool: &str, boot: u64, seq: u64, sent: u64) -> Frame {
        let mut f = sample();
        f.worker_id = worker.into();
        f.pool_id = pool.into();
        f.boot_id = boot;
        f.seq = seq;
        f.sent_ms = sent;
        // A busy engine that makes progress: one step per frame.
        f.metrics.engine_steps = Some(seq as f64);
        f
    }

    /// A frame of a hung engine: busy, its counters frozen at `steps`.
    fn hung(worker: &str, pool: &str, seq: u64, sent: u64, steps: f64) -> Frame {
        let mut f = frame(worker, pool, 1, seq, sent);
        f.metrics.engine_steps = Some(steps);
        f
    }

    #[test]
    fn progress_rules() {
        let busy = sample().metrics;
        let step = Metrics { engine_steps: busy.engine_steps.map(|s| s + 1.0), ..busy };
        assert!(!progress(&busy, &busy), "busy, nothing advanced: no progress");
        assert!(progress(&busy, &step), "an engine step is progress (a chunked prefill)");
        let tok = Metrics { generation_tokens: busy.generation_tokens.map(|g| g + 1.0), ..busy };
        assert!(progress(&busy, &tok));
        // A long chunked prefill: vLLM's steps and tokens stay put, its KV-cache usage grows.
        let chunk = Metrics { kv_usage: busy.kv_usage.map(|k| k + 0.01), ..busy };
        assert!(progress(&busy, &chunk));
        let admitted = Metrics { waiting: Some(0.0), running: busy.running.map(|r| r + 1.0), ..busy };
        assert!(progress(&busy, &admitted), "the scheduler moved a request");
        let idle = Metrics { running: Some(0.0), waiting: Some(0.0), ..busy };
        assert!(progress(&busy, &idle) && progress(&idle, &idle), "an idle engine is never stalled");
        let blind = Metrics { running: Some(1.0), waiting: None, engine_steps: None, generation_tokens: None, prompt_tokens: None, kv_usage: None, preemptions: None, ..busy };
        assert!(progress(&blind, &blind), "no counters: nothing to judge by, every frame counts");
        let reset = Metrics { engine_steps: Some(0.0), ..busy };
        assert!(progress(&busy, &reset), "a counter reset is a change");
    }

    /// Exactly one condition at a time: alive while fresh, stalled while frames come without
    /// progress, silent once frames stop too; the gauges and alerts rest on this.
    #[test]
    fn condition_is_alive_then_stalled_then_silent() {
        let mut fleet = FleetState::new(T0 - 60_000);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        for i in 1..=10u64 {
            fleet.observe(hung("w1", "p", 1 + i, T0 + i * 500, 1.0), T0 + i * 500);
        }
        let w = fleet.worker("w1").unwrap();
        assert_eq!(w.condition(T0 + 3_000), Condition::Alive);
        assert_eq!(w.condition(T0 + 3_001), Condition::Stalled);
        assert_eq!((w.since_frame_ms(T0 + 6_000), w.age_ms(T0 + 6_000)), (1_000, 6_000));
        // The last frame came at T0 + 5 s: silent once it is older than the gate.
        assert_eq!(w.condition(T0 + 8_000), Condition::Stalled);
        assert_eq!(w.condition(T0 + 8_001), Condition::Silent);
        for t in (T0..T0 + 20_000).step_by(250) {
            let c = w.condition(t);
            assert_eq!(c == Condition::Alive, w.is_fresh(t));
            assert_eq!(c == Condition::Stalled, w.is_stalled(t));
        }
    }

    /// A hang with `/metrics` still answering: frames keep coming with frozen counters. The
    /// worker leaves the picker after the 3 s gate and its pool's count after the 10 s window,
    /// exactly like a silent one; progress brings it back (after the failback hold-down).
    #[test]
    fn a_hung_engine_ages_like_a_silent_one() {
        let mut fleet = FleetState::new(T0 - 60_000);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        // Hung from T0: frames every 500 ms, counters frozen.
        for i in 1..=30u64 {
            fleet.observe(hung("w1", "p", 1 + i, T0 + i * 500, 1.0), T0 + i * 500);
        }
        let w = fleet.worker("w1").unwrap();
        assert!(w.is_fresh(T0 + 3_000) && !w.is_fresh(T0 + 3_001));
        assert!(w.is_stalled(T0 + 3_001) && w.is_stalled(T0 + 15_000));
        let pools = [("p", 1usize)];
        assert_eq!(fleet.pool_outlook(&pools, T0 + 10_000).states, vec![Liveness::Alive]);
        assert_eq!(fleet.pool_outlook(&pools, T0 + 10_001).states, vec![Liveness::Dead]);
        let v = fleet.view(T0 + 4_000);
        assert!(v.workers[0].stalled && !v.workers[0].fresh);
        // It makes progress again: fresh at once, counted after the hold-down.
        fleet.observe(frame("w1", "p", 1, 40, T0 + 16_000), T0 + 16_000);
        let w = fleet.worker("w1").unwrap();
        assert!(w.is_fresh(T0 + 16_000) && !w.is_stalled(T0 + 16_000));
        assert_eq!(fleet.pool_outlook(&pools, T0 + 16_500).states, vec![Liveness::Dead]);
        assert_eq!(fleet.pool_outlook(&pools, T0 + 17_000).states, vec![Liveness::Alive]);
        // An idle worker with frozen counters is alive.
        let mut idle = hung("w2", "p", 1, T0, 5.0);
        idle.metrics.running = Some(0.0);
        idle.metrics.waiting = Some(0.0);
        let mut f2 = FleetState::new(T0);
        for i in 0..30u64 {
            let mut f = idle.clone();
            f.seq = 1 + i;
            f.sent_ms = T0 + i * 500;
            f2.observe(f, T0 + i * 500);
        }
        assert!(f2.worker("w2").unwrap().is_fresh(T0 + 14_500));
    }

    fn busy_view(id: &str, pool: &str, running: f64, gen_tps: f64) -> WorkerView {
        WorkerView { id: id.into(), pool: pool.into(), models: vec![], adapters: vec![], addr: String::new(), age_ms: 500, fresh: true, stalled: false, boot: 1, running: Some(running), waiting: None, kv: None, ttft_ms: None, gen_tps: Some(gen_tps), prompt_tps: None, preemptions: None, pace: Some(gen_tps / running.max(1.0)), slow: None, drained: false }
    }

    /// The quadratic definition [`mark_slow_workers`] must agree with: each worker against the
    /// median of every other paced worker of its pool.
    fn mark_slow_workers_oracle(workers: &mut [WorkerView]) {
        let pace = |w: &WorkerView| -> Option<f64> {
            w.running.filter(|r| r.is_finite() && *r >= 1.0)?;
            let p = w.pace.filter(|p| p.is_finite() && *p >= 0.0)?;
            w.fresh.then_some(p)
        };
        let paces: Vec<(usize, String, f64)> = workers.iter().enumerate().filter_map(|(i, w)| pace(w).map(|p| (i, w.pool.clone(), p))).collect();
        for (i, pool, mine) in &paces {
            let mut peers: Vec<f64> = paces.iter().filter(|(j, p, _)| j != i && p == pool).map(|(_, _, x)| *x).collect();
            if peers.is_empty() {
                continue;
            }
            peers.sort_by(f64::total_cmp);
            let mid = peers.len() / 2;
            let median = if peers.len().is_multiple_of(2) { (peers[mid - 1] + peers[mid]) / 2.0 } else { peers[mid] };
            if median > 0.0 && *mine < median * GRAY_PACE_RATIO {
                let f = if *mine > 0.0 { (median / mine).min(GRAY_MAX_PENALTY) } else { GRAY_MAX_PENALTY };
                workers[*i].slow = Some((f * 10.0).round() / 10.0);
            }
        }
    }

    #[test]
    fn gray_failures_are_judged_against_peers() {
        // w3 decodes at a fifth of its peers' pace (per running sequence).
        let mut v = vec![busy_view("w1", "p", 4.0, 400.0), busy_view("w2", "p", 2.0, 200.0), busy_view("w3", "p", 4.0, 80.0), busy_view("x1", "q", 1.0, 5.0)];
        mark_slow_workers(&mut v);
        assert_eq!(v.iter().map(|w| w.slow).collect::<Vec<_>>(), vec![None, None, Some(5.0), None], "x1 has no peer: never judged");
        // A fleet-wide slowdown changes nothing.
        let mut all = vec![busy_view("w1", "p", 4.0, 40.0), busy_view("w2", "p", 4.0, 42.0), busy_view("w3", "p", 4.0, 38.0)];
        mark_slow_workers(&mut all);
        assert!(all.iter().all(|w| w.slow.is_none()));
        // Idle or stale workers are not compared; a stopped decoder gets the cap.
        let mut v = vec![busy_view("w1", "p", 1.0, 0.0), busy_view("w2", "p", 2.0, 100.0), busy_view("w3", "p", 2.0, 0.0)];
        v[0].fresh = false;
        mark_slow_workers(&mut v);
        assert_eq!(v.iter().map(|w| w.slow).collect::<Vec<_>>(), vec![None, None, Some(GRAY_MAX_PENALTY)]);
    }

    #[test]
    fn freshness_gate_is_three_seconds() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        let w = fleet.worker("w1").unwrap();
        assert!(w.is_fresh(T0 + 3_000));
        assert!(!w.is_fresh(T0 + 3_001));
    }

    #[test]
    fn pool_dies_after_window_and_comes_back() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        fleet.observe(frame("w2", "p", 1, 1, T0), T0);
        assert_eq!(fleet.pool_liveness("p", 2, T0 + 10_000), Liveness::Alive);
        assert_eq!(fleet.pool_liveness("p", 2, T0 + 10_001), Liveness::Dead);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 10_001), Liveness::Dead);
        // Back from silence: held down for one second, then answered again (failback).
        fleet.observe(frame("w1", "p", 1, 2, T0 + 20_000), T0 + 20_000);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 20_000), Liveness::Dead);
        fleet.observe(frame("w1", "p", 1, 3, T0 + 20_500), T0 + 20_500);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 20_999), Liveness::Dead);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 21_000), Liveness::Alive);
        assert_eq!(fleet.pool_liveness("p", 2, T0 + 21_000), Liveness::Dead);
    }

    #[test]
    fn sidecar_restart_without_silence_is_not_held_down() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        fleet.observe(frame("w1", "p", 2, 1, T0 + 5_000), T0 + 5_000);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 5_000), Liveness::Alive);
        fleet.observe(frame("w1", "p", 3, 1, T0 + 30_000), T0 + 30_000);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 30_000), Liveness::Dead);
    }

    #[test]
    fn cold_start_is_not_death() {
        let fleet = FleetState::new(T0);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 9_999), Liveness::ColdStart);
        assert_eq!(fleet.pool_liveness("p", 1, T0 + 10_000), Liveness::Dead);
    }

    #[test]
    fn derived_values_from_deltas_and_reset_on_restart() {
        let mut fleet = FleetState::new(T0);
        let mut a = frame("w1", "p", 1, 1, T0);
        a.metrics.ttft_sum_s = Some(1.0);
        a.metrics.ttft_count = Some(10.0);
        a.metrics.generation_tokens = Some(100.0);
        fleet.observe(a.clone(), T0);
        let mut b = frame("w1", "p", 1, 2, T0 + 500);
        b.metrics.ttft_sum_s = Some(1.4);
        b.metrics.ttft_count = Some(12.0);
        b.metrics.generation_tokens = Some(150.0);
        fleet.observe(b.clone(), T0 + 500);
        let d = fleet.worker("w1").unwrap().derived;
        assert!((d.ttft_recent_ms.unwrap() - 200.0).abs() < 1e-9);
        assert!((d.gen_tps.unwrap() - 100.0).abs() < 1e-9);
        // No new first tokens: keeps the last known TTFT.
        let mut c = b.clone();
        c.seq = 3;
        c.sent_ms = T0 + 1_000;
        fleet.observe(c, T0 + 1_000);
        assert!((fleet.worker("w1").unwrap().derived.ttft_recent_ms.unwrap() - 200.0).abs() < 1e-9);
        // Restart: derived values start over.
        let r = frame("w1", "p", 2, 1, T0 + 1_500);
        fleet.observe(r, T0 + 1_500);
        assert_eq!(fleet.worker("w1").unwrap().derived, Derived::default());
    }

    #[test]
    fn counter_reset_gives_no_rate() {
        let mut fleet = FleetState::new(T0);
        let mut a = frame("w1", "p", 1, 1, T0);
        a.metrics.generation_tokens = Some(100.0);
        fleet.observe(a, T0);
        let mut b = frame("w1", "p", 1, 2, T0 + 500);
        b.metrics.generation_tokens = Some(10.0);
        fleet.observe(b, T0 + 500);
        assert_eq!(fleet.worker("w1").unwrap().derived.gen_tps, None);
    }

    #[test]
    fn view_round_trips_through_json() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w2", "p", 1, 1, T0), T0);
        fleet.observe(frame("w1", "q", 1, 1, T0), T0 + 100);
        let v = fleet.view(T0 + 3_050);
        assert_eq!(v.workers[0].id, "w1");
        assert!(v.workers[0].fresh);
        assert!(!v.workers[1].fresh);
        assert_eq!(v.workers[1].age_ms, 3_050);
        assert_eq!(v.pools.len(), 2);
        assert_eq!((v.pools[0].pool.as_str(), v.pools[0].fresh, v.pools[0].in_window), ("p", 0, 1));
        assert_eq!(FleetView::from_json(v.to_json().as_bytes()).unwrap(), v);
    }

    /// A worker's loaded adapters reach the view from its last frame; a worker with none has no
    /// `adapters` key at all (the view stays compact), and a view without the key reads back.
    #[test]
    fn adapters_are_in_the_view_only_when_there_are_some() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        let mut bare = frame("w2", "p", 1, 1, T0);
        bare.adapters.clear();
        fleet.observe(bare, T0);
        let v = fleet.view(T0 + 10);
        assert_eq!(v.workers[0].adapters, vec!["adapter-a".to_string(), "sql-lora".to_string()]);
        assert!(v.workers[1].adapters.is_empty());
        let json = v.to_json();
        assert_eq!(json.matches("\"adapters\"").count(), 1, "{json}");
        assert_eq!(FleetView::from_json(json.as_bytes()).unwrap(), v);
    }

    #[test]
    fn bounded_view_is_stable_while_workers_keep_sending_and_changes_at_the_gate() {
        let mut fleet = FleetState::new(T0);
        let all: Vec<String> = vec![];
        for (i, t) in [0u64, 500, 1_000, 1_500].iter().enumerate() {
            fleet.observe(frame("w1", "p", 1, i as u64 + 1, T0 + t), T0 + t);
            fleet.observe(frame("w2", "q", 1, i as u64 + 1, T0 + t), T0 + t);
        }
        let v0 = fleet.view_of(T0 + 1_600, &all, Ages::Bounded);
        assert_eq!(v0.now_ms, 0);
        assert!(v0.workers.iter().all(|w| w.age_ms == VIEW_AGE_FLOOR_MS && w.fresh));
        // Same frames (numbers unchanged), later instants: the same view.
        let mut f2 = fleet.clone();
        f2.observe(frame("w1", "p", 1, 5, T0 + 2_000), T0 + 2_000);
        f2.observe(frame("w2", "q", 1, 5, T0 + 2_000), T0 + 2_000);
        assert_eq!(f2.view_of(T0 + 2_400, &all, Ages::Bounded), v0);
        assert_eq!(fleet.view_of(T0 + 2_499, &all, Ages::Bounded), v0);
        // Late (over a second): the exact age shows.
        assert_eq!(fleet.view_of(T0 + 2_700, &all, Ages::Bounded).workers[0].age_ms, 1_200);
        // At the gate still fresh and exact, past it stale and no longer changing.
        let at_gate = fleet.view_of(T0 + 4_500, &all, Ages::Bounded);
        assert_eq!((at_gate.workers[0].age_ms, at_gate.workers[0].fresh), (3_000, true));
        let past = fleet.view_of(T0 + 4_501, &all, Ages::Bounded);
        assert_eq!((past.workers[0].age_ms, past.workers[0].fresh), (VIEW_AGE_STALE_MS, false));
        assert_eq!(fleet.view_of(T0 + 9_000, &all, Ages::Bounded).workers, past.workers);
        // The exact form is unchanged.
        assert_eq!(fleet.view(T0 + 2_700).workers[0].age_ms, 1_200);
        assert_eq!(fleet.view(T0 + 2_700).now_ms, T0 + 2_700);
    }

    #[test]
    fn view_of_pools_holds_only_their_workers() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        fleet.observe(frame("w2", "q", 1, 1, T0), T0);
        fleet.observe(frame("w3", "r", 1, 1, T0), T0);
        let v = fleet.view_of(T0, &["r".to_string(), "p".to_string()], Ages::Exact);
        assert_eq!(v.workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["w1", "w3"]);
        assert_eq!(v.pools.iter().map(|p| p.pool.as_str()).collect::<Vec<_>>(), ["p", "r"]);
        assert!(fleet.view_of(T0, &["zzz".to_string()], Ages::Bounded).workers.is_empty());
    }

    #[test]
    fn forget_silent_drops_old_workers() {
        let mut fleet = FleetState::new(T0);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        fleet.observe(frame("w2", "p", 1, 1, T0 + 50_000), T0 + 50_000);
        assert_eq!(fleet.forget_silent(T0 + 60_001, 60_000), 1);
        assert!(fleet.worker("w1").is_none());
        // A hung engine that keeps sending is stalled, never forgotten (and so never new again).
        let mut f = FleetState::new(T0);
        for i in 0..=200u64 {
            f.observe(hung("w3", "p", i + 1, T0 + i * 500, 1.0), T0 + i * 500);
        }
        assert_eq!(f.forget_silent(T0 + 100_000, 60_000), 0);
        assert!(f.worker("w3").unwrap().is_stalled(T0 + 100_000));
    }

    proptest! {
        /// The sorted, per-pool median agrees with the definition, duplicates and all.
        #[test]
        fn slow_workers_match_the_definition(ws in proptest::collection::vec((0u8..3, 0u8..12, prop::bool::weighted(0.9), 0u8..3), 0..24)) {
            let mut v: Vec<WorkerView> = ws
                .iter()
                .enumerate()
                .map(|(i, (pool, pace, fresh, running))| {
                    let mut w = busy_view(&format!("w{i}"), &format!("p{pool}"), f64::from(*running), 0.0);
                    w.pace = Some(f64::from(*pace) * 5.0);
                    w.fresh = *fresh;
                    w
                })
                .collect();
            let mut oracle = v.clone();
            mark_slow_workers(&mut v);
            mark_slow_workers_oracle(&mut oracle);
            prop_assert_eq!(v, oracle);
        }

        /// Whatever frames arrive when, a pool is alive exactly when enough of its workers were
        /// heard from within the window and have been sending for the hold-down (outside cold
        /// start), and fresh implies in-window.
        #[test]
        fn liveness_matches_definition(events in proptest::collection::vec((0u8..4, 0u64..30_000), 1..40),
                                       min in 1usize..3, probe in 0u64..45_000) {
            let mut fleet = FleetState::new(T0);
            let mut evs = events.clone();
            evs.sort_by_key(|e| e.1);
            // Model: per worker, (last frame, start of the current run of frames).
            let mut last: HashMap<u8, (u64, u64)> = HashMap::new();
            for (seq, (w, t)) in evs.iter().enumerate() {
                fleet.observe(frame(&format!("w{w}"), "p", 1, seq as u64 + 1, T0 + t), T0 + t);
                let streak = match last.get(w) {
                    Some((l, s)) if t - l <= EVICTION_WINDOW_MS => *s,
                    _ => *t,
                };
                last.insert(*w, (*t, streak));
            }
            let now = T0 + evs.last().unwrap().1 + probe;
            let counted = last
                .values()
                .filter(|(t, s)| now - (T0 + *t) <= EVICTION_WINDOW_MS && now - (T0 + *s) >= FAILBACK_HOLD_DOWN_MS)
                .count();
            let l = fleet.pool_liveness("p", min, now);
            prop_assert_eq!(l == Liveness::Alive, counted >= min);
            for w in fleet.workers() {
                prop_assert!(!w.is_fresh(now) || w.is_in_window(now));
            }
        }

        /// A reader that adds its own elapsed time `e` to a bounded age makes the same gate
        /// decision as with the exact age, for every `e` below `gate - VIEW_AGE_FLOOR_MS`; and a
        /// bounded age is never below the exact age of a fresh worker.
        #[test]
        fn bounded_ages_keep_gate_decisions(age in 0u64..20_000, e in 0u64..(FRESHNESS_GATE_MS - VIEW_AGE_FLOOR_MS)) {
            let b = bounded_age_ms(age);
            prop_assert_eq!(b + e < FRESHNESS_GATE_MS, age + e < FRESHNESS_GATE_MS);
            prop_assert_eq!(b + e <= FRESHNESS_GATE_MS, age + e <= FRESHNESS_GATE_MS);
            if age <= FRESHNESS_GATE_MS {
                prop_assert!(b >= age);
            }
        }

        /// The outlook agrees with `pool_liveness` at `now` and everywhere in its validity span,
        /// and after one more frame, everywhere before the instant `observe_tracked` returned.
        #[test]
        fn outlook_and_tracked_changes_agree_with_pool_liveness(
            events in proptest::collection::vec((0u8..5, 0u8..2, 0u8..2, 0u64..30_000), 1..30),
            extra in (0u8..5, 0u8..2, 0u8..2, 0u64..30_000),
            now_off in 0u64..45_000, probes in proptest::collection::vec(0u64..45_000, 1..20),
        ) {
            let pools = [("p0", 1usize), ("p1", 2usize)];
            let mut evs = events.clone();
            evs.sort_by_key(|e| e.3);
            let mut fleet = FleetState::new(T0);
            for (seq, (w, p, boot, t)) in evs.iter().enumerate() {
                fleet.observe(frame(&format!("w{w}"), &format!("p{p}"), u64::from(*boot), seq as u64 + 1, T0 + t), T0 + t);
            }
            let now = T0 + now_off;
            let o = fleet.pool_outlook(&pools, now);
            prop_assert!(o.valid_from <= now && now < o.valid_until);
            let live = |f: &FleetState, t: u64| pools.iter().map(|(p, m)| f.pool_liveness(p, *m, t)).collect::<Vec<_>>();
            prop_assert_eq!(&o.states, &live(&fleet, now));
            let edges = [o.valid_from, o.valid_until.saturating_sub(1)];
            for t in probes.iter().map(|p| T0 + p).chain(edges) {
                if o.valid_from <= t && t < o.valid_until {
                    prop_assert_eq!(&o.states, &live(&fleet, t), "at {}", t);
                }
            }
            let before = fleet.clone();
            let (w, p, boot, t) = extra;
            let changed = fleet.observe_tracked(frame(&format!("w{w}"), &format!("p{p}"), u64::from(boot), 1_000, T0 + t), T0 + t);
            for probe in probes.iter().chain([&t, &now_off]) {
                let at = T0 + probe;
                if at < changed {
                    prop_assert_eq!(live(&before, at), live(&fleet, at), "at {} (changed {})", probe, changed);
                }
            }
        }
    }
}
