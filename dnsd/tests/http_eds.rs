//! `POST /v3/discovery:endpoints`: the routers' worker cluster over EDS (REST-JSON), from
//! frames: a router gets its pools' members and its tiers at priority 1; a malformed request is
//! a 304 when the router holds the version already; a 400 that names what is wrong; the warm-up after a start is a 503 (routers keep what they
//! have).

mod common;

use std::time::{Duration, Instant};

use common::*;
use gpuha_liveness::{Frame, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post(d: &Dnsd, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(d.http).await.expect("connect http");
    let req = format!(
        "POST /v3/discovery:endpoints HTTP/1.1\r\nHost: gpuha_fleet\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status");
    (status, body.to_string())
}

fn frame_at(worker: &str, pool: &str, addr: &str) -> Vec<u8> {
    Frame {
        key_id: 1,
        boot_id: 1,
        seq: 1,
        sent_ms: now_ms(),
        worker_id: worker.into(),
        pool_id: pool.into(),
        addr: addr.parse().expect("addr"),
        models: vec!["m".into()],
        adapters: vec![],
        metrics: Metrics::default(),
    }
    .encode(KEY)
    .expect("encode")
}

fn request(pools: &str, tiers: &str) -> String {
    format!(
        r#"{{"node":{{"id":"r1","cluster":"gpuha-router","metadata":{{"gpuha":{{"pools":{pools},"tiers":{tiers}}}}}}},"resource_names":["gpuha_workers"],"type_url":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}}"#
    )
}

fn hosts(locality: &serde_json::Value) -> Vec<String> {
    locality["lb_endpoints"]
        .as_array()
        .expect("lb_endpoints")
        .iter()
        .map(|e| {
            let a = &e["endpoint"]["address"]["socket_address"];
            format!("{}:{}", a["address"].as_str().expect("address"), a["port_value"])
        })
        .collect()
}

#[tokio::test]
async fn routers_get_their_pools_members_and_tiers() {
    let d = Dnsd::start(&format!("[eds]\nleave_after_ms = 60000\n{}", dns_section(""))).await;
    // Just started: dnsd does not know the fleet yet, and says so instead of an empty cluster.
    let (st, body) = post(&d, &request(r#"["pool-a"]"#, "[]")).await;
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("keep the membership"), "{body}");

    send_frame(&[d.ingest], &frame_at("a1", "pool-a", "127.0.0.1:8001"));
    send_frame(&[d.ingest], &frame_at("a2", "pool-a", "[::1]:8002"));
    send_frame(&[d.ingest], &frame_at("b1", "pool-b", "127.0.0.1:8003"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (body, version) = loop {
        let (st, body) = post(&d, &request(r#"["pool-a"]"#, r#"["127.0.0.1:10101"]"#)).await;
        if st == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            if v["resources"][0]["endpoints"][0]["lb_endpoints"].as_array().map_or(0, Vec::len) == 2 {
                break (v.clone(), v["version_info"].as_str().expect("version").to_string());
            }
        } else {
            assert_eq!(st, 503, "{body}");
        }
        assert!(Instant::now() < deadline, "no membership after the warm-up: {st} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["type_url"], "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment");
    let cla = &body["resources"][0];
    assert_eq!(cla["cluster_name"], "gpuha_workers");
    assert_eq!(hosts(&cla["endpoints"][0]), ["127.0.0.1:8001", "::1:8002"]);
    assert_eq!(cla["endpoints"][1]["priority"], 1);
    assert_eq!(hosts(&cla["endpoints"][1]), ["127.0.0.1:10101"]);

    // Unchanged membership, same version (Envoy then skips the update).
    let (st, again) = post(&d, &request(r#"["pool-a"]"#, r#"["127.0.0.1:10101"]"#)).await;
    assert_eq!(st, 200);
    let again: serde_json::Value = serde_json::from_str(&again).expect("json");
    assert_eq!(again["version_info"], version.as_str());
    // A poll that names the version it holds gets 304 and no body (Envoy keeps what it has
    // without parsing); an older version gets the whole answer.
    let holds = |v: &str| request(r#"["pool-a"]"#, r#"["127.0.0.1:10101"]"#).replacen('{', &format!(r#"{{"version_info":"{v}","#), 1);
    let (st, body) = post(&d, &holds(&version)).await;
    assert_eq!((st, body.as_str()), (304, ""));
    let (st, body) = post(&d, &holds("0000000000000000-1-1")).await;
    assert_eq!(st, 200, "{body}");

    // No pools named: every pool's workers.
    let (_, all) = post(&d, &request("[]", "[]")).await;
    let all: serde_json::Value = serde_json::from_str(&all).expect("json");
    assert_eq!(hosts(&all["resources"][0]["endpoints"][0]).len(), 3);
    assert!(all["resources"][0]["endpoints"].as_array().expect("localities").len() == 1, "no tiers: no priority 1");

    // Malformed requests: a 400 that says what is wrong, never a panic.
    for (bad, says) in [
        ("{", "not a DiscoveryRequest"),
        (r#"{"resource_names":[]}"#, "resource_names"),
        (r#"{"resource_names":["x"],"type_url":"type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#, "type_url"),
        (&request("[]", r#"["router-b:10000"]"#), "is not ip:port"),
        (&request("7", "[]"), "not a DiscoveryRequest"),
    ] {
        let (st, body) = post(&d, bad).await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(body.contains(says), "{bad}: {body}");
    }
    let m = d.metrics().await;
    assert!(metric(&m, "gpuha_dnsd_eds_requests_total{result=\"bad_request\"}") >= 5.0);
    assert!(metric(&m, "gpuha_dnsd_eds_requests_total{result=\"warming_up\"}") >= 1.0);
    assert!(metric(&m, "gpuha_dnsd_eds_requests_total{result=\"ok\"}") >= 3.0);
    assert_eq!(metric(&m, "gpuha_dnsd_eds_requests_total{result=\"not_modified\"}"), 1.0);
    d.stop().await;
}

#[test]
fn leave_after_is_bounded_by_the_gate_and_forget_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (eds, ok) in [("", true), ("[eds]\nleave_after_ms = 4000\n", true), ("[eds]\nleave_after_ms = 3000\n", false), ("[eds]\nleave_after_ms = 700000\n", false), ("[eds]\nleave_after = 5000\n", false)] {
        let text = config_text(dir.path(), eds);
        let r = gpuha_dnsd::Config::from_toml(&text, std::path::Path::new("t.toml"));
        assert_eq!(r.is_ok(), ok, "{eds}: {r:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains("leave_after"), "{e}");
        }
    }
    let c = gpuha_dnsd::Config::from_toml(&config_text(dir.path(), ""), std::path::Path::new("t.toml")).expect("config");
    assert_eq!(c.eds.leave_after_ms, gpuha_liveness::membership::DEFAULT_LEAVE_AFTER_MS);
}
