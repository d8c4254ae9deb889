//! The first-token guard (upstream HTTP filter on the worker cluster): glue over
//! `gpuha_liveness::attempt`. Each callback gathers what Envoy shows, hands it to the attempt's
//! state machine and applies its answer; the breaker is told the attempt's one charge as soon as
//! it is known, and the stats count the attempt's one report at the end.

use std::rc::Rc;

use gpuha_liveness::attempt::{mark, Attempt, AttemptConfig, BodyAction, Chunk, Ending, HeadersAction, Outcome, Read, Report};
use gpuha_liveness::guard::TAIL_PEEK_BYTES;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};

use crate::breakers;
use crate::config::GuardConfig;
use crate::host;
use crate::stats::{inc, Stats};
use crate::{GUARD_HEADER, PROBE_HEADER};

pub struct GuardCtx {
    cfg: Rc<GuardConfig>,
    stats: Stats,
    attempt: Attempt,
    /// The worker whose half-open probe this request carries, if any.
    probe_for: Option<String>,
    addr: Option<String>,
}

impl GuardCtx {
    pub fn new(cfg: Rc<GuardConfig>, stats: Stats) -> Self {
        let attempt = Attempt::new(AttemptConfig { max_held_bytes: cfg.max_held_bytes, retry_status: cfg.retry_status }, "");
        GuardCtx { cfg, stats, attempt, probe_for: None, addr: None }
    }

    fn upstream_addr(&mut self) -> Option<String> {
        if self.addr.is_none() {
            self.addr = host::property_string(&["upstream", "address"]);
        }
        self.addr.clone()
    }

    /// Hands the attempt's charge to the worker's breaker, once, when it is known.
    fn charge(&mut self) {
        let Some(c) = self.attempt.take_charge() else { return };
        let Some(addr) = self.upstream_addr() else {
            host::debug("gpuha guard: upstream address unknown; outcome not charged");
            return;
        };
        let probe = self.probe_for.as_deref() == Some(addr.as_str());
        breakers::charge(&addr, probe, &c, host::now_ms(), &self.cfg.breaker, &self.stats);
    }

    fn count(&self, r: &Report) {
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
        let (flags, details) = host::response_flags();
        if let Some(r) = self.attempt.on_done(Ending::from_envoy(flags, details.as_deref())) {
            self.count(&r);
        }
        self.charge();
        true
    }
}

impl HttpContext for GuardCtx {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        // The upstream request shares its header map with the downstream request, and the
        // override_host LB reads `x-gpuha-endpoints` again on every retry: leave it there.
        self.probe_for = host::request_header(PROBE_HEADER);
        let path = host::request_header(":path").unwrap_or_default();
        self.attempt = Attempt::new(AttemptConfig { max_held_bytes: self.cfg.max_held_bytes, retry_status: self.cfg.retry_status }, &path);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let status = host::status().unwrap_or(0);
        let action = self.attempt.on_response_headers(status, host::response_header("content-type").as_deref(), end_of_stream);
        self.charge();
        match action {
            HeadersAction::Continue { mark } => {
                if let Some(m) = mark {
                    host::set_response_header(GUARD_HEADER, Some(m));
                }
                Action::Continue
            }
            HeadersAction::Hold => {
                host::set_response_header(GUARD_HEADER, Some(mark::RELEASED));
                // Needs allow_on_headers_stop_iteration (see the README).
                Action::Pause
            }
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let action = match self.attempt.reads() {
            Read::Nothing => self.attempt.on_body(Chunk::Unread, end_of_stream),
            Read::Tail if size > TAIL_PEEK_BYTES => {
                // Most chunks of a released stream end on an event boundary: a look at their last
                // bytes lets them pass without a copy into Wasm and back.
                let tail = hostcalls::get_buffer(BufferType::HttpResponseBody, size - TAIL_PEEK_BYTES, TAIL_PEEK_BYTES).ok().flatten().unwrap_or_default();
                match self.attempt.on_body(Chunk::Tail(&tail), end_of_stream) {
                    BodyAction::NeedAll => self.attempt.on_body(Chunk::All(&host::body(BufferType::HttpResponseBody, size)), end_of_stream),
                    a => a,
                }
            }
            Read::Tail | Read::All => self.attempt.on_body(Chunk::All(&host::body(BufferType::HttpResponseBody, size)), end_of_stream),
        };
        self.charge();
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
                host::set_response_header(":status", Some(&status.to_string()));
                host::set_response_header("content-type", Some("application/json"));
                host::set_response_header("content-length", None);
                host::set_response_header(GUARD_HEADER, Some(mark::RETRIED));
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
