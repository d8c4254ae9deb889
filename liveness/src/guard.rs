//! The first-token guard's byte holder: what to do with an upstream response body, chunk by
//! chunk, so that a failure before the first generated token can still be retried on another
//! worker and a failure after it leaves the client with whole SSE events only.
//!
//! It owns no I/O and no policy about the attempt as a whole ([`crate::attempt`] drives it and
//! decides outcomes); it only knows bytes, where events end ([`crate::sse`]) and what they mean
//! ([`crate::output`]). Each call returns a [`Step`]:
//!
//! * [`Step::Hold`]: keep the response headers and the bytes so far (nothing reaches the client,
//!   so an upstream death still looks to the router like a reset before headers → retry).
//! * [`Step::Release`]: the first generated output is here: let the headers go, followed by the
//!   given bytes (whole SSE events up to and including the first one carrying output).
//! * [`Step::Forward`]: after release: pass on these bytes (whole events only; a partial event is
//!   kept until its blank line arrives, so an upstream death truncates between events).
//! * [`Step::Fail`]: before release, the worker failed (vLLM's in-band `data: {"error": ...}`
//!   event when its engine died, a `finish_reason` of `abort`/`error`, a Responses
//!   `response.failed`, or a stream that ended without any output): nothing of this attempt may
//!   reach the client.

use crate::output::{event_signal, whole_body_signal, Api, Signal};
use crate::sse::{clean_tail, event_end, has_error_word, parse_event};

/// Default bound on the bytes held before release. A response that grows past it without any
/// output is released unguarded rather than buffered without limit.
pub const DEFAULT_MAX_HELD_BYTES: usize = 256 * 1024;

/// Trailing bytes of a chunk the glue reads for [`Guard::passes_untouched`].
pub const TAIL_PEEK_BYTES: usize = 512;

/// How the response body is guarded, decided from the request's API, the status and the
/// content type ([`mode_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `2xx` `text/event-stream` of a known API: hold until the first event with output.
    Sse(Api),
    /// `2xx` non-streaming body of a known API: hold until the end of the body.
    Whole(Api),
    /// Not guarded: an unknown API or format (fail open: passed through, never judged), or a
    /// non-`2xx` answer (the worker answered; holding buys nothing).
    Pass,
}

/// Why an attempt failed before its first token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// The worker answered with this `5xx` status.
    Status(u16),
    /// An in-band error event arrived before any output; carries its message.
    SseError(String),
    /// The worker aborted the request before any output; carries the reason.
    Aborted(String),
    /// The stream reached `[DONE]` or its end with no output and no finish.
    EndedWithoutOutput,
    /// The upstream connection was reset (or refused) before the response headers.
    ResetBeforeHeaders,
    /// The per-try timeout ran out before the first token (headers held or not yet sent).
    Timeout,
    /// The upstream connection was reset after the headers, before the first token.
    ResetBeforeFirstToken,
    /// The worker stopped showing progress (or went silent) while the guard held the attempt:
    /// handed to a retry at once instead of waiting out the per-try budget.
    WorkerStalled,
    /// Held while the worker's fresh frames, taken after the request reached it, still showed an
    /// idle engine: the engine never saw it (an engine hung while idle).
    UnseenByEngine,
}

impl FailReason {
    /// A short label for logs, stats and the breaker's trip reason.
    pub fn label(&self) -> String {
        match self {
            FailReason::Status(s) => format!("status_{s}"),
            FailReason::SseError(m) => {
                let m: String = m.chars().take(80).collect();
                format!("sse_error: {m}")
            }
            FailReason::Aborted(r) => {
                let r: String = r.chars().take(30).collect();
                format!("finish_reason_{r}")
            }
            FailReason::EndedWithoutOutput => "ended_without_output".to_string(),
            FailReason::ResetBeforeHeaders => "reset_before_headers".to_string(),
            FailReason::Timeout => "timeout_before_first_token".to_string(),
            FailReason::ResetBeforeFirstToken => "reset_before_first_token".to_string(),
            FailReason::WorkerStalled => "worker_stalled".to_string(),
            FailReason::UnseenByEngine => "unseen_by_engine".to_string(),
        }
    }

    /// Whether one such failure is enough to open the worker's circuit. Only a request its
    /// engine never saw: the fresh frames of an engine that counts nothing while holding a
    /// request say the engine is hung, not that one request went wrong (a 5xx, a reset, a
    /// timeout can be one bad request or one bad moment); waiting for the usual three would send
    /// every request of the next seconds to a worker known to swallow them.
    pub fn opens_circuit_at_once(&self) -> bool {
        matches!(self, FailReason::UnseenByEngine)
    }
}

/// What the caller must do after a call into the [`Guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Hold,
    Release(Vec<u8>),
    Forward(Vec<u8>),
    Fail(FailReason),
}

/// Picks the guard mode for a response to a request of `api` (`None`: not a known API). A body
/// with a content coding (`content-encoding` other than `identity`: gzip from a provider or a
/// compressing proxy) is not readable here: passed through, never judged.
pub fn mode_for(api: Option<Api>, status: u16, content_type: Option<&str>, content_encoding: Option<&str>) -> Mode {
    let Some(api) = api else { return Mode::Pass };
    if !(200..300).contains(&status) {
        return Mode::Pass;
    }
    if content_encoding.is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity")) {
        return Mode::Pass;
    }
    let ct = content_type.map(|c| c.trim().to_ascii_lowercase()).unwrap_or_default();
    if ct.starts_with("text/event-stream") {
        Mode::Sse(api)
    } else if ct.is_empty() || ct.starts_with("application/json") {
        Mode::Whole(api)
    } else {
        // A format this guard cannot read: passed through, never judged.
        Mode::Pass
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Holding,
    Released,
    Failed,
}

/// Incremental first-token guard for one upstream response body.
#[derive(Debug, Clone)]
pub struct Guard {
    mode: Mode,
    phase: Phase,
    max_held: usize,
    /// Bytes not yet handed out: everything before release; afterwards only the tail of an
    /// event whose blank line has not arrived yet.
    buf: Vec<u8>,
    /// Where scanning for the next event boundary resumes in `buf`.
    scan_from: usize,
    /// Set when an in-band error event arrived after release (a clean end, but worth counting).
    post_release_error: Option<String>,
    /// Set when the guard gave up holding because `max_held` was reached.
    overflowed: bool,
}

impl Guard {
    /// A guard for a response whose headers said `mode`.
    pub fn new(mode: Mode, max_held: usize) -> Self {
        Guard {
            mode,
            phase: if mode == Mode::Pass { Phase::Released } else { Phase::Holding },
            max_held: max_held.max(1),
            buf: Vec::new(),
            scan_from: 0,
            post_release_error: None,
            overflowed: false,
        }
    }

    /// Whether the headers (and the first bytes) went to the client.
    pub fn is_released(&self) -> bool {
        self.phase == Phase::Released
    }

    /// Bytes currently held back.
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Message of an error event that arrived after release, if any.
    pub fn post_release_error(&self) -> Option<&str> {
        self.post_release_error.as_deref()
    }

    /// Whether the guard released early because it held `max_held` bytes without output.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// After release: whether a chunk whose last bytes are `tail` (its last
    /// [`TAIL_PEEK_BYTES`], or all of it when shorter) may go to the client as it is, without
    /// [`Self::on_body`] seeing it. Lets the glue skip copying every chunk of a released
    /// stream into Wasm and back: [`Self::on_body`] would forward exactly that chunk, and the
    /// guard's state would not change.
    ///
    /// True in SSE mode when nothing is held (the chunk starts an event) and the chunk ends
    /// on an event boundary (or the stream ends here), unless the tail may hold an error event
    /// ([`Self::post_release_error`] must see it, on the stream's last chunk too). An error
    /// event that lies wholly before the tail of a chunk larger than [`TAIL_PEEK_BYTES`] is
    /// forwarded the same way but not noted (it only feeds a counter). Always true in the other
    /// modes once released.
    pub fn passes_untouched(&self, tail: &[u8], end_of_stream: bool) -> bool {
        match (self.phase, self.mode) {
            (Phase::Released, Mode::Sse(_)) => {
                self.buf.is_empty() && if end_of_stream { !has_error_word(tail) } else { clean_tail(tail) }
            }
            (Phase::Released, _) => true,
            _ => false,
        }
    }

    /// Whether [`Self::passes_untouched`] is true for every chunk whose tail is clean
    /// ([`clean_tail`]): released, and in SSE mode holding no part of an event.
    pub fn passes_clean_chunks(&self) -> bool {
        match (self.phase, self.mode) {
            (Phase::Released, Mode::Sse(_)) => self.buf.is_empty(),
            (Phase::Released, _) => true,
            _ => false,
        }
    }

    /// Feeds one body chunk; `end_of_stream` is true on the upstream's clean end.
    pub fn on_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Step {
        match (self.phase, self.mode) {
            (Phase::Failed, _) => Step::Hold,
            (Phase::Released, Mode::Sse(api)) => {
                self.buf.extend_from_slice(chunk);
                let cut = self.drain_events(api, end_of_stream);
                if end_of_stream {
                    // The whole events were looked at for an error (an HTTP/2 or length-delimited
                    // upstream can end the stream on the chunk that carries one); a partial event
                    // left at the end goes too (a client drops it).
                    self.scan_from = 0;
                    return Step::Forward(std::mem::take(&mut self.buf));
                }
                let cut = self.bound_partial(cut);
                let out: Vec<u8> = self.buf.drain(..cut).collect();
                self.scan_from = self.scan_from.saturating_sub(cut);
                Step::Forward(out)
            }
            (Phase::Released, _) => Step::Forward(chunk.to_vec()),
            (Phase::Holding, Mode::Whole(api)) => {
                self.buf.extend_from_slice(chunk);
                if end_of_stream && self.buf.len() < self.max_held {
                    if let Signal::Aborted(reason) = whole_body_signal(api, &self.buf) {
                        return self.fail(FailReason::Aborted(reason));
                    }
                }
                if end_of_stream || self.buf.len() >= self.max_held {
                    self.overflowed = !end_of_stream;
                    self.phase = Phase::Released;
                    return Step::Release(std::mem::take(&mut self.buf));
                }
                Step::Hold
            }
            (Phase::Holding, Mode::Sse(api)) => {
                self.buf.extend_from_slice(chunk);
                self.hold_sse(api, end_of_stream)
            }
            (Phase::Holding, Mode::Pass) => {
                // `new` releases a Pass guard at once; kept total.
                self.phase = Phase::Released;
                Step::Release(chunk.to_vec())
            }
        }
    }

    /// Before release: walks complete events until one decides the attempt.
    fn hold_sse(&mut self, api: Api, end_of_stream: bool) -> Step {
        while let Some(end) = event_end(&self.buf, self.scan_from, end_of_stream) {
            let start = self.scan_from;
            self.scan_from = end;
            match event_signal(api, &parse_event(&self.buf[start..end])) {
                Signal::Output => return self.release_through(api, end, end_of_stream),
                Signal::Error(msg) => return self.fail(FailReason::SseError(msg)),
                Signal::Aborted(reason) => return self.fail(FailReason::Aborted(reason)),
                // `[DONE]` before any output or finish: the answer is incomplete.
                Signal::Done => return self.fail(FailReason::EndedWithoutOutput),
                Signal::Other => {}
            }
        }
        if end_of_stream {
            // A clean end with no output, no finish and no error: cut short.
            return self.fail(FailReason::EndedWithoutOutput);
        }
        if self.buf.len() >= self.max_held {
            self.overflowed = true;
            let cut = self.scan_from;
            return self.release_through(api, cut, false);
        }
        Step::Hold
    }

    fn fail(&mut self, reason: FailReason) -> Step {
        self.phase = Phase::Failed;
        self.buf.clear();
        self.scan_from = 0;
        Step::Fail(reason)
    }

    /// Releases everything up to `end`, plus the whole events already buffered behind it (or
    /// all bytes at a clean end); a partial event stays held.
    fn release_through(&mut self, api: Api, end: usize, end_of_stream: bool) -> Step {
        self.phase = Phase::Released;
        self.scan_from = end;
        // The events behind the first output are looked at for an error at the end too (an
        // HTTP/2 or length-delimited upstream can end the stream on the chunk that carries them).
        let drained = self.drain_events(api, end_of_stream).max(end);
        let cut = if end_of_stream { self.buf.len() } else { self.bound_partial(drained) };
        let out: Vec<u8> = self.buf.drain(..cut).collect();
        self.scan_from = 0;
        Step::Release(out)
    }

    /// After release, `cut`, or everything where the partial event left behind it has reached
    /// `max_held`: a body that never ends an event (one endless line, or not SSE at all) goes on
    /// unguarded, as it would before release, rather than held without limit. What follows is
    /// read as if an event started there: at worst one event's error is not noted.
    fn bound_partial(&mut self, cut: usize) -> usize {
        if self.buf.len() - cut < self.max_held {
            return cut;
        }
        self.overflowed = true;
        self.buf.len()
    }

    /// After release: returns the end of the last complete event in `buf`, noting error events.
    fn drain_events(&mut self, api: Api, end_of_stream: bool) -> usize {
        let mut cut = 0;
        let mut from = self.scan_from.min(self.buf.len());
        // Events are parsed only when the new bytes hold a word an error event has (one search
        // over them all, not one per event: this runs on every chunk of every stream).
        let new = &self.buf[from..];
        let look = self.post_release_error.is_none() && has_error_word(new);
        // Resume scanning where the last call stopped; `cut` starts at 0 because everything
        // before `scan_from` was drained already.
        while let Some(end) = event_end(&self.buf, from, end_of_stream) {
            if look && self.post_release_error.is_none() {
                let ev = &self.buf[from..end];
                if has_error_word(ev) {
                    if let Signal::Error(m) = event_signal(api, &parse_event(ev)) {
                        self.post_release_error = Some(m);
                    }
                }
            }
            from = end;
            cut = end;
        }
        self.scan_from = from;
        cut
    }
}

#[cfg(test)]
mod tests;
