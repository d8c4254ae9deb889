//! `GET /v1/fleet`: the cacheable form (`ages=bounded`) with `ETag` / `If-None-Match` → 304
//! while the fleet does not change, and pool scoping (`pool=a,b`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use gpuha_liveness::{FleetView, Metrics, VIEW_AGE_FLOOR_MS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Status, headers (lower-cased names) and body of one GET.
async fn get(d: &Dnsd, path: &str, if_none_match: Option<&str>) -> (u16, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(d.http).await.expect("connect http");
    let inm = if_none_match.map(|e| format!("If-None-Match: {e}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{inm}Connection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn frame_with(worker: &str, pool: &str, seq: u64, running: f64) -> Vec<u8> {
    frame_with_metrics(worker, pool, 7, seq, Metrics { running: Some(running), ..Metrics::default() })
}

/// Sends a frame and waits until dnsd has counted it as accepted.
async fn send_and_wait(d: &Dnsd, bytes: &[u8], accepted_before: f64) {
    send_frame(&[d.ingest], bytes);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&d.metrics().await, "gpuha_dnsd_frames_accepted_total") < accepted_before + 1.0 {
        assert!(Instant::now() < deadline, "frame not accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bounded_view_answers_304_while_unchanged_and_scopes_to_pools() {
    let d = Dnsd::start(&dns_section("")).await;
    send_and_wait(&d, &frame_with("a1", "pool-a", 1, 2.0), 0.0).await;
    send_and_wait(&d, &frame_with("b1", "pool-b", 1, 5.0), 1.0).await;

    let (st, h, body) = get(&d, "/v1/fleet?ages=bounded", None).await;
    assert_eq!(st, 200, "{body}");
    let etag = header(&h, "etag").expect("etag").to_string();
    let v = FleetView::from_json(body.as_bytes()).expect("json");
    assert_eq!(v.now_ms, 0);
    assert_eq!(v.workers.iter().map(|w| (w.id.as_str(), w.age_ms)).collect::<Vec<_>>(), [("a1", VIEW_AGE_FLOOR_MS), ("b1", VIEW_AGE_FLOOR_MS)]);

    // Unchanged: 304 with the same tag and no body.
    let (st, h, body) = get(&d, "/v1/fleet?ages=bounded", Some(&etag)).await;
    assert_eq!((st, header(&h, "etag"), body.as_str()), (304, Some(etag.as_str()), ""));
    // A new frame with the same numbers changes nothing the view says.
    send_and_wait(&d, &frame_with("a1", "pool-a", 2, 2.0), 2.0).await;
    let (st, _, _) = get(&d, "/v1/fleet?ages=bounded", Some(&format!("\"other\", {etag}"))).await;
    assert_eq!(st, 304);

    // Scoped to pool-b: only b1, under another tag; the fleet-wide tag does not match it.
    let (st, h, body) = get(&d, "/v1/fleet?ages=bounded&pool=pool-b", Some(&etag)).await;
    assert_eq!(st, 200);
    let v = FleetView::from_json(body.as_bytes()).expect("json");
    assert_eq!(v.workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["b1"]);
    assert_eq!(v.pools.iter().map(|p| p.pool.as_str()).collect::<Vec<_>>(), ["pool-b"]);
    let tag_b = header(&h, "etag").expect("etag").to_string();
    assert_ne!(tag_b, etag);
    // The same selection in another order and spelling is the same resource.
    let (st, _, _) = get(&d, "/v1/fleet?ages=bounded&pool=pool-b,,pool-b", Some(&tag_b)).await;
    assert_eq!(st, 304);
    let (_, _, body) = get(&d, "/v1/fleet?pool=pool-b,pool-a", None).await;
    assert_eq!(FleetView::from_json(body.as_bytes()).expect("json").workers.len(), 2);

    // New numbers from a1: the fleet-wide view changed, pool-b's did not.
    send_and_wait(&d, &frame_with("a1", "pool-a", 3, 9.0), 3.0).await;
    let (st, h, body) = get(&d, "/v1/fleet?ages=bounded", Some(&etag)).await;
    assert_eq!(st, 200);
    assert_ne!(header(&h, "etag"), Some(etag.as_str()));
    assert_eq!(FleetView::from_json(body.as_bytes()).expect("json").workers[0].running, Some(9.0));
    let (st, _, _) = get(&d, "/v1/fleet?ages=bounded&pool=pool-b", Some(&tag_b)).await;
    assert_eq!(st, 304);

    // The exact form: no tag, dnsd's clock, exact ages.
    let (st, h, body) = get(&d, "/v1/fleet", Some(&etag)).await;
    assert_eq!(st, 200);
    assert!(header(&h, "etag").is_none());
    let v = FleetView::from_json(body.as_bytes()).expect("json");
    assert!(v.now_ms > 0 && v.workers.iter().all(|w| w.age_ms < VIEW_AGE_FLOOR_MS));

    let (st, _, _) = get(&d, "/v1/fleet?ages=fuzzy", None).await;
    assert_eq!(st, 400);
    d.stop().await;
}

/// Status, headers and raw body of one GET with `Accept` and `If-None-Match`.
async fn get_raw(d: &Dnsd, path: &str, accept: &str, if_none_match: Option<&str>) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(d.http).await.expect("connect http");
    let inm = if_none_match.map(|e| format!("If-None-Match: {e}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n{inm}Connection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    (status, headers, raw[split + 4..].to_vec())
}

/// `Accept: application/x-gpuha-fleet` gets the same view in binary, under its own tag (304
/// while unchanged); anything else still gets JSON.
#[tokio::test]
async fn binary_view_on_content_negotiation() {
    use gpuha_liveness::fleetwire;
    let d = Dnsd::start(&dns_section("")).await;
    send_and_wait(&d, &frame_with("a1", "pool-a", 1, 2.0), 0.0).await;
    send_and_wait(&d, &frame_with("b1", "pool-b", 1, 5.0), 1.0).await;

    let (st, h, json) = get_raw(&d, "/v1/fleet?ages=bounded", "application/json", None).await;
    assert_eq!((st, header(&h, "content-type"), header(&h, "vary")), (200, Some("application/json"), Some("accept")));
    let json_tag = header(&h, "etag").expect("etag").to_string();
    let (st, h, bin) = get_raw(&d, "/v1/fleet?ages=bounded", "application/x-gpuha-fleet, application/json;q=0.5", None).await;
    assert_eq!((st, header(&h, "content-type")), (200, Some(fleetwire::MEDIA_TYPE)));
    let bin_tag = header(&h, "etag").expect("etag").to_string();
    assert_ne!(bin_tag, json_tag, "each form has its own tag");
    assert_eq!(fleetwire::decode(&bin).expect("binary view"), FleetView::from_json(&json).expect("json"));
    assert!(bin.len() < json.len(), "{} binary bytes, {} JSON", bin.len(), json.len());

    // Unchanged: 304 for the binary tag; the JSON tag does not name the binary form.
    let (st, _, body) = get_raw(&d, "/v1/fleet?ages=bounded", fleetwire::MEDIA_TYPE, Some(&bin_tag)).await;
    assert_eq!((st, body.len()), (304, 0));
    let (st, _, _) = get_raw(&d, "/v1/fleet?ages=bounded", fleetwire::MEDIA_TYPE, Some(&json_tag)).await;
    assert_eq!(st, 200);
    // Refused with q=0, or not named: JSON.
    for accept in ["application/x-gpuha-fleet;q=0, application/json", "*/*", "text/html"] {
        let (_, h, _) = get_raw(&d, "/v1/fleet?ages=bounded", accept, None).await;
        assert_eq!(header(&h, "content-type"), Some("application/json"), "{accept}");
    }
    // Scoped and exact forms too.
    let (_, _, bin) = get_raw(&d, "/v1/fleet?pool=pool-b", fleetwire::MEDIA_TYPE, None).await;
    let v = fleetwire::decode(&bin).expect("binary view");
    assert!(v.now_ms > 0);
    assert_eq!(v.workers.iter().map(|w| (w.id.as_str(), w.running)).collect::<Vec<_>>(), [("b1", Some(5.0))]);
    d.stop().await;
}
