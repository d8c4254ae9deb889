//! The sidecar's entry point `gpuha_sidecar::run`, driven on port 0: a `/metrics` server that
//! answers with a real vLLM capture, a UDP socket standing in for dnsd's ingest. The frames that
//! arrive are signed with the configured key, carry the capture's numbers and one boot id with
//! rising sequence numbers, and the run ends when its shutdown channel says so. A `/metrics`
//! that answers seconds late (vLLM's event loop busy streaming) still gets frames at the
//! scrape interval, never one assembled from an answer older than one already sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gpuha_liveness::{Frame, KeyRing};
use gpuha_sidecar::{run, Config, Event};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// Serves `body` as `/metrics` to every connection, until the listener is dropped with the test.
fn metrics_server(body: String) -> SocketAddr {
    serve_metrics(move |_| (Duration::ZERO, body.clone()))
}

/// A `/metrics` server: connection `k` (0, 1, ...) is answered `answer(k).1` once its request is
/// in and `answer(k).0` has passed. Each connection is served on its own thread, so slow answers
/// overlap as they do on vLLM's event loop.
fn serve_metrics(answer: impl Fn(u64) -> (Duration, String) + Send + Sync + 'static) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind metrics server");
    let addr = l.local_addr().expect("metrics server address");
    let answer = Arc::new(answer);
    let next = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let (answer, k) = (answer.clone(), next.fetch_add(1, Ordering::SeqCst));
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let (delay, body) = answer(k);
                std::thread::sleep(delay); // the late answer under test, not a readiness wait
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(body.as_bytes());
            });
        }
    });
    addr
}

/// The ingest socket standing in for dnsd, a temp dir with the key file, and a sidecar config
/// (worker w1, pool p1, key id 7) scraping `metrics`.
fn setup(metrics: SocketAddr, name: &str, interval_ms: u64, scrape_timeout_ms: u64) -> (UdpSocket, std::path::PathBuf, Config) {
    let ingest = UdpSocket::bind("127.0.0.1:0").expect("bind ingest");
    ingest.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let dir = std::env::temp_dir().join(format!("gpuha-sidecar-{name}-{}", std::process::id()));
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
        interval_ms,
        scrape_timeout_ms,
        max_scrapes_in_flight: 8,
        max_metrics_bytes: 1 << 20,
        models: vec![],
    };
    (ingest, dir, config)
}

#[test]
fn run_sends_signed_frames_until_shut_down() {
    let capture = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/metrics-busy.txt")).expect("capture");
    let metrics = metrics_server(capture);
    let (ingest, dir, config) = setup(metrics, "run", 50, 1_000);
    let (stop, shutdown) = mpsc::channel::<()>();
    let runner = std::thread::spawn(move || {
        let mut sent = 0u32;
        let boot = run(config, shutdown, |ev| {
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
        max_scrapes_in_flight: 8,
        max_metrics_bytes: 1 << 20,
        models: vec![],
    };
    let e = run(config, shutdown, |_| {}).expect_err("a bad config does not run").to_string();
    assert!(e.contains("interval_ms"), "{e}");
}

/// A `/metrics` whose answer to connection `k` says `vllm:generation_tokens_total k` and leaves
/// `delay(k)` after the request came in.
fn slow_metrics_server(delay: impl Fn(u64) -> Duration + Send + Sync + 'static) -> SocketAddr {
    serve_metrics(move |k| (delay(k), format!("vllm:num_requests_running{{model_name=\"tiny\"}} 1.0\nvllm:generation_tokens_total{{model_name=\"tiny\"}} {k}.0\n")))
}

/// Runs a sidecar scraping `metrics` every `interval_ms` and returns the frames that arrive
/// within `window` of the first one, with the Overtaken events counted.
fn frames_for(metrics: SocketAddr, interval_ms: u64, window: Duration) -> (Vec<(Instant, Frame)>, u64) {
    let (ingest, dir, config) = setup(metrics, &format!("slow-{interval_ms}"), interval_ms, 8_000);
    let (stop, shutdown) = mpsc::channel::<()>();
    let runner = std::thread::spawn(move || {
        let mut overtaken = 0;
        run(config, shutdown, |ev| {
            if let Event::Overtaken { .. } = ev {
                overtaken += 1;
            }
        })
        .map(|_| overtaken)
        .map_err(|e| e.to_string())
    });
    let mut ring = KeyRing::new();
    ring.insert(7, KEY.to_vec());
    let mut frames: Vec<(Instant, Frame)> = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = ingest.recv_from(&mut buf).expect("a frame within 10 s");
        let at = Instant::now();
        if frames.first().is_some_and(|(t0, _)| at.duration_since(*t0) > window) {
            break;
        }
        frames.push((at, Frame::decode(&buf[..n], &ring).expect("a signed frame")));
    }
    stop.send(()).expect("the runner is waiting");
    let overtaken = runner.join().expect("the runner ends").expect("run ends cleanly");
    let _ = std::fs::remove_dir_all(&dir);
    (frames, overtaken)
}

#[test]
fn a_slow_metrics_page_still_gets_a_frame_every_interval() {
    // Every answer 1.5 s late, a scrape every 200 ms: one scrape at a time would send a frame
    // every 1.5 s (3 in the window); overlapping ones send one about every 200 ms.
    let metrics = slow_metrics_server(|_| Duration::from_millis(1_500));
    let (frames, _) = frames_for(metrics, 200, Duration::from_secs(3));
    let gaps: Vec<u128> = frames.windows(2).map(|w| w[1].0.duration_since(w[0].0).as_millis()).collect();
    assert!(frames.len() >= 8, "{} frames in 3 s with answers 1.5 s late; gaps (ms): {gaps:?}", frames.len());
    assert!(gaps.iter().all(|&g| g < 1_000), "a gap of a whole slow answer: {gaps:?}");
    for w in frames.windows(2) {
        assert_eq!(w[1].1.seq, w[0].1.seq + 1, "sequence numbers rise by one");
    }
}

#[test]
fn an_answer_overtaken_by_a_later_one_is_not_sent() {
    // Connection 1 answers 2 s late; 0 and 2.. at once. Its numbers (generation 1) are older
    // than the frames sent meanwhile (generation 2, 3, ...): dropped, never sent after them.
    let metrics = slow_metrics_server(|k| Duration::from_millis(if k == 1 { 2_000 } else { 0 }));
    let (frames, overtaken) = frames_for(metrics, 100, Duration::from_secs(3));
    let gens: Vec<f64> = frames.iter().map(|(_, f)| f.metrics.generation_tokens.unwrap_or(-1.0)).collect();
    assert!(gens.windows(2).all(|w| w[1] > w[0]), "counters sent out of order: {gens:?}");
    assert!(!gens.contains(&1.0), "the overtaken answer was sent: {gens:?}");
    assert_eq!(overtaken, 1, "one answer overtaken; generations sent: {gens:?}");
}
