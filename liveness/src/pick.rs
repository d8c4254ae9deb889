//! Worker picking for one request: which workers may get it (fresh, serving the model, circuit
//! not open), how they rank (predicted time to first token), and the ordered endpoint list that
//! Envoy's `override_host` load balancer walks (first attempt → first address, each retry → the
//! next one).
//!
//! (Over 500 lines on purpose: every way a request's endpoint list is built — ranking, the
//! freshness gate, the breaker's admission, affinity and LoRA placement, fail-open and last
//! resort — is one decision, read in one place; its tests are in `pick/tests.rs`.)
//!
//! Anti-herding: many Envoy threads read the same snapshot between two polls, so the first
//! endpoint is chosen by power of two choices among the near-best workers, not "the best", and
//! the router's own requests in flight to a worker ([`LoadView`], [`crate::inflight`]) count as
//! load on top of what the worker's last frame reported ([`load_of`]).
//!
//! Pure: the snapshot, the local fetch time, `now_ms`, the breaker admissions and the random
//! source are passed in.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::affinity::{self, AffinityConfig, Outcome, Want};
use crate::breaker::Admission;
use crate::fleet::{FleetView, WorkerView};
use crate::inflight::Flights;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickConfig {
    /// Pools this router serves (the telemetry pool ids of the workers in its Envoy cluster);
    /// empty: every pool in the fleet view. A router must only pick its own cluster's members.
    pub pools: Vec<String>,
    /// Endpoints in the list (first attempt + retries).
    pub max_endpoints: usize,
    /// Attempts past the end of the list, on workers the request has not tried ([`retries_for`]).
    pub retries_past_list: usize,
    /// A worker whose frame is this old (dnsd's age + local time since the fetch) is skipped.
    pub freshness_gate_ms: u64,
    /// A snapshot fetched longer ago than this is not used at all: fail open.
    pub stale_after_ms: u64,
    /// Workers scoring within `best * (1 + near_best_ratio) + near_best_ms` are "near-best".
    pub near_best_ratio: f64,
    pub near_best_ms: f64,
    /// TTFT assumed when a worker has not reported one (or is idle).
    pub default_ttft_ms: f64,
    /// Weight of each running sequence on prefill time.
    pub running_weight: f64,
    /// KV-cache usage above which a worker is penalised, and the penalty at 100 %.
    pub kv_soft_limit: f64,
    pub kv_penalty: f64,
    /// Open circuits complete the endpoint list as last resorts ([`panic_fill`]); `false` gives
    /// the strict breaker (an open circuit removes the worker from every list: a flaky fleet
    /// then refuses requests with no attempt at all).
    pub last_resort: bool,
    /// When every worker that could take a request is silent, try them anyway
    /// ([`silent_fail_open`]); `false`: the picker's 503 stands.
    pub silent_fail_open: bool,
    /// Prefix-cache and session affinity ([`crate::affinity`]).
    pub affinity: AffinityConfig,
    /// A request counted in flight longer than this stops counting ([`crate::inflight`]).
    pub in_flight_max_age_ms: u64,
    /// LoRA affinity ([`crate::lora`]).
    pub lora: crate::lora::LoraConfig,
}

impl Default for PickConfig {
    fn default() -> Self {
        PickConfig {
            pools: Vec::new(),
            max_endpoints: 3,
            retries_past_list: DEFAULT_RETRIES_PAST_LIST,
            freshness_gate_ms: crate::FRESHNESS_GATE_MS,
            stale_after_ms: 3_000,
            near_best_ratio: 0.25,
            near_best_ms: 20.0,
            default_ttft_ms: 100.0,
            running_weight: 0.05,
            kv_soft_limit: 0.8,
            kv_penalty: 4.0,
            last_resort: true,
            silent_fail_open: true,
            affinity: AffinityConfig::default(),
            in_flight_max_age_ms: 600_000,
            lora: crate::lora::LoraConfig::default(),
        }
    }
}

/// Whether a view fetched at `fetched_local_ms` is past use at `now_ms`: older than
/// `stale_after_ms`, or as far in the future (the wall clock stepped back since the fetch: every
/// worker's age would read as frozen at the fetch, and the dead ones as fresh).
pub fn view_stale(fetched_local_ms: u64, now_ms: u64, cfg: &PickConfig) -> bool {
    now_ms.abs_diff(fetched_local_ms) > cfg.stale_after_ms
}

impl PickConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_endpoints == 0 || self.max_endpoints > 16 {
            return Err("pick.max_endpoints: must be 1..=16".into());
        }
        if self.retries_past_list > MAX_RETRIES_PAST_LIST {
            return Err(format!("pick.retries_past_list: at most {MAX_RETRIES_PAST_LIST} (the route's host_selection_retry_max_attempts bounds the search for an untried worker)"));
        }
        if self.freshness_gate_ms == 0 || self.stale_after_ms == 0 {
            return Err("pick.freshness_gate_ms / stale_after_ms: must be > 0".into());
        }
        let finite_nonneg = [self.near_best_ratio, self.near_best_ms, self.default_ttft_ms, self.running_weight, self.kv_penalty];
        if finite_nonneg.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("pick: weights must be finite and >= 0".into());
        }
        if !(0.0..1.0).contains(&self.kv_soft_limit) {
            return Err("pick.kv_soft_limit: must be in [0, 1)".into());
        }
        if self.in_flight_max_age_ms < crate::inflight::BUCKET_MS {
            return Err("pick.in_flight_max_age_ms: must be at least 1000".into());
        }
        self.affinity.validate()?;
        self.lora.validate()
    }
}

/// Attempts past the end of a request's endpoint list by default ([`retries_for`]).
pub const DEFAULT_RETRIES_PAST_LIST: usize = 2;
/// The most [`PickConfig::retries_past_list`] may be: Envoy's round robin looks for an untried
/// worker at most `host_selection_retry_max_attempts` (8, `envoy/pool-router.yaml`) times more,
/// and then takes a tried one.
pub const MAX_RETRIES_PAST_LIST: usize = 8;

/// How many retries Envoy makes for a request whose `x-gpuha-endpoints` list is `listed` (the
/// picker sends it in `x-envoy-max-retries`, which stock Envoy puts before the route's
/// `num_retries`): one per address after the first, then up to `past_list` more. Past the end
/// of the list stock Envoy's `override_host` policy hands each attempt to the cluster's fallback
/// round robin, and the route's `previous_hosts` predicate keeps it off every worker the request
/// tried; so these are bounded by the distinct `members` (the router's own workers) the list
/// does not name: a cluster with no untried worker left gets no attempt that would go back to a
/// tried one.
///
/// Why attempts past the list: the list is chosen when the request arrives, and a request held
/// on a worker that freezes or hangs waits for the guard's stall rescue (the 3 s gate + 2 s)
/// before its next attempt, so it can outlive every worker it was given while others are live
/// (the kill soak's two errors: 3 listed workers, each faulted while the request was in
/// flight). Why only a few: against a dead fleet each one costs a connect failure (fast) or a
/// blackholed connect (`connect_timeout`), against a hung one a `per_try_timeout` or a stall
/// rescue (~5 s each), all of it the client's wait before its error; 2 covers the soak's fleet
/// (5 workers, 3 listed) and adds at most ~10 s to the worst wait.
pub fn retries_for<'a>(listed: &[String], members: impl IntoIterator<Item = &'a str>, past_list: usize) -> usize {
    let mut unlisted: Vec<&str> = Vec::with_capacity(past_list);
    for m in members {
        if unlisted.len() >= past_list {
            break;
        }
        if !listed.iter().any(|l| l == m) && !unlisted.contains(&m) {
            unlisted.push(m);
        }
    }
    listed.len().saturating_sub(1) + unlisted.len()
}

/// Small deterministic PRNG (SplitMix64): good enough to spread choices, seedable in tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The router's own requests in flight per worker, as the picker reads them (the filter reads
/// the shared-data slots of [`crate::inflight`]; tests use [`LocalLoad`]).
pub trait LoadView {
    /// This router's load on `addr` given the frame taken at `frame_local_ms` that reported
    /// `frame_load` ([`Flights::estimate`]).
    fn ours(&self, addr: &str, frame_local_ms: u64, frame_load: f64) -> f64;
}

/// In-memory [`LoadView`]: per worker [`Flights`], read at the time of the last start or end.
#[derive(Debug, Clone, Default)]
pub struct LocalLoad {
    flights: HashMap<String, Flights>,
    now_ms: u64,
}

impl LocalLoad {
    const MAX_AGE_MS: u64 = 600_000;

    /// A request to `addr` started at `now_ms`.
    pub fn start(&mut self, addr: &str, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.flights.entry(addr.to_string()).or_default().start(now_ms, Self::MAX_AGE_MS);
    }

    /// The request to `addr` started at `started_ms` ended at `now_ms`.
    pub fn end(&mut self, addr: &str, started_ms: u64, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if let Some(f) = self.flights.get_mut(addr) {
            f.end(started_ms, now_ms, Self::MAX_AGE_MS);
        }
    }
}

impl LoadView for LocalLoad {
    fn ours(&self, addr: &str, frame_local_ms: u64, frame_load: f64) -> f64 {
        self.flights.get(addr).map_or(0.0, |f| f.estimate(self.now_ms, Self::MAX_AGE_MS, frame_local_ms, frame_load))
    }
}

/// A worker's load for the picker and `extra`, what of it the frame does not show: the larger
/// of the frame's `running + waiting` and this router's own in-flight requests (one router
/// alone: its in-flight count is the worker's load, fresher than any frame; several: each sees
/// the others' load in the frames).
pub fn load_of(w: &WorkerView, fetched_local_ms: u64, load: &dyn LoadView) -> (f64, f64) {
    let num = |v: Option<f64>| v.filter(|x| x.is_finite() && *x >= 0.0).unwrap_or(0.0);
    let frame = num(w.running) + num(w.waiting);
    let frame_local_ms = fetched_local_ms.saturating_sub(w.age_ms);
    let ours = load.ours(&w.addr, frame_local_ms, frame);
    let l = if ours.is_finite() { frame.max(ours) } else { frame };
    (l, l - frame)
}

/// The load that balancing compares ([`affinity::choose`], the near-best choice): this router's
/// own requests in flight to `w`. Not the frame's numbers: a frame is a snapshot up to a poll
/// plus a sidecar interval old, many requests ago at the rates where balance matters, so ranking
/// by it herds (a worker caught busy in its last frame gets nothing until the next one, then
/// everything). Each router spreading its own requests evenly spreads the sum evenly too; load
/// the router does not see (other routers, direct clients) reaches the pick through the frame's
/// numbers in the predicted TTFT, and so through the margins.
pub fn own_load(w: &WorkerView, fetched_local_ms: u64, load: &dyn LoadView) -> f64 {
    let num = |v: Option<f64>| v.filter(|x| x.is_finite() && *x >= 0.0).unwrap_or(0.0);
    let frame = num(w.running) + num(w.waiting);
    let ours = load.ours(&w.addr, fetched_local_ms.saturating_sub(w.age_ms), frame);
    if ours.is_finite() { ours.max(0.0) } else { 0.0 }
}

/// Age of a worker's last frame on the local clock: dnsd's age at fetch time plus the local
/// time since the fetch (never comparing two hosts' clocks).
pub fn effective_age_ms(w: &WorkerView, fetched_local_ms: u64, now_ms: u64) -> u64 {
    w.age_ms.saturating_add(now_ms.saturating_sub(fetched_local_ms))
}

/// Predicted time to first token for one more request, with `extra` requests queued on top of
/// what the worker reported.
pub fn predicted_ttft_ms(w: &WorkerView, extra: f64, cfg: &PickConfig) -> f64 {
    let num = |v: Option<f64>| v.filter(|x| x.is_finite() && *x >= 0.0);
    let waiting = num(w.waiting).unwrap_or(0.0) + extra.max(0.0);
    let running = num(w.running).unwrap_or(0.0);
    let mut base = num(w.ttft_ms).filter(|t| *t > 0.0).unwrap_or(cfg.default_ttft_ms);
    if waiting + running == 0.0 {
        // An idle worker's last TTFT reflects load it no longer has; without this a worker that
        // once was slow would never get the traffic that updates its number.
        base = base.min(cfg.default_ttft_ms);
    }
    // Each request queued ahead costs about one prefill; running sequences slow prefill down.
    let mut t = base * (1.0 + waiting) * (1.0 + cfg.running_weight * running);
    let kv = num(w.kv).unwrap_or(0.0).min(1.0);
    if kv > cfg.kv_soft_limit {
        // Little KV headroom: the new sequence waits for blocks or causes preemptions.
        t *= 1.0 + (kv - cfg.kv_soft_limit) / (1.0 - cfg.kv_soft_limit) * cfg.kv_penalty;
    }
    // Gray failure: a worker decoding far below its peers' pace (see `fleet::mark_slow_workers`).
    t * w.slow.filter(|f| f.is_finite() && *f >= 1.0).unwrap_or(1.0)
}

/// The picker's answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send to these addresses in order. `probe` is the address whose half-open probe this
    /// request carries (always the first endpoint), if any.
    Endpoints { endpoints: Vec<String>, probe: Option<String> },
    /// The snapshot is too old to trust (dnsd down or restarted): no pick, fail open.
    Stale,
    /// No worker in the snapshot serves this model: no pick (the upstream answers 404).
    UnknownModel,
    /// Workers serve the model but none is fresh with a closed circuit.
    NoWorker { fresh: usize, serving: usize },
}

/// Whether `w` serves `model` (`None`: the request named none, any worker will do).
pub fn serves(w: &WorkerView, model: Option<&str>) -> bool {
    match model {
        None => true,
        Some(m) => w.models.is_empty() || w.models.iter().any(|x| x == m),
    }
}

/// One candidate in [`Ranked`]: a worker's index in the view, its score with no local load and
/// its address's hash (a rendezvous weight is then two multiplications).
#[derive(Debug, Clone, Copy)]
struct Cand {
    idx: usize,
    base: f64,
    addr_hash: u64,
}

/// Eligible workers of one model, best base score first.
#[derive(Debug, Clone, Default)]
struct ModelRank {
    /// Workers of the router's pools serving the model, whatever their age.
    serving: usize,
    /// Those fresh when the view was fetched (age below the gate) and not drained, by (base
    /// score, view index).
    cands: Vec<Cand>,
    /// Their ages, ascending: how many are still fresh at `now` is one binary search.
    ages: Vec<u64>,
}

impl ModelRank {
    /// `addr_hash`: [`affinity::addr_hash`] of the worker's address.
    fn push(&mut self, idx: usize, w: &WorkerView, addr_hash: u64, cfg: &PickConfig) {
        self.serving += 1;
        // A drained worker serves the model but gets no new request (`crate::admin`).
        if w.age_ms < cfg.freshness_gate_ms && !w.drained {
            self.cands.push(Cand { idx, base: predicted_ttft_ms(w, 0.0, cfg), addr_hash });
            self.ages.push(w.age_ms);
        }
    }

    fn finish(&mut self) {
        self.cands.sort_by(|a, b| a.base.total_cmp(&b.base).then(a.idx.cmp(&b.idx)));
        self.ages.sort_unstable();
    }
}

/// A [`FleetView`] pre-ranked for [`pick_ranked`]: built once per new view (O(n log n)), so a
/// request costs about `max_endpoints` candidates instead of scoring and sorting the fleet.
///
/// A worker's score only grows with the local load counted on top of its frame
/// ([`predicted_ttft_ms`] is monotone in `extra`), so candidates taken in base-score order can
/// stop as soon as the next base score is above everything the answer depends on.
#[derive(Debug, Clone, Default)]
pub struct Ranked {
    /// Requests that name no model: every worker of the router's pools.
    any: ModelRank,
    by_model: foldhash::HashMap<String, ModelRank>,
    /// A model no worker lists: the workers that list no models (they serve anything).
    unlisted: ModelRank,
    /// The router's pools' workers as ([`affinity::addr_hash`] of the address, view index),
    /// sorted: to find half-open ones by address (one allocation, not one per worker).
    by_addr: Vec<(u64, usize)>,
}

impl Ranked {
    /// Ranks `view` for `cfg` (the pools, freshness gate and score weights come from it).
    pub fn build(view: &FleetView, cfg: &PickConfig) -> Self {
        let mut r = Ranked::default();
        // Address hashes by view index (0 outside the router's pools).
        let mut hashes = vec![0u64; view.workers.len()];
        for (idx, w) in view.workers.iter().enumerate() {
            if !(cfg.pools.is_empty() || cfg.pools.contains(&w.pool)) {
                continue;
            }
            let h = affinity::addr_hash(&w.addr);
            hashes[idx] = h;
            r.any.push(idx, w, h, cfg);
            r.by_addr.push((h, idx));
            if w.models.is_empty() {
                r.unlisted.push(idx, w, h, cfg);
            }
        }
        r.by_addr.sort_unstable();
        // A model's list: the workers listing it, plus those listing none.
        for (idx, w) in view.workers.iter().enumerate() {
            if !(cfg.pools.is_empty() || cfg.pools.contains(&w.pool)) {
                continue;
            }
            for (i, m) in w.models.iter().enumerate() {
                if w.models[..i].contains(m) {
                    continue;
                }
                if !r.by_model.contains_key(m) {
                    let mut seed = ModelRank::default();
                    for (j, u) in view.workers.iter().enumerate() {
                        if u.models.is_empty() && (cfg.pools.is_empty() || cfg.pools.contains(&u.pool)) && j < idx {
                            seed.push(j, u, hashes[j], cfg);
                        }
                    }
                    r.by_model.insert(m.clone(), seed);
                }
                if let Some(mr) = r.by_model.get_mut(m) {
                    mr.push(idx, w, hashes[idx], cfg);
                }
            }
            if w.models.is_empty() {
                for mr in r.by_model.values_mut() {
                    mr.push(idx, w, hashes[idx], cfg);
                }
            }
        }
        r.any.finish();
        r.unlisted.finish();
        for mr in r.by_model.values_mut() {
            mr.finish();
        }
        r
    }

    /// View indices of the router's pools' workers at `addr`, ascending.
    fn with_addr<'a>(&'a self, view: &'a FleetView, addr: &'a str) -> impl Iterator<Item = usize> + 'a {
        let h = affinity::addr_hash(addr);
        let from = self.by_addr.partition_point(|e| e.0 < h);
        // Hashes may collide: the address itself decides.
        self.by_addr[from..].iter().take_while(move |e| e.0 == h).map(|e| e.1).filter(move |&idx| view.workers.get(idx).is_some_and(|w| w.addr == addr))
    }

    fn for_model(&self, model: Option<&str>) -> &ModelRank {
        match model {
            None => &self.any,
            Some(m) => self.by_model.get(m).unwrap_or(&self.unlisted),
        }
    }
}

/// The reference picker (`pick`, kept in the tests as the oracle) over a [`Ranked`] built from the same `view` and `cfg`, without scoring every
/// worker: the same answer (same random draws) as long as every address outside `not_closed`
/// is admitted ([`Admission::Allow`]). `admission` is asked only about addresses in
/// `not_closed` (the breaker's open and half-open circuits; the filter keeps that list).
///
/// With an affinity `key` ([`crate::affinity`]) the first attempt, unless a probe takes it, is
/// chosen by [`affinity::choose`] among the admitted fresh workers whose predicted TTFT is within
/// the spill margin of the best (instead of a power-of-two choice among the near-best): the
/// key's placement while its load allows, else the first in its rendezvous order under the
/// balance bound; the retries follow in score order as without a key. The [`Outcome`] says which
/// (hit, spill, placed).
#[allow(clippy::too_many_arguments)]
pub fn pick_ranked(
    ranked: &Ranked,
    view: &FleetView,
    fetched_local_ms: u64,
    now_ms: u64,
    model: Option<&str>,
    key: Option<Want>,
    load: &dyn LoadView,
    rng: &mut Rng,
    cfg: &PickConfig,
    not_closed: &[&str],
    mut admission: impl FnMut(&str) -> Admission,
    mut claim_probe: impl FnMut(&str) -> bool,
) -> (Decision, Outcome) {
    if view_stale(fetched_local_ms, now_ms, cfg) {
        return (Decision::Stale, Outcome::None);
    }
    let mr = ranked.for_model(model);
    if mr.serving == 0 {
        // No worker of the router's pools at all (a dnsd that has just started and heard no
        // frame yet): no knowledge, not an unknown model. Fail open.
        let d = if ranked.any.serving == 0 { Decision::Stale } else { Decision::UnknownModel };
        return (d, Outcome::None);
    }
    let elapsed = now_ms.saturating_sub(fetched_local_ms);
    let is_fresh = |w: &WorkerView| effective_age_ms(w, fetched_local_ms, now_ms) < cfg.freshness_gate_ms;
    let fresh = mr.ages.partition_point(|a| a.saturating_add(elapsed) < cfg.freshness_gate_ms);
    // Scored candidates (score, view index) and half-open ones (view index), scanned so far.
    let mut normal: Vec<(f64, usize)> = Vec::with_capacity(4 * cfg.max_endpoints + 8);
    // Half-open workers anywhere in the list, as `pick` finds them: only `not_closed` can be.
    let mut probes: Vec<usize> = listed_fresh(ranked, view, not_closed, model, fetched_local_ms, now_ms, cfg).filter(|&idx| admission(&view.workers[idx].addr) == Admission::Probe).collect();
    // LoRA affinity (`crate::lora`): the adapter this request asks for, if a candidate holds it.
    let adapter = crate::lora::requested(model, mr.cands.iter().map(|c| &view.workers[c.idx]), &cfg.lora);
    let mut next = 0;
    let mut want = 4 * cfg.max_endpoints + 8;
    loop {
        while next < mr.cands.len() && normal.len() < want {
            let c = mr.cands[next];
            next += 1;
            let w = &view.workers[c.idx];
            if !is_fresh(w) {
                continue;
            }
            let allowed = !not_closed.contains(&w.addr.as_str()) || admission(&w.addr) == Admission::Allow;
            if allowed {
                let extra = load_of(w, fetched_local_ms, load).1;
                normal.push((predicted_ttft_ms(w, extra, cfg), c.idx));
            }
        }
        if next >= mr.cands.len() {
            break;
        }
        normal.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        // Everything the answer reads has a score at most `needed`; an unscanned worker scores
        // at least its base score, so once that is above `needed` nothing unscanned matters.
        // With a key, that includes every worker within the spill margin.
        let needed = needed_score(&normal, view, cfg).map(|n| match (key, normal.first()) {
            (Some(_), Some(best)) => n.max(affinity::spill_limit(best.0.max(cfg.default_ttft_ms), &cfg.affinity)),
            _ => n,
        });
        // With an adapter, every holder within its margin.
        let needed = needed.map(|n| match (adapter, normal.first()) {
            (Some(_), Some(best)) => n.max(crate::lora::spill_limit(best.0, &cfg.lora)),
            _ => n,
        });
        if needed.is_some_and(|n| mr.cands[next].base.total_cmp(&n).is_gt()) {
            break;
        }
        want = normal.len() * 2 + 8;
    }
    normal.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    probes.sort_unstable();
    let mut endpoints: Vec<String> = Vec::with_capacity(cfg.max_endpoints);
    let mut probe = None;
    while !probes.is_empty() {
        let w = &view.workers[probes.swap_remove(rng.below(probes.len()))];
        if claim_probe(&w.addr) {
            endpoints.push(w.addr.clone());
            probe = Some(w.addr.clone());
            break;
        }
    }
    let mut outcome = Outcome::None;
    if probe.is_none() && !normal.is_empty() {
        let best = normal[0].0;
        let lora_first = adapter.and_then(|a| crate::lora::first(&normal, view, a, key.map(|k| k.key), |n| rng.below(n), (cfg.near_best_ratio, cfg.near_best_ms), &cfg.lora));
        let first = if let Some(i) = lora_first {
            // A holder of the adapter takes it; prefix affinity only chose among the holders.
            i
        } else if let Some(k) = key {
            // The key's first choice and its placement among every admitted fresh worker (the
            // scan may have stopped before them: they are then over the margin).
            let mut winner = None;
            let mut placed_admitted = false;
            for c in &mr.cands {
                let w = &view.workers[c.idx];
                if is_fresh(w) && (!not_closed.contains(&w.addr.as_str()) || admission(&w.addr) == Admission::Allow) {
                    winner = winner.max(Some(affinity::weight_of(k.key, c.addr_hash)));
                    placed_admitted |= k.placed == Some(c.addr_hash);
                }
            }
            let limit = affinity::spill_limit(best.max(cfg.default_ttft_ms), &cfg.affinity);
            let within: Vec<affinity::Cand> = normal.iter().take_while(|s| s.0 <= limit).map(|(_, idx)| affine_cand(&view.workers[*idx], k.key, fetched_local_ms, load)).collect();
            let (first, o) = affinity::choose(&within, k.placed, placed_admitted, winner, &cfg.affinity);
            outcome = o;
            first
        } else {
            near_best_first(&normal, best, rng, cfg, |idx| own_load(&view.workers[idx], fetched_local_ms, load))
        };
        let chosen = normal.remove(first);
        endpoints.push(view.workers[chosen.1].addr.clone());
    }
    for (_, idx) in normal {
        if endpoints.len() >= cfg.max_endpoints {
            break;
        }
        let addr = &view.workers[idx].addr;
        if !endpoints.contains(addr) {
            endpoints.push(addr.clone());
        }
    }
    if fresh == 0 && !mr.ages.is_empty() {
        // See `pick`: fresh at dnsd, aged past the gate only on our clock: fail open.
        return (Decision::Stale, Outcome::None);
    }
    if endpoints.is_empty() {
        return (Decision::NoWorker { fresh, serving: mr.serving }, Outcome::None);
    }
    (Decision::Endpoints { endpoints, probe }, outcome)
}

/// Anti-herding: the first attempt by power of two choices among the near-best of `normal`
/// (sorted by score, best first): of the two, the one with less load ([`own_load`]), then the
/// better score. The band's `best` is floored at
/// `default_ttft_ms`: reported TTFTs swing with prefix-cache hits, and a band of a few cached
/// TTFTs would leave one worker in it.
fn near_best_first(normal: &[(f64, usize)], best: f64, rng: &mut Rng, cfg: &PickConfig, load_at: impl Fn(usize) -> f64) -> usize {
    let limit = near_best_limit(best, cfg);
    let near = normal.iter().take_while(|s| s.0 <= limit).count();
    if near < 2 {
        return 0;
    }
    let a = rng.below(near);
    let mut b = rng.below(near - 1);
    if b >= a {
        b += 1;
    }
    let (la, lb) = (load_at(normal[a].1), load_at(normal[b].1));
    if lb < la || (lb == la && normal[b].0 < normal[a].0) {
        b
    } else {
        a
    }
}

/// The near-best band's upper score.
fn near_best_limit(best: f64, cfg: &PickConfig) -> f64 {
    best.max(cfg.default_ttft_ms) * (1.0 + cfg.near_best_ratio) + cfg.near_best_ms
}

/// A worker within the spill margin as [`affinity::choose`] sees it.
fn affine_cand(w: &WorkerView, key: u64, fetched_local_ms: u64, load: &dyn LoadView) -> affinity::Cand {
    let addr_hash = affinity::addr_hash(&w.addr);
    affinity::Cand { weight: affinity::weight_of(key, addr_hash), load: own_load(w, fetched_local_ms, load), addr_hash }
}

/// How the breaker's open circuits shape a pick (Envoy's load balancer routes to every host
/// below its `healthy_panic_threshold`; LiteLLM bypasses its cool-downs when every deployment is
/// in one): **an open circuit takes a worker out of first choice, never out of the list**. The
/// fresh workers whose circuit is open (`denied_trips(addr)`: `Some(trips in a row)` while the
/// breaker denies it) complete the endpoint list after the admitted ones, those with the fewest
/// trips in a row first, then by predicted time to first token (which counts this thread's
/// recent requests, so such picks spread). So while any fresh worker serves the model, a request
/// gets up to `max_endpoints` attempts and is never refused outright; when no worker is
/// admitted at all, the least failing open one takes the first attempt (a panic pick).
/// Freshness is never overridden: a dead or hung worker is not offered.
///
/// Returns the decision and whether it is a panic pick (its first endpoint's circuit is open).
#[allow(clippy::too_many_arguments)]
pub fn panic_fill(
    decision: Decision,
    ranked: &Ranked,
    view: &FleetView,
    fetched_local_ms: u64,
    now_ms: u64,
    model: Option<&str>,
    load: &dyn LoadView,
    cfg: &PickConfig,
    not_closed: &[&str],
    mut denied_trips: impl FnMut(&str) -> Option<u32>,
) -> (Decision, bool) {
    let (mut endpoints, probe) = match decision {
        Decision::Endpoints { endpoints, probe } if endpoints.len() < cfg.max_endpoints => (endpoints, probe),
        Decision::NoWorker { .. } => (Vec::new(), None),
        d => return (d, false),
    };
    if !cfg.last_resort {
        return (rebuild(endpoints, probe, ranked, model, fetched_local_ms, now_ms, cfg), false);
    }
    let mut denied: Vec<(u32, f64, usize)> = Vec::new();
    for idx in listed_fresh(ranked, view, not_closed, model, fetched_local_ms, now_ms, cfg) {
        let w = &view.workers[idx];
        if let Some(trips) = denied_trips(&w.addr) {
            let extra = load_of(w, fetched_local_ms, load).1;
            denied.push((trips, predicted_ttft_ms(w, extra, cfg), idx));
        }
    }
    let panic = endpoints.is_empty() && !denied.is_empty();
    denied.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, _, idx) in denied {
        if endpoints.len() >= cfg.max_endpoints {
            break;
        }
        let addr = &view.workers[idx].addr;
        if !endpoints.contains(addr) {
            endpoints.push(addr.clone());
        }
    }
    (rebuild(endpoints, probe, ranked, model, fetched_local_ms, now_ms, cfg), panic)
}

/// View indexes of the fresh, undrained workers serving `model` whose address is in
/// `not_closed` (each address once): the only workers a breaker can deny or probe. A drained
/// worker is never a probe nor a last resort: the operator took it out.
fn listed_fresh<'a>(ranked: &'a Ranked, view: &'a FleetView, not_closed: &'a [&'a str], model: Option<&'a str>, fetched_local_ms: u64, now_ms: u64, cfg: &'a PickConfig) -> impl Iterator<Item = usize> + 'a {
    not_closed
        .iter()
        .enumerate()
        .filter(move |(i, addr)| !not_closed[..*i].contains(addr))
        .flat_map(move |(_, addr)| ranked.with_addr(view, addr))
        .filter(move |&idx| {
            let w = &view.workers[idx];
            !w.drained && serves(w, model) && effective_age_ms(w, fetched_local_ms, now_ms) < cfg.freshness_gate_ms
        })
}

fn rebuild(endpoints: Vec<String>, probe: Option<String>, ranked: &Ranked, model: Option<&str>, fetched_local_ms: u64, now_ms: u64, cfg: &PickConfig) -> Decision {
    if endpoints.is_empty() {
        let mr = ranked.for_model(model);
        let elapsed = now_ms.saturating_sub(fetched_local_ms);
        let fresh = mr.ages.partition_point(|a| a.saturating_add(elapsed) < cfg.freshness_gate_ms);
        return Decision::NoWorker { fresh, serving: mr.serving };
    }
    Decision::Endpoints { endpoints, probe }
}

/// How LoRA affinity fared for a pick whose first endpoint is `first` ([`crate::lora::outcome`]),
/// over the workers this router could have given the request: of its pools, serving the model,
/// undrained and fresh now.
pub fn lora_outcome(view: &FleetView, fetched_local_ms: u64, now_ms: u64, model: Option<&str>, first: Option<&str>, cfg: &PickConfig) -> crate::lora::Outcome {
    let eligible = |w: &WorkerView| !w.drained && (cfg.pools.is_empty() || cfg.pools.contains(&w.pool)) && serves(w, model) && effective_age_ms(w, fetched_local_ms, now_ms) < cfg.freshness_gate_ms;
    crate::lora::outcome(view, model, first, eligible, &cfg.lora)
}

/// When no worker serving the model is fresh but some are **stalled** (their frames came, their
/// engine numbers did not move), the progress rule may be wrong about all of them at once (a host
/// so overloaded that every engine step takes longer than the gate) more likely than every
/// engine hung together; and the HA layer must not manufacture an outage on its own judgement.
/// So such a pick fails open onto the stalled workers, best predicted time to first token first
/// (a real fleet-wide hang still leaves DNS after the eviction window, and the guard rescues
/// nothing while no worker elsewhere is alive). Drained workers stay out: an operator's drain is
/// not a judgement to fail open from. Returns `None` when this does not apply.
pub fn stalled_fail_open(decision: &Decision, view: &FleetView, model: Option<&str>, cfg: &PickConfig) -> Option<Decision> {
    if !matches!(decision, Decision::NoWorker { fresh: 0, .. }) {
        return None;
    }
    let mut stalled: Vec<(f64, &WorkerView)> = view
        .workers
        .iter()
        .filter(|w| w.stalled && !w.drained && (cfg.pools.is_empty() || cfg.pools.contains(&w.pool)) && serves(w, model))
        .map(|w| (predicted_ttft_ms(w, 0.0, cfg), w))
        .collect();
    if stalled.is_empty() {
        return None;
    }
    stalled.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.addr.cmp(&b.1.addr)));
    let endpoints = stalled.into_iter().take(cfg.max_endpoints).map(|(_, w)| w.addr.clone()).collect();
    Some(Decision::Endpoints { endpoints, probe: None })
}

/// When no worker serving the model is fresh and none is stalled, but some are **silent** (no
/// frame within the freshness gate): every frame of a router's workers stopping at once is more
/// likely telemetry lost (every sidecar's scrape timing out on a loaded fleet, a key rolled out
/// wrong, the sidecars cut off from dnsd) than every engine dead together, and the HA layer must
/// not manufacture an outage out of missing data. So such a pick fails open onto the silent
/// workers, as many as `max_endpoints`: if they are dead, their attempts fail (a refused or
/// timed-out connection, retried on the next) and the client gets the router's error as before;
/// if they serve, it is served.
///
/// - Which first: those that went silent with the most recent one (heard within the eviction
///   window of it), from a random one on in the view's order, as Envoy's own load balancing
///   would spread them with no view at all: with no numbers to score, one fixed order would
///   send every request to the same worker. Then those silent for longer, most recently heard
///   first.
/// - Drained workers stay out (an operator's drain is not a judgement to fail open from).
/// - Stalled workers are [`stalled_fail_open`]'s, which goes first.
/// - The caller applies it only where the answer would otherwise be the picker's own 503: a
///   request with no fallback tier to go to.
///
/// Returns `None` when this does not apply (`silent_fail_open` off, a worker is fresh, or none
/// is silent).
pub fn silent_fail_open(decision: &Decision, view: &FleetView, model: Option<&str>, rng: &mut Rng, cfg: &PickConfig) -> Option<Decision> {
    if !cfg.silent_fail_open || !matches!(decision, Decision::NoWorker { fresh: 0, .. }) {
        return None;
    }
    // One pass to find them, and O(max_endpoints) work per endpoint: a fleet of thousands gone
    // silent must not cost each request a sort.
    let silent: Vec<&WorkerView> = view
        .workers
        .iter()
        .filter(|w| !w.stalled && !w.drained && (cfg.pools.is_empty() || cfg.pools.contains(&w.pool)) && serves(w, model))
        .collect();
    let newest = silent.iter().map(|w| w.age_ms).min()?;
    let together = |w: &WorkerView| w.age_ms <= newest.saturating_add(crate::EVICTION_WINDOW_MS);
    let mut endpoints: Vec<String> = Vec::new();
    let start = rng.below(silent.len());
    for w in silent[start..].iter().chain(&silent[..start]) {
        if endpoints.len() >= cfg.max_endpoints {
            break;
        }
        if together(w) && !endpoints.contains(&w.addr) {
            endpoints.push(w.addr.clone());
        }
    }
    while endpoints.len() < cfg.max_endpoints {
        let Some(w) = silent.iter().filter(|w| !endpoints.contains(&w.addr)).min_by(|a, b| a.age_ms.cmp(&b.age_ms).then(a.addr.cmp(&b.addr))) else { break };
        endpoints.push(w.addr.clone());
    }
    Some(Decision::Endpoints { endpoints, probe: None })
}

/// The highest score [`pick_ranked`]'s answer can depend on, given the sorted scores so far:
/// the near-best limit, and the score of the element that completes the endpoint list
/// whichever near-best one is chosen first. `None`: the scanned ones cannot complete it.
fn needed_score(normal: &[(f64, usize)], view: &FleetView, cfg: &PickConfig) -> Option<f64> {
    let best = normal.first()?.0;
    let limit = near_best_limit(best, cfg);
    let near = normal.iter().take_while(|s| s.0 <= limit).count().max(1);
    // The list is the chosen one plus the next distinct addresses in order; with any of the
    // first `near` chosen, it is complete once max_endpoints + 1 distinct addresses are seen.
    let mut distinct: Vec<&str> = Vec::with_capacity(cfg.max_endpoints + 1);
    let mut last = None;
    for (i, (score, idx)) in normal.iter().enumerate() {
        let addr = view.workers[*idx].addr.as_str();
        if distinct.len() <= cfg.max_endpoints && !distinct.contains(&addr) {
            distinct.push(addr);
        }
        if i + 1 >= near && distinct.len() > cfg.max_endpoints {
            last = Some(*score);
            break;
        }
    }
    last.map(|l| l.max(limit))
}

#[cfg(test)]
mod tests;
