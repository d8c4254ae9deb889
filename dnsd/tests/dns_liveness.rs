//! Real time, real sockets: two dnsd instances fed the same frames (as sidecars send to every
//! instance) answer the same, evict the silent pools once the cold-start window ends, count the
//! transitions, and fail back once frames have returned for the hold-down. Takes about one eviction window (10 s).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::rr::RecordType;

async fn answer(d: &Dnsd, name: &str) -> Vec<String> {
    addrs(&udp(d.dns, &query_msg(name, RecordType::A, None)).await.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_evict_and_fail_back_together() {
    let started = Instant::now();
    let d1 = Dnsd::start(&dns_section("")).await;
    let d2 = Dnsd::start(&dns_section("")).await;
    let all = vec!["10.0.1.1", "10.0.2.1", "10.0.2.2"];
    for d in [&d1, &d2] {
        assert_eq!(answer(d, "api.gpuha.test.").await, all, "cold start: every pool");
        assert_eq!(answer(d, "big.gpuha.test.").await.len(), 0, "100 routers: TC over UDP without EDNS");
    }

    // A sidecar for pool-a's worker, every 300 ms, to both instances.
    let stop = Arc::new(AtomicBool::new(false));
    let sidecar = {
        let stop = stop.clone();
        let to = vec![d1.ingest, d2.ingest];
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                send_frame(&to, &frame("a1", "pool-a", 42, seq));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // Before the window ends, still everyone; after it, pool-a only, on both instances.
    tokio::time::sleep(Duration::from_millis(9_000).saturating_sub(started.elapsed())).await;
    assert_eq!(answer(&d1, "api.gpuha.test.").await, all);
    let deadline = started + Duration::from_millis(12_000);
    loop {
        let (a1, a2) = (answer(&d1, "api.gpuha.test.").await, answer(&d2, "api.gpuha.test.").await);
        if a1 == ["10.0.1.1"] && a2 == ["10.0.1.1"] {
            break;
        }
        assert!(Instant::now() < deadline, "not converged: {a1:?} {a2:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let evicted_at = started.elapsed();
    eprintln!("silent pools left the answer of both instances {evicted_at:?} after start");
    assert!(evicted_at >= Duration::from_millis(10_000), "evicted before the window ended: {evicted_at:?}");
    for d in [&d1, &d2] {
        assert_eq!(answer(d, "prio.gpuha.test.").await, ["10.0.1.1"], "priority fails over to pool-a");
        assert_eq!(answer(d, "big.gpuha.test.").await, ["10.9.9.9"], "no pool alive: fail-whale");
    }
    // The tick counts evictions without queries; give it one period.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for d in [&d1, &d2] {
        let m = d.metrics().await;
        assert_eq!(metric(&m, "gpuha_dnsd_pool_evictions_total{pool=\"pool-b\"}"), 1.0, "{m}");
        assert_eq!(metric(&m, "gpuha_dnsd_pool_evictions_total{pool=\"pool-big\"}"), 1.0);
        assert_eq!(metric(&m, "gpuha_dnsd_pool_evictions_total{pool=\"pool-a\"}"), 0.0);
        assert!(metric(&m, "gpuha_dnsd_failwhale_answers_total{service=\"big.gpuha.test.\"}") >= 1.0);
        assert!(metric(&m, "gpuha_dnsd_dns_answers_total{service=\"api.gpuha.test.\",pool=\"pool-a\",pool_state=\"alive\"}") >= 1.0);
        assert_eq!(metric(&m, "gpuha_dnsd_pool_state{pool=\"pool-b\",region=\"r2\",cloud=\"c2\",state=\"dead\"}"), 1.0);
    }

    // pool-b's worker speaks again: held down for FAILBACK_HOLD_DOWN_MS (so every Envoy picker
    // sees it fresh first), then failback on both.
    let b_stop = Arc::new(AtomicBool::new(false));
    let back = Instant::now();
    let b_sidecar = {
        let stop = b_stop.clone();
        let to = vec![d1.ingest, d2.ingest];
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                send_frame(&to, &frame("b1", "pool-b", 7, seq));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    for d in [&d1, &d2] {
        assert_eq!(answer(d, "api.gpuha.test.").await, ["10.0.1.1"], "failback before the hold-down");
    }
    let deadline = back + Duration::from_millis(gpuha_liveness::FAILBACK_HOLD_DOWN_MS + 1_500);
    loop {
        let (a1, a2) = (answer(&d1, "api.gpuha.test.").await, answer(&d2, "api.gpuha.test.").await);
        if a1 == all && a2 == all {
            break;
        }
        assert!(Instant::now() < deadline, "no failback: {a1:?} {a2:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failback = back.elapsed();
    eprintln!("pool-b answered again {failback:?} after its first frame");
    assert!(failback >= Duration::from_millis(gpuha_liveness::FAILBACK_HOLD_DOWN_MS), "{failback:?}");
    for d in [&d1, &d2] {
        assert_eq!(answer(d, "prio.gpuha.test.").await, ["10.0.2.1", "10.0.2.2"], "priority back on pool-b");
        let m = d.metrics().await;
        assert_eq!(metric(&m, "gpuha_dnsd_pool_failbacks_total{pool=\"pool-b\"}"), 1.0, "{m}");
    }
    b_stop.store(true, Ordering::Relaxed);
    let _ = b_sidecar.await;
    stop.store(true, Ordering::Relaxed);
    let _ = sidecar.await;
    d1.stop().await;
    d2.stop().await;
}

/// A hang is not silence (issue 12): pool-a's only worker keeps sending frames — its `/metrics`
/// still answers — but its engine is stuck (requests running, counters frozen). pool-a leaves
/// the answer once the window passes without progress, although its frames never stopped;
/// pool-b, whose engine steps advance, stays. About one eviction window plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_workers_all_hang_leaves_the_answer() {
    use gpuha_liveness::Metrics;
    let started = Instant::now();
    let d = Dnsd::start(&dns_section("")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let hang_at = Duration::from_millis(1_000);
    let sidecars = {
        let stop = stop.clone();
        let to = vec![d.ingest];
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                // Busy; pool-a's counters freeze at `hang_at`, pool-b's keep stepping.
                let steps = |frozen: bool| if frozen { 10.0 } else { seq as f64 };
                let hung = started.elapsed() >= hang_at;
                let m = |frozen: bool| Metrics { running: Some(2.0), waiting: Some(0.0), engine_steps: Some(steps(frozen)), generation_tokens: Some(steps(frozen)), ..Metrics::default() };
                send_frame(&to, &frame_with_metrics("a1", "pool-a", 1, seq, m(hung)));
                send_frame(&to, &frame_with_metrics("b1", "pool-b", 2, seq, m(false)));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let both = vec!["10.0.1.1", "10.0.2.1", "10.0.2.2"];
    // Before the hang has lasted a window: both pools (cold start, then alive by progress).
    tokio::time::sleep(Duration::from_millis(10_500).saturating_sub(started.elapsed())).await;
    assert_eq!(answer(&d, "api.gpuha.test.").await, both, "pool-a left before its hang lasted a window");
    let deadline = started + Duration::from_millis(13_000);
    loop {
        let a = answer(&d, "api.gpuha.test.").await;
        if a == ["10.0.2.1", "10.0.2.2"] {
            break;
        }
        assert!(Instant::now() < deadline, "the hung pool is still answered: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = started.elapsed();
    eprintln!("the hung pool left the answer {:?} after its hang (its frames never stopped)", left - hang_at);
    assert!(left - hang_at >= Duration::from_millis(10_000));
    let raw = http_get(d.http, "/v1/fleet").await;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let fleet: serde_json::Value = serde_json::from_str(body).expect("fleet json");
    let a1 = fleet["workers"].as_array().and_then(|w| w.iter().find(|w| w["id"] == "a1").cloned()).expect("a1 in the fleet");
    assert_eq!(a1["stalled"], true, "{a1}");
    assert_eq!(a1["fresh"], false, "{a1}");
    stop.store(true, Ordering::Relaxed);
    let _ = sidecars.await;
}
