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
