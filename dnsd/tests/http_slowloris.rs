//! dnsd's HTTP side against slow and greedy clients: a request whose headers never finish is
//! closed after the header read timeout, and connections past the limit are closed at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes; returns how long that took, or None if it did not within `wait`.
async fn closed_within(c: &mut TcpStream, wait: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        match tokio::time::timeout(wait.saturating_sub(t.elapsed()), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_is_closed_after_the_header_timeout() {
    let d = Dnsd::start_http("header_read_timeout_ms = 300", &dns_section("")).await;
    let mut c = TcpStream::connect(d.http).await.expect("connect");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    let took = closed_within(&mut c, Duration::from_secs(3)).await.expect("a half-sent request is closed");
    assert!(took >= Duration::from_millis(250), "closed before the timeout: {took:?}");
    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(d.http).await.expect("connect");
    assert!(closed_within(&mut idle, Duration::from_secs(3)).await.is_some(), "a silent connection is closed");
    // Whole requests are served as before.
    assert!(d.metrics().await.contains("gpuha_dnsd"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    let d = Dnsd::start_http("max_connections = 2\nheader_read_timeout_ms = 2000", &dns_section("")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(d.http).await.expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\n").await.expect("write");
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(d.http).await.expect("connect");
    let took = closed_within(&mut third, Duration::from_secs(1)).await.expect("the third connection is closed");
    assert!(took < Duration::from_millis(500), "{took:?}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(d.metrics().await.contains("gpuha_dnsd_http_connections_rejected_total 1"));
    d.stop().await;
}
