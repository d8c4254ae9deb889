//! Issue-level test of the telemetry foundation: fake vLLM worker → sidecar → dnsd, all real
//! processes on 127.0.0.1; and bad datagrams that must change nothing.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuha_e2e::{bin, field, http_get, wait_for, Proc};
use gpuha_liveness::{Frame, FleetView, KeyRing, Metrics};

const KEY: &[u8] = b"e2e-test-key-0123456789abcdef";

fn key_file(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("gpuha-e2e-{tag}-{}.key", std::process::id()));
    std::fs::write(&p, KEY).expect("write key");
    p
}

fn start_dnsd(key: &std::path::Path) -> (Proc, String, String) {
    let mut cmd = Command::new(bin("gpuha-dnsd"));
    cmd.args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--key-file"]).arg(key);
    let p = Proc::start("dnsd", cmd);
    let ready = p.wait_line("READY", Duration::from_secs(10));
    (p, field(&ready, "ingest"), field(&ready, "http"))
}

fn fleet(http: &str) -> FleetView {
    let (status, body) = http_get(http, "/v1/fleet").expect("GET /v1/fleet");
    assert_eq!(status, 200, "{body}");
    FleetView::from_json(body.as_bytes()).expect("fleet view JSON")
}

fn metric(http: &str, name: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").expect("GET /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[test]
fn killed_worker_goes_stale_after_gate_and_its_pool_dies_after_window() {
    let key = key_file("kill");
    let (_dnsd, ingest, http) = start_dnsd(&key);

    let worker = Proc::start("fake-vllm", {
        let mut c = Command::new(bin("fake-vllm"));
        c.args(["--port", "0", "--id", "w1", "--model", "tiny"]);
        c
    });
    let wline = worker.wait_line("LISTENING", Duration::from_secs(10));
    let waddr = wline.split_whitespace().nth(1).expect("LISTENING ip:port").to_string();

    // A second ingest target the test reads, to see every frame the sidecar sends.
    let spy = UdpSocket::bind("127.0.0.1:0").expect("bind spy");
    let spy_addr = spy.local_addr().expect("spy addr").to_string();
    let seen: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
    {
        let seen = seen.clone();
        let spy = spy.try_clone().expect("clone spy");
        std::thread::spawn(move || {
            let ring = KeyRing::single(1, KEY.to_vec());
            let mut buf = [0u8; 600];
            while let Ok(n) = spy.recv(&mut buf) {
                if let Ok(f) = Frame::decode(&buf[..n], &ring) {
                    seen.lock().expect("seen").push((Instant::now(), f.seq));
                }
            }
        });
    }

    let started = Instant::now();
    let _sidecar = Proc::start("sidecar", {
        let mut c = Command::new(bin("gpuha-sidecar"));
        c.args(["--metrics-url", &format!("http://{waddr}/metrics"), "--ingest", &ingest, "--ingest", &spy_addr])
            .args(["--worker-id", "w1", "--pool", "p1", "--serve-addr", &waddr, "--interval-ms", "250", "--key-file"])
            .arg(&key);
        c
    });

    let w = wait_for("w1 fresh in /v1/fleet", Duration::from_secs(5), || {
        fleet(&http).workers.into_iter().find(|w| w.id == "w1" && w.fresh)
    });
    let to_fresh = started.elapsed();
    assert!(to_fresh < Duration::from_secs(2), "fresh after {to_fresh:?}, want < 2 s");
    assert_eq!(w.pool, "p1");
    assert_eq!(w.models, vec!["tiny".to_string()]);
    assert_eq!(w.addr, waddr);
    assert!(w.running.is_some() && w.kv.is_some(), "{w:?}");
    println!("worker fresh in /v1/fleet {to_fresh:?} after the sidecar started");

    // Frames are flowing (so "none after the kill" means something).
    wait_for("3 frames at the spy", Duration::from_secs(5), || (seen.lock().expect("seen").len() >= 3).then_some(()));
    worker.signal("KILL");
    let killed = Instant::now();
    let last_seq_at_kill = seen.lock().expect("seen").last().map(|s| s.1).unwrap_or(0);

    let stale_after = wait_for("w1 stale", Duration::from_secs(6), || {
        let v = fleet(&http);
        let w = v.workers.iter().find(|w| w.id == "w1")?;
        (!w.fresh).then(|| killed.elapsed())
    });
    // Its last frame left at most one interval before the kill.
    assert!(stale_after >= Duration::from_millis(2_700), "stale only {stale_after:?} after the kill");
    assert!(stale_after <= Duration::from_millis(3_800), "stale {stale_after:?} after the kill");

    let dead_after = wait_for("pool p1 dead", Duration::from_secs(14), || {
        let v = fleet(&http);
        let p = v.pools.iter().find(|p| p.pool == "p1")?;
        (p.in_window == 0).then(|| killed.elapsed())
    });
    assert!(dead_after >= Duration::from_millis(9_700), "pool dead only {dead_after:?} after the kill");
    assert!(dead_after <= Duration::from_millis(10_800), "pool dead {dead_after:?} after the kill");

    let seen = seen.lock().expect("seen");
    let after: Vec<_> = seen.iter().filter(|(t, s)| *t > killed + Duration::from_millis(100) || *s > last_seq_at_kill + 1).collect();
    assert!(after.is_empty(), "the sidecar sent {} frames after the kill: {after:?}", after.len());
    assert!(seen.len() >= 3, "spy saw only {} frames", seen.len());
    println!("stale {stale_after:?} after SIGKILL, pool dead {dead_after:?} after; {} frames before the kill, 0 after", seen.len());
}

#[test]
fn forged_replayed_and_garbage_datagrams_change_nothing_and_are_counted() {
    let key = key_file("bad");
    let (_dnsd, ingest, http) = start_dnsd(&key);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut f = Frame {
        key_id: 1,
        boot_id: 42,
        seq: 1,
        sent_ms: now_ms(),
        worker_id: "w9".into(),
        pool_id: "p9".into(),
        addr: "127.0.0.1:9999".parse().expect("addr"),
        models: vec!["tiny".into()],
        adapters: vec![],
        metrics: Metrics { running: Some(1.0), waiting: Some(0.0), ..Metrics::default() },
    };
    let good = f.encode(KEY).expect("encode");
    sock.send_to(&good, &ingest).expect("send");
    wait_for("accepted frame", Duration::from_secs(5), || (metric(&http, "gpuha_dnsd_frames_accepted_total") == 1.0).then_some(()));
    let before = fleet(&http).workers;

    // Forged: a newer sequence with other numbers, signed with the wrong key.
    f.seq = 2;
    f.metrics.running = Some(99.0);
    sock.send_to(&f.encode(b"not-the-key-0123456789").expect("encode"), &ingest).expect("send");
    // Replayed: the accepted datagram again.
    sock.send_to(&good, &ingest).expect("send");
    // Garbage, and an oversized datagram.
    sock.send_to(b"\x00\xffnot a frame at all", &ingest).expect("send");
    sock.send_to(&[b'G'; 1200], &ingest).expect("send");
    // A stale capture: correctly signed but sent a minute ago.
    f.seq = 3;
    f.sent_ms = now_ms() - 60_000;
    sock.send_to(&f.encode(KEY).expect("encode"), &ingest).expect("send");

    wait_for("5 drops counted", Duration::from_secs(5), || {
        let total: f64 = ["bad_mac", "replay", "malformed", "clock_skew"]
            .iter()
            .map(|r| metric(&http, &format!("gpuha_dnsd_frames_dropped_total{{reason=\"{r}\"}}")))
            .sum();
        (total == 5.0).then_some(())
    });
    assert_eq!(metric(&http, "gpuha_dnsd_frames_dropped_total{reason=\"bad_mac\"}"), 1.0);
    assert_eq!(metric(&http, "gpuha_dnsd_frames_dropped_total{reason=\"replay\"}"), 1.0);
    assert_eq!(metric(&http, "gpuha_dnsd_frames_dropped_total{reason=\"malformed\"}"), 2.0);
    assert_eq!(metric(&http, "gpuha_dnsd_frames_dropped_total{reason=\"clock_skew\"}"), 1.0);
    assert_eq!(metric(&http, "gpuha_dnsd_frames_accepted_total"), 1.0);
    let after = fleet(&http).workers;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].running, before[0].running, "a dropped frame changed the fleet view");
    assert_eq!(after[0].boot, before[0].boot);
}
