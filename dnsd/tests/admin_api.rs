//! The admin API with real sockets: authentication, drains and forced pools as DNS and the
//! fleet view show them, "safe" after the last TTL, persistence across a restart, and reloads
//! (admin call and SIGHUP to the real binary) that refuse a bad config and keep the old one.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use gpuha_liveness::{Frame, Metrics};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-admin-token-0123456789abcdef";

/// One HTTP/1.1 request; returns the status and the whole response (headers and body).
async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

fn body_json(resp: &str) -> serde_json::Value {
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {resp}"))
}

async fn answer(d: &Dnsd, name: &str) -> Vec<String> {
    addrs(&udp(d.dns, &query_msg(name, RecordType::A, None)).await.0)
}

/// The `[admin]` section with the test token (written into `dir`) and, if given, a state file.
fn admin_section(dir: &Path, state: Option<&Path>) -> String {
    let token = dir.join("admin.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    let state = state.map(|p| format!("state_file = \"{}\"\n", p.display())).unwrap_or_default();
    format!("\n[admin]\ntoken_file = \"{}\"\n{state}", token.display())
}

async fn start_admin(state: Option<&Path>) -> Dnsd {
    let dir = tempfile::tempdir().expect("tempdir");
    let dns = dns_section("") + &admin_section(dir.path(), state);
    let text = config_text_full(dir.path(), "", "", &dns);
    Dnsd::start_text(&text, dir).await
}

/// Frames for `workers` (id, pool) every 200 ms until the flag is set.
fn sidecars(d: &Dnsd, workers: &'static [(&'static str, &'static str)]) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, to) = (stop.clone(), vec![d.ingest]);
    tokio::spawn(async move {
        let mut seq = 0;
        while !flag.load(Ordering::Relaxed) {
            seq += 1;
            for (w, p) in workers {
                send_frame(&to, &frame(w, p, 7, seq));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    stop
}

/// Waits until `/v1/fleet` lists `n` workers.
async fn fleet_of(d: &Dnsd, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = body_json(&http_get(d.http, "/v1/fleet").await);
        if v["workers"].as_array().is_some_and(|w| w.len() == n) {
            return v;
        }
        assert!(Instant::now() < deadline, "fleet never had {n} workers: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn drained(fleet: &serde_json::Value, id: &str) -> bool {
    let w = fleet["workers"].as_array().and_then(|ws| ws.iter().find(|w| w["id"] == id)).unwrap_or_else(|| panic!("{id} not in {fleet}"));
    w["drained"].as_bool().unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_need_the_token() {
    // No token configured: nothing is accepted, whatever is presented.
    let open = Dnsd::start(&dns_section("")).await;
    let (st, resp) = request(open.http, "POST", "/v1/admin/pools/pool-a", Some(TOKEN), r#"{"state":"drain"}"#).await;
    assert_eq!(st, 403, "{resp}");
    assert!(resp.contains("admin API is disabled"), "{resp}");
    assert_eq!(request(open.http, "GET", "/v1/admin", None, "").await.0, 403);
    assert_eq!(request(open.http, "POST", "/v1/admin/reload", Some(TOKEN), "").await.0, 403);
    assert_eq!(answer(&open, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"], "nothing changed");
    assert_eq!(metric(&open.metrics().await, "gpuha_dnsd_admin_refused_total{reason=\"disabled\"}"), 3.0);
    assert_eq!(metric(&open.metrics().await, "gpuha_dnsd_admin_enabled"), 0.0);
    open.stop().await;

    let d = start_admin(None).await;
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-a", None, r#"{"state":"drain"}"#).await;
    assert_eq!(st, 401, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("www-authenticate: bearer"), "{resp}");
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-a", Some("test-admin-token-0123456789abcdeF"), r#"{"state":"drain"}"#).await;
    assert_eq!(st, 401, "{resp}");
    assert!(resp.contains("wrong admin token"), "{resp}");
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"], "refused requests change nothing");
    let m = d.metrics().await;
    assert_eq!(metric(&m, "gpuha_dnsd_admin_refused_total{reason=\"no_token\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_admin_refused_total{reason=\"bad_token\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_admin_changes_total{target=\"pool\",action=\"drain\"}"), 0.0);

    // Bad input: clear errors, no change, no panic.
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-a", Some(TOKEN), r#"{"state":"sideways"}"#).await;
    assert_eq!(st, 400, "{resp}");
    assert!(resp.contains("bad admin request body") && resp.contains("force_out"), "{resp}");
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-a", Some(TOKEN), "{not json").await;
    assert_eq!(st, 400, "{resp}");
    let (st, resp) = request(d.http, "POST", "/v1/admin/workers/nobody", Some(TOKEN), r#"{"state":"drain"}"#).await;
    assert_eq!(st, 404, "{resp}");
    assert!(resp.contains("unknown worker \\\"nobody\\\""), "{resp}");
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-zzz", Some(TOKEN), r#"{"state":"drain"}"#).await;
    assert_eq!(st, 404, "{resp}");
    let (st, resp) = request(d.http, "POST", "/v1/admin/reload", Some(TOKEN), "").await;
    assert_eq!(st, 422, "started from a config text, not a file: {resp}");
    assert!(resp.contains("without --config"), "{resp}");

    // The right token: accepted and counted.
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-a", Some(TOKEN), r#"{"state":"force_out","reason":"test"}"#).await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.2.1", "10.0.2.2"]);
    assert_eq!(metric(&d.metrics().await, "gpuha_dnsd_admin_changes_total{target=\"pool\",action=\"force_out\"}"), 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pool_leaves_the_answer_and_is_safe_after_its_last_ttl() {
    let d = start_admin(None).await;
    let stop = sidecars(&d, &[("a1", "pool-a"), ("b1", "pool-b")]);
    fleet_of(&d, 2).await;
    // Taken before the query: dnsd hands the answer out (and starts its TTL) after this instant.
    let last_answer = now_ms();
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"]);

    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-b", Some(TOKEN), r#"{"state":"drain","reason":"maintenance"}"#).await;
    assert_eq!(st, 200, "{resp}");
    let v = body_json(&resp);
    assert_eq!(v["before"], "auto");
    assert_eq!(v["now"]["answered"], false, "{v}");
    assert_eq!(v["now"]["safe"], false, "a TTL handed out a moment ago still runs: {v}");
    let safe_at = v["now"]["safe_at_ms"].as_u64().expect("safe_at_ms");
    assert!(safe_at >= last_answer + 5_000, "the api service's TTL is 5 s: {safe_at} vs {last_answer}");
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.1.1"], "drained pool out of the answer");
    assert_eq!(answer(&d, "prio.gpuha.test.").await, ["10.0.1.1"], "priority moves to the next pool");
    assert!(!drained(&fleet_of(&d, 2).await, "b1"), "its workers keep serving cached clients until safe");

    // Safe once the last TTL ran out; from then its workers get no new requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let v = body_json(&request(d.http, "GET", "/v1/admin", Some(TOKEN), "").await.1);
        let row = v["pools"].as_array().and_then(|p| p.iter().find(|r| r["pool"] == "pool-b").cloned()).expect("pool-b row");
        if row["safe"] == true {
            break row;
        }
        assert!(Instant::now() < deadline, "never safe: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(now_ms() >= row["safe_at_ms"].as_u64().expect("safe_at"), "{row}");
    assert_eq!(row["state"], "drain");
    assert_eq!(row["reason"], "maintenance");
    let fleet = fleet_of(&d, 2).await;
    assert!(drained(&fleet, "b1") && !drained(&fleet, "a1"), "{fleet}");
    let m = d.metrics().await;
    assert_eq!(metric(&m, "gpuha_dnsd_admin_changes_total{target=\"pool\",action=\"drain\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_pool_admin_state{pool=\"pool-b\",state=\"drain\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_pool_drain_safe{pool=\"pool-b\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_service_pool_answered{service=\"api.gpuha.test.\",pool=\"pool-b\"}"), 0.0);
    let dns = body_json(&http_get(d.http, "/v1/dns").await);
    let b = dns["pools"].as_array().and_then(|p| p.iter().find(|r| r["pool"] == "pool-b").cloned()).expect("pool-b");
    assert_eq!((b["admin"].as_str(), b["answerable"].as_bool(), b["safe"].as_bool()), (Some("drain"), Some(false), Some(true)), "{b}");
    assert!(dns["transitions"].as_array().is_some_and(|t| t.iter().any(|t| t["pool"] == "pool-b" && t["event"] == "drain")), "{dns}");

    // Undrain: back in the answer and in the picker's list.
    let (st, resp) = request(d.http, "POST", "/v1/admin/pools/pool-b", Some(TOKEN), r#"{"state":"auto"}"#).await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(body_json(&resp)["before"], "drain");
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"]);
    assert!(!drained(&fleet_of(&d, 2).await, "b1"));

    // A worker drain: the fleet view marks it at once; DNS is unchanged.
    let (st, resp) = request(d.http, "POST", "/v1/admin/workers/a1", Some(TOKEN), r#"{"state":"drain"}"#).await;
    assert_eq!(st, 200, "{resp}");
    let fleet = fleet_of(&d, 2).await;
    assert!(drained(&fleet, "a1") && !drained(&fleet, "b1"), "{fleet}");
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"]);
    assert_eq!(metric(&d.metrics().await, "gpuha_dnsd_worker_drained{worker=\"a1\"}"), 1.0);
    let (_, again) = request(d.http, "POST", "/v1/admin/workers/a1", Some(TOKEN), r#"{"state":"drain"}"#).await;
    assert_eq!(body_json(&again)["changed"], false, "{again}");
    assert_eq!(metric(&d.metrics().await, "gpuha_dnsd_admin_changes_total{target=\"worker\",action=\"drain\"}"), 1.0, "a no-op is not counted");
    stop.store(true, Ordering::Relaxed);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_survive_a_restart() {
    let state_dir = tempfile::tempdir().expect("tempdir");
    let state = state_dir.path().join("admin_state.json");
    let d = start_admin(Some(&state)).await;
    send_frame(&[d.ingest], &frame("a1", "pool-a", 1, 1));
    fleet_of(&d, 1).await;
    for (path, body) in [("/v1/admin/workers/a1", r#"{"state":"drain","reason":"disk"}"#), ("/v1/admin/pools/pool-a", r#"{"state":"force_out"}"#), ("/v1/admin/pools/pool-b", r#"{"state":"force_in"}"#)] {
        let (st, resp) = request(d.http, "POST", path, Some(TOKEN), body).await;
        assert_eq!(st, 200, "{resp}");
    }
    d.stop().await;

    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).expect("state file written")).expect("JSON");
    assert_eq!(saved["version"], 1);
    assert_eq!(saved["workers"]["a1"]["reason"], "disk");
    assert_eq!(saved["pools"]["pool-a"]["state"], "force_out");
    assert_eq!(saved["pools"]["pool-b"]["state"], "force_in");
    let names: Vec<_> = std::fs::read_dir(state_dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names.len(), 1, "only the state file, no temporary one: {names:?}");

    // A new dnsd with the same file: the overrides are in force before any frame arrives.
    let d = start_admin(Some(&state)).await;
    assert_eq!(answer(&d, "api.gpuha.test.").await, ["10.0.2.1", "10.0.2.2"]);
    let v = body_json(&request(d.http, "GET", "/v1/admin", Some(TOKEN), "").await.1);
    assert_eq!(v["workers"]["a1"]["reason"], "disk", "{v}");
    send_frame(&[d.ingest], &frame("a1", "pool-a", 2, 1));
    assert!(drained(&fleet_of(&d, 1).await, "a1"));
    d.stop().await;

    // A corrupt file stops dnsd with an error naming it.
    std::fs::write(&state, "{\"version\":1,\"workers\":{\"a1\":").expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text_full(dir.path(), "", "", &(dns_section("") + &admin_section(dir.path(), Some(&state))));
    let config = gpuha_dnsd::Config::from_toml(&text, Path::new("t.toml")).expect("config");
    let listeners = gpuha_dnsd::Listeners::bind(&config).expect("bind");
    let err = gpuha_dnsd::run(config, listeners, async {}).await.expect_err("a corrupt state file must not start");
    assert!(err.to_string().contains("admin_state.json"), "{err}");
    let cfg = dir.path().join("dnsd.toml");
    std::fs::write(&cfg, &text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuha-dnsd")).arg("--config").arg(&cfg).arg("--check").output().expect("run dnsd");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin_state.json") && stderr.contains("admin state file"), "{stderr}");
}

/// The real binary, its stderr lines on a channel, stopped by PID when dropped.
struct Binary {
    child: Child,
    http: SocketAddr,
    dns: SocketAddr,
    ingest: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Binary {
    fn start(config: &Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpuha-dnsd"))
            .arg("--config")
            .arg(config)
            .env("GPUHA_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsd");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut ready).expect("READY line");
        let field = |k: &str| -> SocketAddr {
            ready.split_whitespace().find_map(|f| f.strip_prefix(k)).and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("{k} in {ready:?}"))
        };
        let (http, dns, ingest) = (field("http="), field("dns="), field("ingest="));
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Binary { child, http, dns, ingest, lines }
    }

    fn hup(&self) {
        let st = Command::new("kill").arg("-HUP").arg(self.child.id().to_string()).status().expect("kill -HUP");
        assert!(st.success());
    }

    /// The next stderr line containing `needle` (within 10 s).
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?}"),
            }
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn answer_at(dns: SocketAddr, name: &str) -> Vec<String> {
    addrs(&udp(dns, &query_msg(name, RecordType::A, None)).await.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_sighup_and_admin_call_refuses_a_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = config_text_full(dir.path(), "", "", &(dns_section("") + &admin_section(dir.path(), None)));
    let cfg = dir.path().join("dnsd.toml");
    std::fs::write(&cfg, &base).expect("write config");
    let b = Binary::start(&cfg);
    assert_eq!(answer_at(b.dns, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"]);

    // SIGHUP with a good change: the service now names pool-a only.
    let one_pool = base.replacen("pools = [\"pool-a\", \"pool-b\"]", "pools = [\"pool-a\"]", 1);
    assert_ne!(one_pool, base);
    std::fs::write(&cfg, &one_pool).expect("write");
    b.hup();
    let line = b.wait_log("config reloaded");
    assert!(line.contains("SIGHUP") && line.contains("3 pool(s)"), "{line}");
    assert_eq!(answer_at(b.dns, "api.gpuha.test.").await, ["10.0.1.1"]);

    // SIGHUP with a bad one: refused naming the key; the previous config keeps serving.
    std::fs::write(&cfg, one_pool.replacen("pools = [\"pool-a\"]", "pools = [\"pool-a\", \"pool-zzz\"]", 1)).expect("write");
    b.hup();
    let line = b.wait_log("reload refused");
    assert!(line.contains("dns.services[0].pools") && line.contains("pool-zzz"), "{line}");
    assert_eq!(answer_at(b.dns, "api.gpuha.test.").await, ["10.0.1.1"]);
    let m = http_get(b.http, "/metrics").await;
    assert_eq!(metric(&m, "gpuha_dnsd_config_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_config_reloads_total{result=\"refused\"}"), 1.0);
    assert_eq!(metric(&m, "gpuha_dnsd_config_last_reload_ok"), 0.0);

    // The admin call: the same refusal in the response; a setting that needs a restart too.
    let (st, resp) = request(b.http, "POST", "/v1/admin/reload", Some(TOKEN), "").await;
    assert_eq!(st, 422, "{resp}");
    assert!(resp.contains("dns.services[0].pools") && resp.contains("keeps serving"), "{resp}");
    std::fs::write(&cfg, one_pool.replacen("[http]\nlisten = \"127.0.0.1:0\"", "[http]\nlisten = \"127.0.0.1:1\"", 1)).expect("write");
    let (st, resp) = request(b.http, "POST", "/v1/admin/reload", Some(TOKEN), "").await;
    assert_eq!(st, 422, "{resp}");
    assert!(resp.contains("http.listen") && resp.contains("restart"), "{resp}");
    assert_eq!(request(b.http, "POST", "/v1/admin/reload", None, "").await.0, 401, "reload needs the token too");

    // Frame keys rotate: key 2 in, key 1 out. Frames signed with key 1 are dropped from then on.
    let key2 = dir.path().join("frame2.key");
    std::fs::write(&key2, b"the-second-key-0123456789").expect("write key");
    let rotated = base.replacen("keys = [{ id = 1,", &format!("keys = [{{ id = 2, file = \"{}\" }}, {{ id = 3,", key2.display()), 1);
    assert_ne!(rotated, base);
    std::fs::write(&cfg, &rotated).expect("write");
    let (st, resp) = request(b.http, "POST", "/v1/admin/reload", Some(TOKEN), "").await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(answer_at(b.dns, "api.gpuha.test.").await, ["10.0.1.1", "10.0.2.1", "10.0.2.2"], "the reload brought pool-b back");
    let signed2 = Frame { key_id: 2, boot_id: 1, seq: 1, sent_ms: now_ms(), worker_id: "k2".into(), pool_id: "pool-a".into(), addr: "10.0.0.1:8000".parse().expect("addr"), models: vec![], adapters: vec![], metrics: Metrics::default() }
        .encode(b"the-second-key-0123456789")
        .expect("encode");
    send_frame(&[b.ingest], &signed2);
    send_frame(&[b.ingest], &frame("k1", "pool-a", 1, 1));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = http_get(b.http, "/metrics").await;
        let (ok, unknown) = (metric(&m, "gpuha_dnsd_frames_accepted_total"), metric(&m, "gpuha_dnsd_frames_dropped_total{reason=\"unknown_key\"}"));
        if ok == 1.0 && unknown == 1.0 {
            assert_eq!(metric(&m, "gpuha_dnsd_config_last_reload_ok"), 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "accepted {ok}, unknown key {unknown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
