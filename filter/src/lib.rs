//! GPU HA Proxy-Wasm filter for stock Envoy. One module, three roles chosen by the plugin
//! configuration's `role` (see [`config`]):
//!
//! * `picker` (downstream `envoy.filters.http.wasm` in the listener's HCM): polls dnsd's
//!   `/v1/fleet`, picks up to three workers per request and writes them to `x-gpuha-endpoints`
//!   for the `override_host` load balancer; answers with OpenAI-shaped errors where Envoy would
//!   send text/plain.
//! * `guard` (upstream HTTP filter on the worker cluster): the first-token guard.
//! * `failwhale`: answers every request with an OpenAI-shaped 503 (SSE when `"stream": true`).
//!
//! This crate is glue: every decision lives in `gpuha-liveness` (`pick`, `breaker`, `guard`,
//! `openai_error`) and is tested there natively. Host errors are logged and the request goes
//! on (fail open); nothing here panics on the request path.
//!
//! Cross-thread state lives in Proxy-Wasm shared data (one store per `vm_id`, so the picker and
//! the guard must be configured with the same `vm_id`):
//!
//! * `gpuha.fleet`: the latest fleet view: 8 bytes little-endian local fetch time (ms) of its
//!   content (its version), then dnsd's JSON (`/v1/fleet?ages=bounded`, see dnsd's `http`).
//! * `gpuha.fleet.version`: 16 bytes: that version, then the local time dnsd last vouched for
//!   the content (its `200`, or a later `304 Not Modified`: the view's ages count from there).
//!   Read on every request, so that a thread copies and parses the view only when its content
//!   changed, and a `304` costs the threads nothing.
//! * `gpuha.fleet.etag`: 8 bytes version, then dnsd's `ETag` for it, sent as `If-None-Match`.
//! * `gpuha.poll`: 8 bytes, when the last poll was started. Every picker root context (one per
//!   Envoy worker thread) ticks, but only the one that wins the compare-and-swap on this slot
//!   polls, so dnsd sees one poll per interval however many threads Envoy runs, and there is
//!   no leader whose loss would stop polling.
//! * `gpuha.breaker.<ip:port>`: that worker's circuit breaker (JSON).
//! * `gpuha.breakers.not_closed`: the workers whose circuit is open or half-open.

pub mod config;
mod host;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use gpuha_liveness::breaker::{Admission, Breaker, BreakerConfig, Transition};
use gpuha_liveness::guard::{mode_for, Guard, Mode, Step, TAIL_PEEK_BYTES};
use gpuha_liveness::openai_error::{error_json, error_response, is_api_shaped, wants_stream};
use gpuha_liveness::pick::{pick_ranked, Decision, LocalLoad, Ranked, Rng};
use gpuha_liveness::FleetView;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

use crate::config::{Config, FailwhaleConfig, GuardConfig, NoWorkerPolicy, PickerConfig};
use crate::host::{inc, Stats};

/// Request header read by the `override_host` load balancer.
pub const ENDPOINTS_HEADER: &str = "x-gpuha-endpoints";
/// Request header telling the guard that this request carries a half-open probe.
pub const PROBE_HEADER: &str = "x-gpuha-probe";
/// Response header marking what the guard did (`released`, `retried`, `failed`).
pub const GUARD_HEADER: &str = "x-gpuha-guard";

const FLEET_KEY: &str = "gpuha.fleet";
/// 8 bytes: the local fetch time of the view in `gpuha.fleet`, written after it.
const FLEET_VERSION_KEY: &str = "gpuha.fleet.version";
const FLEET_ETAG_KEY: &str = "gpuha.fleet.etag";
const POLL_KEY: &str = "gpuha.poll";
/// Comma-separated addresses whose circuit is not closed. Every other worker is admitted
/// without reading its breaker, so a pick costs one shared-data read, not one per worker.
const NOT_CLOSED_KEY: &str = "gpuha.breakers.not_closed";

fn breaker_key(addr: &str) -> String {
    format!("gpuha.breaker.{addr}")
}

/// Adds `addr` to (or removes it from) the not-closed list.
fn set_not_closed(addr: &str, not_closed: bool) {
    host::shared_update(NOT_CLOSED_KEY, |cur| {
        let cur = String::from_utf8_lossy(cur.unwrap_or_default());
        let mut list: Vec<&str> = cur.split(',').filter(|x| !x.is_empty() && *x != addr).collect();
        if not_closed {
            list.push(addr);
        }
        Some((list.join(",").into_bytes(), ()))
    });
}

fn u64_prefix(b: Option<&[u8]>) -> u64 {
    u64_at(b, 0)
}

fn u64_at(b: Option<&[u8]>, at: usize) -> u64 {
    b.and_then(|b| b.get(at..at + 8)).and_then(|p| p.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// The version slot: (content version, vouched at). A slot of 8 bytes (no vouch yet) is
/// vouched at its version.
fn version_slot(b: Option<&[u8]>) -> (u64, u64) {
    let v = u64_prefix(b);
    let vouched = if b.is_some_and(|b| b.len() >= 16) { u64_at(b, 8) } else { v };
    (v, vouched)
}

fn version_bytes(version: u64, vouched: u64) -> Vec<u8> {
    let mut b = version.to_le_bytes().to_vec();
    b.extend_from_slice(&vouched.to_le_bytes());
    b
}

/// The path polled: `fleet_path` with the cacheable form and the router's pools asked for.
pub fn poll_path(p: &PickerConfig) -> String {
    let sep = if p.fleet_path.contains('?') { '&' } else { '?' };
    let mut path = format!("{}{sep}ages=bounded", p.fleet_path);
    if !p.pick.pools.is_empty() {
        path.push_str("&pool=");
        path.push_str(&p.pick.pools.join(","));
    }
    path
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::new(id)) });
}}

/// Per-thread state shared by a root context and its HTTP contexts (one Wasm VM per thread,
/// so `Rc` is enough).
struct Thread {
    /// Parsed fleet view and its content version, cached until the shared content changes.
    fleet: Option<(u64, Rc<FleetView>)>,
    /// The view's workers ranked for picking, built on the first pick after a new view.
    ranked: Option<(u64, Rc<Ranked>)>,
    load: LocalLoad,
    rng: Rng,
}

impl Thread {
    /// The current fleet view: (content version, local time its ages count from, view).
    /// Every request calls this, so it reads only the 16-byte version slot; the view itself
    /// (megabytes for a large fleet) is copied and parsed only when another thread published
    /// new content.
    fn fleet(&mut self) -> Option<(u64, u64, Rc<FleetView>)> {
        let (version, vouched) = version_slot(host::shared_get(FLEET_VERSION_KEY).0.as_deref());
        if let Some((v, view)) = &self.fleet {
            if *v == version {
                return Some((version, vouched, view.clone()));
            }
        }
        let bytes = host::shared_get(FLEET_KEY).0?;
        let fetched = u64_prefix(Some(&bytes));
        // The slot is written just after the view: until then, the view's own fetch time.
        let vouched = if fetched == version { vouched } else { fetched };
        match FleetView::from_json(bytes.get(8..).unwrap_or_default()) {
            Ok(v) => {
                let v = Rc::new(v);
                self.fleet = Some((fetched, v.clone()));
                Some((fetched, vouched, v))
            }
            Err(e) => {
                host::warn(&format!("gpuha: shared fleet view unreadable: {e}"));
                None
            }
        }
    }
}

struct Root {
    id: u32,
    cfg: Option<Rc<Config>>,
    stats: Stats,
    thread: Rc<RefCell<Thread>>,
    /// The poll this root context has in flight: (token, started at, version it named in
    /// `If-None-Match`).
    poll: Option<(u32, u64, u64)>,
    /// The path polled ([`poll_path`]).
    poll_path: String,
}

impl Root {
    fn new(id: u32) -> Self {
        Root { id, cfg: None, stats: Stats::default(), thread: Rc::new(RefCell::new(Thread { fleet: None, ranked: None, load: LocalLoad::default(), rng: Rng::new(0) })), poll: None, poll_path: String::new() }
    }

    fn seed() -> u64 {
        // Distinct per thread and per start: std's hasher keys come from WASI random_get.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(host::now_ms());
        h.finish()
    }

    fn maybe_poll(&mut self, p: &PickerConfig) {
        let now = host::now_ms();
        if let Some((_, since, _)) = self.poll {
            if now.saturating_sub(since) <= p.poll_timeout_ms + 1_000 {
                return;
            }
            // The host never answered: forget it.
            self.poll = None;
        }
        let min_gap = p.poll_interval_ms * 9 / 10;
        let claimed = host::shared_update(POLL_KEY, |cur| {
            (now.saturating_sub(u64_prefix(cur)) >= min_gap).then(|| (now.to_le_bytes().to_vec(), ()))
        });
        if claimed.is_none() {
            return;
        }
        // The tag of the content we hold: an unchanged fleet is answered 304 with no body.
        let tag = host::shared_get(FLEET_ETAG_KEY).0.unwrap_or_default();
        let tag_version = u64_prefix(Some(&tag));
        let etag = tag.get(8..).and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("");
        let mut headers = vec![
            (":method", "GET"),
            (":path", self.poll_path.as_str()),
            (":authority", p.fleet_authority.as_str()),
            ("accept", "application/json"),
        ];
        if !etag.is_empty() {
            headers.push(("if-none-match", etag));
        }
        match self.dispatch_http_call(&p.fleet_cluster, headers, None, vec![], Duration::from_millis(p.poll_timeout_ms)) {
            Ok(token) => {
                inc(self.stats.fleet_polls);
                self.poll = Some((token, now, tag_version));
            }
            Err(e) => {
                inc(self.stats.fleet_poll_failures);
                host::warn(&format!("gpuha: fleet poll via cluster {}: {e:?}", p.fleet_cluster));
            }
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let (started, tag_version) = match self.poll {
            Some((t, started, v)) if t == token => (started, v),
            _ => return,
        };
        self.poll = None;
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status").ok().flatten();
        let now = host::now_ms();
        if status.as_deref() == Some("304") {
            // dnsd vouches, as of now, for the content we named: its ages count from now.
            // Nothing to copy or parse. Only if that content is still the current one.
            inc(self.stats.fleet_not_modified);
            host::shared_update(FLEET_VERSION_KEY, |cur| {
                let (v, vouched) = version_slot(cur);
                (cur.is_some() && v == tag_version && vouched < now).then(|| (version_bytes(v, now), ()))
            });
            return;
        }
        if status.as_deref() != Some("200") {
            inc(self.stats.fleet_poll_failures);
            host::debug(&format!("gpuha: fleet poll failed: status {status:?}"));
            return;
        }
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
        let view = match FleetView::from_json(&body) {
            Ok(v) => v,
            Err(e) => {
                inc(self.stats.fleet_poll_failures);
                host::warn(&format!("gpuha: fleet view from dnsd unreadable: {e}"));
                return;
            }
        };
        let etag = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, "etag").ok().flatten().unwrap_or_default();
        let mut value = now.to_le_bytes().to_vec();
        value.extend_from_slice(&body);
        // A slow answer must not replace a view fetched after this poll started.
        let published = host::shared_update(FLEET_KEY, |cur| (cur.is_none() || u64_prefix(cur) <= started).then(|| (value.clone(), ())));
        if published.is_some() {
            host::shared_update(FLEET_VERSION_KEY, |_| Some((version_bytes(now, now), ())));
            let mut tag = now.to_le_bytes().to_vec();
            tag.extend_from_slice(etag.as_bytes());
            host::shared_update(FLEET_ETAG_KEY, |_| Some((tag.clone(), ())));
            // This thread parsed it already: no second parse on its next request.
            self.thread.borrow_mut().fleet = Some((now, Rc::new(view)));
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        let cfg = match Config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host::log(LogLevel::Error, &format!("gpuha: bad plugin configuration: {e}"));
                return false;
            }
        };
        self.stats = Stats::define();
        self.thread.borrow_mut().rng = Rng::new(Self::seed() ^ u64::from(self.id));
        if let Config::Picker(p) = &cfg {
            self.poll_path = poll_path(p);
            let tick = Duration::from_millis((p.poll_interval_ms / 2).max(10));
            if let Err(e) = hostcalls::set_tick_period(tick) {
                host::log(LogLevel::Error, &format!("gpuha: set_tick_period: {e:?}"));
                return false;
            }
        }
        self.cfg = Some(Rc::new(cfg));
        true
    }

    fn on_tick(&mut self) {
        if let Some(cfg) = self.cfg.clone() {
            if let Config::Picker(p) = cfg.as_ref() {
                self.maybe_poll(p);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let stats = self.stats;
        Some(match self.cfg.as_deref() {
            Some(Config::Picker(p)) => Box::new(Picker::new(Rc::new(p.clone()), stats, self.thread.clone())),
            Some(Config::Guard(g)) => Box::new(GuardCtx::new(Rc::new(g.clone()), stats)),
            Some(Config::Failwhale(f)) => Box::new(Failwhale { cfg: Rc::new(f.clone()), stats, replied: false }),
            None => Box::new(PassThrough),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct PassThrough;
impl Context for PassThrough {}
impl HttpContext for PassThrough {}

// ---------------------------------------------------------------------------------------------
// Picker

#[derive(serde::Deserialize)]
struct RequestFields {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

struct Picker {
    cfg: Rc<PickerConfig>,
    stats: Stats,
    thread: Rc<RefCell<Thread>>,
    stream: bool,
    /// Set when the response is one of Envoy's own text/plain errors being rewritten.
    rewrite: Option<u16>,
}

impl Picker {
    fn new(cfg: Rc<PickerConfig>, stats: Stats, thread: Rc<RefCell<Thread>>) -> Self {
        Picker { cfg, stats, thread, stream: false, rewrite: None }
    }

    fn reply_error(&self, status: u16, message: &str, retry_after: Option<u32>) {
        let r = error_response(status, message, self.stream, Some(self.cfg.stream_error_status), retry_after);
        host::send_response(r.status, &r.headers, &r.body);
    }

    fn breaker_admission(&self, addr: &str, now: u64) -> Admission {
        let (bytes, _) = host::shared_get(&breaker_key(addr));
        Breaker::decode(bytes.as_deref()).admission(now, &self.cfg.breaker)
    }

    fn decide(&mut self, body: &[u8]) -> Action {
        let fields: RequestFields = match serde_json::from_slice(body) {
            Ok(f) => f,
            Err(_) => {
                // Not JSON: no pick; the worker answers its own 400.
                inc(self.stats.fail_open);
                return Action::Continue;
            }
        };
        self.stream = matches!(fields.stream, Some(serde_json::Value::Bool(true)));
        let model = fields.model.as_ref().and_then(|m| m.as_str()).map(str::to_string);
        let now = host::now_ms();
        let Some((version, fetched, view)) = self.thread.borrow_mut().fleet() else {
            inc(self.stats.fail_open);
            host::debug("gpuha: no fleet view yet: fail open");
            return Action::Continue;
        };
        let bcfg: BreakerConfig = self.cfg.breaker;
        let not_closed = host::shared_get(NOT_CLOSED_KEY).0.unwrap_or_default();
        let not_closed = String::from_utf8_lossy(&not_closed).into_owned();
        let not_closed: Vec<&str> = not_closed.split(',').filter(|x| !x.is_empty()).collect();
        let decision = {
            let mut t = self.thread.borrow_mut();
            let t = &mut *t;
            // Ranked once per fleet view content (per thread), not per request.
            let ranked = match &t.ranked {
                Some((v, r)) if *v == version => r.clone(),
                _ => {
                    let r = Rc::new(Ranked::build(&view, &self.cfg.pick));
                    t.ranked = Some((version, r.clone()));
                    r
                }
            };
            pick_ranked(
                &ranked,
                &view,
                fetched,
                now,
                model.as_deref(),
                &t.load,
                &mut t.rng,
                &self.cfg.pick,
                &not_closed,
                |a| self.breaker_admission(a, now),
                |a| {
                    host::shared_update(&breaker_key(a), |cur| {
                        let mut b = Breaker::decode(cur);
                        b.try_claim_probe(now, &bcfg).then(|| (b.encode(), ()))
                    })
                    .is_some()
                },
            )
        };
        match decision {
            Decision::Endpoints { endpoints, probe } => {
                let list = endpoints.join(",");
                host::set_request_header(ENDPOINTS_HEADER, Some(&list));
                if let Some(p) = &probe {
                    host::set_request_header(PROBE_HEADER, Some(p));
                    inc(self.stats.probes);
                }
                if let Some(first) = endpoints.first() {
                    let mut t = self.thread.borrow_mut();
                    t.load.record(first, now);
                    t.load.prune(now);
                }
                inc(self.stats.picks);
                Action::Continue
            }
            Decision::Stale | Decision::UnknownModel => {
                inc(self.stats.fail_open);
                Action::Continue
            }
            Decision::NoWorker { fresh, serving } => {
                inc(self.stats.no_worker);
                if self.cfg.no_worker == NoWorkerPolicy::FailOpen {
                    return Action::Continue;
                }
                let m = model.as_deref().unwrap_or("(none)");
                let msg = format!("No worker can serve model '{m}' right now ({serving} known, {fresh} fresh, none with a closed circuit). Please retry.");
                self.reply_error(503, &msg, Some(self.cfg.retry_after_s));
                Action::Pause
            }
        }
    }
}

impl Context for Picker {}

impl HttpContext for Picker {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // Clients must not steer the load balancer or claim probes.
        host::set_request_header(ENDPOINTS_HEADER, None);
        host::set_request_header(PROBE_HEADER, None);
        if end_of_stream {
            // No body (GET /v1/models, health checks): no pick, Envoy's fallback LB decides.
            return Action::Continue;
        }
        // Hold the headers: the pick needs the body (needs allow_on_headers_stop_iteration).
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if size > self.cfg.max_body_bytes {
            inc(self.stats.body_too_large);
            let msg = format!("Request body is larger than {} bytes.", self.cfg.max_body_bytes);
            self.reply_error(413, &msg, None);
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, size);
        self.decide(&body)
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if !self.cfg.rewrite_local_replies || end_of_stream {
            return Action::Continue;
        }
        let Some(status) = host::status() else { return Action::Continue };
        if status < 400 || is_api_shaped(host::response_header("content-type").as_deref()) {
            return Action::Continue;
        }
        // Envoy's own error (no healthy upstream, reset before headers, timeout, 413...):
        // text/plain. Rewrite it once the body (Envoy's details) is complete.
        self.rewrite = Some(status);
        host::set_response_header("content-length", None);
        // Hold the headers too: content type and `retry-after` change with the body.
        Action::Pause
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let Some(status) = self.rewrite else { return Action::Continue };
        if !end_of_stream {
            return Action::Pause;
        }
        let details = String::from_utf8_lossy(&host::body(BufferType::HttpResponseBody, size)).trim().to_string();
        let msg = match status {
            503 => format!("No worker could serve the request ({details}). Please retry."),
            504 => format!("The worker did not start answering in time ({details}). Please retry."),
            _ => format!("The request failed at the gateway ({details})."),
        };
        let retry_after = matches!(status, 429 | 502 | 503 | 504).then_some(self.cfg.retry_after_s);
        let r = error_response(status, &msg, self.stream, None, retry_after);
        for (k, v) in &r.headers {
            host::set_response_header(k, Some(v));
        }
        host::set_response_header("x-gpuha-rewritten", Some("1"));
        host::set_body(BufferType::HttpResponseBody, size, &r.body);
        inc(self.stats.local_replies_rewritten);
        Action::Continue
    }
}

// ---------------------------------------------------------------------------------------------
// First-token guard (upstream filter)

struct GuardCtx {
    cfg: Rc<GuardConfig>,
    stats: Stats,
    guard: Option<Guard>,
    probe_for: Option<String>,
    addr: Option<String>,
    /// The breaker has heard how this attempt went.
    reported: bool,
    saw_headers: bool,
    saw_end: bool,
    failed: bool,
    /// The guard replaced this attempt's body with its own error (a 503 rewrite): drop the rest.
    swallow: bool,
}

impl GuardCtx {
    fn new(cfg: Rc<GuardConfig>, stats: Stats) -> Self {
        GuardCtx { cfg, stats, guard: None, probe_for: None, addr: None, reported: false, saw_headers: false, saw_end: false, failed: false, swallow: false }
    }

    fn upstream_addr(&mut self) -> Option<String> {
        if self.addr.is_none() {
            self.addr = host::property_string(&["upstream", "address"]);
        }
        self.addr.clone()
    }

    /// Tells the worker's breaker how this attempt went.
    fn report(&mut self, failure: Option<String>) {
        let Some(addr) = self.upstream_addr() else {
            host::debug("gpuha guard: upstream address unknown; outcome not reported");
            return;
        };
        let probe = self.probe_for.as_deref() == Some(addr.as_str());
        let now = host::now_ms();
        let cfg = self.cfg.breaker;
        let t = host::shared_update(&breaker_key(&addr), |cur| {
            let mut b = Breaker::decode(cur);
            let before = b.clone();
            let t = match &failure {
                Some(reason) => b.on_failure(now, probe, reason, &cfg),
                None => b.on_success(probe),
            };
            // Skip the write when nothing changed (the common success case).
            (b != before).then(|| (b.encode(), t))
        });
        match t {
            Some(Transition::Tripped) => {
                set_not_closed(&addr, true);
                inc(self.stats.breaker_trips);
                host::warn(&format!("gpuha: circuit opened for {addr}: {}", failure.as_deref().unwrap_or("")));
            }
            Some(Transition::Closed) => {
                set_not_closed(&addr, false);
                host::log(LogLevel::Info, &format!("gpuha: circuit closed for {addr} (probe succeeded)"));
            }
            _ => {}
        }
    }

    fn fail_before_first_token(&mut self, reason: String) {
        self.failed = true;
        inc(self.stats.pre_token_retries);
        host::debug(&format!("gpuha guard: attempt failed before first token: {reason}"));
        self.reported = true;
        self.report(Some(reason));
    }
}

impl Context for GuardCtx {
    fn on_done(&mut self) -> bool {
        let released = self.guard.as_ref().is_some_and(Guard::is_released);
        if self.failed || self.saw_end {
            return true;
        }
        if host::client_went_away() {
            // The client hung up (or pressed stop): says nothing about the worker. Neither a
            // breaker failure nor a truncation.
            inc(self.stats.client_cancels);
            return true;
        }
        if released {
            // The worker's stream ended early after the client got the first token: a
            // truncation. Not fed to the breaker: this attempt already proved the worker
            // alive, and a worker that died is silenced by telemetry within 3 s.
            inc(self.stats.post_token_truncations);
        } else if !self.reported {
            let reason = if self.saw_headers { "reset before first token" } else { "reset or timeout before headers" };
            self.fail_before_first_token(reason.into());
        }
        true
    }
}

impl HttpContext for GuardCtx {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        // The upstream request shares its header map with the downstream request, and the
        // override_host LB reads `x-gpuha-endpoints` again on every retry: leave it there.
        self.probe_for = host::request_header(PROBE_HEADER);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.saw_headers = true;
        let status = host::status().unwrap_or(0);
        if status >= 500 {
            // The router retries it (retriable_status_codes / 5xx) if it can.
            host::set_response_header(GUARD_HEADER, Some("failed"));
            self.fail_before_first_token(format!("status_{status}"));
            return Action::Continue;
        }
        let mode = mode_for(status, host::response_header("content-type").as_deref());
        if mode == Mode::Pass || end_of_stream {
            self.saw_end = end_of_stream;
            self.reported = true;
            self.report(None);
            return Action::Continue;
        }
        host::set_response_header(GUARD_HEADER, Some("released"));
        self.guard = Some(Guard::new(mode, self.cfg.max_held_bytes));
        // Hold the headers: until they reach the router, an upstream death is a reset before
        // headers, which the route's retry policy retries (needs allow_on_headers_stop_iteration).
        Action::Pause
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.saw_end = true;
        }
        if self.swallow {
            // The guard rewrote this attempt into its own 503: swallow whatever else it sends.
            host::set_body(BufferType::HttpResponseBody, size, b"");
            return Action::Continue;
        }
        if self.failed {
            // The worker's own 5xx: the router retries it (its body never reaches the client)
            // or, on the last attempt, it is the client's answer and passes whole (its
            // content-length still stands: emptying the body would leave the client waiting).
            return Action::Continue;
        }
        let Some(guard) = self.guard.as_mut() else { return Action::Continue };
        let was_released = guard.is_released();
        let mut tail = None;
        if was_released {
            // Most chunks of a released stream end on an event boundary: pass them on as they
            // are, after a look at their last bytes only (no copy of the chunk in and out).
            let n = size.min(TAIL_PEEK_BYTES);
            let t = if n == 0 { Vec::new() } else { hostcalls::get_buffer(BufferType::HttpResponseBody, size - n, n).ok().flatten().unwrap_or_default() };
            if t.len() == n && guard.passes_untouched(&t, end_of_stream) {
                if end_of_stream && guard.post_release_error().is_some() {
                    inc(self.stats.post_token_errors);
                }
                return Action::Continue;
            }
            tail = (n == size && t.len() == n).then_some(t);
        }
        // A short chunk was read whole just now.
        let chunk = match tail {
            Some(t) => t,
            None => host::body(BufferType::HttpResponseBody, size),
        };
        let step = guard.on_body(&chunk, end_of_stream);
        let post_error = end_of_stream && guard.post_release_error().is_some();
        match step {
            Step::Hold => {
                // Envoy keeps buffering with Pause; the guard keeps its own copy, so each
                // callback sees only the new bytes.
                host::set_body(BufferType::HttpResponseBody, size, b"");
                Action::Pause
            }
            Step::Release(bytes) => {
                host::set_body(BufferType::HttpResponseBody, size, &bytes);
                inc(self.stats.guard_released);
                if !was_released {
                    self.reported = true;
                    self.report(None);
                }
                Action::Continue
            }
            Step::Forward(bytes) => {
                if post_error {
                    inc(self.stats.post_token_errors);
                }
                host::set_body(BufferType::HttpResponseBody, size, &bytes);
                Action::Continue
            }
            Step::Fail(reason) => {
                // Nothing of this attempt reached the client: make it a retryable 5xx.
                let status = self.cfg.retry_status;
                host::set_response_header(":status", Some(&status.to_string()));
                host::set_response_header("content-type", Some("application/json"));
                host::set_response_header("content-length", None);
                host::set_response_header(GUARD_HEADER, Some("retried"));
                let body = error_json(status, &format!("The worker failed before the first token: {}", reason.label()));
                host::set_body(BufferType::HttpResponseBody, size, body.as_bytes());
                self.swallow = true;
                self.fail_before_first_token(reason.label());
                Action::Continue
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fail-whale

struct Failwhale {
    cfg: Rc<FailwhaleConfig>,
    stats: Stats,
    replied: bool,
}

impl Failwhale {
    fn reply(&mut self, body: &[u8]) -> Action {
        if !self.replied {
            self.replied = true;
            inc(self.stats.failwhale_replies);
            let r = error_response(self.cfg.status, &self.cfg.message, wants_stream(body), Some(self.cfg.stream_error_status), Some(self.cfg.retry_after_s));
            host::send_response(r.status, &r.headers, &r.body);
        }
        Action::Pause
    }
}

impl Context for Failwhale {}

impl HttpContext for Failwhale {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return self.reply(b"");
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if size > self.cfg.max_body_bytes {
            return self.reply(b"");
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, size);
        self.reply(&body)
    }
}
