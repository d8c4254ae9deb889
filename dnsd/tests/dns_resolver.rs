//! The pure resolver with synthetic time: which pools are answered as frames come and go,
//! cold start, fail-whale, priority, failback, and the eviction/failback transitions.

mod common;

use std::path::Path;

use gpuha_dnsd::dns::answer::{resolve, service_addresses, PoolStates, Transition, Transitions};
use gpuha_dnsd::dns::Zones;
use gpuha_dnsd::Config;
use gpuha_liveness::admin::{Overrides, PoolCommand};
use gpuha_liveness::{FleetState, Frame, Liveness, Metrics, EVICTION_WINDOW_MS, FAILBACK_HOLD_DOWN_MS as HOLD};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};

const T0: u64 = 1_800_000_000_000;

fn zones() -> Zones {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = common::config_text(dir.path(), &common::dns_section(""));
    let c = Config::from_toml(&text, Path::new("t.toml")).expect("config");
    Zones::compile(c.dns.as_ref().expect("dns")).expect("zones")
}

fn frame(worker: &str, pool: &str, seq: u64, at: u64) -> Frame {
    Frame {
        key_id: 1,
        boot_id: 1,
        seq,
        sent_ms: at,
        worker_id: worker.into(),
        pool_id: pool.into(),
        addr: "10.0.0.1:8000".parse().expect("addr"),
        models: vec![],
        adapters: vec![],
        metrics: Metrics::default(),
    }
}

fn a(z: &Zones, fleet: &FleetState, now: u64, name: &str) -> Vec<String> {
    let states = PoolStates::compute(z, fleet, &Overrides::default(), now);
    let r = resolve(z, &states, &Name::from_ascii(name).expect("name"), RecordType::A);
    assert_eq!(r.rcode, ResponseCode::NoError);
    let mut v: Vec<String> = r
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

const API_ALL: [&str; 3] = ["10.0.1.1", "10.0.2.1", "10.0.2.2"];
const POOL_A: [&str; 1] = ["10.0.1.1"];
const POOL_B: [&str; 2] = ["10.0.2.1", "10.0.2.2"];
const WHALE: [&str; 1] = ["10.9.9.9"];

#[test]
fn cold_start_answers_every_pool_then_evicts_the_silent_ones() {
    let z = zones();
    let mut fleet = FleetState::new(T0);
    // No frame at all: during the first window every pool is answered.
    assert_eq!(a(&z, &fleet, T0, "api.gpuha.test."), API_ALL);
    assert_eq!(a(&z, &fleet, T0 + EVICTION_WINDOW_MS - 1, "api.gpuha.test."), API_ALL);
    // After one window with no frames: every pool dead -> fail-whale, never NXDOMAIN.
    assert_eq!(a(&z, &fleet, T0 + EVICTION_WINDOW_MS, "api.gpuha.test."), WHALE);
    // Pool A reports: held down for HOLD, then only A is answered.
    fleet.observe(frame("a1", "pool-a", 1, T0 + 11_000), T0 + 11_000);
    assert_eq!(a(&z, &fleet, T0 + 11_000, "api.gpuha.test."), WHALE);
    assert_eq!(a(&z, &fleet, T0 + 11_000 + HOLD - 1, "api.gpuha.test."), WHALE);
    assert_eq!(a(&z, &fleet, T0 + 11_000 + HOLD, "api.gpuha.test."), POOL_A);
    // A's worker is in the window until exactly 10 s after its last frame, then A is evicted.
    assert_eq!(a(&z, &fleet, T0 + 21_000, "api.gpuha.test."), POOL_A);
    assert_eq!(a(&z, &fleet, T0 + 21_001, "api.gpuha.test."), WHALE);
    // Failback once frames have come back for the hold-down.
    fleet.observe(frame("b1", "pool-b", 1, T0 + 30_000), T0 + 30_000);
    assert_eq!(a(&z, &fleet, T0 + 30_000, "api.gpuha.test."), WHALE);
    fleet.observe(frame("b1", "pool-b", 2, T0 + 30_500), T0 + 30_500);
    assert_eq!(a(&z, &fleet, T0 + 30_000 + HOLD, "api.gpuha.test."), POOL_B);
}

#[test]
fn evicted_pool_is_never_answered_whatever_the_policy() {
    let z = zones();
    let mut fleet = FleetState::new(T0);
    for i in 0..40u64 {
        let t = T0 + i * 500;
        fleet.observe(frame("b1", "pool-b", i + 1, t), t);
        if i < 10 {
            fleet.observe(frame("a1", "pool-a", i + 1, t), t);
        }
    }
    // a1 last spoke at T0+4500; b1 at T0+19500.
    let now = T0 + 19_500;
    let states = PoolStates::compute(&z, &fleet, &Overrides::default(), now);
    assert_eq!(states.live[0], Liveness::Dead);
    assert_eq!(states.live[1], Liveness::Alive);
    for (i, _) in z.services.iter().enumerate() {
        let (_, served) = service_addresses(&z, &states, i);
        assert!(served.pools.iter().all(|(p, s)| *p != 0 && s.is_answerable()));
    }
    assert_eq!(a(&z, &fleet, now, "api.gpuha.test."), POOL_B);
    assert_eq!(a(&z, &fleet, now, "prio.gpuha.test."), POOL_B);
}

fn with(z: &Zones, fleet: &FleetState, ov: &Overrides, now: u64, name: &str) -> Vec<String> {
    let states = PoolStates::compute(z, fleet, ov, now);
    let r = resolve(z, &states, &Name::from_ascii(name).expect("name"), RecordType::A);
    let mut v: Vec<String> = r.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0.to_string()) } else { None }).collect();
    v.sort();
    v
}

#[test]
fn overrides_decide_over_liveness() {
    let z = zones();
    let mut fleet = FleetState::new(T0);
    let t = T0 + 20_000;
    fleet.observe(frame("a1", "pool-a", 1, t), t);
    fleet.observe(frame("b1", "pool-b", 1, t), t);
    let now = t + HOLD;
    let mut ov = Overrides::default();
    assert_eq!(with(&z, &fleet, &ov, now, "api.gpuha.test."), API_ALL);
    // A drained pool leaves the answer although alive; priority moves to the next pool.
    ov.set_pool("pool-b", PoolCommand::Drain, "", now);
    assert_eq!(with(&z, &fleet, &ov, now, "api.gpuha.test."), POOL_A);
    assert_eq!(with(&z, &fleet, &ov, now, "prio.gpuha.test."), POOL_A);
    // Forced out too: both out, the fail-whale set answers.
    ov.set_pool("pool-a", PoolCommand::ForceOut, "", now);
    assert_eq!(with(&z, &fleet, &ov, now, "prio.gpuha.test."), WHALE);
    // Forced in: answered although evicted (its worker silent for more than the window).
    ov.set_pool("pool-a", PoolCommand::ForceIn, "", now);
    let later = t + EVICTION_WINDOW_MS + 1;
    assert_eq!(PoolStates::compute(&z, &fleet, &ov, later).live[0], Liveness::Dead);
    assert_eq!(with(&z, &fleet, &ov, later, "prio.gpuha.test."), POOL_A);
    // Back to liveness alone.
    ov.set_pool("pool-a", PoolCommand::Auto, "", now);
    ov.set_pool("pool-b", PoolCommand::Auto, "", now);
    assert_eq!(with(&z, &fleet, &ov, later, "api.gpuha.test."), WHALE, "both silent: the fail-whale set");
}

#[test]
fn priority_takes_the_first_alive_pool_and_fails_over() {
    let z = zones();
    let mut fleet = FleetState::new(T0);
    let t = T0 + 20_000;
    fleet.observe(frame("a1", "pool-a", 1, t), t);
    fleet.observe(frame("b1", "pool-b", 1, t), t);
    assert_eq!(a(&z, &fleet, t + HOLD, "prio.gpuha.test."), POOL_B);
    fleet.observe(frame("a1", "pool-a", 2, t + 8_000), t + 8_000);
    // b1 silent for > 10 s: prio fails over to pool-a.
    assert_eq!(a(&z, &fleet, t + 10_001, "prio.gpuha.test."), POOL_A);
    // AAAA from the same pool as A: pool-a has one v6 router.
    let states = PoolStates::compute(&z, &fleet, &Overrides::default(), t + 10_001);
    let r = resolve(&z, &states, &Name::from_ascii("prio.gpuha.test.").expect("n"), RecordType::AAAA);
    assert_eq!(r.answers.len(), 1);
}

#[test]
fn min_workers_counts_distinct_workers_in_the_window() {
    let text = common::dns_section("").replace("routers = [\"10.0.1.1\", \"fd00::1:1\"]", "routers = [\"10.0.1.1\", \"fd00::1:1\"]\nmin_workers = 2");
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Config::from_toml(&common::config_text(dir.path(), &text), Path::new("t.toml")).expect("config");
    let z = Zones::compile(c.dns.as_ref().expect("dns")).expect("zones");
    let mut fleet = FleetState::new(T0);
    let t = T0 + 20_000;
    fleet.observe(frame("a1", "pool-a", 1, t), t);
    fleet.observe(frame("b1", "pool-b", 1, t), t);
    fleet.observe(frame("a2", "pool-a", 1, t + 100), t + 100);
    // At t + HOLD, a2 has not sent for the hold-down yet.
    assert_eq!(a(&z, &fleet, t + HOLD, "api.gpuha.test."), POOL_B, "one worker is not enough for pool-a");
    assert_eq!(a(&z, &fleet, t + 100 + HOLD, "api.gpuha.test."), API_ALL);
}

#[test]
fn transitions_are_counted_once_per_change() {
    let z = zones();
    let mut fleet = FleetState::new(T0);
    let mut tr = Transitions::default();
    let mut seen = Vec::new();
    let mut step = |fleet: &FleetState, now: u64, tr: &mut Transitions| {
        seen.extend(tr.observe(&PoolStates::compute(&z, fleet, &Overrides::default(), now), now).into_iter().map(|(p, t)| (now - T0, p, t)));
    };
    step(&fleet, T0, &mut tr);
    fleet.observe(frame("a1", "pool-a", 1, T0 + 1_000), T0 + 1_000);
    // Ticks every 500 ms for 25 s; a1 falls silent after T0+1000 and comes back at T0+20000.
    for i in 1..=50u64 {
        let now = T0 + i * 500;
        if now == T0 + 20_000 {
            fleet.observe(frame("a1", "pool-a", 2, now), now);
        }
        step(&fleet, now, &mut tr);
    }
    // An observation older than the newest is ignored (racing queries cannot flap).
    step(&fleet, T0 + 1_000, &mut tr);
    assert_eq!(
        seen,
        vec![
            // Cold start ends at 10 s: b and big never reported.
            (10_000, 1, Transition::Evicted),
            (10_000, 2, Transition::Evicted),
            // a1's last frame at 1 s; it is out of the window at 11.001 s -> seen at the 11.5 s tick.
            (11_500, 0, Transition::Evicted),
            // Back at 20 s: answered again after the 1 s hold-down.
            (20_000 + HOLD, 0, Transition::FailedBack),
        ]
    );
}

#[test]
fn names_outside_and_inside_the_zones() {
    let z = zones();
    let fleet = FleetState::new(T0);
    let states = PoolStates::compute(&z, &fleet, &Overrides::default(), T0);
    let q = |n: &str, t| resolve(&z, &states, &Name::from_ascii(n).expect("n"), t);
    assert_eq!(q("example.com.", RecordType::A).rcode, ResponseCode::Refused);
    assert!(!q("example.com.", RecordType::A).authoritative);
    assert_eq!(q("gpuha.test.", RecordType::SOA).answers.len(), 1);
    let r = q("missing.gpuha.test.", RecordType::A);
    assert_eq!((r.rcode, r.authoritative, r.authority.len()), (ResponseCode::NXDomain, true, 1));
    assert_eq!(r.authority[0].ttl, 3);
    let r = q("API.gpuha.TEST.", RecordType::MX);
    assert!(r.is_nodata());
    assert_eq!(r.authority.len(), 1);
    // ANY on a service: both families.
    assert_eq!(q("api.gpuha.test.", RecordType::ANY).answers.len(), 4);
}
