//! `gpuha-bench`: the load tools `bench/run.py` drives. Every subcommand prints one JSON object
//! on stdout (plus `READY` for `keepalive`), so the driver never parses prose.
//!
//! ```text
//! gpuha-bench blast --to ADDR --key-file F [--key-id 1] --workers W --rate R --secs S [--batch 32]
//!     pre-encodes R*S distinct, valid frames (W workers, increasing seqs, send time in the skew
//!     window), then sends them paced at R frames/s with sendmmsg
//! gpuha-bench keepalive --to ADDR --key-file F --workers W [--pools P] [--hz 2] [--secs S]
//!     keeps W synthetic workers fresh (one frame per worker per 1/hz s), like W sidecars;
//!     [--model M] names the model they serve; [--steady 1]: idle workers whose numbers do
//!     not change (the default is a busy fleet: queue lengths and rates change every frame);
//!     [--churn C]: C workers per second stop sending (the oldest) and as many new ones start
//!     (a fleet that scales in and out at once; the number sending stays W)
//! gpuha-bench ingest-micro --workers W --frames N
//!     in-process cost of decode+HMAC (owned and borrowed), and of the full accept (order) +
//!     fleet observe as dnsd does it (borrowed frames) and with owned frames
//! gpuha-bench sink --bind ADDR [--rcvbuf BYTES]
//!     the receive floor of ingest: binds ADDR (receive buffer BYTES, 8 MiB by default, as
//!     dnsd asks), prints `READY sink=ADDR`, then takes datagrams with dnsd's own `recvmmsg`
//!     batches (`gpuha_dnsd::udp_batch::RecvBatch`, with its ingest socket's buffers; blocking,
//!     where dnsd's ingest waits in tokio's epoll between batches) and drops them unread: what
//!     any receiver of one datagram per frame pays the kernel, with no work of its own. Runs
//!     until killed.
//! gpuha-bench fleet-parse FILE [--iters N]
//!     native costs of a /v1/fleet JSON body: serde parse (FleetView::from_json), the binary
//!     form's size, encode, full decode and in-place update (gpuha_liveness::fleetwire), and
//!     Ranked::build (what a thread runs on the first pick after a new view)
//! ```
//!
//! Why a separate tool and not the real sidecar: one sidecar process per worker cannot reach
//! 10 k workers or 500 k frames/s on a 2-core machine; the frames are the real codec's output.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpuha_liveness::affinity;
use gpuha_liveness::breaker::Admission;
use gpuha_liveness::busylist;
use gpuha_liveness::pick::{pick_ranked, LoadView, PickConfig, Ranked, Rng};
use gpuha_liveness::{fleetwire, FleetState, FleetView, Frame, FrameRef, Ingest, KeyRing, Metrics};

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("blast") => blast(&Opts::parse(&args[1..])),
        Some("keepalive") => keepalive(&Opts::parse(&args[1..])),
        Some("ingest-micro") => ingest_micro(&Opts::parse(&args[1..])),
        Some("fleet-parse") => fleet_parse(&Opts::parse(&args[1..])),
        Some("sink") => sink(&Opts::parse(&args[1..])),
        _ => Err("usage: gpuha-bench blast|keepalive|ingest-micro|fleet-parse|sink [--opts] (see the module doc)".into()),
    };
    if let Err(e) = r {
        eprintln!("gpuha-bench: {e}");
        std::process::exit(2);
    }
}

struct Opts {
    kv: HashMap<String, String>,
    pos: Vec<String>,
}

impl Opts {
    fn parse(a: &[String]) -> Self {
        let mut kv = HashMap::new();
        let mut pos = Vec::new();
        let mut i = 0;
        while i < a.len() {
            if let Some(k) = a[i].strip_prefix("--") {
                kv.insert(k.to_string(), a.get(i + 1).cloned().unwrap_or_default());
                i += 2;
            } else {
                pos.push(a[i].clone());
                i += 1;
            }
        }
        Opts { kv, pos }
    }
    fn get<T: std::str::FromStr>(&self, k: &str, default: Option<T>) -> Res<T> {
        match self.kv.get(k) {
            Some(v) => v.parse().map_err(|_| format!("--{k}: cannot parse {v:?}")),
            None => default.ok_or_else(|| format!("--{k} is required")),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn read_key(path: &str) -> Res<Vec<u8>> {
    let mut k = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    // dnsd strips one trailing newline; do the same.
    if k.last() == Some(&b'\n') {
        k.pop();
    }
    Ok(k)
}

/// Worker `i`'s frame: realistic field sizes (ids like a k8s pod, one model, every metric set).
fn frame(i: usize, pools: usize, boot: u64, seq: u64, sent_ms: u64, key_id: u16) -> Frame {
    frame_m(i, pools, boot, seq, sent_ms, key_id, "meta-llama/Llama-3.1-8B-Instruct")
}

fn frame_m(i: usize, pools: usize, boot: u64, seq: u64, sent_ms: u64, key_id: u16, model: &str) -> Frame {
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    Frame {
        key_id,
        boot_id: boot,
        seq,
        sent_ms,
        worker_id: format!("vllm-worker-{i:06}"),
        pool_id: format!("pool-{:03}", i % pools.max(1)),
        addr: SocketAddr::V4(SocketAddrV4::new(ip, 8000)),
        models: vec![model.into()],
        adapters: vec![],
        metrics: busy_metrics(seq),
    }
}

/// A busy worker's numbers: queue lengths and counters move every frame.
fn busy_metrics(seq: u64) -> Metrics {
    Metrics {
        running: Some((seq % 17) as f64),
        waiting: Some((seq % 3) as f64),
        kv_usage: Some(0.25),
        ttft_sum_s: Some(seq as f64 * 0.05),
        ttft_count: Some(seq as f64),
        prompt_tokens: Some(seq as f64 * 100.0),
        generation_tokens: Some(seq as f64 * 300.0),
        preemptions: Some(0.0),
        engine_steps: Some(seq as f64 * 40.0),
    }
}

/// An idle worker's numbers: the same in every frame.
fn steady_metrics() -> Metrics {
    Metrics {
        running: Some(0.0),
        waiting: Some(0.0),
        kv_usage: Some(0.02),
        ttft_sum_s: Some(12.5),
        ttft_count: Some(250.0),
        prompt_tokens: Some(25_000.0),
        generation_tokens: Some(75_000.0),
        preemptions: Some(0.0),
        engine_steps: Some(9_000.0),
    }
}

/// Pre-encoded frames in one flat buffer (1 M frames are ~150 MB as separate Vecs otherwise).
struct Batch {
    buf: Vec<u8>,
    off: Vec<(usize, usize)>,
}

fn encode_many(n: usize, workers: usize, pools: usize, key: &[u8], key_id: u16, sent_ms: u64, seq_base: u64) -> Res<Batch> {
    let mut b = Batch { buf: Vec::with_capacity(n * 160), off: Vec::with_capacity(n) };
    let boot = 0x6265_6e63_6800_0000 ^ seq_base;
    for k in 0..n {
        let (i, round) = (k % workers, (k / workers) as u64);
        let bytes = frame(i, pools, boot, seq_base + round, sent_ms, key_id).encode(key).map_err(|e| e.to_string())?;
        b.off.push((b.buf.len(), bytes.len()));
        b.buf.extend_from_slice(&bytes);
    }
    Ok(b)
}

/// Sends `frames[from..to]` with one sendmmsg call per `batch`; returns how many the kernel took.
fn send_mmsg(sock: &UdpSocket, b: &Batch, from: usize, to: usize) -> usize {
    use std::os::fd::AsRawFd;
    let n = to - from;
    let mut iov: Vec<libc::iovec> = b.off[from..to]
        .iter()
        .map(|&(o, l)| libc::iovec { iov_base: b.buf[o..].as_ptr() as *mut libc::c_void, iov_len: l })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: a zeroed msghdr is valid (no name, no control); we set the one iovec.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_iov = v as *mut libc::iovec;
            h.msg_iovlen = 1;
            libc::mmsghdr { msg_hdr: h, msg_len: 0 }
        })
        .collect();
    // SAFETY: msgs/iov point into live buffers for the duration of the call; the socket is connected.
    let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
    if r < 0 {
        0
    } else {
        r as usize
    }
}

fn sink(o: &Opts) -> Res<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = o.get("bind", None)?;
    let rcvbuf: libc::c_int = o.get("rcvbuf", Some(8 << 20))?;
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    // SAFETY: a valid socket, an int option of the size given.
    let r = unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&rcvbuf as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r != 0 {
        return Err(format!("SO_RCVBUF: {}", std::io::Error::last_os_error()));
    }
    println!("READY sink={}", sock.local_addr().map_err(|e| e.to_string())?);
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // dnsd's own batch receive, with the buffers its ingest socket uses.
    let mut batch = gpuha_dnsd::udp_batch::RecvBatch::new(gpuha_liveness::MAX_FRAME_LEN + 1);
    loop {
        match batch.recv_blocking(&sock) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("recvmmsg: {e}")),
        }
    }
}

fn blast(o: &Opts) -> Res<()> {
    let to: SocketAddr = o.get("to", None)?;
    let key = read_key(&o.get::<String>("key-file", None)?)?;
    let key_id: u16 = o.get("key-id", Some(1))?;
    let workers: usize = o.get("workers", Some(10_000))?;
    let pools: usize = o.get("pools", Some(10))?;
    let rate: f64 = o.get("rate", None)?;
    let secs: f64 = o.get("secs", Some(1.0))?;
    let batch: usize = o.get("batch", Some(32))?;
    let n = (rate * secs).ceil() as usize;
    let t0 = Instant::now();
    // Send time 2.5 s in the future: valid (±5 s skew) from 2.5 s before until 7.5 s after now,
    // which covers encoding plus sending.
    let b = encode_many(n, workers, pools, &key, key_id, now_ms() + 2_500, now_us())?;
    let encode_s = t0.elapsed().as_secs_f64();
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(to).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut sent = 0usize;
    let mut failed_calls = 0u64;
    while sent < n {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(n);
        if due <= sent {
            std::hint::spin_loop();
            continue;
        }
        let to_idx = (sent + batch).min(due);
        let k = send_mmsg(&sock, &b, sent, to_idx);
        if k == 0 {
            failed_calls += 1;
            sent += to_idx - sent; // count as offered: the driver compares with dnsd's counter
        } else {
            sent += k;
        }
    }
    let el = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"offered": n, "secs": el, "offered_rate": n as f64 / el, "target_rate": rate,
                           "encode_s": encode_s, "failed_send_calls": failed_calls,
                           "frame_bytes_avg": b.buf.len() as f64 / n.max(1) as f64})
    );
    Ok(())
}

fn keepalive(o: &Opts) -> Res<()> {
    let to: SocketAddr = o.get("to", None)?;
    let key = read_key(&o.get::<String>("key-file", None)?)?;
    let key_id: u16 = o.get("key-id", Some(1))?;
    let workers: usize = o.get("workers", None)?;
    let pools: usize = o.get("pools", Some(10))?;
    let hz: f64 = o.get("hz", Some(2.0))?;
    let secs: f64 = o.get("secs", Some(3600.0))?;
    let model: String = o.get("model", Some("meta-llama/Llama-3.1-8B-Instruct".to_string()))?;
    let steady: u8 = o.get("steady", Some(0))?;
    let churn: f64 = o.get("churn", Some(0.0))?;
    if !(churn >= 0.0 && churn.is_finite()) {
        return Err("--churn: workers per second, 0 or more".into());
    }
    // The workers sending this round are first..first + workers: each round moves the window by
    // churn / hz (the fraction carried over), so the oldest go silent and new ids appear.
    let (mut first, mut carry) = (0usize, 0f64);
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(to).map_err(|e| e.to_string())?;
    let boot = now_us();
    let period = Duration::from_secs_f64(1.0 / hz);
    let start = Instant::now();
    let mut seq = 1u64;
    let mut frames = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let round = Instant::now();
        for k in 0..workers {
            let i = first + k;
            let mut f = frame_m(i, pools, boot, seq, now_ms(), key_id, &model);
            if steady != 0 {
                f.metrics = steady_metrics();
            }
            let f = f.encode(&key).map_err(|e| e.to_string())?;
            let _ = sock.send(&f);
            frames += 1;
            // Spread the round over its period in slices of 256 frames, like independent sidecars.
            if k % 256 == 255 {
                let target = period.mul_f64((k + 1) as f64 / workers as f64);
                if let Some(d) = target.checked_sub(round.elapsed()) {
                    std::thread::sleep(d);
                }
            }
        }
        if seq == 1 {
            println!("READY workers={workers}");
        }
        seq += 1;
        carry += churn / hz;
        let step = carry.floor();
        carry -= step;
        first += step as usize;
        if let Some(d) = period.checked_sub(round.elapsed()) {
            std::thread::sleep(d);
        }
    }
    println!("{}", serde_json::json!({"frames": frames}));
    Ok(())
}

fn ingest_micro(o: &Opts) -> Res<()> {
    let workers: usize = o.get("workers", Some(10_000))?;
    let n: usize = o.get("frames", Some(500_000))?;
    let key = vec![7u8; 32];
    let ring = KeyRing::single(1, key.clone());
    let now = now_ms();
    let b = encode_many(n, workers, 10, &key, 1, now, 1)?;
    let frames: Vec<&[u8]> = b.off.iter().map(|&(o, l)| &b.buf[o..o + l]).collect();

    let (t, c) = (Instant::now(), thread_cpu_ns());
    let mut ok = 0usize;
    for f in &frames {
        ok += usize::from(Frame::decode(f, &ring).is_ok());
    }
    let decode_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let cpu_decode_ns = (thread_cpu_ns() - c) as f64 / n as f64;

    let t = Instant::now();
    let mut ok_ref = 0usize;
    for f in &frames {
        ok_ref += usize::from(FrameRef::decode(f, &ring).is_ok());
    }
    let decode_ref_ns = t.elapsed().as_nanos() as f64 / n as f64;

    // What dnsd does: frames borrowed from the datagrams.
    let mut ingest = Ingest::new(ring.clone());
    let mut fleet = FleetState::new(now);
    let (t, c) = (Instant::now(), thread_cpu_ns());
    let mut accepted = 0usize;
    for f in &frames {
        if let Ok(fr) = ingest.accept_ref(f, now) {
            fleet.observe_ref(&fr, now);
            accepted += 1;
        }
    }
    let accept_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let cpu_accept_ns = (thread_cpu_ns() - c) as f64 / n as f64;

    let mut ingest = Ingest::new(ring);
    let mut fleet = FleetState::new(now);
    let t = Instant::now();
    let mut accepted_owned = 0usize;
    for f in &frames {
        if let Ok(fr) = ingest.accept(f, now) {
            fleet.observe(fr, now);
            accepted_owned += 1;
        }
    }
    let accept_owned_ns = t.elapsed().as_nanos() as f64 / n as f64;
    if (ok_ref, accepted_owned) != (ok, accepted) {
        return Err(format!("borrowed and owned paths disagree: decoded {ok_ref} vs {ok}, accepted {accepted} vs {accepted_owned}"));
    }
    println!(
        "{}",
        serde_json::json!({"frames": n, "workers": workers, "decoded_ok": ok, "accepted": accepted,
                           "decode_hmac_ns": decode_ns, "decode_ref_ns": decode_ref_ns,
                           "accept_observe_ns": accept_ns, "accept_observe_owned_ns": accept_owned_ns,
                           "cpu_decode_hmac_ns": cpu_decode_ns, "cpu_accept_observe_ns": cpu_accept_ns,
                           "frame_bytes_avg": b.buf.len() as f64 / n as f64})
    );
    Ok(())
}

/// CPU time of this thread (ns): on a shared machine, what wall-clock timing overstates by the
/// time other tasks held the core.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn fleet_parse(o: &Opts) -> Res<()> {
    let path = o.pos.first().ok_or("fleet-parse FILE")?;
    let iters: usize = o.get("iters", Some(50))?;
    let body = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    // Each step's time per iteration, sorted: (p50, p99, min) in µs.
    fn timed(iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<(f64, f64, f64)> {
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        Ok((pct(0.5), pct(0.99), pct(0.0)))
    }
    let view = FleetView::from_json(&body).map_err(|e| e.to_string())?;
    let parse = timed(iters, || FleetView::from_json(&body).map(drop).map_err(|e| e.to_string()))?;
    let bin = fleetwire::encode(&view);
    let encode = timed(iters, || {
        std::hint::black_box(fleetwire::encode(&view));
        Ok(())
    })?;
    let decode = timed(iters, || fleetwire::decode(&bin).map(drop).map_err(|e| e.to_string()))?;
    let mut held = fleetwire::decode(&bin).map_err(|e| e.to_string())?;
    let update = timed(iters, || fleetwire::update(&mut held, &bin).map_err(|e| e.to_string()))?;
    let identity = timed(iters, || {
        let a = fleetwire::identity(&bin).map_err(|e| e.to_string())?;
        std::hint::black_box(a == fleetwire::identity(&bin).map_err(|e| e.to_string())?);
        Ok(())
    })?;
    let cfg = PickConfig::default();
    let rank = timed(iters, || {
        std::hint::black_box(Ranked::build(&view, &cfg));
        Ok(())
    })?;
    // How many workers one pick scores (each a shared-data read of its in-flight slot in the
    // filter): the near-best band is scanned whole.
    struct Counting(std::cell::Cell<usize>);
    impl LoadView for Counting {
        fn ours(&self, _: &str, _: u64, _: f64) -> f64 {
            self.0.set(self.0.get() + 1);
            0.0
        }
    }
    let ranked = Ranked::build(&view, &cfg);
    let load = Counting(std::cell::Cell::new(0));
    let model = view.workers.first().and_then(|w| w.models.first()).cloned();
    let _ = pick_ranked(&ranked, &view, 0, 0, model.as_deref(), None, &load, &mut Rng::new(1), &cfg, &[], |_| Admission::Allow, |_| false);
    // One pick's own cost (no shared data): with no load at all, and through the busy list over
    // an in-memory store that lists one worker (what the filter's picks read past the first few).
    let mut seed = 0;
    let pick_zero = timed(iters, || {
        seed += 1;
        std::hint::black_box(pick_ranked(&ranked, &view, 0, 0, model.as_deref(), None, &Counting(std::cell::Cell::new(0)), &mut Rng::new(seed), &cfg, &[], |_| Admission::Allow, |_| false));
        Ok(())
    })?;
    // The same with an affinity key, as nearly every chat request has (its prompt's prefix).
    let keyed_pick = timed(iters, || {
        seed += 1;
        let want = Some(affinity::Want::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        std::hint::black_box(pick_ranked(&ranked, &view, 0, 0, model.as_deref(), want, &Counting(std::cell::Cell::new(0)), &mut Rng::new(seed), &cfg, &[], |_| Admission::Allow, |_| false));
        Ok(())
    })?;
    #[derive(Default)]
    struct Mem(HashMap<String, Vec<u8>>, usize);
    impl busylist::Store for Mem {
        fn get(&mut self, key: &str) -> busylist::Read {
            self.1 += 1;
            (self.0.get(key).cloned(), Some(1))
        }
        fn set(&mut self, key: &str, value: &[u8], _: Option<u32>) -> busylist::SetResult {
            self.0.insert(key.to_string(), value.to_vec());
            busylist::SetResult::Ok
        }
    }
    let mut mem = Mem::default();
    if let Some(w) = view.workers.get(view.workers.len() / 2) {
        let mut op = busylist::Start::new(&w.addr, 0, cfg.in_flight_max_age_ms, None, None);
        busylist::run(&mut mem, |s| op.step(s));
    }
    let mut busy_reads = 0;
    let pick_busy = timed(iters, || {
        seed += 1;
        mem.1 = 0;
        let busy = busylist::BusyLoad::new(&mut mem, 0, cfg.in_flight_max_age_ms);
        std::hint::black_box(pick_ranked(&ranked, &view, 0, 0, model.as_deref(), None, &busy, &mut Rng::new(seed), &cfg, &[], |_| Admission::Allow, |_| false));
        drop(busy);
        busy_reads = mem.1;
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({"bytes": body.len(), "workers": view.workers.len(), "iters": iters, "load_reads_per_pick": load.0.get(),
                           "parse_us_p50": parse.0, "parse_us_p99": parse.1, "parse_us_min": parse.2,
                           "binary_bytes": bin.len(), "binary_encode_us_p50": encode.0,
                           "binary_decode_us_p50": decode.0, "binary_decode_us_p99": decode.1,
                           "binary_update_us_p50": update.0, "binary_update_us_p99": update.1,
                           "identity_compare_us_p50": identity.0, "rank_build_us_p50": rank.0, "rank_build_us_p99": rank.1,
                           "pick_us_p50": pick_zero.0, "keyed_pick_us_p50": keyed_pick.0, "busy_pick_us_p50": pick_busy.0, "busy_pick_store_reads": busy_reads})
    );
    Ok(())
}
