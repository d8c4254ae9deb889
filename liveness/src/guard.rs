//! The first-token guard's state machine: what to do with an upstream response, byte chunk by
//! byte chunk, so that a failure before the first generated token can still be retried on
//! another worker and a failure after it leaves the client with whole SSE events only.
//!
//! It owns no I/O. The Envoy glue (`filter/src/guard.rs`) feeds it the response status, the
//! content type and each body chunk as it arrives, and turns each [`Step`] into Envoy actions:
//!
//! * [`Step::Hold`]: keep the response headers and the bytes so far (nothing reaches the client,
//!   so an upstream death still looks to the router like a reset before headers → retry).
//! * [`Step::Release`]: the first generated output is here: let the headers go, followed by the
//!   given bytes (whole SSE events up to and including the first one carrying output).
//! * [`Step::Forward`]: after release: pass on these bytes (whole events only; a partial event is
//!   kept until its blank line arrives, so an upstream death truncates between events).
//! * [`Step::Fail`]: before release, the worker failed (for example vLLM's in-band
//!   `data: {"error": ...}` event when its engine died, a `finish_reason` of `abort` or `error`
//!   when it shut down with the request still queued, or a stream that ended without any
//!   output and without a `finish_reason`): the glue must turn it into a retryable failure;
//!   nothing of this attempt may reach the client.
//!
//! "Generated output" means, in any choice: a non-empty `delta.content`, `delta.reasoning_content`
//! or `delta.reasoning`, a non-empty `delta.tool_calls`, a non-empty completions `text`, or a set
//! `finish_reason` other than `abort`/`error` (the model finished, possibly with nothing to say).
//! The role event and empty `content` events that vLLM sends first are not output.
//!
//! A complete chat or completions stream always carries a `finish_reason` for each choice, so
//! a stream that reaches `data: [DONE]` or its clean end with neither output nor a
//! `finish_reason` was cut short by the worker (vLLM 0.26 does this to queued requests when its
//! API server gets SIGTERM): before release that is a failure, not an empty answer.

use serde_json::Value;

/// Default bound on the bytes held before release. A response that grows past it without any
/// output is released unguarded rather than buffered without limit.
pub const DEFAULT_MAX_HELD_BYTES: usize = 256 * 1024;

/// How the response body is guarded, decided from its status and content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `2xx` `text/event-stream`: hold until the first event with generated output.
    Sse,
    /// `2xx` anything else (a non-streaming JSON completion): hold until the end of the body.
    Whole,
    /// Not guarded (`1xx`/`3xx`/`4xx`: the worker answered; holding buys nothing).
    Pass,
}

/// Why an attempt failed before its first token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// The worker answered with this `5xx` status.
    Status(u16),
    /// An SSE event `data: {"error": ...}` arrived before any output; carries its message.
    SseError(String),
    /// A `finish_reason` of `abort` or `error` arrived before any output; carries it.
    Aborted(String),
    /// The stream reached `[DONE]` or its end with no output and no `finish_reason`.
    EndedWithoutOutput,
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
                let r: String = r.chars().take(20).collect();
                format!("finish_reason_{r}")
            }
            FailReason::EndedWithoutOutput => "ended_without_output".to_string(),
        }
    }
}

/// What the glue must do after a call into the [`Guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Hold,
    Release(Vec<u8>),
    Forward(Vec<u8>),
    Fail(FailReason),
}

/// Picks the guard mode for a response.
pub fn mode_for(status: u16, content_type: Option<&str>) -> Mode {
    if !(200..300).contains(&status) {
        return Mode::Pass;
    }
    let is_sse = content_type
        .map(|c| c.trim().to_ascii_lowercase().starts_with("text/event-stream"))
        .unwrap_or(false);
    if is_sse {
        Mode::Sse
    } else {
        Mode::Whole
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Holding,
    Released,
    Failed,
}

/// Incremental first-token guard for one upstream attempt.
#[derive(Debug, Clone)]
pub struct Guard {
    mode: Mode,
    phase: Phase,
    max_held: usize,
    /// Bytes not yet handed to the glue: everything before release; afterwards only the tail
    /// of an event whose blank line has not arrived yet.
    buf: Vec<u8>,
    /// Where scanning for the next event boundary resumes in `buf`.
    scan_from: usize,
    /// Set when an in-band error event arrived after release (a clean end, but worth counting).
    post_release_error: Option<String>,
    /// Set when the guard gave up holding because `max_held` was reached.
    overflowed: bool,
}

/// What one complete SSE event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// Generated output (see the module docs).
    Output,
    /// `data: {"error": ...}` with its message.
    Error(String),
    /// A choice finished with `finish_reason` `abort` or `error` (the worker gave up on the
    /// request, not the model), and no choice in the event carries output.
    Aborted(String),
    /// `data: [DONE]`.
    Done,
    /// Anything else: role-only or empty deltas, usage, comments, unparseable data.
    Other,
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

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the headers (and the first bytes) went to the client.
    pub fn is_released(&self) -> bool {
        self.phase == Phase::Released
    }

    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
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
    /// ([`Self::post_release_error`] must see it). An error event that lies wholly before the
    /// tail of a chunk larger than [`TAIL_PEEK_BYTES`] is forwarded the same way but not
    /// noted (it only feeds a counter). Always true in the other modes once released.
    pub fn passes_untouched(&self, tail: &[u8], end_of_stream: bool) -> bool {
        match (self.phase, self.mode) {
            (Phase::Released, Mode::Sse) => {
                self.buf.is_empty() && (end_of_stream || (ends_on_event_boundary(tail) && !contains(tail, b"error")))
            }
            (Phase::Released, _) => true,
            _ => false,
        }
    }

    /// Feeds one body chunk; `end_of_stream` is true on the upstream's clean end.
    pub fn on_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Step {
        match (self.phase, self.mode) {
            (Phase::Failed, _) => Step::Hold,
            (Phase::Released, Mode::Pass) | (Phase::Released, Mode::Whole) => Step::Forward(chunk.to_vec()),
            (Phase::Released, Mode::Sse) => {
                self.buf.extend_from_slice(chunk);
                if end_of_stream {
                    self.scan_from = 0;
                    return Step::Forward(std::mem::take(&mut self.buf));
                }
                let cut = self.drain_events();
                let out: Vec<u8> = self.buf.drain(..cut).collect();
                self.scan_from = self.scan_from.saturating_sub(cut);
                Step::Forward(out)
            }
            (Phase::Holding, Mode::Whole) => {
                self.buf.extend_from_slice(chunk);
                if end_of_stream && self.buf.len() < self.max_held {
                    if let Some(reason) = whole_body_aborted(&self.buf) {
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
            (Phase::Holding, _) => {
                self.buf.extend_from_slice(chunk);
                self.hold_sse(end_of_stream)
            }
        }
    }

    /// Before release: walks complete events until one decides the attempt.
    fn hold_sse(&mut self, end_of_stream: bool) -> Step {
        while let Some(end) = next_event_end(&self.buf, self.scan_from) {
            let start = self.scan_from;
            self.scan_from = end;
            match classify_event(&self.buf[start..end]) {
                EventKind::Output => return self.release_through(end, end_of_stream),
                EventKind::Error(msg) => return self.fail(FailReason::SseError(msg)),
                EventKind::Aborted(reason) => return self.fail(FailReason::Aborted(reason)),
                // `[DONE]` before any output or `finish_reason`: the answer is incomplete.
                EventKind::Done => return self.fail(FailReason::EndedWithoutOutput),
                EventKind::Other => {}
            }
        }
        if end_of_stream {
            // A clean end with no output, no finish_reason and no error: cut short.
            return self.fail(FailReason::EndedWithoutOutput);
        }
        if self.buf.len() >= self.max_held {
            self.overflowed = true;
            let cut = self.scan_from;
            return self.release_through(cut, false);
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
    fn release_through(&mut self, end: usize, end_of_stream: bool) -> Step {
        self.phase = Phase::Released;
        self.scan_from = end;
        let cut = if end_of_stream { self.buf.len() } else { self.drain_events().max(end) };
        let out: Vec<u8> = self.buf.drain(..cut).collect();
        self.scan_from = 0;
        Step::Release(out)
    }

    /// After release: returns the end of the last complete event in `buf`, noting error events.
    fn drain_events(&mut self) -> usize {
        let mut cut = 0;
        let mut from = self.scan_from.min(self.buf.len());
        // Resume scanning where the last call stopped; `cut` starts at 0 because everything
        // before `scan_from` was drained already.
        while let Some(end) = next_event_end(&self.buf, from) {
            if self.post_release_error.is_none() {
                let ev = &self.buf[from..end];
                if contains(ev, b"\"error\"") {
                    if let EventKind::Error(m) = classify_event(ev) {
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

/// A whole (non-streaming) completion in which every choice ended with `finish_reason`
/// `abort` or `error` and none carries output: the worker gave up before the first token.
/// Returns the first such reason. Only bodies that mention `abort`/`error` are parsed.
pub fn whole_body_aborted(body: &[u8]) -> Option<String> {
    if !contains(body, b"\"abort\"") && !contains(body, b"\"error\"") {
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let choices = v.get("choices")?.as_array()?;
    let mut reason = None;
    for c in choices {
        let r = c.get("finish_reason").and_then(Value::as_str)?;
        if r != "abort" && r != "error" {
            return None;
        }
        let non_empty = |x: Option<&Value>| x.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
        let msg = c.get("message");
        if non_empty(c.get("text"))
            || non_empty(msg.and_then(|m| m.get("content")))
            || non_empty(msg.and_then(|m| m.get("reasoning_content")))
            || msg.and_then(|m| m.get("tool_calls")).and_then(Value::as_array).is_some_and(|a| !a.is_empty())
        {
            return None;
        }
        reason.get_or_insert_with(|| r.to_string());
    }
    reason
}

/// Trailing bytes of a chunk the glue reads for [`Guard::passes_untouched`].
pub const TAIL_PEEK_BYTES: usize = 512;

/// Whether bytes that start at an event start and end with `tail` end on an event boundary
/// (their last line is a blank line that [`next_event_end`] ends an event with). Conservative:
/// only the endings `\n\n`, `\r\n\r\n`, `\n\r\n` and `\r\r\n` count (vLLM sends `\n\n`).
pub fn ends_on_event_boundary(tail: &[u8]) -> bool {
    [&b"\n\n"[..], b"\r\n\r\n", b"\n\r\n", b"\r\r\n"].iter().any(|e| tail.ends_with(e))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Index just past the blank line that ends the first complete event at or after `from`.
/// Accepts `\n`, `\r\n` and `\r` line ends (the SSE spec's three).
pub fn next_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let mut line_empty = true;
    while i < buf.len() {
        match buf[i] {
            b'\n' | b'\r' => {
                let mut next = i + 1;
                if buf[i] == b'\r' {
                    if next >= buf.len() {
                        // A lone `\r` at the end may be the first half of `\r\n`: wait.
                        return None;
                    }
                    if buf[next] == b'\n' {
                        next += 1;
                    }
                }
                if line_empty {
                    // A blank line ends the event (a blank line at `from` itself is an empty
                    // "event" of its own, which classifies as nothing).
                    return Some(next);
                }
                line_empty = true;
                i = next;
            }
            _ => {
                line_empty = false;
                i += 1;
            }
        }
    }
    None
}

/// The `data:` payload of one event (lines joined with `\n`), if it has any.
pub fn event_data(event: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(event);
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

/// What a complete SSE event means for the guard.
pub fn classify_event(event: &[u8]) -> EventKind {
    let Some(data) = event_data(event) else {
        return EventKind::Other;
    };
    let data = data.trim();
    if data == "[DONE]" {
        return EventKind::Done;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return EventKind::Other;
    };
    if let Some(err) = v.get("error") {
        if !err.is_null() {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string());
            return EventKind::Error(msg);
        }
    }
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return EventKind::Other;
    };
    let non_empty_str = |x: Option<&Value>| x.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let mut aborted: Option<String> = None;
    for c in choices {
        match c.get("finish_reason") {
            Some(Value::String(r)) if r == "abort" || r == "error" => {
                aborted.get_or_insert_with(|| r.clone());
            }
            Some(f) if !f.is_null() => return EventKind::Output,
            _ => {}
        }
        if non_empty_str(c.get("text")) {
            return EventKind::Output;
        }
        if let Some(d) = c.get("delta") {
            if non_empty_str(d.get("content"))
                || non_empty_str(d.get("reasoning_content"))
                || non_empty_str(d.get("reasoning"))
                || d.get("tool_calls").and_then(Value::as_array).is_some_and(|a| !a.is_empty())
            {
                return EventKind::Output;
            }
        }
    }
    match aborted {
        Some(r) => EventKind::Aborted(r),
        None => EventKind::Other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DATA}{name}")).unwrap()
    }

    /// Strips HTTP/1.1 chunked framing (`<hex>\r\n<data>\r\n`...). The stream tails start in the
    /// middle of a chunk, so everything before the first well-formed chunk-size line is dropped.
    fn dechunk(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let text = raw;
        // Find the first "\r\n<hex>\r\n" boundary.
        let mut i = 0;
        let is_size_line = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_hexdigit);
        let mut start = None;
        while i + 2 <= text.len() {
            if text[i..].starts_with(b"\r\n") {
                let rest = &text[i + 2..];
                if let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                    if is_size_line(&rest[..p]) {
                        start = Some(i + 2);
                        break;
                    }
                }
            }
            i += 1;
        }
        let mut pos = start.unwrap();
        loop {
            let rest = &text[pos..];
            let Some(p) = rest.windows(2).position(|w| w == b"\r\n") else { break };
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..p]).unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            let body = pos + p + 2;
            out.extend_from_slice(&text[body..body + size]);
            pos = body + size + 2;
            if pos >= text.len() {
                break;
            }
        }
        out
    }

    /// Runs a guard over `chunks`; returns (released prefix, forwarded rest, final step kinds).
    fn run(mode: Mode, chunks: &[&[u8]], eos: bool) -> (Option<Vec<u8>>, Vec<u8>, Option<FailReason>) {
        let mut g = Guard::new(mode, DEFAULT_MAX_HELD_BYTES);
        let mut released = None;
        let mut fwd = Vec::new();
        let mut fail = None;
        for (i, c) in chunks.iter().enumerate() {
            let last = eos && i + 1 == chunks.len();
            match g.on_body(c, last) {
                Step::Hold => {}
                Step::Release(b) => {
                    assert!(released.is_none());
                    released = Some(b);
                }
                Step::Forward(b) => {
                    assert!(released.is_some() || mode != Mode::Sse);
                    fwd.extend(b);
                }
                Step::Fail(r) => fail = Some(r),
            }
        }
        (released, fwd, fail)
    }

    #[test]
    fn real_chat_stream_releases_on_first_content_not_role_event() {
        let body = fixture("sse-chat.txt");
        let (rel, fwd, fail) = run(Mode::Sse, &[&body], true);
        assert!(fail.is_none());
        // All in one chunk at a clean end: everything goes at release.
        assert_eq!(rel.unwrap(), body);
        assert!(fwd.is_empty());
        // Event by event: the role event (empty content) is held, the first " list" releases.
        let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
        let mut events = body.split_inclusive(|b| *b == b'\n');
        let role = [events.next().unwrap(), events.next().unwrap()].concat();
        assert_eq!(g.on_body(&role, false), Step::Hold);
        let first = [events.next().unwrap(), events.next().unwrap()].concat();
        let Step::Release(rel) = g.on_body(&first, false) else { panic!() };
        let text = String::from_utf8(rel).unwrap();
        assert_eq!(text.matches("data: ").count(), 2, "{text}");
        assert!(text.ends_with("\n\n") && text.contains("\"content\":\" list\""));
    }

    #[test]
    fn real_chat_stream_event_by_event() {
        let body = fixture("sse-chat.txt");
        let events: Vec<&[u8]> = body.split_inclusive(|b| *b == b'\n').collect();
        let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
        let mut out = Vec::new();
        for (i, line) in events.iter().enumerate() {
            match g.on_body(line, i + 1 == events.len()) {
                Step::Release(b) | Step::Forward(b) => {
                    // Only whole events leave the guard mid-stream.
                    if i + 1 != events.len() {
                        assert!(b.is_empty() || b.ends_with(b"\n\n"), "{:?}", String::from_utf8_lossy(&b));
                    }
                    out.extend(b)
                }
                Step::Hold => {}
                Step::Fail(r) => panic!("{r:?}"),
            }
        }
        assert_eq!(out, body);
    }

    #[test]
    fn real_completions_stream_releases_on_first_text() {
        let body = fixture("sse-completions.txt");
        let first_end = next_event_end(&body, 0).unwrap();
        let (rel, fwd, _) = run(Mode::Sse, &[&body[..first_end + 3], &body[first_end + 3..]], true);
        let rel = rel.unwrap();
        assert_eq!(rel, &body[..first_end]);
        assert_eq!([rel, fwd].concat(), body);
    }

    #[test]
    fn engine_death_before_first_token_fails_for_retry() {
        let tail = dechunk(&fixture("kill-enginecore_stream_tail.txt"));
        let text = String::from_utf8_lossy(&tail).to_string();
        let err_at = text.find("data: {\"error\"").unwrap();
        // The same error event after only the role event: nothing generated yet → Fail.
        let role = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
        let (rel, fwd, fail) = run(Mode::Sse, &[role, &tail[err_at..]], true);
        assert!(rel.is_none() && fwd.is_empty());
        match fail.unwrap() {
            FailReason::SseError(m) => assert!(m.starts_with("EngineCore encountered an issue")),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn engine_death_after_first_token_is_a_clean_end() {
        let tail = dechunk(&fixture("kill-enginecore_stream_tail.txt"));
        let text = String::from_utf8_lossy(&tail).to_string();
        // The capture starts mid-event: keep from the first whole event on.
        let first = text.find("data: ").unwrap();
        let body = &tail[first..];
        let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
        let mut out = Vec::new();
        for c in body.chunks(7) {
            match g.on_body(c, false) {
                Step::Release(b) | Step::Forward(b) => out.extend(b),
                Step::Hold => {}
                Step::Fail(r) => panic!("{r:?}"),
            }
        }
        assert!(g.is_released());
        assert!(g.post_release_error().unwrap().starts_with("EngineCore"));
        assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn upstream_death_after_release_truncates_between_events() {
        let body = fixture("sse-chat.txt");
        // The upstream dies 10 bytes into some event: no end_of_stream ever comes.
        let cut = body.len() / 2;
        let (rel, fwd, _) = run(Mode::Sse, &[&body[..cut / 2], &body[cut / 2..cut]], false);
        let mut out = rel.unwrap();
        out.extend(fwd);
        assert!(out.ends_with(b"\n\n"));
        assert!(body.starts_with(&out));
        assert!(out.len() <= cut && out.len() + 400 > cut);
    }

    #[test]
    fn non_streaming_json_is_held_to_the_end() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}]}"#;
        let mut g = Guard::new(mode_for(200, Some("application/json")), 1024);
        assert_eq!(g.on_body(&body[..10], false), Step::Hold);
        assert_eq!(g.on_body(&body[10..], true), Step::Release(body.to_vec()));
    }

    #[test]
    fn released_stream_chunks_on_event_boundaries_pass_untouched() {
        let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
        assert!(!g.passes_untouched(b"data: x\n\n", false), "not before release");
        assert!(matches!(g.on_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false), Step::Release(_)));
        assert!(g.passes_untouched(b"data: {\"choices\":[{\"text\":\"b\"}]}\n\n", false));
        assert!(g.passes_untouched(b"data: b\r\n\r\n", false));
        assert!(!g.passes_untouched(b"data: b\n", false), "ends inside an event");
        assert!(!g.passes_untouched(b"data: {\"error\":{}}\n\n", false), "an error event is looked at");
        assert!(g.passes_untouched(b"", true));
        // Part of an event held: the next chunk completes it, so on_body must see it.
        assert_eq!(g.on_body(b"data: {\"choices\"", false), Step::Forward(vec![]));
        assert!(!g.passes_untouched(b":[]}\n\n", false));
        assert!(!g.passes_untouched(b"", true));
        let w = Guard::new(Mode::Whole, 10);
        assert!(!w.passes_untouched(b"x\n\n", false));
    }

    #[test]
    fn modes_from_status_and_content_type() {
        assert_eq!(mode_for(200, Some("text/event-stream; charset=utf-8")), Mode::Sse);
        assert_eq!(mode_for(200, Some("application/json")), Mode::Whole);
        assert_eq!(mode_for(200, None), Mode::Whole);
        assert_eq!(mode_for(400, Some("application/json")), Mode::Pass);
        assert_eq!(mode_for(503, Some("text/event-stream")), Mode::Pass);
    }

    const ROLE: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";

    #[test]
    fn done_or_clean_end_without_output_fails() {
        // vLLM 0.26 after SIGTERM, to a request still queued: role event, then `[DONE]`.
        let (rel, _, fail) = run(Mode::Sse, &[ROLE, b"data: [DONE]\n\n"], false);
        assert!(rel.is_none());
        assert_eq!(fail, Some(FailReason::EndedWithoutOutput));
        // ... or the connection's clean end right after the role event.
        let (rel, _, fail) = run(Mode::Sse, &[ROLE], true);
        assert!(rel.is_none());
        assert_eq!(fail.as_ref().map(FailReason::label).as_deref(), Some("ended_without_output"));
        let (rel, _, fail) = run(Mode::Sse, &[b"", b""], true);
        assert!(rel.is_none() && fail == Some(FailReason::EndedWithoutOutput));
    }

    #[test]
    fn abort_or_error_finish_before_output_fails_after_output_passes() {
        let abort = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"abort\"}]}\n\n";
        let (rel, _, fail) = run(Mode::Sse, &[ROLE, abort, b"data: [DONE]\n\n"], true);
        assert!(rel.is_none());
        assert_eq!(fail, Some(FailReason::Aborted("abort".into())));
        assert_eq!(FailReason::Aborted("abort".into()).label(), "finish_reason_abort");
        let err = b"data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"error\"}]}\n\n";
        assert_eq!(classify_event(err), EventKind::Aborted("error".into()));
        // After the first token an abort is the worker's own clean end: passed on as it is.
        let tok = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n";
        let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
        assert!(matches!(g.on_body(&[ROLE, tok].concat(), false), Step::Release(_)));
        assert_eq!(g.on_body(abort, false), Step::Forward(abort.to_vec()));
        // A model that finished with nothing to say is an answer, not a failure.
        let stop = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        let (rel, _, fail) = run(Mode::Sse, &[ROLE, stop, b"data: [DONE]\n\n"], true);
        assert!(fail.is_none() && rel.is_some());
        // An aborted choice beside one with output: the output wins (it must reach the client).
        let mixed = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"abort\"},{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\n";
        assert_eq!(classify_event(mixed), EventKind::Output);
    }

    #[test]
    fn whole_body_aborted_fails_answers_pass() {
        let aborted = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""},"finish_reason":"abort"}]}"#;
        let (rel, _, fail) = run(Mode::Whole, &[&aborted[..10], &aborted[10..]], true);
        assert!(rel.is_none());
        assert_eq!(fail, Some(FailReason::Aborted("abort".into())));
        let partial = br#"{"choices":[{"index":0,"text":"some","finish_reason":"abort"}]}"#;
        assert_eq!(whole_body_aborted(partial), None);
        let done = br#"{"choices":[{"index":0,"message":{"content":"error"},"finish_reason":"stop"}]}"#;
        assert_eq!(whole_body_aborted(done), None);
        let (rel, _, fail) = run(Mode::Whole, &[done], true);
        assert!(fail.is_none() && rel.is_some());
        assert_eq!(whole_body_aborted(b"\"abort\" not json"), None);
        assert_eq!(whole_body_aborted(br#"{"choices":[]}"#), None);
    }

    #[test]
    fn overflow_releases() {
        let mut g = Guard::new(Mode::Sse, 64);
        let ev = b"data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n";
        assert_eq!(g.on_body(ev, false), Step::Hold);
        match g.on_body(ev, false) {
            Step::Release(b) => assert_eq!(b.len(), 2 * ev.len()),
            s => panic!("{s:?}"),
        }
        assert!(g.overflowed());
    }

    #[test]
    fn crlf_events_and_tool_calls_and_reasoning() {
        let ev = b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\r\n\r\n";
        assert_eq!(next_event_end(ev, 0), Some(ev.len()));
        assert_eq!(classify_event(ev), EventKind::Output);
        assert_eq!(classify_event(b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n"), EventKind::Output);
        assert_eq!(classify_event(b"data: {\"choices\":[],\"usage\":{}}\n\n"), EventKind::Other);
        assert_eq!(classify_event(b": keepalive\n\n"), EventKind::Other);
    }

    fn split_points(len: usize) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..=len, 0..12).prop_map(move |mut v| {
            v.push(0);
            v.push(len);
            v.sort_unstable();
            v.dedup();
            v
        })
    }

    fn outcome(mode: Mode, body: &[u8], cuts: &[usize], eos: bool) -> (Vec<u8>, Vec<u8>, Option<FailReason>, bool) {
        let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &body[w[0]..w[1]]).collect();
        let mut g = Guard::new(mode, DEFAULT_MAX_HELD_BYTES);
        let (mut rel, mut fwd, mut fail) = (None, Vec::new(), None);
        for (i, c) in chunks.iter().enumerate() {
            match g.on_body(c, eos && i + 1 == chunks.len()) {
                Step::Release(b) => rel = Some(b),
                Step::Forward(b) => {
                    if !(eos && i + 1 == chunks.len()) {
                        // Whole events only, except at a clean end.
                        assert!(b.is_empty() || b.ends_with(b"\n\n"));
                    }
                    fwd.extend(b)
                }
                Step::Hold => {}
                Step::Fail(r) => fail = Some(r),
            }
        }
        let rel = rel.unwrap_or_default();
        // Whatever the split, the release never comes before the first output event is whole.
        if let Some(first) = first_output_end(body) {
            assert!(!g.is_released() || rel.len() >= first || fail.is_some());
        }
        ([rel, fwd].concat(), Vec::new(), fail, g.is_released())
    }

    fn first_output_end(body: &[u8]) -> Option<usize> {
        let mut from = 0;
        while let Some(end) = next_event_end(body, from) {
            if matches!(classify_event(&body[from..end]), EventKind::Output) {
                return Some(end);
            }
            from = end;
        }
        None
    }

    proptest! {
        /// However the upstream splits its bytes, the guard releases at the same event and
        /// hands on the same bytes.
        /// After release, forwarding the chunks `passes_untouched` allows as they are (their
        /// tail only) gives the client the same bytes as feeding every chunk to `on_body`, and
        /// the guard ends in the same state (held bytes, noted error).
        #[test]
        fn untouched_chunks_change_nothing(
            parts in proptest::collection::vec(0usize..8, 0..60), cuts in proptest::collection::vec(0usize..200, 0..12), eos: bool,
        ) {
            let atoms: [&[u8]; 8] = [b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}", b"\n", b"\r", b"\r\n", b"\n\n",
                b"data: {\"error\":{\"message\":\"boom\"}}", b"data: [DONE]", b": c"];
            let first: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
            let mut body = first.to_vec();
            for p in &parts {
                body.extend_from_slice(atoms[*p]);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| first.len() + c.min(body.len() - first.len())).collect();
            cuts.push(first.len());
            cuts.push(body.len());
            cuts.sort_unstable();
            cuts.dedup();
            let run = |fast: bool| {
                let mut g = Guard::new(Mode::Sse, DEFAULT_MAX_HELD_BYTES);
                let mut out = Vec::new();
                let mut from = 0;
                let mut untouched = 0;
                for (i, &to) in cuts.iter().enumerate() {
                    let chunk = &body[from..to];
                    let last = i + 1 == cuts.len() && eos;
                    let tail = &chunk[chunk.len().saturating_sub(TAIL_PEEK_BYTES)..];
                    if fast && g.passes_untouched(tail, last) {
                        out.extend_from_slice(chunk);
                        untouched += 1;
                    } else {
                        match g.on_body(chunk, last) {
                            Step::Release(b) | Step::Forward(b) => out.extend_from_slice(&b),
                            other => panic!("{other:?}"),
                        }
                    }
                    from = to;
                }
                (out, g.held(), g.post_release_error().map(str::to_string), untouched)
            };
            let slow = run(false);
            let fast = run(true);
            prop_assert_eq!((&slow.0, slow.1, &slow.2), (&fast.0, fast.1, &fast.2));
        }

        #[test]
        fn chat_split_anywhere_same_output(cuts in split_points(fixture("sse-chat.txt").len()), eos: bool) {
            let body = fixture("sse-chat.txt");
            let whole = outcome(Mode::Sse, &body, &[0, body.len()], eos);
            let split = outcome(Mode::Sse, &body, &cuts, eos);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn error_stream_split_anywhere_same_output(cuts in split_points(300)) {
            let mut body = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n".to_vec();
            body.extend_from_slice(b"data: {\"error\": {\"message\": \"EngineCore encountered an issue.\", \"type\": \"InternalServerError\", \"code\": 500}}\n\ndata: [DONE]\n\n");
            let cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            let mut cuts = cuts; cuts.push(body.len()); cuts.sort_unstable(); cuts.dedup();
            let (rel, fwd, fail, released) = outcome(Mode::Sse, &body, &cuts, true);
            prop_assert!(rel.is_empty() && fwd.is_empty() && !released);
            prop_assert!(matches!(fail, Some(FailReason::SseError(_))));
        }

        /// Released + forwarded bytes are always a prefix of the input that ends on an event
        /// boundary (or is all of it at a clean end).
        #[test]
        fn output_is_whole_event_prefix(cuts in split_points(fixture("sse-completions.txt").len())) {
            let body = fixture("sse-completions.txt");
            let (rel, fwd, _, _) = outcome(Mode::Sse, &body, &cuts, false);
            let out = [rel, fwd].concat();
            prop_assert!(body.starts_with(&out));
            prop_assert!(out.is_empty() || out.ends_with(b"\n\n"));
        }
    }
}
