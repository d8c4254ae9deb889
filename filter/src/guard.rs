//! The first-token guard (upstream HTTP filter on the worker cluster): glue over
//! `gpuha_liveness::attempt`. Each callback gathers what Envoy shows, hands it to the attempt's
//! state machine and applies its answer; the breaker is told the attempt's one charge as soon as
//! it is known, and the stats count the attempt's one report at the end.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use gpuha_liveness::attempt::{invisible_to_engine, is_last_attempt, mark, rescue, shows_no_life, Attempt, AttemptConfig, BodyAction, Charge, Chunk, Ending, HeadersAction, Outcome, Read, Report, Rescue, RescueConfig, StallClock};
use gpuha_liveness::pick::effective_age_ms;
use gpuha_liveness::blame::add_note;
use gpuha_liveness::slots::{decode_request_notes, encode_request_notes, request_key};
use gpuha_liveness::guard::TAIL_PEEK_BYTES;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};

use crate::breakers;
use crate::config::GuardConfig;
use crate::host;
use crate::stats::{inc, Stats, TierStats};
use gpuha_liveness::tier::TierKind;
use crate::{ATTEMPTS_HEADER, ATTEMPT_COUNT_HEADER, GUARD_HEADER, PROBE_HEADER, REQUEST_KEY_HEADER};

/// The time the router gives this attempt, in ms: its per-try timeout, else the route's.
const EXPECTED_TIMEOUT_HEADER: &str = "x-envoy-expected-rq-timeout-ms";

/// The attempts this thread's guard holds or streams, for the root context's rescue tick: one
/// entry per HTTP context, removed when Envoy is done with it. The attempt itself lives here so
/// that the tick can tell it what it did.
#[derive(Default)]
pub struct Registry {
    attempts: HashMap<u32, Tracked>,
    stalls: StallClock,
}

struct Tracked {
    addr: Rc<str>,
    attempt: Rc<RefCell<Attempt>>,
    /// When the guard began holding it (local clock; its start until then).
    held_since: u64,
    /// The request's last attempt ([`is_last_attempt`]).
    last: bool,
    /// It carries its worker's half-open probe.
    probe: bool,
}

impl Registry {
    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty()
    }
}

/// A rescue the tick decided: the context, what to do, its attempt, its worker, and whether it
/// is the request's last attempt.
type Due = (u32, Rescue, Rc<RefCell<Attempt>>, Rc<str>, bool);

/// An attempt with no headers that its idle engine does not show, which the host cannot move:
/// the attempt, its worker, whether it carries the worker's probe, and when it was sent.
type Unseen = (Rc<RefCell<Attempt>>, Rc<str>, bool, u64);

/// The rescue tick: every attempt held or streaming on a worker that stopped showing signs of
/// life is retried now (held) or ended (past its first token, after the configured bound).
/// `view`: the fleet view and when its ages count from.
pub fn rescue_tick(reg: &Rc<RefCell<Registry>>, view: &gpuha_liveness::FleetView, vouched: u64, cfg: &GuardConfig, stats: &Stats) {
    let now = host::now_ms();
    let rcfg = RescueConfig {
        end_stream_after_ms: cfg.end_stalled_streams_after_ms,
        rescue_held_after_ms: cfg.rescue_held_after_ms,
        invisible_after_ms: cfg.unseen_after_ms,
        invisible_no_headers_after_ms: cfg.unseen_no_headers_after_ms.max(cfg.unseen_after_ms),
        ..RescueConfig::default()
    };
    let mut todo: Vec<Due> = Vec::new();
    // Their workers are charged (`Attempt::charge_unseen`).
    let mut unseen: Vec<Unseen> = Vec::new();
    {
        let mut reg = reg.borrow_mut();
        let reg = &mut *reg;
        let view_age = now.saturating_sub(vouched);
        // One pass over the view: the tracked workers' entries, and how many workers are alive.
        let tracked: std::collections::HashSet<&str> = reg.attempts.values().map(|t| &*t.addr).collect();
        let mut entries: HashMap<&str, &gpuha_liveness::WorkerView> = HashMap::with_capacity(tracked.len());
        let mut alive_count = 0usize;
        for w in &view.workers {
            let alive = effective_age_ms(w, vouched, now) <= rcfg.gate_ms;
            alive_count += usize::from(alive);
            if tracked.contains(w.addr.as_str()) {
                entries.insert(w.addr.as_str(), w);
            }
        }
        for (id, t) in &reg.attempts {
            let w = entries.get(&*t.addr).copied();
            // A rescue moves a request to another worker: with none alive (every worker stalled
            // or silent), it would only move it between dead ends. The per-try budget stays in charge.
            let self_alive = w.is_some_and(|w| effective_age_ms(w, vouched, now) <= rcfg.gate_ms);
            if alive_count <= usize::from(self_alive) {
                continue;
            }
            let age = w.map(|w| effective_age_ms(w, vouched, now));
            let stalled_for = reg.stalls.observe(&t.addr, shows_no_life(age, w.is_some_and(|w| w.stalled), view_age, &rcfg), now);
            let a = t.attempt.borrow();
            // An attempt that has no header yet is answered for its worker by a host that can
            // (the native build), which the router retries. On Envoy's Wasm host only the last
            // attempt can be answered (to the client); the per-try budget stays in charge of the
            // others (`answer_for_worker`).
            let before_token = a.is_held() || (a.awaits_headers() && (t.last || host::can_answer_as_upstream()));
            let mut r = rescue(before_token, a.is_released(), stalled_for, &rcfg);
            // A worker sends held headers once its engine has the request (vLLM prepares a
            // request, its images fetched and its prompt tokenized, before it answers the headers
            // of a stream). A request awaiting its headers may still be in that preparation, which
            // an idle engine's numbers cannot show: the rule waits longer for it
            // (`unseen_no_headers_after_ms`). vLLM 0.32 whose engine stopped while idle sends a
            // stream's headers at once (held: the first case) and an answer that does not stream
            // none (the second).
            let awaiting = a.awaits_headers();
            if r.is_none() && (a.is_held() || awaiting) && view_age <= rcfg.gate_ms {
                // An engine that hung while idle: its frames still say idle although it holds our request.
                let invisible = w.is_some_and(|w| {
                    let idle = w.running.unwrap_or(0.0) + w.waiting.unwrap_or(0.0) <= 0.0;
                    invisible_to_engine(t.held_since, now, vouched.saturating_sub(w.age_ms), idle, w.ttft_ms.is_some(), awaiting, &rcfg)
                });
                if invisible && !before_token {
                    unseen.push((t.attempt.clone(), t.addr.clone(), t.probe, t.held_since));
                }
                r = (invisible && before_token).then_some(Rescue::RetryUnseen);
            }
            if let Some(r) = r {
                todo.push((*id, r, t.attempt.clone(), t.addr.clone(), t.last));
            }
        }
        reg.stalls.retain(|a| tracked.contains(a));
    }
    for (attempt, addr, probe, since) in unseen {
        let Some(c) = attempt.borrow_mut().charge_unseen() else { continue };
        breakers::charge(&addr, probe, &c, now, &cfg.breaker, stats);
        inc(stats.unseen_charges);
        let ago = now.saturating_sub(since);
        host::log(proxy_wasm::types::LogLevel::Info, &format!("gpuha: worker {addr} does not show an attempt sent to it {ago} ms ago while its engine looks idle: charged (its circuit opens); the attempt waits on its budget"));
    }
    for (id, r, attempt, addr, last) in todo {
        let no_headers = attempt.borrow().awaits_headers();
        let retry = attempt.borrow_mut().on_worker_stalled(r);
        if let Err(e) = hostcalls::set_effective_context(id) {
            host::debug(&format!("gpuha guard: rescue of context {id}: {e:?}"));
            continue;
        }
        match (r, retry) {
            (Rescue::RetryNow | Rescue::RetryUnseen, Some((status, body))) if no_headers => answer_for_worker(status, &body, last, &attempt, &addr, stats),
            (Rescue::RetryNow | Rescue::RetryUnseen, Some((status, _body))) => {
                // No body can follow (the worker sends nothing): where Envoy has no attempt
                // left, the picker answers in its place (`mark::RESCUED`).
                mark_retried(status, true, mark::RESCUED);
                if let Err(e) = hostcalls::resume_http_response() {
                    host::warn(&format!("gpuha guard: resume after rescue: {e:?}"));
                }
                inc(stats.stall_rescues);
                host::log(proxy_wasm::types::LogLevel::Info, &format!("gpuha: worker {addr} shows no sign of life: held attempt handed to a retry"));
            }
            (Rescue::EndStream, None) => {
                if let Err(e) = hostcalls::reset_http_response() {
                    host::warn(&format!("gpuha guard: ending a stream after rescue: {e:?}"));
                }
                inc(stats.stall_truncations);
                host::log(proxy_wasm::types::LogLevel::Info, &format!("gpuha: worker {addr} shows no sign of life: stream past its first token ended"));
            }
            _ => {}
        }
    }
}

/// Answers a rescued attempt whose headers never came (an answer that does not stream, which a
/// worker sends whole), with a retryable `status` marked `mark::RESCUED`:
/// - for its worker, where the host can (`host::can_answer_as_upstream`, the native build): the
///   router retries it like the worker's own answer. No body follows: where Envoy has no attempt
///   left, the picker answers in its place.
/// - else only the request's `last` attempt, to the client: an upstream filter's local reply on
///   Envoy's Wasm host goes to the client past the router's retries (measured, and so does a
///   reset of the stream: the client's connection is reset). The JSON error `body` goes with it;
///   the picker puts its own answer in its place, as for the native build.
///
/// Should the host refuse, the attempt goes on as before the rescue (fail open).
fn answer_for_worker(status: u16, body: &[u8], last: bool, attempt: &RefCell<Attempt>, addr: &str, stats: &Stats) {
    let sent = if host::can_answer_as_upstream() {
        host::answer_as_upstream(status, mark::RESCUED)
    } else {
        last && host::send_response(status, &[("content-type".into(), "application/json".into()), (GUARD_HEADER.into(), mark::RESCUED.into())], body)
    };
    if sent {
        inc(stats.stall_rescues);
        let to = if last { "answered: no attempt was left" } else { "handed to a retry" };
        host::log(proxy_wasm::types::LogLevel::Info, &format!("gpuha: worker {addr} shows no sign of life: attempt with no answer yet {to}"));
    } else {
        attempt.borrow_mut().answer_not_sent();
        host::warn(&format!("gpuha guard: rescue of an attempt on {addr}: the host did not answer it; its per-try budget decides"));
    }
}

/// Makes the held answer's headers a retryable `status` marked `mark` (`retried`, or `rescued`
/// when no body follows), for the OpenAI-shaped JSON body the caller sets (`json_body`) or for
/// none.
fn mark_retried(status: u16, json_body: bool, mark: &str) {
    host::set_response_header(":status", Some(&status.to_string()));
    host::set_response_header("content-type", json_body.then_some("application/json"));
    host::set_response_header("content-length", None);
    host::set_response_header(GUARD_HEADER, Some(mark));
}

pub struct GuardCtx {
    id: u32,
    registry: Rc<RefCell<Registry>>,
    cfg: Rc<GuardConfig>,
    stats: Stats,
    /// Shared with the registry while tracked.
    attempt: Rc<RefCell<Attempt>>,
    /// Whether the registry has it.
    tracked: bool,
    /// The worker whose half-open probe this request carries, if any.
    probe_for: Option<String>,
    /// The attempt's worker (read once; shared, not copied, with the registry and the charge).
    addr: Option<Rc<str>>,
    /// [`REQUEST_KEY_HEADER`] (the picker's): the key of the request's noted failures.
    request_id: Option<String>,
    /// When the attempt started (local clock), and its budget (`x-envoy-expected-rq-timeout-ms`).
    started: u64,
    budget_ms: Option<u64>,
    /// The request's last attempt ([`is_last_attempt`]).
    last: bool,
    tier_attempts: Rc<TierStats>,
}

impl GuardCtx {
    pub fn new(id: u32, registry: Rc<RefCell<Registry>>, cfg: Rc<GuardConfig>, stats: Stats, tier_attempts: Rc<TierStats>) -> Self {
        let attempt = Rc::new(RefCell::new(Attempt::new(AttemptConfig { max_held_bytes: cfg.max_held_bytes, retry_status: cfg.retry_status }, "")));
        GuardCtx { id, registry, cfg, stats, attempt, tracked: false, probe_for: None, addr: None, request_id: None, started: 0, budget_ms: None, last: false, tier_attempts }
    }

    /// Whether this attempt went to a tier of the chain (another router, an adapter listener)
    /// rather than one of the router's own workers.
    fn on_tier(&mut self) -> bool {
        let Some(addr) = self.upstream_addr() else { return false };
        self.cfg.tiers.tier_of(&addr).is_some()
    }

    /// Lets the rescue tick see this attempt from its start (a judged API) until Envoy is done
    /// with it: awaiting its answer, held, or streaming.
    fn track(&mut self) {
        // Tier endpoints are not in the fleet view: absent there is not silence.
        if self.tracked || !self.cfg.rescue || self.on_tier() {
            return;
        }
        if let Some(addr) = self.upstream_addr() {
            let probe = self.probe_for.as_deref() == Some(&*addr);
            self.registry.borrow_mut().attempts.insert(self.id, Tracked { addr, attempt: self.attempt.clone(), held_since: self.started, last: self.last, probe });
            self.tracked = true;
        }
    }

    fn upstream_addr(&mut self) -> Option<Rc<str>> {
        if self.addr.is_none() {
            self.addr = host::property_string(&["upstream", "address"]).map(Rc::from);
        }
        self.addr.clone()
    }

    /// Hands the attempt's charge to the worker's breaker, once, when it is known; a failure
    /// that may be the request's own doing is noted for the picker to judge at the request's
    /// end instead (`gpuha_liveness::blame`).
    fn charge(&mut self) {
        let Some(c) = self.attempt.borrow_mut().take_charge() else { return };
        if self.on_tier() {
            // A tier's failure moves the request down the chain; breakers are for picked workers.
            return;
        }
        let Some(addr) = self.upstream_addr() else {
            host::debug("gpuha guard: upstream address unknown; outcome not charged");
            return;
        };
        let probe = self.probe_for.as_deref() == Some(&*addr);
        if let (Charge::Failure(reason), Some(id)) = (&c, self.request_id.as_deref()) {
            if reason.may_follow_request() {
                // Noted in the request's shared-data slot (request headers cannot be read or
                // written from an upstream filter's response phase: the SDK panics).
                host::shared_update(&request_key(id), |cur| {
                    let prev = cur.and_then(|b| decode_request_notes(b, id));
                    Some((encode_request_notes(id, &add_note(prev, &addr, probe, reason)), ()))
                });
                return;
            }
        }
        breakers::charge(&addr, probe, &c, host::now_ms(), &self.cfg.breaker, &self.stats);
    }

    /// Lets a host that can pass the next clean body chunks itself do so, when the attempt
    /// would pass them untouched (most chunks of a released stream: each would otherwise cost a
    /// call into the filter and a copy of its last bytes).
    fn offer_clean_chunks(&self) {
        if self.attempt.borrow().passes_clean_chunks() {
            host::pass_clean_response_chunks();
        }
    }

    fn count(&self, r: &Report) {
        if r.rescued.is_some() {
            host::debug(&format!("gpuha guard: rescued attempt: {}", r.outcome.label()));
        }
        if r.released {
            inc(self.stats.guard_released);
        }
        if r.post_token_error {
            inc(self.stats.post_token_errors);
        }
        if r.overflowed {
            inc(self.stats.guard_overflows);
        }
        match &r.outcome {
            Outcome::Served => {}
            Outcome::Truncated => inc(self.stats.post_token_truncations),
            Outcome::FailedBeforeFirstToken(reason) => {
                inc(self.stats.pre_token_retries);
                host::debug(&format!("gpuha guard: attempt failed before first token: {}", reason.label()));
            }
            Outcome::ClientCancelled { .. } => inc(self.stats.client_cancels),
            Outcome::Passed { .. } => inc(self.stats.guard_passed),
        }
    }
}

impl Context for GuardCtx {
    fn on_done(&mut self) -> bool {
        // Envoy's flags and details (two property reads) only where the report depends on them.
        let ending = if self.attempt.borrow().needs_ending() {
            let (flags, details) = host::response_flags();
            Ending::from_envoy(flags, details.as_deref()).after(host::now_ms().saturating_sub(self.started), self.budget_ms)
        } else {
            Ending::default()
        };
        self.registry.borrow_mut().attempts.remove(&self.id);
        if let Some(addr) = self.upstream_addr() {
            let chain = &self.cfg.tiers;
            self.tier_attempts.inc(chain.served_by(&addr));
            if chain.tier_of(&addr).is_some_and(|t| t.kind == TierKind::Provider) {
                inc(self.stats.provider_calls);
            }
        }
        let report = self.attempt.borrow_mut().on_done(ending);
        if let Some(r) = report {
            self.count(&r);
        }
        self.charge();
        true
    }
}

impl HttpContext for GuardCtx {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        // The upstream request shares its header map with the downstream request: leave
        // `x-gpuha-endpoints` there (the override_host LB takes the list once per request and
        // walks it on retries; the kill soak found that it does not re-read it).
        // One host call for every header read here.
        const NAMES: &[&str] = &[PROBE_HEADER, REQUEST_KEY_HEADER, EXPECTED_TIMEOUT_HEADER, ":path", ATTEMPT_COUNT_HEADER, ATTEMPTS_HEADER];
        // A host that answers for the worker moves every attempt: it needs no attempt number.
        let moves_any = host::can_answer_as_upstream();
        let h = host::Headers::read(MapType::HttpRequestHeaders, if moves_any { &NAMES[..4] } else { NAMES });
        let [probe_for, request_id, budget, path] = [0, 1, 2, 3].map(|i| h.get(i));
        self.last = !moves_any && is_last_attempt(h.get(4).as_deref(), h.get(5).as_deref());
        self.probe_for = probe_for;
        self.request_id = request_id.filter(|id| !id.is_empty());
        // This attempt's budget: the router's per-try timeout (the route's timeout without one).
        self.budget_ms = budget.and_then(|v| v.trim().parse().ok());
        self.started = host::now_ms();
        let path = path.unwrap_or_default();
        *self.attempt.borrow_mut() = Attempt::new(AttemptConfig { max_held_bytes: self.cfg.max_held_bytes, retry_status: self.cfg.retry_status }, &path);
        if self.attempt.borrow().api().is_some() {
            // From now: a worker that hangs sends no header to an answer that does not stream.
            self.track();
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // Two single reads and a set: reading them by name, then adding the mark where it was
        // absent, cost more in all (the picker's later set of its tier on the same map grew by
        // more than the add saved: `bench/results/2026-12-01-namedheaders`).
        let status = host::status().unwrap_or(0);
        let action = self.attempt.borrow_mut().on_response_headers(
            status,
            host::response_header("content-type").as_deref(),
            host::response_header("content-encoding").as_deref(),
            end_of_stream,
        );
        self.charge();
        self.offer_clean_chunks();
        match action {
            HeadersAction::Continue { mark } => {
                if let Some(m) = mark {
                    host::set_response_header(GUARD_HEADER, Some(m));
                }
                Action::Continue
            }
            HeadersAction::Fail { status } => {
                // Nothing of this attempt reached the client: a retryable status, no body.
                mark_retried(status, false, mark::RETRIED);
                Action::Continue
            }
            HeadersAction::Hold => {
                host::set_response_header(GUARD_HEADER, Some(mark::RELEASED));
                self.track();
                if let Some(t) = self.registry.borrow_mut().attempts.get_mut(&self.id) {
                    t.held_since = host::now_ms();
                }
                // Needs allow_on_headers_stop_iteration (see the README).
                Action::Pause
            }
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let mut attempt = self.attempt.borrow_mut();
        let action = match attempt.reads() {
            Read::Nothing => attempt.on_body(Chunk::Unread, end_of_stream),
            Read::Tail if size > TAIL_PEEK_BYTES => {
                // Most chunks of a released stream end on an event boundary: a look at their last
                // bytes lets them pass without a copy into Wasm and back.
                let tail = hostcalls::get_buffer(BufferType::HttpResponseBody, size - TAIL_PEEK_BYTES, TAIL_PEEK_BYTES).ok().flatten().unwrap_or_default();
                match attempt.on_body(Chunk::Tail(&tail), end_of_stream) {
                    BodyAction::NeedAll => attempt.on_body(Chunk::All(&host::body(BufferType::HttpResponseBody, size)), end_of_stream),
                    a => a,
                }
            }
            Read::Tail | Read::All => attempt.on_body(Chunk::All(&host::body(BufferType::HttpResponseBody, size)), end_of_stream),
        };
        drop(attempt);
        self.charge();
        self.offer_clean_chunks();
        match action {
            BodyAction::Pass | BodyAction::NeedAll => Action::Continue,
            BodyAction::Hold => {
                // Envoy keeps buffering with Pause; the attempt keeps its own copy, so each
                // callback sees only the new bytes.
                host::set_body(BufferType::HttpResponseBody, size, b"");
                Action::Pause
            }
            BodyAction::Emit(bytes) => {
                host::set_body(BufferType::HttpResponseBody, size, &bytes);
                Action::Continue
            }
            BodyAction::Fail { status, body } => {
                // Nothing of this attempt reached the client: make it a retryable 5xx.
                mark_retried(status, true, mark::RETRIED);
                host::set_body(BufferType::HttpResponseBody, size, &body);
                Action::Continue
            }
            BodyAction::Drop => {
                host::set_body(BufferType::HttpResponseBody, size, b"");
                Action::Continue
            }
        }
    }
}
