//! The run-time failure shapes, driven by real signals to a spawned process: SIGUSR1 hangs the
//! engine (streams go silent, `/metrics` keeps answering with frozen numbers, as in
//! `metrics-hang-*.txt`) and resumes it; SIGUSR2 slows decoding down.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{capture, Exchange, Exposition, Worker};

const LONG_CHAT: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"go"}],"stream":true,"max_tokens":5000}"#;

fn progress(e: &Exposition) -> (f64, f64, f64) {
    (
        e.value("vllm:generation_tokens_total", &[]),
        e.value("vllm:prompt_tokens_total", &[]),
        e.value("vllm:iteration_tokens_total_count", &[]),
    )
}

/// Polls (bounded) until `f` holds.
fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr1_hangs_the_engine_and_resumes_it() {
    let w = Worker::start_logged(&["--id", "h1", "--ttft-ms", "0", "--tokens-per-s", "200"]);
    let mut stream =
        Exchange::open(&w.addr, "POST", "/v1/chat/completions", Some(LONG_CHAT)).expect("open");
    assert_eq!(stream.status, 200);
    // The role event, then tokens: count every chunk read.
    let mut chunks = 0;
    for _ in 0..3 {
        assert!(stream.next_chunk().expect("a token").is_some());
        chunks += 1;
    }
    // The counters the fixtures show advancing while the engine works.
    let a = progress(&w.metrics());
    eventually(Duration::from_secs(5), "progress before the hang", || {
        let b = progress(&w.metrics());
        b.0 > a.0 && b.2 > a.2
    });
    assert!(a.1 > 0.0);

    w.signal("USR1");
    w.wait_log("engine hung (SIGUSR1)", Duration::from_secs(5));
    // Read what was sent before the hang (and the step in flight when it came), then silence.
    while !stream.silent_for(Duration::from_millis(300)) {
        assert!(stream.next_chunk().expect("still open").is_some());
        chunks += 1;
        assert!(chunks < 5000, "the stream keeps going during the hang");
    }
    assert!(stream.silent_for(Duration::from_secs(1)), "no byte, no close");

    // /metrics still answers, with the numbers frozen, num_requests_running included.
    let frozen = w.get("/metrics");
    assert_eq!(frozen.status, 200);
    let f = Exposition::parse(&frozen.text());
    assert_eq!(f.value("vllm:num_requests_running", &[]), 1.0);
    let hung_at = progress(&f);
    // Every token the frozen counter shows reached the client, and no more (one stream).
    assert_eq!(f64::from(chunks - 1), hung_at.0, "tokens read vs frozen generation_tokens_total");
    // A new streaming request: 200 and headers at once, then nothing (vLLM sends its headers
    // before the first token).
    let t0 = Instant::now();
    let mut late = Exchange::open(&w.addr, "POST", "/v1/chat/completions", Some(LONG_CHAT))
        .expect("open during the hang");
    assert_eq!(late.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(2), "headers at once");
    assert!(late.silent_for(Duration::from_millis(500)));
    // A Responses stream gets what vLLM sends before asking the engine, then nothing.
    let mut resp = Exchange::open(
        &w.addr,
        "POST",
        "/v1/responses",
        Some(r#"{"model":"tiny","input":"x","stream":true}"#),
    )
    .expect("open a Responses stream");
    assert_eq!(resp.status, 200);
    for kind in ["response.created", "response.in_progress"] {
        let chunk = resp.next_chunk().expect("event").expect("not the end");
        assert!(String::from_utf8_lossy(&chunk).starts_with(&format!("event: {kind}\n")));
    }
    assert!(resp.silent_for(Duration::from_millis(300)));
    // Over a second, not one counter moved, nor anything else in the exposition.
    std::thread::sleep(Duration::from_secs(1));
    let again = w.get("/metrics");
    assert_eq!(again.text(), frozen.text());
    assert_eq!(progress(&w.metrics()), hung_at);

    w.signal("USR1");
    w.wait_log("engine resumed (SIGUSR1)", Duration::from_secs(5));
    assert!(stream.next_chunk().expect("tokens again").is_some());
    assert!(late.next_chunk().expect("the late request starts").is_some());
    eventually(Duration::from_secs(5), "counters advance after the resume", || {
        let p = progress(&w.metrics());
        p.0 > hung_at.0 && p.1 > hung_at.1 && p.2 > hung_at.2
    });
}

#[test]
fn frozen_metrics_keep_the_captured_families() {
    // The families the fake exposes during a hang are all in the real hang capture.
    let real = Exposition::parse(&capture("metrics-hang-12s.txt"));
    let w = Worker::start_logged(&["--hang-after-ms", "0"]);
    w.wait_log("engine hung (--hang-after-ms)", Duration::from_secs(5));
    let fake = w.metrics();
    for (name, kind) in &fake.types {
        assert_eq!(real.types.get(name), Some(kind), "{name} ({kind}) is not in the hang capture");
    }
    // A hung engine admits nothing: a non-streaming request gets no answer at all.
    let body = r#"{"model":"tiny","prompt":"x","max_tokens":1}"#;
    let mut sock = TcpStream::connect(&w.addr).expect("connect");
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    sock.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut buf = [0u8; 64];
    let err = sock.read(&mut buf).expect_err("no answer from a hung engine");
    assert!(matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{err}");
}

fn timed_completion(w: &Worker, tokens: u32) -> Duration {
    let body = format!(r#"{{"model":"tiny","prompt":"x","max_tokens":{tokens}}}"#);
    let t0 = Instant::now();
    let r = w.post("/v1/completions", &body);
    assert_eq!(r.status, 200);
    t0.elapsed()
}

#[test]
fn sigusr2_slows_decoding_down() {
    // 20 tokens at 200/s: 95 ms of inter-token delays; slowed down 5x: at least 475 ms.
    let w = Worker::start_logged(&["--ttft-ms", "0", "--tokens-per-s", "200", "--slow-factor", "5"]);
    let fast = timed_completion(&w, 20);
    w.signal("USR2");
    w.wait_log("engine slowed down (SIGUSR2)", Duration::from_secs(5));
    let slow = timed_completion(&w, 20);
    assert!(slow >= Duration::from_millis(475), "slowed down: {slow:?}");
    assert!(slow > fast * 2, "fast {fast:?}, slow {slow:?}");
    w.signal("USR2");
    w.wait_log("engine at full speed (SIGUSR2)", Duration::from_secs(5));
    let fast_again = timed_completion(&w, 20);
    assert!(fast_again < slow, "fast again {fast_again:?}, slow {slow:?}");
}
