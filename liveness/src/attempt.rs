//! One upstream attempt, as the first-token guard (an upstream HTTP filter in Envoy) sees it:
//! the events the glue observes go in, the actions it must apply come out, and the attempt ends
//! with **exactly one** [`Report`] — for the stats and the log — and **exactly one** [`Charge`]
//! for the worker's circuit breaker. Every decision about an attempt is made here, once; the
//! Wasm glue only gathers inputs and applies answers (pingora's model: the outcome is a value).
//!
//! Events, in the order Envoy delivers them (any may be missing: a reset can come at any
//! point, and the client can go away at any point):
//!
//! 1. [`Attempt::new`] with the request's path (its API: [`Api::from_path`]).
//! 2. [`Attempt::on_response_headers`]: status, content type and coding, end of stream.
//! 3. [`Attempt::on_body`] per body chunk (the glue reads what [`Attempt::reads`] asks for).
//! 4. [`Attempt::on_done`], when Envoy is finished with the attempt: how it ended
//!    ([`Ending::from_envoy`]: the client went away, a timeout, or a reset).
//!
//! What the attempt amounts to ([`Outcome`]):
//!
//! | outcome | when | breaker |
//! |---|---|---|
//! | `Served` | released (first token, or a whole answer) and ended cleanly | success, at release |
//! | `Truncated` | released, then the worker's stream ended without its clean end | success (given at release) |
//! | `FailedBeforeFirstToken` | a 5xx, an in-band error/abort, an end without output, a reset or timeout before the first token | failure |
//! | `ClientCancelled` | the client went away (before or after release) | nothing before release |
//! | `Passed` | not judged: an API or format the guard does not know, or a `1xx`/`3xx`/`4xx` answer | success below 500, else nothing |
//!
//! The breaker's charge is given as early as it is known ([`Attempt::take_charge`]): a success
//! at release, so a half-open worker is readmitted as soon as it produces a first token, not
//! when its stream ends. The report comes once, at the end.
//!
//! Invariants (property-tested below): exactly one report and one charge per attempt whatever
//! the event order; no byte of a failed attempt reaches the client; after release only whole
//! SSE events (except at a clean end); a client that goes away never charges a worker with a
//! failure.
//!
//! (Over 500 lines on purpose: the one state machine and its transition rules are kept in one
//! file, so that every way an attempt can end is read in one place; its tests are in
//! `attempt/tests.rs`.)

use crate::guard::{mode_for, FailReason, Guard, Mode, Step, TAIL_PEEK_BYTES};
use crate::openai_error::error_json;
use crate::output::Api;

/// Tuning of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptConfig {
    /// Bytes held before the first token; past it the response is released unguarded.
    pub max_held_bytes: usize,
    /// Status a pre-token failure inside a `200` is rewritten to (in the route's
    /// `retriable_status_codes`, so that the router retries it).
    pub retry_status: u16,
}

/// Values of the `x-gpuha-guard` response header.
pub mod mark {
    /// The guard held the headers and released them with the first token.
    pub const RELEASED: &str = "released";
    /// The guard turned an in-band failure before the first token into a retryable status.
    pub const RETRIED: &str = "retried";
    /// The worker answered a 5xx before the first token.
    pub const FAILED: &str = "failed";
    /// The guard handed a held attempt on a worker that shows no sign of life to a retry (the
    /// stall rescue): a retryable status whose body never comes, since the worker sends
    /// nothing more. Where it reaches the picker, no attempt was left, and the picker answers
    /// in its place.
    pub const RESCUED: &str = "rescued";
}

/// What the response-headers callback does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadersAction {
    /// Let the headers go on as they are, with `x-gpuha-guard: <mark>` when set.
    Continue { mark: Option<&'static str> },
    /// Hold them (pause) until the first token; marked [`mark::RELEASED`] for when they go.
    Hold,
    /// The answer ended with its headers, before any output (an event stream with no body):
    /// make it a retryable `status` with no body, marked [`mark::RETRIED`], as a body that ends
    /// without output becomes one.
    Fail { status: u16 },
}

/// What the glue reads of a body chunk before calling [`Attempt::on_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Nothing: the chunk's fate does not depend on its bytes.
    Nothing,
    /// Its last [`TAIL_PEEK_BYTES`] (all of it when shorter): enough to let most chunks of a
    /// released stream pass without a copy; the attempt may then ask for all of it.
    Tail,
    /// All of it.
    All,
}

/// A body chunk, as much of it as the glue read.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    /// Not read ([`Read::Nothing`]).
    Unread,
    /// The last bytes of a chunk longer than them ([`Read::Tail`]).
    Tail(&'a [u8]),
    /// The whole chunk.
    All(&'a [u8]),
}

/// What the body callback does with the chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyAction {
    /// Let the chunk go on untouched.
    Pass,
    /// The tail was not enough: read the whole chunk and call [`Attempt::on_body`] again.
    NeedAll,
    /// Keep everything back: empty this chunk (the attempt keeps its own copy) and pause.
    Hold,
    /// Replace the chunk with these bytes and go on.
    Emit(Vec<u8>),
    /// Failed before the first token: rewrite the held headers to `status`,
    /// `content-type: application/json`, no `content-length`, `x-gpuha-guard: retried`; replace
    /// the chunk with `body`; go on (the router retries it, or it is the client's answer).
    Fail { status: u16, body: Vec<u8> },
    /// Drop the chunk (the rest of a rewritten attempt) and go on.
    Drop,
}

/// What an attempt amounted to (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Served,
    Truncated,
    FailedBeforeFirstToken(FailReason),
    ClientCancelled { after_release: bool },
    Passed { status: u16 },
}

impl Outcome {
    /// A short label for logs.
    pub fn label(&self) -> String {
        match self {
            Outcome::Served => "served".into(),
            Outcome::Truncated => "truncated".into(),
            Outcome::FailedBeforeFirstToken(r) => format!("failed_before_first_token: {}", r.label()),
            Outcome::ClientCancelled { after_release } => format!("client_cancelled{}", if *after_release { "_after_first_token" } else { "" }),
            Outcome::Passed { status } => format!("passed_{status}"),
        }
    }
}

/// What the worker's circuit breaker is told about this attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    Success,
    Failure(FailReason),
    /// Says nothing about the worker (the client went away; a format not judged).
    Nothing,
}

/// The one report an attempt leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// The charge given for it (already handed out by [`Attempt::take_charge`] or about to be).
    pub charge: Charge,
    /// The first bytes reached the client.
    pub released: bool,
    /// An in-band error event arrived after release (the worker's own clean end).
    pub post_token_error: bool,
    /// The guard released early: it held its maximum without seeing output.
    pub overflowed: bool,
    /// The attempt was rescued from a stalled or silent worker ([`Attempt::on_worker_stalled`]).
    pub rescued: Option<Rescue>,
}

/// What is done to an attempt whose worker stopped showing signs of life ([`rescue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescue {
    /// Held before the first token: turn the held headers into a retryable status and let them
    /// go, so that the router retries on the next worker now, not after the per-try budget.
    RetryNow,
    /// The same for a request its worker's engine never saw ([`invisible_to_engine`]): an
    /// engine hung while idle, which freshness cannot see, so this one is charged to the breaker.
    RetryUnseen,
    /// Past the first token: end the stream (a reset; the client has whole events only and a
    /// visibly incomplete answer), instead of leaving it open until Envoy's idle timeout.
    EndStream,
}

/// Tuning of [`rescue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescueConfig {
    /// A worker whose last evidence of life is older than this is stalled or silent (the
    /// freshness gate).
    pub gate_ms: u64,
    /// A stream past its first token on such a worker is ended this long after that is known
    /// (seen by the guard's tick).
    pub end_stream_after_ms: u64,
    /// A request held before its first token on such a worker is handed to a retry once the
    /// stall has lasted this long. Not 0: an engine starved of CPU for a few seconds (a host
    /// shared with other engines) looks exactly like a hung one for that long, and moving its
    /// requests throws their prefill away (seen in the real-vLLM drills on 2 cores).
    pub rescue_held_after_ms: u64,
    /// A request held this long before its first token on a worker whose fresh frames, taken
    /// after the request reached it, still show an idle engine (nothing running or waiting) is
    /// invisible to the engine: an engine that hung while idle looks idle forever (its numbers
    /// froze at zero), and progress cannot tell it from a quiet one. Only a request it does not
    /// see can.
    pub invisible_after_ms: u64,
    /// The same for a request whose headers have not come (an answer that does not stream; any
    /// request to vLLM 0.32 whose EngineCore stopped while idle, measured): longer, since such a
    /// request may still be in the API server's preparation (its images fetched, its prompt
    /// tokenized), which no engine number shows. vLLM bounds the fetches (5 s for an image, 30 s
    /// for a video by default).
    pub invisible_no_headers_after_ms: u64,
}

impl Default for RescueConfig {
    fn default() -> Self {
        // invisible_after_ms: longer than one engine step of an engine that was idle: vLLM
        // publishes its running and waiting counts when a step ends, so the step that takes a
        // new request shows the idle numbers from before it. Measured with the real CPU build
        // on a loaded 2-core host: 2.2 s (two drills, the rule then at 1.5 s opened a healthy
        // server's circuit); a GPU step is well under a second (a LoRA adapter loaded from disk
        // inside a step is the known longer one).
        RescueConfig { gate_ms: crate::FRESHNESS_GATE_MS, end_stream_after_ms: 10_000, rescue_held_after_ms: 2_000, invisible_after_ms: 2_500, invisible_no_headers_after_ms: 30_000 }
    }
}

/// Time for a request to show in its engine's numbers: vLLM counts it as waiting as soon as its
/// engine receives it (after tokenization in the API server), and the sidecar scrapes every
/// 500 ms, so a frame taken a second after the request arrived shows it.
pub const SHOWS_WITHIN_MS: u64 = 1_000;

/// Whether a request held since `held_since_ms` is invisible to its worker's engine: held for
/// [`RescueConfig::invisible_after_ms`] ([`RescueConfig::invisible_no_headers_after_ms`] for one
/// `awaiting_headers`, sent at `held_since_ms`), and the worker's latest frame, taken at
/// `frame_taken_ms` (local clock; an upper bound on its age makes this an early estimate, so
/// the rule only errs towards waiting), at least a scrape after the request arrived, shows
/// nothing running or waiting.
///
/// `engine_has_served`: the worker's frames have shown a time to first token (its engine has
/// completed a first token since this view began). vLLM publishes its running and waiting
/// counts only when an engine step completes, so an engine in a long step shows the numbers
/// from before it; the first step of a freshly started engine is one (measured with the real
/// CPU build: the first request after start took 2.2 s and its frames said idle throughout,
/// which this rule took for an engine hung while idle). Without that evidence the rule does not
/// judge: fail open.
pub fn invisible_to_engine(held_since_ms: u64, now_ms: u64, frame_taken_ms: u64, engine_idle: bool, engine_has_served: bool, awaiting_headers: bool, cfg: &RescueConfig) -> bool {
    let after = if awaiting_headers { cfg.invisible_no_headers_after_ms } else { cfg.invisible_after_ms };
    engine_has_served && engine_idle && now_ms.saturating_sub(held_since_ms) >= after && frame_taken_ms >= held_since_ms.saturating_add(SHOWS_WITHIN_MS)
}

/// Whether a worker is hung with its `/metrics` still answering, from a fleet view: dnsd marks
/// it `stalled` (its frames came with its engine numbers frozen, for longer than the gate or
/// within it, and it has shown no life since: `fleet::WorkerState::is_stalled`) and its last
/// evidence of life is `worker_age_ms` old, past the gate, in a view dnsd last vouched for
/// `view_age_ms` ago. A stale view (dnsd unreachable) judges nobody: fail open. A *silent*
/// worker (no frames, or only counters that moved at an unknown instant) is not rescued: a
/// dead one resets its connections anyway, and on a host merely overloaded `/metrics` is the
/// first thing to time out (seen with real vLLM on 2 cores: scrapes over 2.5 s while the engine
/// served fine), so silence alone is too weak a reason to move requests. A stall that then
/// went silent stays a stall: its clock keeps running (the real CPU build's hung engine sent
/// frozen frames, then none for 9 s: with the clock stopped, its streams ended 16.1-16.3 s
/// after the hang instead of 13).
///
/// `Some(ms)`: it shows no sign of life, and has shown none for at least `ms` past the gate
/// (the view's age is a lower bound past the gate, `fleet::bounded_age_ms`): a hang first seen
/// late, after its `/metrics` went unanswered for a while (the real CPU build: 17 s after its
/// engine was stopped), is judged by how long it has lasted, not from when it was seen.
pub fn shows_no_life(worker_age_ms: Option<u64>, stalled: bool, view_age_ms: u64, cfg: &RescueConfig) -> Option<u64> {
    let age = worker_age_ms.filter(|&age| stalled && age > cfg.gate_ms && view_age_ms <= cfg.gate_ms)?;
    Some(age - cfg.gate_ms)
}

/// When each worker was first seen showing no sign of life, on this thread's clock, or as
/// the view dates it when that is earlier: the fleet view reports ages past the gate only in
/// steps (see `fleet::bounded_age_ms`), so how long a stall has lasted is counted here too.
#[derive(Debug, Clone, Default)]
pub struct StallClock {
    since: std::collections::HashMap<String, u64>,
}

impl StallClock {
    /// Records what the view says of `addr` at `now` ([`shows_no_life`]); returns for how long
    /// it has shown no sign of life (`None`: it does now, or nothing is known).
    pub fn observe(&mut self, addr: &str, no_life_for_ms: Option<u64>, now_ms: u64) -> Option<u64> {
        let Some(known) = no_life_for_ms else {
            self.since.remove(addr);
            return None;
        };
        let since = self.since.entry(addr.to_string()).or_insert(now_ms);
        *since = (*since).min(now_ms.saturating_sub(known));
        Some(now_ms.saturating_sub(*since))
    }

    /// Forgets workers no longer asked about (keeps memory bounded by the attempts in flight).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.since.retain(|a, _| keep(a));
    }
}

/// Whether an attempt is its request's last: Envoy's number of it (`count`, from
/// `x-envoy-attempt-count`) has reached the attempts the request is allowed (`allowed`, the
/// picker's). Unknown (either one absent or not a number): not the last, so that the router's
/// retries stay in charge.
pub fn is_last_attempt(count: Option<&str>, allowed: Option<&str>) -> bool {
    let n = |v: Option<&str>| v.and_then(|v| v.trim().parse::<u32>().ok());
    matches!((n(count), n(allowed)), (Some(c), Some(a)) if a > 0 && c >= a)
}

/// What to do with an attempt whose worker has shown no sign of life for `stalled_for_ms`
/// (`None`: it is alive, or unknown). `before_token`: nothing of it reached the client yet, its
/// headers held or not come ([`Attempt::before_first_token`]); `released`: past its first token.
pub fn rescue(before_token: bool, released: bool, stalled_for_ms: Option<u64>, cfg: &RescueConfig) -> Option<Rescue> {
    let stalled_for = stalled_for_ms?;
    if before_token {
        (stalled_for >= cfg.rescue_held_after_ms).then_some(Rescue::RetryNow)
    } else if released && stalled_for >= cfg.end_stream_after_ms {
        Some(Rescue::EndStream)
    } else {
        None
    }
}

/// How Envoy ended the attempt, from its response flags and details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ending {
    /// The client went away (or pressed stop).
    pub client_went_away: bool,
    /// A timeout ended it (the per-try budget: no first token in time).
    pub timed_out: bool,
}

/// Envoy response flags (`StreamInfo::CoreResponseFlag`), as in its access log.
pub mod flags {
    /// `UT`: upstream request timeout.
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4;
    /// `DC`: downstream connection termination.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000;
    /// `SI`: stream idle timeout.
    pub const STREAM_IDLE_TIMEOUT: u64 = 0x10000;
}

impl Ending {
    /// Measured on Envoy 1.40: a client hanging up while the guard held the headers gives flags
    /// `0x4000` (`DC`) and details `downstream_remote_disconnect`; a worker reset gives neither.
    pub fn from_envoy(response_flags: u64, code_details: Option<&str>) -> Ending {
        let details = code_details.unwrap_or_default();
        Ending {
            client_went_away: response_flags & flags::DOWNSTREAM_CONNECTION_TERMINATION != 0 || details.starts_with("downstream_"),
            timed_out: response_flags & (flags::UPSTREAM_REQUEST_TIMEOUT | flags::STREAM_IDLE_TIMEOUT) != 0 || details.contains("timeout"),
        }
    }

    /// The ending of an attempt that lasted `elapsed_ms` of a budget of `budget_ms` (the
    /// `x-envoy-expected-rq-timeout-ms` Envoy sends each attempt: its per-try timeout when the
    /// route has one). One that used up its budget was ended by the per-try timeout, whatever
    /// the flags say. Envoy flags that timeout (`UT`, `upstream_per_try_timeout`) only on a
    /// request's last attempt. Without this, the attempts retried before it read as resets:
    /// a slow prompt on every worker charged them all and opened their circuits. Measured on
    /// Envoy 1.40 (drill `test_slow_prompts_open_no_circuit`). The per-try timer fires at the
    /// budget and the attempt ends after it, so the slack only absorbs clock rounding.
    pub fn after(self, elapsed_ms: u64, budget_ms: Option<u64>) -> Ending {
        let spent = budget_ms.is_some_and(|b| b > 0 && elapsed_ms.saturating_add(b / 20) >= b);
        Ending { timed_out: self.timed_out || spent, ..self }
    }
}

#[derive(Debug, Clone)]
enum Phase {
    AwaitingHeaders,
    /// A known API's `2xx`: the guard holds, then releases.
    Guarding(Guard),
    /// Not judged: passes through.
    Passing { status: u16 },
    /// The worker's own 5xx: passes whole (the router retries it, or it is the answer).
    WorkerStatus(u16),
    /// The guard rewrote this attempt into its own error; the rest is dropped.
    Rewritten(FailReason),
    /// The guard answered this attempt itself before any header came (a rescue,
    /// [`Attempt::awaits_headers`]): its own headers pass; it has no body, so a body is the
    /// worker's and is dropped.
    Answered(FailReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChargeSlot {
    Undecided,
    Pending(Charge),
    Given(Charge),
}

/// One upstream attempt (see the module docs).
#[derive(Debug, Clone)]
pub struct Attempt {
    cfg: AttemptConfig,
    api: Option<Api>,
    phase: Phase,
    charge: ChargeSlot,
    /// The upstream's clean end was seen.
    saw_end: bool,
    reported: bool,
    rescued: Option<Rescue>,
}

impl Attempt {
    /// An attempt for a request to `path`.
    pub fn new(cfg: AttemptConfig, path: &str) -> Self {
        Attempt { cfg, api: Api::from_path(path), phase: Phase::AwaitingHeaders, charge: ChargeSlot::Undecided, saw_end: false, reported: false, rescued: None }
    }

    /// The API the request speaks (`None`: not judged).
    pub fn api(&self) -> Option<Api> {
        self.api
    }

    fn decide(&mut self, c: Charge) {
        if self.charge == ChargeSlot::Undecided {
            self.charge = ChargeSlot::Pending(c);
        }
    }

    /// The breaker's charge, once, as soon as it is known. `None` before and after.
    pub fn take_charge(&mut self) -> Option<Charge> {
        match std::mem::replace(&mut self.charge, ChargeSlot::Undecided) {
            ChargeSlot::Pending(c) => {
                self.charge = ChargeSlot::Given(c.clone());
                Some(c)
            }
            other => {
                self.charge = other;
                None
            }
        }
    }

    /// Whether the first bytes went to the client.
    pub fn is_released(&self) -> bool {
        match &self.phase {
            Phase::Guarding(g) => g.is_released(),
            Phase::Passing { .. } | Phase::WorkerStatus(_) => true,
            Phase::AwaitingHeaders | Phase::Rewritten(_) | Phase::Answered(_) => false,
        }
    }

    /// The response headers arrived: the status, `content-type` and `content-encoding`.
    pub fn on_response_headers(&mut self, status: u16, content_type: Option<&str>, content_encoding: Option<&str>, end_of_stream: bool) -> HeadersAction {
        if self.reported || !matches!(self.phase, Phase::AwaitingHeaders) {
            // Headers twice (1xx then final are one call in Envoy): keep the first decision.
            return HeadersAction::Continue { mark: None };
        }
        self.saw_end = end_of_stream;
        if status >= 500 {
            self.phase = Phase::WorkerStatus(status);
            return match self.api {
                // A judged API: the worker failed before any output. The router retries it
                // (retriable_status_codes) if it can; its body passes whole either way.
                Some(_) => {
                    self.decide(Charge::Failure(FailReason::Status(status)));
                    HeadersAction::Continue { mark: Some(mark::FAILED) }
                }
                // Not judged: passes through, never a worker failure.
                None => {
                    self.decide(Charge::Nothing);
                    HeadersAction::Continue { mark: None }
                }
            };
        }
        let mode = mode_for(self.api, status, content_type, content_encoding);
        if matches!(mode, Mode::Sse(_)) && end_of_stream {
            // An event stream over before it began (HTTP/2 or `content-length: 0`): the same
            // failure as a body that ends without output, so it is retried the same way.
            let reason = FailReason::EndedWithoutOutput;
            self.decide(Charge::Failure(reason.clone()));
            self.phase = Phase::Rewritten(reason);
            return HeadersAction::Fail { status: self.cfg.retry_status };
        }
        if mode == Mode::Pass || end_of_stream {
            self.phase = Phase::Passing { status };
            self.decide(Charge::Success);
            return HeadersAction::Continue { mark: None };
        }
        self.phase = Phase::Guarding(Guard::new(mode, self.cfg.max_held_bytes));
        // Until the headers reach the router, an upstream death is a reset before headers,
        // which the route's retry policy retries.
        HeadersAction::Hold
    }

    /// Whether the guard holds the response (headers paused) before the first token.
    pub fn is_held(&self) -> bool {
        matches!(&self.phase, Phase::Guarding(g) if !g.is_released())
    }

    /// Whether the response's headers have not come yet (a worker sends them for an answer that
    /// does not stream only with the whole answer; vLLM 0.32 with its engine hung while idle
    /// sends none at all).
    pub fn awaits_headers(&self) -> bool {
        !self.reported && self.rescued.is_none() && matches!(self.phase, Phase::AwaitingHeaders)
    }

    /// Whether nothing of the attempt can have reached the client: its headers held, or not come.
    pub fn before_first_token(&self) -> bool {
        self.is_held() || self.awaits_headers()
    }

    /// The worker stopped showing signs of life; `r` is what [`rescue`] decided and the glue
    /// is about to do. For [`Rescue::RetryNow`] returns the status and body the attempt's answer
    /// becomes: the glue sets them on held headers, marks them `retried` and resumes, or, where
    /// no headers came ([`Attempt::awaits_headers`]), answers the attempt with them itself.
    pub fn on_worker_stalled(&mut self, r: Rescue) -> Option<(u16, Vec<u8>)> {
        if self.reported || self.rescued.is_some() {
            return None;
        }
        match r {
            Rescue::RetryNow | Rescue::RetryUnseen if self.before_first_token() => {
                let no_headers = self.awaits_headers();
                self.rescued = Some(r);
                let (reason, charge) = if r == Rescue::RetryUnseen {
                    // Freshness cannot see an engine hung while idle (its numbers froze at zero):
                    // only the breaker keeps new requests off it.
                    (FailReason::UnseenByEngine, Charge::Failure(FailReason::UnseenByEngine))
                } else {
                    // Not charged: the freshness gate already keeps new requests off a worker
                    // that shows no life, and lets it back the moment it does; a charge would
                    // keep it out for a cool-down after it recovered, and on a host merely
                    // overloaded (its `/metrics` too slow for a scrape) it would open healthy
                    // circuits (seen in the real-vLLM drills).
                    (FailReason::WorkerStalled, Charge::Nothing)
                };
                self.decide(charge);
                let body = error_json(self.cfg.retry_status, &format!("The worker stopped before the first token: {}", reason.label())).into_bytes();
                self.phase = if no_headers { Phase::Answered(reason) } else { Phase::Rewritten(reason) };
                Some((self.cfg.retry_status, body))
            }
            Rescue::EndStream if self.is_released() => {
                self.rescued = Some(r);
                None
            }
            _ => None,
        }
    }

    /// The engine does not show this attempt, which has no headers yet
    /// ([`invisible_to_engine`]), and the glue cannot move it (Envoy's Wasm host, with another
    /// attempt after this one: only an answer the router takes for the worker's is retried). Its
    /// worker is charged now, once: [`FailReason::UnseenByEngine`] opens the circuit, so that no
    /// new request goes to an engine hung while idle, which looks idle, the best pick, forever.
    /// The attempt itself waits on (its per-try budget decides), and the worker's own answer, if
    /// it comes, passes whole. Returns the charge for the glue to give, the first time only. It
    /// rests on the engine's frames, not on how the attempt ends: it stands if the client goes
    /// away later, or the worker answers after all.
    pub fn charge_unseen(&mut self) -> Option<Charge> {
        if !self.awaits_headers() || self.charge != ChargeSlot::Undecided {
            return None;
        }
        self.decide(Charge::Failure(FailReason::UnseenByEngine));
        self.take_charge()
    }

    /// The glue could not send the answer [`Self::on_worker_stalled`] gave an attempt that had
    /// no headers (a host error): the attempt goes on as if it had not been rescued, so that the
    /// worker's own answer, if it comes, passes whole (fail open).
    pub fn answer_not_sent(&mut self) {
        if matches!(self.phase, Phase::Answered(_)) {
            self.phase = Phase::AwaitingHeaders;
            self.rescued = None;
            if matches!(self.charge, ChargeSlot::Pending(_)) {
                self.charge = ChargeSlot::Undecided;
            }
        }
    }

    /// Whether every body chunk that does not end the stream and whose tail is clean
    /// ([`crate::sse::clean_tail`]) would now pass untouched, with nothing of the attempt
    /// changed: an answer the guard passes, or a released stream holding no part of an event.
    /// A host that can look at a chunk's tail itself may then pass such chunks without the
    /// filter, until it hands the filter a chunk again (the filter asks anew after each one).
    pub fn passes_clean_chunks(&self) -> bool {
        !self.reported
            && match &self.phase {
                Phase::Guarding(g) => g.passes_clean_chunks(),
                Phase::Passing { .. } | Phase::WorkerStatus(_) => true,
                Phase::AwaitingHeaders | Phase::Rewritten(_) | Phase::Answered(_) => false,
            }
    }

    /// What the glue reads of the next body chunk.
    pub fn reads(&self) -> Read {
        match &self.phase {
            Phase::Guarding(g) if g.is_released() => Read::Tail,
            Phase::Guarding(_) => Read::All,
            _ => Read::Nothing,
        }
    }

    /// A body chunk arrived; `end_of_stream` on the upstream's clean end.
    pub fn on_body(&mut self, chunk: Chunk<'_>, end_of_stream: bool) -> BodyAction {
        if self.reported {
            // Envoy sends nothing after the end; if it did, nothing of it would be judged.
            return BodyAction::Drop;
        }
        if end_of_stream {
            self.saw_end = true;
        }
        let retry_status = self.cfg.retry_status;
        match &mut self.phase {
            Phase::AwaitingHeaders | Phase::Passing { .. } | Phase::WorkerStatus(_) => BodyAction::Pass,
            Phase::Rewritten(_) | Phase::Answered(_) => BodyAction::Drop,
            Phase::Guarding(g) => {
                let bytes = match chunk {
                    Chunk::Tail(tail) => {
                        return if g.passes_untouched(tail, end_of_stream) { BodyAction::Pass } else { BodyAction::NeedAll };
                    }
                    Chunk::All(b) => {
                        let tail = &b[b.len().saturating_sub(TAIL_PEEK_BYTES)..];
                        if b.len() <= TAIL_PEEK_BYTES && g.passes_untouched(tail, end_of_stream) && !end_of_stream {
                            // Same answer as on_body would give, without the copy; the state
                            // is unchanged either way (see `Guard::passes_untouched`).
                            return BodyAction::Pass;
                        }
                        b
                    }
                    Chunk::Unread => &[][..],
                };
                match g.on_body(bytes, end_of_stream) {
                    Step::Hold => BodyAction::Hold,
                    Step::Release(out) => {
                        self.charge_success();
                        BodyAction::Emit(out)
                    }
                    Step::Forward(out) => BodyAction::Emit(out),
                    Step::Fail(reason) => {
                        let body = error_json(retry_status, &format!("The worker failed before the first token: {}", reason.label())).into_bytes();
                        self.decide(Charge::Failure(reason.clone()));
                        self.phase = Phase::Rewritten(reason);
                        BodyAction::Fail { status: retry_status, body }
                    }
                }
            }
        }
    }

    fn charge_success(&mut self) {
        self.decide(Charge::Success);
    }

    /// Whether [`Self::on_done`]'s answer depends on how Envoy ended the attempt: `false` once
    /// it is reported, for an attempt that passed or was rewritten, and for a released stream
    /// that ended cleanly. The glue reads Envoy's response flags and details (two property
    /// reads) only when this is true.
    pub fn needs_ending(&self) -> bool {
        if self.reported {
            return false;
        }
        match &self.phase {
            Phase::Passing { .. } | Phase::WorkerStatus(_) | Phase::Rewritten(_) | Phase::Answered(_) => false,
            Phase::Guarding(g) if g.is_released() => !(self.saw_end && self.rescued.is_none()),
            Phase::Guarding(_) | Phase::AwaitingHeaders => true,
        }
    }

    /// Envoy is done with the attempt. Returns the report the first time, `None` after.
    pub fn on_done(&mut self, ending: Ending) -> Option<Report> {
        if self.reported {
            return None;
        }
        self.reported = true;
        let released = self.is_released();
        let (post_token_error, overflowed) = match &self.phase {
            Phase::Guarding(g) => (g.post_release_error().is_some(), g.overflowed()),
            _ => (false, false),
        };
        let cut_short = |ending: Ending| if ending.timed_out { FailReason::Timeout } else { FailReason::ResetBeforeFirstToken };
        let outcome = match &self.phase {
            Phase::Passing { status } => Outcome::Passed { status: *status },
            Phase::WorkerStatus(s) if self.api.is_none() => Outcome::Passed { status: *s },
            Phase::WorkerStatus(s) => Outcome::FailedBeforeFirstToken(FailReason::Status(*s)),
            Phase::Rewritten(r) | Phase::Answered(r) => Outcome::FailedBeforeFirstToken(r.clone()),
            Phase::Guarding(g) if g.is_released() => {
                if self.saw_end && self.rescued.is_none() {
                    Outcome::Served
                } else if ending.client_went_away {
                    Outcome::ClientCancelled { after_release: true }
                } else {
                    Outcome::Truncated
                }
            }
            // Held, not released: nothing reached the client.
            _ if ending.client_went_away => Outcome::ClientCancelled { after_release: false },
            Phase::Guarding(_) => Outcome::FailedBeforeFirstToken(cut_short(ending)),
            Phase::AwaitingHeaders => Outcome::FailedBeforeFirstToken(if ending.timed_out { FailReason::Timeout } else { FailReason::ResetBeforeHeaders }),
        };
        match &outcome {
            Outcome::ClientCancelled { .. } => self.decide(Charge::Nothing),
            Outcome::FailedBeforeFirstToken(r) => self.decide(Charge::Failure(r.clone())),
            _ => self.decide(Charge::Success),
        }
        let charge = match &self.charge {
            ChargeSlot::Pending(c) | ChargeSlot::Given(c) => c.clone(),
            ChargeSlot::Undecided => Charge::Nothing,
        };
        Some(Report { outcome, charge, released, post_token_error, overflowed, rescued: self.rescued })
    }
}

#[cfg(test)]
mod tests;
