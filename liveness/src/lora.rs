//! LoRA affinity: a request that names a LoRA adapter prefers the workers that already have it
//! loaded, so it does not wait for the adapter's weights to be read and copied in (and does not
//! evict another adapter from a full set of `max_loras` GPU slots).
//!
//! vLLM serves an adapter under its own model name (`--lora-modules name=path`, listed by
//! `/v1/models`), so the request's `model` is the adapter's name. What a worker has loaded comes
//! from its frames ([`crate::frame::Frame::adapters`]): the sidecar reads vLLM's
//! `vllm:lora_requests_info` (the adapters of the requests running and waiting at the newest
//! engine step, and, from its older series, when each adapter was last in a step) and announces
//! the active ones, then the most recently used others, up to vLLM's `max_lora` slots: the
//! contents of vLLM's LRU as far as `/metrics` tells (it does not show the cache itself). It
//! only ever chooses between workers that are eligible anyway.
//!
//! The rule (in [`crate::pick::pick_ranked`], through [`first`]): among the workers already
//! eligible for the first attempt (fresh, serving the model, not drained, admitted by the
//! breaker), those holding the adapter take it while their predicted time to first token is
//! within [`LoraConfig::spill_ratio`]/[`LoraConfig::spill_ms`] of the best; above that the
//! request spills to the normal pick (the adapter is then loaded on one more worker, which is
//! how a hot adapter spreads). Among several holders within the margin, a request with a prefix
//! or session key ([`crate::affinity`]) takes its rendezvous favourite, one without takes the
//! better of two near-best holders (anti-herding, as the normal pick). The retries keep the
//! score order: affinity never removes a worker from the list nor reorders the retries.
//!
//! Peers: the Gateway API Inference Extension's LoRA affinity scorer reads the same metric and
//! scores a pod holding the adapter above one with a free slot above the rest. This takes the
//! signal and keeps the load score in charge (the margin), and keeps an adapter after its last
//! request (from the metric's older series), which reading the newest series alone forgets.

use serde::{Deserialize, Serialize};

use crate::affinity;
use crate::fleet::{FleetView, WorkerView};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// `false`: adapters in the view are ignored and every pick is the load-only pick.
    pub enabled: bool,
    /// A holder is taken while its predicted TTFT is at most `best * (1 + spill_ratio) +
    /// spill_ms`; above that the request spills.
    pub spill_ratio: f64,
    pub spill_ms: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        // Loading an adapter costs one read of its weights (tens to hundreds of ms for the usual
        // ranks) plus, with every slot taken, an eviction that the next request for the evicted
        // adapter pays again: worth a queue about as long as the best worker's, not more.
        LoraConfig { enabled: true, spill_ratio: 1.0, spill_ms: 100.0 }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<(), String> {
        if ![self.spill_ratio, self.spill_ms].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err("pick.lora.spill_ratio / spill_ms: must be finite and >= 0".into());
        }
        Ok(())
    }
}

/// Whether `w`'s last frame lists `model` among its loaded adapters.
pub fn holds(w: &WorkerView, model: &str) -> bool {
    w.adapters.iter().any(|a| a == model)
}

/// The adapter a request asks for, when LoRA affinity applies to it: `model`, if one of
/// `workers` (the request's candidates) holds it.
pub fn requested<'a, 'w>(model: Option<&'a str>, mut workers: impl Iterator<Item = &'w WorkerView>, cfg: &LoraConfig) -> Option<&'a str> {
    let m = model.filter(|_| cfg.enabled)?;
    workers.any(|w| holds(w, m)).then_some(m)
}

/// The margin over the best predicted TTFT within which a holder is taken.
pub fn spill_limit(best_ms: f64, cfg: &LoraConfig) -> f64 {
    best_ms * (1.0 + cfg.spill_ratio) + cfg.spill_ms
}

/// The first attempt for a request for `adapter`: its position in `normal` (the admitted fresh
/// candidates as (score, view index), best first), or `None` when no holder is within the
/// margin (the normal pick then decides: a spill). `near_best` is the picker's near-best band
/// (ratio, ms) and `below(n)` its uniform draw in `0..n` (this module sits below `pick`).
pub fn first(normal: &[(f64, usize)], view: &FleetView, adapter: &str, key: Option<u64>, mut below: impl FnMut(usize) -> usize, near_best: (f64, f64), cfg: &LoraConfig) -> Option<usize> {
    let best = normal.first()?.0;
    let limit = spill_limit(best, cfg);
    let holders: Vec<usize> = normal.iter().enumerate().take_while(|(_, s)| s.0 <= limit).filter(|(_, s)| holds(&view.workers[s.1], adapter)).map(|(i, _)| i).collect();
    let top = *holders.first()?;
    if let Some(k) = key {
        // The first of equal weights (workers sharing an address) keeps the score order.
        let mut win = (top, affinity::weight(k, &view.workers[normal[top].1].addr));
        for &i in &holders[1..] {
            let w = affinity::weight(k, &view.workers[normal[i].1].addr);
            if w > win.1 {
                win = (i, w);
            }
        }
        return Some(win.0);
    }
    // Power of two choices among the holders near the best holder.
    let near_limit = normal[top].0 * (1.0 + near_best.0) + near_best.1;
    let near: Vec<usize> = holders.iter().copied().take_while(|i| normal[*i].0 <= near_limit).collect();
    if near.len() < 2 {
        return Some(top);
    }
    let a = below(near.len());
    let mut b = below(near.len() - 1);
    if b >= a {
        b += 1;
    }
    Some(if normal[near[b]].0 < normal[near[a]].0 { near[b] } else { near[a] })
}

/// How LoRA affinity fared for one request, for the filter's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No eligible worker holds the requested model as an adapter (or no pick was made).
    None,
    /// The first attempt goes to a worker holding the adapter.
    Hit,
    /// Some fresh worker of the router's pools holds it, the first attempt went elsewhere: it
    /// was over the margin (a spill), its circuit was open, or a breaker probe took the slot.
    Miss,
}

/// [`Outcome`] of a pick whose first endpoint is `first` (`None`: no pick), over the workers
/// `eligible` says could take the request (`crate::pick::lora_outcome` passes the picker's rule).
pub fn outcome(view: &FleetView, model: Option<&str>, first: Option<&str>, eligible: impl Fn(&WorkerView) -> bool, cfg: &LoraConfig) -> Outcome {
    let (Some(m), Some(first)) = (model.filter(|_| cfg.enabled), first) else { return Outcome::None };
    let mut any = false;
    for w in &view.workers {
        if holds(w, m) && eligible(w) {
            if w.addr == first {
                return Outcome::Hit;
            }
            any = true;
        }
    }
    if any {
        Outcome::Miss
    } else {
        Outcome::None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::breaker::Admission;
    use crate::pick::{lora_outcome as outcome, pick_ranked, Decision, LocalLoad, PickConfig, Ranked, Rng};
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    fn w(i: u16, waiting: f64, adapters: &[&str]) -> WorkerView {
        WorkerView {
            id: format!("w{i}"),
            pool: "p1".into(),
            models: vec!["tiny".into(), "sql".into(), "chat".into()],
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
            addr: format!("127.0.0.1:{i}"),
            age_ms: 100,
            fresh: true,
            stalled: false,
            boot: 1,
            running: Some(0.0),
            waiting: Some(waiting),
            kv: Some(0.1),
            ttft_ms: Some(50.0),
            gen_tps: None,
            prompt_tps: None,
            preemptions: None,
            pace: None,
            slow: None,
            drained: false,
        }
    }

    fn view(ws: Vec<WorkerView>) -> FleetView {
        FleetView { now_ms: 0, workers: ws, pools: vec![] }
    }

    /// The endpoints a request for `model` gets, with `open` circuits denied.
    fn pick(v: &FleetView, model: &str, key: Option<u64>, seed: u64, open: &[&str], cfg: &PickConfig) -> Vec<String> {
        let ranked = Ranked::build(v, cfg);
        let adm = |a: &str| if open.contains(&a) { Admission::Deny } else { Admission::Allow };
        let (d, _) = pick_ranked(&ranked, v, 0, 0, Some(model), key.map(crate::affinity::Want::new), &LocalLoad::default(), &mut Rng::new(seed), cfg, open, adm, |_| false);
        match d {
            Decision::Endpoints { endpoints, .. } => endpoints,
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_request_for_an_adapter_goes_to_its_holder() {
        let v = view(vec![w(1, 0.0, &[]), w(2, 0.0, &["sql"]), w(3, 0.0, &["chat"]), w(4, 0.0, &[])]);
        let cfg = PickConfig::default();
        for seed in 0..200 {
            let e = pick(&v, "sql", None, seed, &[], &cfg);
            assert_eq!(e[0], "127.0.0.1:2", "seed {seed}");
            assert_eq!(e.len(), 3, "the retries stay: {e:?}");
            assert_eq!(outcome(&v, 0, 0, Some("sql"), Some(&e[0]), &cfg), Outcome::Hit);
            let k = pick(&v, "chat", Some(seed), seed, &[], &cfg);
            assert_eq!(k[0], "127.0.0.1:3", "a key does not override the adapter");
        }
        // The base model (held by nobody as an adapter): the normal spread.
        let firsts: std::collections::HashSet<String> = (0..200).map(|s| pick(&v, "tiny", None, s, &[], &cfg)[0].clone()).collect();
        assert_eq!(firsts.len(), 4);
        assert_eq!(outcome(&v, 0, 0, Some("tiny"), Some("127.0.0.1:1"), &cfg), Outcome::None);
        // Disabled: the adapter is ignored.
        let off = PickConfig { lora: LoraConfig { enabled: false, ..LoraConfig::default() }, ..PickConfig::default() };
        let firsts: std::collections::HashSet<String> = (0..200).map(|s| pick(&v, "sql", None, s, &[], &off)[0].clone()).collect();
        assert_eq!(firsts.len(), 4);
        assert_eq!(outcome(&v, 0, 0, Some("sql"), Some("127.0.0.1:1"), &off), Outcome::None);
    }

    #[test]
    fn a_loaded_holder_spills_and_an_open_or_stale_holder_is_skipped() {
        let cfg = PickConfig::default();
        // Best 50 ms; limit 50 * 2 + 100 = 200 ms: 2 waiting (150 ms) is within, 4 (250) is not.
        let v = view(vec![w(1, 0.0, &[]), w(2, 2.0, &["sql"]), w(3, 0.0, &[])]);
        assert_eq!(pick(&v, "sql", None, 7, &[], &cfg)[0], "127.0.0.1:2");
        let v = view(vec![w(1, 0.0, &[]), w(2, 4.0, &["sql"]), w(3, 0.0, &[])]);
        for seed in 0..50 {
            let e = pick(&v, "sql", None, seed, &[], &cfg);
            assert_ne!(e[0], "127.0.0.1:2", "spilled");
            assert!(e.contains(&"127.0.0.1:2".to_string()), "still a retry: {e:?}");
            assert_eq!(outcome(&v, 0, 0, Some("sql"), Some(&e[0]), &cfg), Outcome::Miss);
        }
        let v = view(vec![w(1, 0.0, &[]), w(2, 0.0, &["sql"]), w(3, 0.0, &[])]);
        assert_ne!(pick(&v, "sql", None, 3, &["127.0.0.1:2"], &cfg)[0], "127.0.0.1:2", "open circuit");
        let mut dead = v.clone();
        dead.workers[1].age_ms = 5_000;
        let e = pick(&dead, "sql", None, 3, &[], &cfg);
        assert!(!e.contains(&"127.0.0.1:2".to_string()), "a silent holder is never picked: {e:?}");
        assert_eq!(outcome(&dead, 0, 0, Some("sql"), Some(&e[0]), &cfg), Outcome::None);
    }

    #[test]
    fn holders_share_an_adapter_by_score_and_by_key() {
        let cfg = PickConfig::default();
        let v = view(vec![w(1, 0.0, &["sql"]), w(2, 0.0, &["sql"]), w(3, 0.0, &[]), w(4, 0.0, &[])]);
        let mut n = [0usize; 2];
        for seed in 0..400 {
            let e = pick(&v, "sql", None, seed, &[], &cfg);
            n[usize::from(e[0] != "127.0.0.1:1")] += 1;
            assert!(e[0] == "127.0.0.1:1" || e[0] == "127.0.0.1:2");
        }
        assert!(n.iter().all(|c| *c > 100), "both holders get some: {n:?}");
        // With a key, the same holder every time.
        let a = pick(&v, "sql", Some(99), 1, &[], &cfg)[0].clone();
        assert!((0..50).all(|s| pick(&v, "sql", Some(99), s, &[], &cfg)[0] == a));
    }

    proptest! {
        /// Whatever the fleet: the first attempt is an eligible worker (fresh, admitted), a
        /// holder whenever an admitted fresh holder is within the margin (and, without a key,
        /// only then), and the list is the same set of workers as without LoRA affinity.
        #[test]
        fn lora_only_chooses_the_first_among_the_eligible(
            n in 1usize..8,
            waiting in proptest::collection::vec(0.0f64..6.0, 8),
            ages in proptest::collection::vec(0u64..4_000, 8),
            held in proptest::collection::vec(any::<bool>(), 8),
            open in proptest::collection::vec(any::<bool>(), 8),
            seed in any::<u64>(), key in proptest::option::of(any::<u64>()),
        ) {
            let cfg = PickConfig::default();
            let ws: Vec<WorkerView> = (0..n).map(|i| {
                let mut x = w(i as u16 + 1, waiting[i], if held[i] { &["sql"] } else { &[] });
                x.age_ms = ages[i];
                x
            }).collect();
            let v = view(ws);
            let open: Vec<String> = (0..n).filter(|i| open[*i]).map(|i| v.workers[i].addr.clone()).collect();
            let open: Vec<&str> = open.iter().map(String::as_str).collect();
            let ranked = Ranked::build(&v, &cfg);
            let adm = |a: &str| if open.contains(&a) { Admission::Deny } else { Admission::Allow };
            let (d, _) = pick_ranked(&ranked, &v, 0, 0, Some("sql"), key.map(crate::affinity::Want::new), &LocalLoad::default(), &mut Rng::new(seed), &cfg, &open, adm, |_| false);
            let off = PickConfig { lora: LoraConfig { enabled: false, ..LoraConfig::default() }, ..PickConfig::default() };
            let (d_off, _) = pick_ranked(&Ranked::build(&v, &off), &v, 0, 0, Some("sql"), key.map(crate::affinity::Want::new), &LocalLoad::default(), &mut Rng::new(seed), &off, &open, adm, |_| false);
            let eligible = |x: &WorkerView| x.age_ms < cfg.freshness_gate_ms && !open.contains(&x.addr.as_str());
            let scores: Vec<(f64, &WorkerView)> = v.workers.iter().filter(|x| eligible(x)).map(|x| (crate::pick::predicted_ttft_ms(x, 0.0, &cfg), x)).collect();
            match (d, d_off) {
                (Decision::Endpoints { endpoints, .. }, Decision::Endpoints { endpoints: e_off, .. }) => {
                    let first = v.workers.iter().find(|x| x.addr == endpoints[0]).unwrap();
                    prop_assert!(eligible(first));
                    let best = scores.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
                    let holder_within = scores.iter().any(|(s, x)| holds(x, "sql") && *s <= spill_limit(best, &cfg.lora));
                    if holder_within {
                        prop_assert!(holds(first, "sql"));
                    } else if key.is_none() {
                        // (With a key, prefix affinity's own wider margin may still choose one.)
                        prop_assert!(!holds(first, "sql"));
                    }
                    let mut a = endpoints.clone();
                    let mut b = e_off.clone();
                    a.sort();
                    b.sort();
                    if a.len() < cfg.max_endpoints {
                        prop_assert_eq!(a, b);
                    }
                }
                (d, d_off) => {
                    prop_assert!(scores.is_empty(), "{:?} {:?}", d, d_off);
                }
            }
        }
    }
}
