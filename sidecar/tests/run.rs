//! The sidecar's entry point `gpuha_sidecar::run`, driven on port 0: a `/metrics` server that
//! answers with a real vLLM capture, a UDP socket standing in for dnsd's ingest. The frames that
//! arrive are signed with the configured key, carry the capture's numbers and one boot id with
//! rising sequence numbers, and the run ends when its shutdown channel says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use gpuha_liveness::{Frame, KeyRing};
use gpuha_sidecar::{run, Config, Event};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Serves `body` as `/metrics` to every connection, until the listener is dropped with the test.
fn metrics_server(body: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind metrics server");
    let addr = l.local_addr().expect("metrics server address");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = c.write_all(head.as_bytes());
            let _ = c.write_all(body.as_bytes());
        }
    });
    addr
}

#[test]
fn run_sends_signed_frames_until_shut_down() {
    let capture = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/metrics-busy.txt")).expect("capture");
    let metrics = metrics_server(capture);
    let ingest = UdpSocket::bind("127.0.0.1:0").expect("bind ingest");
    ingest.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let dir = std::env::temp_dir().join(format!("gpuha-sidecar-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key_file = dir.join("frame.key");
    std::fs::write(&key_file, KEY).expect("key file");
    let config = Config {
        metrics_url: format!("http://{metrics}/metrics"),
        ingest: vec![ingest.local_addr().expect("ingest address")],
        worker_id: "w1".into(),
        pool: "p1".into(),
        serve_addr: "127.0.0.1:8000".parse().expect("addr"),
        key_file,
        key_id: 7,
        interval_ms: 50,
        scrape_timeout_ms: 1_000,
        max_metrics_bytes: 1 << 20,
        models: vec![],
    };
    let (stop, shutdown) = mpsc::channel::<()>();
    let runner = std::thread::spawn(move || {
        let mut sent = 0u32;
        let boot = run(config, &shutdown, |ev| {
            if let Event::Sent { .. } = ev {
                sent += 1;
            }
        });
        (boot.map_err(|e| e.to_string()), sent)
    });
    let mut ring = KeyRing::new();
    ring.insert(7, KEY.to_vec());
    let mut frames: Vec<Frame> = Vec::new();
    let mut buf = [0u8; 2048];
    while frames.len() < 3 {
        let (n, _) = ingest.recv_from(&mut buf).expect("a frame within 10 s");
        frames.push(Frame::decode(&buf[..n], &ring).expect("a frame signed with the configured key"));
    }
    stop.send(()).expect("the runner is waiting");
    let (boot, sent) = runner.join().expect("the runner ends");
    let boot = boot.expect("run ends cleanly on shutdown");
    assert!(sent >= 3, "{sent} sent");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.worker_id.as_str(), f.pool_id.as_str(), f.key_id), ("w1", "p1", 7));
        assert_eq!(f.boot_id, boot, "one boot id, the one run returned");
        assert_eq!(f.metrics.running, Some(1.0));
        assert_eq!(f.metrics.waiting, Some(1.0));
        if i > 0 {
            assert_eq!(f.seq, frames[i - 1].seq + 1, "sequence numbers rise by one");
        }
    }
    // Nothing more after the shutdown.
    ingest.set_read_timeout(Some(Duration::from_millis(300))).expect("read timeout");
    let mut late = 0;
    while ingest.recv_from(&mut buf).is_ok() {
        late += 1;
        assert!(late <= 2, "frames keep coming after the shutdown");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_refuses_a_bad_config_with_the_key_named() {
    let (_stop, shutdown) = mpsc::channel::<()>();
    let config = Config {
        metrics_url: "http://127.0.0.1:1/metrics".into(),
        ingest: vec!["127.0.0.1:9".parse().expect("addr")],
        worker_id: "w1".into(),
        pool: "p1".into(),
        serve_addr: "127.0.0.1:8000".parse().expect("addr"),
        key_file: "/nonexistent/gpuha-frame.key".into(),
        key_id: 1,
        interval_ms: 0,
        scrape_timeout_ms: 1_000,
        max_metrics_bytes: 1 << 20,
        models: vec![],
    };
    let e = run(config, &shutdown, |_| {}).expect_err("a bad config does not run").to_string();
    assert!(e.contains("interval_ms"), "{e}");
}
