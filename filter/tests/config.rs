//! The plugin configuration: defaults, roles, and bad values refused with the key named.

use gpuha_filter::config::{Config, GuardConfig, NoWorkerPolicy, PickerConfig};

#[test]
fn defaults_and_roles() {
    assert_eq!(Config::parse(br#"{"role":"picker"}"#).unwrap(), Config::Picker(PickerConfig::default()));
    assert_eq!(Config::parse(br#"{"role":"guard"}"#).unwrap(), Config::Guard(GuardConfig::default()));
    let Config::Picker(p) = Config::parse(br#"{"role":"picker","poll_interval_ms":100,"no_worker":"fail_open","pick":{"max_endpoints":2},"breaker":{"failure_threshold":5}}"#).unwrap() else { panic!("not a picker") };
    assert_eq!(p.poll_interval_ms, 100);
    assert_eq!(p.no_worker, NoWorkerPolicy::FailOpen);
    assert_eq!(p.pick.max_endpoints, 2);
    assert_eq!(p.breaker.failure_threshold, 5);
    assert_eq!(p.breaker.cooldown_ms, 5_000);
}

#[test]
fn rejects_unknown_and_bad_values() {
    assert!(Config::parse(br#"{"role":"picker","poll_intervall_ms":100}"#).unwrap_err().contains("unknown field"));
    assert!(Config::parse(br#"{"role":"guard","pick":{}}"#).is_err());
    assert!(Config::parse(br#"{"role":"picker","pick":{"max_endpoint":2}}"#).is_err());
    assert!(Config::parse(br#"{"role":"nobody"}"#).is_err());
    assert!(Config::parse(br#"{}"#).is_err());
    assert!(Config::parse(br#"{"role":"guard","retry_status":200}"#).unwrap_err().contains("retry_status"));
    assert!(Config::parse(br#"{"role":"guard","unseen_after_ms":500}"#).unwrap_err().contains("unseen_after_ms"));
    assert!(Config::parse(br#"{"role":"guard","unseen_after_ms":3000}"#).is_ok());
    // A config that raised only unseen_after_ms above the no-headers default stays valid (the
    // guard takes the larger of the two for attempts with no headers).
    assert!(Config::parse(br#"{"role":"guard","unseen_after_ms":60000}"#).is_ok());
    assert!(Config::parse(br#"{"role":"guard","unseen_no_headers_after_ms":5000}"#).is_ok());
    assert!(Config::parse(br#"{"role":"picker","poll_interval_ms":0}"#).unwrap_err().contains("poll_interval_ms"));
    assert!(Config::parse(br#"{"role":"picker","non_stream_timeout_ms":500}"#).unwrap_err().contains("non_stream_timeout_ms"));
    assert!(Config::parse(br#"{"role":"picker","non_stream_timeout_ms":0}"#).is_ok());
    assert!(Config::parse(b"not json").is_err());
}

#[test]
fn affinity_settings() {
    let Config::Picker(p) = Config::parse(br#"{"role":"picker","pick":{"affinity":{"enabled":false,"session_header":"x-conversation","spill_ms":10}}}"#).unwrap() else { panic!("not a picker") };
    assert!(!p.pick.affinity.enabled);
    assert_eq!(p.pick.affinity.session_header, "x-conversation");
    assert_eq!(p.pick.affinity.spill_ms, 10.0);
    assert!(p.pick.affinity.user_field, "unset keys keep their defaults");
    assert!(Config::parse(br#"{"role":"picker","pick":{"affinity":{"session_header":"X-Session"}}}"#).unwrap_err().contains("session_header"));
    assert!(Config::parse(br#"{"role":"picker","pick":{"affinity":{"spill_ratio":-1}}}"#).unwrap_err().contains("spill_ratio"));
    assert!(Config::parse(br#"{"role":"picker","pick":{"affinity":{"max_messages":0}}}"#).unwrap_err().contains("max_messages"));
    assert!(Config::parse(br#"{"role":"picker","pick":{"affinity":{"spil_ms":1}}}"#).unwrap_err().contains("unknown field"));
}

#[test]
fn gate_and_poll_interval_fit_dnsds_bounded_ages() {
    // Ages in the polled view are exact only up to the 3 s gate, and "under 1 s" below 1 s.
    assert!(Config::parse(br#"{"role":"picker","pick":{"freshness_gate_ms":5000}}"#).unwrap_err().contains("freshness_gate_ms"));
    assert!(Config::parse(br#"{"role":"picker","poll_interval_ms":2000}"#).unwrap_err().contains("poll_interval_ms"));
    assert!(Config::parse(br#"{"role":"picker","poll_interval_ms":500,"pick":{"freshness_gate_ms":1500}}"#).unwrap_err().contains("poll_interval_ms"));
    assert!(Config::parse(br#"{"role":"picker","poll_interval_ms":1999}"#).is_ok());
}

#[test]
fn poll_path_asks_for_the_cacheable_view_of_the_routers_pools() {
    use gpuha_filter::poll_path;
    let Config::Picker(p) = Config::parse(br#"{"role":"picker"}"#).unwrap() else { panic!() };
    assert_eq!(poll_path(&p), "/v1/fleet?ages=bounded");
    let Config::Picker(p) = Config::parse(br#"{"role":"picker","fleet_path":"/v1/fleet?x=1","pick":{"pools":["a","b"]}}"#).unwrap() else { panic!() };
    assert_eq!(poll_path(&p), "/v1/fleet?x=1&ages=bounded&pool=a,b");
}

#[test]
fn fallback_chain_and_tier_role() {
    let Config::Picker(p) = Config::parse(
        br#"{"role":"picker","tiers":{"own":"eu","own_endpoints":["10.0.0.5:8000"],"tiers":[{"name":"us","kind":"spill","endpoints":["10.0.2.1:10000"]},{"name":"small","kind":"degraded","endpoints":["127.0.0.1:10101"]}]},"spill_budget":{"share":0.25}}"#,
    )
    .unwrap() else {
        panic!("not a picker")
    };
    assert_eq!(p.tiers.served_by("10.0.2.1:10000"), "us");
    assert_eq!(p.spill_budget.share, 0.25);
    assert_eq!(p.spill_budget.slots_per_worker, 64.0);
    // Order spill → degraded → provider, unique names, a share in 0..=1.
    assert!(Config::parse(br#"{"role":"picker","tiers":{"tiers":[{"name":"s","kind":"degraded","endpoints":["127.0.0.1:1"]},{"name":"b","kind":"spill","endpoints":["127.0.0.1:2"]}]}}"#).unwrap_err().contains("order"));
    assert!(Config::parse(br#"{"role":"picker","spill_budget":{"share":2}}"#).unwrap_err().contains("spill_budget.share"));
    assert!(Config::parse(br#"{"role":"guard","tiers":{"own":"Not OK"}}"#).unwrap_err().contains("tiers.own"));

    let Config::Tier(t) = Config::parse(br#"{"role":"tier","name":"small","kind":"degraded","adapt":{"model":"small","max_tokens":64,"set":{"temperature":0}}}"#).unwrap() else {
        panic!("not a tier")
    };
    assert_eq!(t.adapt.max_tokens, Some(64));
    assert!(Config::parse(br#"{"role":"tier","name":"b","kind":"spill"}"#).unwrap_err().contains("spill"));
    assert!(Config::parse(br#"{"role":"tier","name":"s","kind":"degraded","adapt":{"set":{"stream":false}}}"#).unwrap_err().contains("adapt.set"));
    assert!(Config::parse(br#"{"role":"tier","name":"s","kind":"provider","adapt":{"max_token":5}}"#).unwrap_err().contains("unknown field"));
}
