//! What operators read over HTTP: the fleet page at `/` and `/fleet`, `GET /v1/dns` (the DNS
//! answer now), and the per-pool and per-service gauges on `/metrics`.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

#[tokio::test]
async fn fleet_page_dns_status_and_gauges() {
    let d = Dnsd::start(&dns_section("")).await;
    // Cold start: every pool answerable, nothing heard yet.
    let page = http_get(d.http, "/fleet").await;
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("text/html") && body(&page).contains("v1/dns"), "{page}");
    assert_eq!(body(&http_get(d.http, "/").await), body(&page));

    send_frame(&[d.ingest], &frame("a1", "pool-a", 1, 1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&d.metrics().await, "gpuha_dnsd_frames_accepted_total") < 1.0 {
        assert!(Instant::now() < deadline, "frame not accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status: serde_json::Value = serde_json::from_str(body(&http_get(d.http, "/v1/dns").await)).expect("json");
    assert_eq!(status["dns"], true);
    let pools: Vec<(&str, &str)> = status["pools"].as_array().unwrap().iter().map(|p| (p["pool"].as_str().unwrap(), p["state"].as_str().unwrap())).collect();
    assert_eq!(pools, [("pool-a", "cold_start"), ("pool-b", "cold_start"), ("pool-big", "cold_start")]);
    let api = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "api.gpuha.test.").expect("api");
    assert_eq!(api["fail_whale"], false);
    assert_eq!(api["pools"], serde_json::json!(["pool-a", "pool-b"]));
    assert!(api["addresses"].as_array().unwrap().iter().any(|a| a == "10.0.1.1"), "{api}");
    assert_eq!(status["transitions"], serde_json::json!([]));

    let m = d.metrics().await;
    assert_eq!(metric(&m, "gpuha_dnsd_pool_workers{pool=\"pool-a\",state=\"alive\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "gpuha_dnsd_pool_workers{pool=\"pool-b\",state=\"alive\"}"), 0.0);
    assert!(m.contains("gpuha_dnsd_pool_workers{pool=\"pool-b\",state=\"silent\"} 0\n"), "configured pools are listed");
    assert_eq!(metric(&m, "gpuha_dnsd_worker_state{pool=\"pool-a\",worker=\"a1\",state=\"alive\"}"), 1.0);
    assert!(metric(&m, "gpuha_dnsd_worker_seconds_since_life{pool=\"pool-a\",worker=\"a1\"}") < 3.0);
    assert_eq!(metric(&m, "gpuha_dnsd_service_failwhale{service=\"api.gpuha.test.\"}"), 0.0);
    assert_eq!(metric(&m, "gpuha_dnsd_service_pool_answered{service=\"prio.gpuha.test.\",pool=\"pool-b\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_service_pool_answered{service=\"prio.gpuha.test.\",pool=\"pool-a\"}"), 0.0, "priority: the first pool only");
    assert!(metric(&m, "gpuha_dnsd_start_time_seconds") > 1.7e9);
    assert_eq!(metric(&m, "gpuha_dnsd_workers_unexported"), 0.0);
    d.stop().await;
}
