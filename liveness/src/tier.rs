//! The fallback chain: which tiers a request may reach after the router's own workers, in what
//! order, how a request is adapted to a degraded tier or a provider, and how much spilled
//! traffic a receiving pool takes.
//!
//! ```text
//!   own workers ─▶ spill: other pools' routers ─▶ degraded tiers ─▶ provider ─▶ typed 503
//!   (picked)        (same model, full size)        (smaller model,    (TLS, key,
//!                                                   CPU vLLM; capped)  own model)
//! ```
//!
//! The router walks the chain with one `x-gpuha-endpoints` list: the picked workers first, then
//! every tier's endpoints in order ([`Chain::endpoints`]); Envoy's retry policy moves to the next
//! address on a failure before the first token, so a tier's last candidate failing moves the
//! request to the next tier with nothing of the failed attempt sent to the client.
//!
//! Policies, each decided here:
//! * **No amplification.** A request that reached this router as a spill (it carries
//!   [`SPILLED_HEADER`]) is served by this router's own workers or not at all: no tier is
//!   appended, so it can never spill again or bounce between regions. The sending router keeps
//!   its own chain (its degraded tiers, its provider) for what the receiving pool refuses.
//! * **Spill budget** ([`admit_spill`]): the receiving router admits spilled requests while the
//!   ones it is serving stay below `share` of its pool's capacity (fresh workers from its
//!   telemetry × `slots_per_worker`), and only while its own pool is not full. A refusal is an
//!   immediate 503 the sending router retries on its next tier.
//! * **What a degraded tier serves** ([`Chain::applies`]): only generation (chat, completions,
//!   Responses). An embedding from another model is not interchangeable, so embeddings, audio
//!   and tokenization get the spill tiers (same model) and nothing else.
//! * **Adaptation** ([`Adaptation::apply`]): the model name replaced, `max_tokens` (and
//!   `max_completion_tokens`, `max_output_tokens`) capped, and configured fields (sampling)
//!   overwritten, per tier, by that tier's own listener: the router's buffered body, which every
//!   retry replays, stays the client's.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fleet::{FleetView, WorkerView};
use crate::output::Api;
use crate::pick::effective_age_ms;

/// Request header marking a request one router spilled to another; its value is the sending
/// router's tier name (for logs). The receiving router serves it with its own workers only.
pub const SPILLED_HEADER: &str = "x-gpuha-spilled";
/// Response header naming the tier that served the request.
pub const TIER_HEADER: &str = "x-gpuha-tier";

/// What a tier is: decides where it sits in the chain and what it may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierKind {
    /// Another pool's router: the same model at full size (cross-region spillover).
    Spill,
    /// A smaller model or a CPU vLLM behind this router's adapter listener.
    Degraded,
    /// An external OpenAI-compatible API behind this router's adapter listener.
    Provider,
}

impl TierKind {
    pub fn label(self) -> &'static str {
        match self {
            TierKind::Spill => "spill",
            TierKind::Degraded => "degraded",
            TierKind::Provider => "provider",
        }
    }
}

/// One tier after the router's own workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Names the tier in `x-gpuha-tier`, the access log and the stats (`[a-z0-9_-]`).
    pub name: String,
    pub kind: TierKind,
    /// `ip:port` addresses, tried in order: other routers' listeners (spill), or this router's
    /// adapter listener for the tier (degraded, provider).
    pub endpoints: Vec<String>,
}

/// The router's chain: its own tier's name and the tiers after it, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Chain {
    /// The name of the router's own workers' tier.
    pub own: String,
    /// The router's own workers (its Envoy cluster's members), for a request the picker
    /// cannot pick for (no fresh view: dnsd unreachable): [`Chain::fail_open`].
    pub own_endpoints: Vec<String>,
    pub tiers: Vec<Tier>,
}

impl Default for Chain {
    fn default() -> Self {
        Chain { own: "primary".into(), own_endpoints: Vec::new(), tiers: Vec::new() }
    }
}

/// The addresses of `view`'s workers of `pools` (every pool when empty) that an operator has not
/// drained, in the view's order: the router's own workers when its config lists none (membership
/// over EDS), for [`Chain::fail_open_over`]. Stale or not: a view too old to pick from still
/// names the cluster's members better than nothing (no data is not death).
pub fn own_of_view(view: &crate::FleetView, pools: &[String]) -> Vec<String> {
    view.workers.iter().filter(|w| !w.drained && (pools.is_empty() || pools.contains(&w.pool))).map(|w| w.addr.clone()).collect()
}

/// Whether `name` is usable in a stat name and a header value.
fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 32 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Chain {
    pub fn validate(&self) -> Result<(), String> {
        if !name_ok(&self.own) {
            return Err(format!("tiers.own: {:?} must be 1-32 characters of a-z, 0-9, _ and -", self.own));
        }
        let mut names = vec![self.own.as_str()];
        let mut rank = 0;
        for (i, t) in self.tiers.iter().enumerate() {
            if !name_ok(&t.name) {
                return Err(format!("tiers.tiers[{i}].name: {:?} must be 1-32 characters of a-z, 0-9, _ and -", t.name));
            }
            if names.contains(&t.name.as_str()) {
                return Err(format!("tiers.tiers[{i}].name: {:?} is used twice", t.name));
            }
            names.push(&t.name);
            if t.endpoints.is_empty() {
                return Err(format!("tiers.tiers[{i}].endpoints: tier {:?} needs at least one ip:port", t.name));
            }
            let r = match t.kind {
                TierKind::Spill => 0,
                TierKind::Degraded => 1,
                TierKind::Provider => 2,
            };
            if r < rank {
                return Err(format!("tiers.tiers[{i}]: a {} tier cannot follow a later kind (order: spill, degraded, provider)", t.kind.label()));
            }
            rank = r;
        }
        Ok(())
    }

    /// Whether a tier of `kind` may serve a request for `path` (see the module docs).
    pub fn applies(kind: TierKind, path: &str) -> bool {
        kind == TierKind::Spill || Api::from_path(path).is_some()
    }

    /// The whole endpoint list for one request: `own` (the picked workers, in order) followed by
    /// the endpoints of every tier that applies, unless the request arrived as a spill.
    /// `spill_ok`: whether spill tiers may be used now (false when the request arrived spilled).
    /// The answer's `spills` says whether a spill endpoint is in the list (the request must then
    /// carry [`SPILLED_HEADER`]).
    pub fn endpoints(&self, own: &[String], path: &str, spilled: bool) -> Listed {
        let mut endpoints: Vec<String> = own.to_vec();
        let mut spills = false;
        if !spilled {
            for t in self.tiers.iter().filter(|t| Chain::applies(t.kind, path)) {
                spills |= t.kind == TierKind::Spill;
                for e in &t.endpoints {
                    if !endpoints.contains(e) {
                        endpoints.push(e.clone());
                    }
                }
            }
        }
        Listed { endpoints, spills }
    }

    /// The list for a request the picker fails open on (no fresh view: no data is not death):
    /// up to `max` of the router's own workers, from `start` round the list (spreads like
    /// round robin), then the tiers, so that own workers that really are dead still leave the
    /// chain. Empty without tiers: no list at all, Envoy's round robin as before.
    pub fn fail_open(&self, start: usize, max: usize, path: &str, spilled: bool) -> Listed {
        self.fail_open_over(&self.own_endpoints, start, max, path, spilled)
    }

    /// [`Chain::fail_open`] over `own`, the router's own workers as it knows them: with
    /// membership over EDS the config lists none ([`Chain::own_endpoints`] is empty), and the
    /// last fleet view's workers ([`own_of_view`]) stand in, so a router whose dnsd is gone
    /// still tries its own workers before the tiers.
    pub fn fail_open_over(&self, own: &[String], start: usize, max: usize, path: &str, spilled: bool) -> Listed {
        if self.tiers.is_empty() {
            return Listed { endpoints: Vec::new(), spills: false };
        }
        let n = own.len();
        let own: Vec<String> = (0..n.min(max)).map(|i| own[(start + i) % n].clone()).collect();
        self.endpoints(&own, path, spilled)
    }

    /// The tier an upstream address belongs to; `None`: the router's own workers.
    pub fn tier_of(&self, addr: &str) -> Option<&Tier> {
        self.tiers.iter().find(|t| t.endpoints.iter().any(|e| e == addr))
    }

    /// The tier name an answer from `addr` is marked with.
    pub fn served_by<'a>(&'a self, addr: &str) -> &'a str {
        self.tier_of(addr).map_or(self.own.as_str(), |t| t.name.as_str())
    }

    /// Every tier endpoint (never picked from the fleet view, never rescued by the guard).
    pub fn all_endpoints(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().flat_map(|t| t.endpoints.iter().map(String::as_str))
    }
}

/// A request's endpoint list ([`Chain::endpoints`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub endpoints: Vec<String>,
    /// A spill endpoint is in the list.
    pub spills: bool,
}

// ------------------------------------------------------------------------------------------
// Spill budget (receiving side)

/// How much spilled traffic this router's pool takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpillBudget {
    /// Share of the pool's capacity that spilled requests may hold at once (0 refuses every spill).
    pub share: f64,
    /// Concurrent requests one worker takes (vLLM's `--max-num-seqs`): telemetry says how many
    /// workers are fresh and how busy they are, not how many sequences they were started with.
    pub slots_per_worker: f64,
}

impl Default for SpillBudget {
    fn default() -> Self {
        SpillBudget { share: 0.5, slots_per_worker: 64.0 }
    }
}

impl SpillBudget {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.share) {
            return Err("spill_budget.share: must be in 0..=1".into());
        }
        if !(self.slots_per_worker.is_finite() && self.slots_per_worker >= 1.0) {
            return Err("spill_budget.slots_per_worker: must be at least 1".into());
        }
        Ok(())
    }
}

/// A pool's load as its telemetry shows it now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PoolLoad {
    /// Workers fresh now (the picker's gate).
    pub fresh: usize,
    /// Their `num_requests_running + num_requests_waiting`.
    pub busy: f64,
}

/// The load of the workers of `pools` (empty: all) in `view`, counting only those fresh and
/// not drained at `now` (`fetched_local_ms`: when the view was vouched for, see [`effective_age_ms`]).
pub fn pool_load(view: &FleetView, pools: &[String], fetched_local_ms: u64, now_ms: u64, gate_ms: u64) -> PoolLoad {
    let mine = |w: &&WorkerView| pools.is_empty() || pools.contains(&w.pool);
    // A drained worker takes no new request: it is no capacity for spills either.
    let fresh = view.workers.iter().filter(mine).filter(|w| !w.drained && effective_age_ms(w, fetched_local_ms, now_ms) < gate_ms);
    fresh.fold(PoolLoad::default(), |acc, w| {
        let n = |x: Option<f64>| x.filter(|v| v.is_finite() && *v > 0.0).unwrap_or(0.0);
        PoolLoad { fresh: acc.fresh + 1, busy: acc.busy + n(w.running) + n(w.waiting) }
    })
}

/// Why a spilled request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillRefusal {
    /// No fresh worker in this pool.
    NoCapacity,
    /// Spilled requests in flight already hold the budget's share of the capacity.
    OverBudget,
    /// The pool's own numbers say it is full.
    Full,
}

impl SpillRefusal {
    pub fn message(self) -> &'static str {
        match self {
            SpillRefusal::NoCapacity => "no fresh worker in this pool to take a spilled request",
            SpillRefusal::OverBudget => "this pool's spill budget is taken by other spilled requests",
            SpillRefusal::Full => "this pool is full",
        }
    }
}

/// Whether one more spilled request may be served: `in_flight` spilled requests are being
/// served now.
pub fn admit_spill(in_flight: u64, load: PoolLoad, budget: &SpillBudget) -> Result<(), SpillRefusal> {
    if load.fresh == 0 {
        return Err(SpillRefusal::NoCapacity);
    }
    let capacity = load.fresh as f64 * budget.slots_per_worker;
    if in_flight as f64 + 1.0 > (capacity * budget.share).floor() {
        return Err(SpillRefusal::OverBudget);
    }
    if load.busy >= capacity {
        return Err(SpillRefusal::Full);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Adaptation (degraded tiers, provider)

/// How a request is adapted to a tier.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adaptation {
    /// The model name the tier serves (replaces the request's `model`).
    pub model: Option<String>,
    /// Upper bound on `max_tokens` / `max_completion_tokens` (chat, completions) and
    /// `max_output_tokens` (Responses); set to it when the request has none.
    pub max_tokens: Option<u64>,
    /// Top-level fields set on every request (sampling: `{"temperature": 0}` for greedy decoding).
    pub set: Map<String, Value>,
}

/// Fields `set` may not touch: they decide what the request is, not how it is sampled.
const NOT_SETTABLE: &[&str] = &["model", "stream", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Why a body could not be adapted (the adapter then refuses the attempt: the next tier takes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdaptError {
    /// Not a JSON object.
    NotJson,
}

impl Adaptation {
    pub fn validate(&self) -> Result<(), String> {
        if self.model.as_deref().is_some_and(str::is_empty) {
            return Err("adapt.model: must not be empty".into());
        }
        if self.max_tokens == Some(0) {
            return Err("adapt.max_tokens: must be at least 1".into());
        }
        if let Some(k) = self.set.keys().find(|k| NOT_SETTABLE.contains(&k.as_str())) {
            return Err(format!("adapt.set: {k:?} cannot be set (use adapt.model / adapt.max_tokens)"));
        }
        Ok(())
    }

    /// The body for this tier. `path` selects the token-limit field names.
    pub fn apply(&self, path: &str, body: &[u8]) -> Result<Vec<u8>, AdaptError> {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else { return Err(AdaptError::NotJson) };
        if let Some(m) = &self.model {
            obj.insert("model".into(), Value::String(m.clone()));
        }
        if let Some(cap) = self.max_tokens {
            let fields: &[&str] = match Api::from_path(path) {
                Some(Api::Responses) => &["max_output_tokens"],
                _ => &["max_tokens", "max_completion_tokens"],
            };
            let mut any = false;
            for f in fields {
                if let Some(v) = obj.get_mut(*f) {
                    if v.is_null() {
                        continue;
                    }
                    any = true;
                    // A non-number is the worker's to refuse; a number above the cap is capped.
                    if v.as_f64().is_some_and(|n| n > cap as f64) {
                        *v = Value::from(cap);
                    }
                }
            }
            if !any {
                obj.insert(fields[0].to_string(), Value::from(cap));
            }
        }
        for (k, v) in &self.set {
            obj.insert(k.clone(), v.clone());
        }
        Ok(serde_json::to_vec(&Value::Object(obj)).unwrap_or_else(|_| body.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain() -> Chain {
        Chain {
            own: "a".into(),
            own_endpoints: vec!["w1:1".into(), "w2:1".into(), "w3:1".into(), "w4:1".into()],
            tiers: vec![
                Tier { name: "b".into(), kind: TierKind::Spill, endpoints: vec!["10.0.1.1:10000".into()] },
                Tier { name: "small".into(), kind: TierKind::Degraded, endpoints: vec!["127.0.0.1:10101".into()] },
                Tier { name: "openai".into(), kind: TierKind::Provider, endpoints: vec!["127.0.0.1:10102".into()] },
            ],
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn chain_appends_tiers_in_order() {
        let l = chain().endpoints(&s(&["w1:1", "w2:1"]), "/v1/chat/completions", false);
        assert_eq!(l.endpoints, s(&["w1:1", "w2:1", "10.0.1.1:10000", "127.0.0.1:10101", "127.0.0.1:10102"]));
        assert!(l.spills);
        // No own worker fresh: the tiers alone.
        let l = chain().endpoints(&[], "/v1/responses", false);
        assert_eq!(l.endpoints, s(&["10.0.1.1:10000", "127.0.0.1:10101", "127.0.0.1:10102"]));
    }

    #[test]
    fn a_spilled_request_is_never_spilled_again_nor_degraded_here() {
        let l = chain().endpoints(&s(&["w1:1"]), "/v1/chat/completions", true);
        assert_eq!(l.endpoints, s(&["w1:1"]));
        assert!(!l.spills);
        assert!(chain().endpoints(&[], "/v1/chat/completions", true).endpoints.is_empty());
    }

    #[test]
    fn embeddings_spill_but_are_never_degraded() {
        let l = chain().endpoints(&s(&["w1:1"]), "/v1/embeddings", false);
        assert_eq!(l.endpoints, s(&["w1:1", "10.0.1.1:10000"]));
        let l = chain().endpoints(&[], "/v1/audio/transcriptions", false);
        assert_eq!(l.endpoints, s(&["10.0.1.1:10000"]));
    }

    #[test]
    fn fail_open_rotates_own_workers_then_the_tiers() {
        let l = chain().fail_open(3, 3, "/v1/chat/completions", false);
        assert_eq!(l.endpoints, s(&["w4:1", "w1:1", "w2:1", "10.0.1.1:10000", "127.0.0.1:10101", "127.0.0.1:10102"]));
        // Every start gives each own worker the first attempt in turn.
        let firsts: Vec<String> = (0..4).map(|i| chain().fail_open(i, 3, "/v1/chat/completions", false).endpoints[0].clone()).collect();
        assert_eq!(firsts, s(&["w1:1", "w2:1", "w3:1", "w4:1"]));
        assert_eq!(chain().fail_open(0, 2, "/v1/chat/completions", true).endpoints, s(&["w1:1", "w2:1"]));
        // No tiers: no list (Envoy's round robin, as without a chain).
        let c = Chain { tiers: vec![], ..chain() };
        assert!(c.fail_open(0, 3, "/v1/chat/completions", false).endpoints.is_empty());
    }

    /// Membership over EDS: the config lists no own worker; the last view's workers of the
    /// router's pools (not drained) come before the tiers.
    #[test]
    fn fail_open_over_the_views_workers_without_configured_ones() {
        let view: crate::FleetView = serde_json::from_value(json!({"now_ms": 0, "workers": [
            {"id": "a1", "pool": "a", "models": [], "addr": "10.0.0.1:8000", "age_ms": 9000, "fresh": false, "boot": 1},
            {"id": "a2", "pool": "a", "models": [], "addr": "10.0.0.2:8000", "age_ms": 9000, "fresh": false, "boot": 1, "drained": true},
            {"id": "b1", "pool": "b", "models": [], "addr": "10.0.9.1:8000", "age_ms": 9000, "fresh": false, "boot": 1},
        ]}))
        .unwrap();
        let own = own_of_view(&view, &s(&["a"]));
        assert_eq!(own, s(&["10.0.0.1:8000"]));
        assert_eq!(own_of_view(&view, &[]).len(), 2);
        let c = Chain { own_endpoints: vec![], ..chain() };
        let l = c.fail_open_over(&own, 5, 3, "/v1/chat/completions", false);
        assert_eq!(l.endpoints, s(&["10.0.0.1:8000", "10.0.1.1:10000", "127.0.0.1:10101", "127.0.0.1:10102"]));
        assert_eq!(c.fail_open(0, 3, "/v1/chat/completions", false).endpoints[0], "10.0.1.1:10000", "no view, no own worker known: the tiers");
    }

    #[test]
    fn served_by_names_the_tier_of_the_address() {
        let c = chain();
        assert_eq!(c.served_by("10.0.1.1:10000"), "b");
        assert_eq!(c.served_by("127.0.0.1:10102"), "openai");
        assert_eq!(c.served_by("10.9.9.9:8000"), "a");
        assert_eq!(c.tier_of("127.0.0.1:10101").map(|t| t.kind), Some(TierKind::Degraded));
        assert_eq!(c.all_endpoints().count(), 3);
    }

    #[test]
    fn an_endpoint_listed_twice_is_tried_once() {
        let l = chain().endpoints(&s(&["10.0.1.1:10000"]), "/v1/completions", false);
        assert_eq!(l.endpoints.iter().filter(|e| *e == "10.0.1.1:10000").count(), 1);
    }

    #[test]
    fn validate_names_order_and_endpoints() {
        assert!(chain().validate().is_ok());
        let mut c = chain();
        c.tiers.swap(0, 1);
        assert!(c.validate().unwrap_err().contains("order"));
        let mut c = chain();
        c.tiers[1].name = "b".into();
        assert!(c.validate().unwrap_err().contains("twice"));
        let mut c = chain();
        c.tiers[2].endpoints.clear();
        assert!(c.validate().unwrap_err().contains("endpoints"));
        let mut c = chain();
        c.own = "Bad Name".into();
        assert!(c.validate().unwrap_err().contains("tiers.own"));
    }

    #[test]
    fn spill_budget_is_a_share_of_fresh_capacity() {
        let b = SpillBudget { share: 0.25, slots_per_worker: 8.0 };
        let two = PoolLoad { fresh: 2, busy: 3.0 };
        // 2 workers x 8 slots x 0.25 = 4 spilled requests at once.
        for n in 0..4 {
            assert_eq!(admit_spill(n, two, &b), Ok(()), "in flight {n}");
        }
        assert_eq!(admit_spill(4, two, &b), Err(SpillRefusal::OverBudget));
        assert_eq!(admit_spill(0, PoolLoad { fresh: 0, busy: 0.0 }, &b), Err(SpillRefusal::NoCapacity));
        assert_eq!(admit_spill(0, PoolLoad { fresh: 2, busy: 16.0 }, &b), Err(SpillRefusal::Full));
        // A share of 0 refuses every spill.
        assert_eq!(admit_spill(0, two, &SpillBudget { share: 0.0, slots_per_worker: 8.0 }), Err(SpillRefusal::OverBudget));
        assert!(SpillBudget { share: 1.5, slots_per_worker: 8.0 }.validate().is_err());
        assert!(SpillBudget { share: 0.5, slots_per_worker: 0.0 }.validate().is_err());
    }

    #[test]
    fn pool_load_counts_fresh_workers_of_the_pools_only() {
        let w = |pool: &str, age: u64, running: f64| WorkerView {
            id: format!("{pool}{age}"),
            pool: pool.into(),
            models: vec![],
            adapters: vec![],
            addr: "127.0.0.1:1".into(),
            age_ms: age,
            fresh: age < 3_000,
            stalled: false,
            boot: 1,
            running: Some(running),
            waiting: Some(1.0),
            kv: None,
            ttft_ms: None,
            gen_tps: None,
            prompt_tps: None,
            preemptions: None,
            pace: None,
            slow: None,
            drained: false,
        };
        let mut view = FleetView { now_ms: 0, workers: vec![w("a", 100, 2.0), w("a", 5_000, 9.0), w("b", 100, 4.0)], pools: vec![] };
        let l = pool_load(&view, &s(&["a"]), 1_000, 1_500, 3_000);
        assert_eq!(l, PoolLoad { fresh: 1, busy: 3.0 });
        // An operator drained it: no capacity for spills.
        view.workers[0].drained = true;
        assert_eq!(pool_load(&view, &s(&["a"]), 1_000, 1_500, 3_000).fresh, 0);
        view.workers[0].drained = false;
        // Time passes on the local clock: the fresh one ages past the gate too.
        assert_eq!(pool_load(&view, &s(&["a"]), 1_000, 4_000, 3_000).fresh, 0);
        assert_eq!(pool_load(&view, &[], 1_000, 1_500, 3_000).fresh, 2);
    }

    fn adapt(a: &Adaptation, path: &str, body: Value) -> Value {
        serde_json::from_slice(&a.apply(path, body.to_string().as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn adaptation_rewrites_model_caps_tokens_and_sets_sampling() {
        let a = Adaptation { model: Some("small".into()), max_tokens: Some(64), set: json!({"temperature": 0}).as_object().unwrap().clone() };
        let out = adapt(&a, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "model": "big", "max_tokens": 500, "temperature": 0.9, "stream": true}));
        assert_eq!(out, json!({"messages": [{"role": "user", "content": "hi"}], "model": "small", "max_tokens": 64, "temperature": 0, "stream": true}));
        // Below the cap: kept. Both OpenAI names are capped.
        let out = adapt(&a, "/v1/chat/completions", json!({"model": "big", "max_tokens": 10, "max_completion_tokens": 900}));
        assert_eq!((out["max_tokens"].clone(), out["max_completion_tokens"].clone()), (json!(10), json!(64)));
        // None given: the cap is set (an uncapped request would run to the model's limit).
        assert_eq!(adapt(&a, "/v1/completions", json!({"model": "big", "prompt": "x", "max_tokens": null}))["max_tokens"], json!(64));
        // Responses API names it max_output_tokens.
        let out = adapt(&a, "/v1/responses", json!({"model": "big", "input": "x"}));
        assert_eq!(out["max_output_tokens"], json!(64));
        assert!(out.get("max_tokens").is_none());
    }

    #[test]
    fn adaptation_refuses_what_is_not_a_json_object() {
        let a = Adaptation { model: Some("small".into()), ..Adaptation::default() };
        assert_eq!(a.apply("/v1/chat/completions", b"[1,2]"), Err(AdaptError::NotJson));
        assert_eq!(a.apply("/v1/chat/completions", b"{\"model\": "), Err(AdaptError::NotJson));
        // Nothing configured: the body is the same object.
        let same = Adaptation::default().apply("/v1/chat/completions", br#"{"model":"m","n":1}"#).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&same).unwrap(), json!({"model": "m", "n": 1}));
    }

    #[test]
    fn adaptation_validate_keeps_set_to_sampling() {
        let bad = Adaptation { set: json!({"model": "x"}).as_object().unwrap().clone(), ..Adaptation::default() };
        assert!(bad.validate().unwrap_err().contains("\"model\""));
        assert!(Adaptation { max_tokens: Some(0), ..Adaptation::default() }.validate().is_err());
        assert!(Adaptation { model: Some(String::new()), ..Adaptation::default() }.validate().is_err());
    }
}
