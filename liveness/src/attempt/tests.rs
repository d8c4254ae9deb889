#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;

const CFG: AttemptConfig = AttemptConfig { max_held_bytes: 4096, retry_status: 503 };
const CHAT: &str = "/v1/chat/completions";
const ROLE: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
const TOKEN: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
const ENGINE_DEAD: &[u8] = b"data: {\"error\": {\"message\": \"EngineCore encountered an issue.\", \"type\": \"InternalServerError\", \"code\": 500}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

/// What the client saw of one attempt, and what the attempt said about itself.
#[derive(Debug, Default)]
struct Seen {
    client: Vec<u8>,
    headers_released: bool,
    failed_with: Option<u16>,
    charges: Vec<Charge>,
    reports: Vec<Report>,
}

/// Drives an attempt like the Envoy glue does, recording what would reach the client.
struct Driver {
    a: Attempt,
    seen: Seen,
    held_headers: bool,
    /// Drive it like the native host: after a body chunk, when the attempt says
    /// [`Attempt::passes_clean_chunks`], the next chunks that do not end the stream and have a
    /// clean tail pass without it.
    host_checks: bool,
    armed: bool,
    /// Chunks the host passed without the attempt.
    host_passed: usize,
    /// Chunks that came after the first bytes went to the client.
    after_release: usize,
}

impl Driver {
    fn new(path: &str) -> Self {
        Driver { a: Attempt::new(CFG, path), seen: Seen::default(), held_headers: false, host_checks: false, armed: false, host_passed: 0, after_release: 0 }
    }

    fn checking_host(path: &str) -> Self {
        Driver { host_checks: true, ..Driver::new(path) }
    }

    fn charges(&mut self) {
        while let Some(c) = self.a.take_charge() {
            self.seen.charges.push(c);
        }
    }

    fn headers(&mut self, status: u16, ct: &str, eos: bool) {
        self.coded_headers(status, ct, None, eos);
    }

    fn coded_headers(&mut self, status: u16, ct: &str, coding: Option<&str>, eos: bool) {
        match self.a.on_response_headers(status, Some(ct), coding, eos) {
            HeadersAction::Continue { .. } => self.seen.headers_released |= !self.held_headers,
            HeadersAction::Hold => self.held_headers = true,
            // The router retries it; the client sees none of this attempt.
            HeadersAction::Fail { status } => self.seen.failed_with = Some(status),
        }
        self.charges();
    }

    fn body(&mut self, chunk: &[u8], eos: bool) {
        self.after_release += usize::from(self.seen.headers_released);
        let tail = &chunk[chunk.len().saturating_sub(TAIL_PEEK_BYTES)..];
        if self.armed && !eos && crate::sse::clean_tail(tail) {
            // What the attempt would have answered, and that it would not have changed.
            let mut a = self.a.clone();
            let before = format!("{a:?}");
            let answer = match a.reads() {
                Read::Nothing => a.on_body(Chunk::Unread, eos),
                Read::Tail if chunk.len() > TAIL_PEEK_BYTES => a.on_body(Chunk::Tail(tail), eos),
                _ => a.on_body(Chunk::All(chunk), eos),
            };
            assert_eq!(answer, BodyAction::Pass, "a clean chunk the host passed");
            assert_eq!(format!("{a:?}"), before, "the attempt changed on a chunk the host passed");
            assert_eq!(a.take_charge(), None);
            self.host_passed += 1;
            self.seen.client.extend_from_slice(chunk);
            return;
        }
        let action = match self.a.reads() {
            Read::Nothing => self.a.on_body(Chunk::Unread, eos),
            Read::Tail if chunk.len() > TAIL_PEEK_BYTES => match self.a.on_body(Chunk::Tail(&chunk[chunk.len() - TAIL_PEEK_BYTES..]), eos) {
                BodyAction::NeedAll => self.a.on_body(Chunk::All(chunk), eos),
                a => a,
            },
            _ => self.a.on_body(Chunk::All(chunk), eos),
        };
        match action {
            BodyAction::Pass => {
                if self.held_headers && !self.seen.headers_released {
                    panic!("a chunk passed while the headers were held");
                }
                self.seen.client.extend_from_slice(chunk)
            }
            BodyAction::NeedAll => panic!("NeedAll for a whole chunk"),
            BodyAction::Hold => {}
            BodyAction::Emit(b) => {
                self.seen.headers_released = true;
                self.seen.client.extend_from_slice(&b);
            }
            BodyAction::Fail { status, body } => {
                // The router retries it: the client sees none of it (unless it is the last
                // attempt, when it sees this error, never the worker's bytes).
                self.seen.failed_with = Some(status);
                assert!(String::from_utf8_lossy(&body).contains("before the first token"));
            }
            BodyAction::Drop => {}
        }
        self.charges();
        self.armed = self.host_checks && self.a.passes_clean_chunks();
    }

    fn done(&mut self, ending: Ending) {
        if !self.a.needs_ending() {
            // The glue then passes `Ending::default()`: every ending must give the same answer.
            let endings = [(false, false), (true, false), (false, true), (true, true)];
            let answers: Vec<_> = endings
                .iter()
                .map(|&(c, t)| {
                    let mut a = self.a.clone();
                    let r = a.on_done(Ending { client_went_away: c, timed_out: t });
                    (r, a.take_charge())
                })
                .collect();
            assert!(answers.windows(2).all(|w| w[0] == w[1]), "needs_ending() false, yet the ending changes the answer: {answers:?}");
        }
        if let Some(r) = self.a.on_done(ending) {
            self.seen.reports.push(r);
        }
        self.charges();
    }
}

fn run(path: &str, status: u16, ct: &str, chunks: &[&[u8]], eos: bool, ending: Ending) -> Seen {
    let mut d = Driver::new(path);
    d.headers(status, ct, false);
    for (i, c) in chunks.iter().enumerate() {
        d.body(c, eos && i + 1 == chunks.len());
    }
    d.done(ending);
    d.done(ending);
    d.seen
}

const SSE: &str = "text/event-stream; charset=utf-8";

#[test]
fn served_stream() {
    let s = run(CHAT, 200, SSE, &[ROLE, TOKEN, DONE], true, Ending::default());
    assert_eq!(s.client, [ROLE, TOKEN, DONE].concat());
    assert_eq!(s.charges, vec![Charge::Success]);
    assert_eq!(s.reports.len(), 1);
    assert_eq!(s.reports[0].outcome, Outcome::Served);
    assert!(s.reports[0].released);
}

#[test]
fn engine_death_before_first_token_fails_and_charges() {
    let s = run(CHAT, 200, SSE, &[ROLE, ENGINE_DEAD, DONE], true, Ending::default());
    assert!(s.client.is_empty());
    assert_eq!(s.failed_with, Some(503));
    assert!(matches!(&s.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::SseError(_))));
    assert!(matches!(&s.charges[..], [Charge::Failure(FailReason::SseError(_))]));
}

#[test]
fn reset_before_headers_and_timeout() {
    let mut d = Driver::new(CHAT);
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::ResetBeforeHeaders));
    assert_eq!(d.seen.charges, vec![Charge::Failure(FailReason::ResetBeforeHeaders)]);
    let mut d = Driver::new(CHAT);
    d.headers(200, SSE, false);
    d.body(ROLE, false);
    d.done(Ending { timed_out: true, client_went_away: false });
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::Timeout));
    let mut d = Driver::new(CHAT);
    d.headers(200, SSE, false);
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::ResetBeforeFirstToken));
}

#[test]
fn truncation_after_first_token() {
    let s = run(CHAT, 200, SSE, &[ROLE, TOKEN, &TOKEN[..10]], false, Ending::default());
    assert_eq!(s.client, [ROLE, TOKEN].concat(), "the partial event never reaches the client");
    assert_eq!(s.reports[0].outcome, Outcome::Truncated);
    assert_eq!(s.charges, vec![Charge::Success]);
}

#[test]
fn an_error_event_on_the_stream_s_last_chunk_is_reported() {
    // An HTTP/2 or length-delimited upstream ends the stream on the chunk that carries the event;
    // HTTP/1 chunked ends it with an empty chunk. A short chunk is read whole, a long one by its
    // tail first, and either way the host checks its tail.
    let long = [TOKEN.repeat(12), ENGINE_DEAD.to_vec(), DONE.to_vec()].concat();
    assert!(long.len() > TAIL_PEEK_BYTES);
    for last in [[ENGINE_DEAD, DONE].concat(), long] {
        for host_checks in [false, true] {
            let mut d = if host_checks { Driver::checking_host(CHAT) } else { Driver::new(CHAT) };
            d.headers(200, SSE, false);
            d.body(ROLE, false);
            d.body(TOKEN, false);
            d.body(&last, true);
            d.done(Ending::default());
            assert_eq!(d.seen.client, [ROLE, TOKEN, &last].concat());
            assert_eq!(d.seen.reports[0].outcome, Outcome::Served);
            assert!(d.seen.reports[0].post_token_error, "{} bytes, host checks {host_checks}", last.len());
        }
    }
}

#[test]
fn a_stream_that_ends_with_its_headers_is_retried() {
    // HTTP/2 HEADERS with END_STREAM, or `content-length: 0`: no event, no output. Framed as
    // headers and an empty last chunk it is the same failure.
    for empty_chunk in [false, true] {
        let mut d = Driver::new(CHAT);
        if empty_chunk {
            d.headers(200, SSE, false);
            d.body(b"", true);
        } else {
            d.headers(200, SSE, true);
        }
        d.done(Ending::default());
        assert_eq!(d.seen.failed_with, Some(503), "empty chunk {empty_chunk}");
        assert!(!d.seen.headers_released && d.seen.client.is_empty());
        assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::EndedWithoutOutput));
        assert_eq!(d.seen.charges, vec![Charge::Failure(FailReason::EndedWithoutOutput)]);
    }
    // An empty json answer and an unknown path's empty stream pass, as before.
    for (path, ct) in [(CHAT, "application/json"), ("/v1/whatever", SSE)] {
        let mut d = Driver::new(path);
        d.headers(200, ct, true);
        d.done(Ending::default());
        assert_eq!(d.seen.failed_with, None, "{path} {ct}");
        assert_eq!(d.seen.reports[0].outcome, Outcome::Passed { status: 200 });
    }
}

#[test]
fn a_coded_stream_passes_unjudged() {
    // gzip'd events cannot be read: judged, they would end "without output" and be retried on
    // every worker. Passed through whole, as any format the guard does not know.
    let gz: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00\x43\xbf\xa6\xa3\x02\x00\x00\x00";
    let mut d = Driver::new(CHAT);
    d.coded_headers(200, SSE, Some("gzip"), false);
    d.body(gz, false);
    d.body(b"", true);
    d.done(Ending::default());
    assert_eq!(d.seen.client, gz);
    assert_eq!(d.seen.failed_with, None);
    assert_eq!(d.seen.reports[0].outcome, Outcome::Passed { status: 200 });
    assert!(!d.seen.charges.iter().any(|c| matches!(c, Charge::Failure(_))));
}

#[test]
fn client_cancels_charge_nothing() {
    let gone = Ending { client_went_away: true, timed_out: false };
    let s = run(CHAT, 200, SSE, &[ROLE], false, gone);
    assert_eq!(s.reports[0].outcome, Outcome::ClientCancelled { after_release: false });
    assert_eq!(s.charges, vec![Charge::Nothing]);
    let mut d = Driver::new(CHAT);
    d.done(gone);
    assert_eq!(d.seen.charges, vec![Charge::Nothing]);
    let s = run(CHAT, 200, SSE, &[ROLE, TOKEN], false, gone);
    assert_eq!(s.reports[0].outcome, Outcome::ClientCancelled { after_release: true });
    assert_eq!(s.charges, vec![Charge::Success], "the worker did produce its first token");
}

#[test]
fn worker_5xx_passes_whole_and_charges_known_apis_only() {
    let s = run(CHAT, 500, "application/json", &[b"{\"error\":{}}"], true, Ending::default());
    assert_eq!(s.client, b"{\"error\":{}}", "the last attempt's 5xx reaches the client whole");
    assert_eq!(s.charges, vec![Charge::Failure(FailReason::Status(500))]);
    let s = run("/v1/embeddings", 500, "application/json", &[b"{}"], true, Ending::default());
    assert_eq!(s.charges, vec![Charge::Nothing]);
    assert_eq!(s.reports[0].outcome, Outcome::Passed { status: 500 });
}

/// The Responses API's stream (vLLM 0.32, recorded): judged in its own dialect, released at
/// its first output delta, and never a failure (it was, before: `ended_without_output`).
#[test]
fn responses_stream_is_served() {
    let raw = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/sse-responses.txt")).unwrap();
    let body = &raw[raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    for cut in 0..body.len() {
        let s = run("/v1/responses", 200, SSE, &[&body[..cut], &body[cut..]], true, Ending::default());
        assert_eq!(s.client, body, "cut at {cut}");
        assert_eq!(s.charges, vec![Charge::Success]);
        assert_eq!(s.reports[0].outcome, Outcome::Served);
    }
    // The same bytes on an unknown path: passed through untouched, not judged.
    let s = run("/v1/whatever", 200, SSE, &[body], true, Ending::default());
    assert_eq!(s.client, body);
    assert_eq!(s.reports[0].outcome, Outcome::Passed { status: 200 });
}

/// A capture's status, content type and body: the raw HTTP head when it kept one, else a
/// 200 of `default_ct`.
fn capture(file: &str, default_ct: &str) -> (u16, String, Vec<u8>) {
    let raw = std::fs::read(format!("{}/../tests/data/vllm-0.32.0-cpu/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    if !raw.starts_with(b"HTTP/") {
        return (200, default_ct.to_string(), raw);
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let ct = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string)).unwrap_or_default();
    (status, ct, raw[end + 4..].to_vec())
}

/// Every recorded vLLM answer (tests/data/vllm-0.32.0-cpu, `deploy/vllm/capture.py`), split at
/// every byte: the chat, completions and Responses answers (streams and JSON) are judged and
/// served whole; what the guard does not judge (models, tokenize, embeddings) passes
/// untouched (the worker answered: a success for its breaker, whatever the status); vLLM's
/// 4xx answers to chat (a bad request, an unknown model) reach the client whole and are
/// charged to nobody.
#[test]
fn recorded_answers_split_at_every_byte() {
    for (file, path, judged) in [
        ("sse-chat.txt", CHAT, true),
        ("sse-chat-usage.txt", CHAT, true),
        ("json-chat.txt", CHAT, true),
        ("json-chat-n2-logprobs.txt", CHAT, true),
        ("sse-completions.txt", "/v1/completions", true),
        ("json-completions.txt", "/v1/completions", true),
        ("sse-responses.txt", "/v1/responses", true),
        ("json-responses.txt", "/v1/responses", true),
        ("tokenize.txt", "/tokenize", false),
        ("detokenize.txt", "/detokenize", false),
        ("json-models.txt", "/v1/models", false),
        ("json-embeddings-float.txt", "/v1/embeddings", false),
        ("json-embeddings-base64.txt", "/v1/embeddings", false),
        ("error-embeddings.txt", "/v1/embeddings", false),
        ("error-transcription.txt", "/v1/audio/transcriptions", false),
        ("error-chat-bad-request.txt", CHAT, false),
        ("error-chat-unknown-model.txt", CHAT, false),
    ] {
        let (status, ct, body) = capture(file, SSE);
        // Every byte of the small captures; the 43 kB chat stream at every byte of its first
        // 2 kB (where the first token is) and every 97th after (its random splits are the
        // guard's property tests).
        let cuts = (0..=body.len()).filter(|c| body.len() <= 8_192 || *c <= 2_048 || c % 97 == 0);
        for cut in cuts {
            let s = run(path, status, &ct, &[&body[..cut], &body[cut..]], true, Ending::default());
            assert_eq!(s.client, body, "{file} cut at {cut}");
            let (want, charge) = match (judged, status) {
                (true, 200) => (Outcome::Served, Charge::Success),
                (false, _) => (Outcome::Passed { status }, Charge::Success),
                _ => (Outcome::Passed { status }, Charge::Nothing),
            };
            assert_eq!(s.reports[0].outcome, want, "{file} cut at {cut}");
            assert_eq!(s.charges, vec![charge], "{file} cut at {cut}");
        }
    }
}

#[test]
fn responses_failure_before_output_fails() {
    let created = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{}}\n\n";
    let failed = b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"error\":{\"message\":\"engine dead\"}}}\n\n";
    let s = run("/v1/responses", 200, SSE, &[created, failed], true, Ending::default());
    assert!(s.client.is_empty());
    assert_eq!(s.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::SseError("engine dead".into())));
    // Created, then the end: no output.
    let s = run("/v1/responses", 200, SSE, &[created], true, Ending::default());
    assert_eq!(s.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::EndedWithoutOutput));
}

#[test]
fn unknown_formats_pass_untouched() {
    for (path, ct) in [("/v1/embeddings", "application/json"), ("/tokenize", "application/json"), ("/v1/audio/transcriptions", "text/event-stream"), (CHAT, "application/octet-stream")] {
        let s = run(path, 200, ct, &[b"{\"x\":", b"1}"], true, Ending::default());
        assert_eq!(s.client, b"{\"x\":1}");
        assert_eq!(s.charges, vec![Charge::Success]);
        assert_eq!(s.reports[0].outcome, Outcome::Passed { status: 200 });
    }
}

#[test]
fn rescue_rules() {
    let cfg = RescueConfig::default();
    assert_eq!(shows_no_life(Some(3_000), true, 100, &cfg), None, "fresh");
    assert_eq!(shows_no_life(Some(3_001), true, 100, &cfg), Some(1));
    assert_eq!(shows_no_life(Some(3_001), false, 100, &cfg), None, "silent, not stalled: not rescued");
    assert_eq!(shows_no_life(None, true, 100, &cfg), None, "unknown worker: fail open");
    assert_eq!(shows_no_life(Some(60_000), true, 3_001, &cfg), None, "a stale view (dnsd unreachable) judges nobody");
    assert_eq!(shows_no_life(Some(15_000), true, 100, &cfg), Some(12_000), "how long past the gate, as the view says");
    let mut clock = StallClock::default();
    assert_eq!(clock.observe("a:1", None, 1_000), None);
    assert_eq!(clock.observe("a:1", Some(1), 2_000), Some(1));
    assert_eq!(clock.observe("a:1", Some(1), 12_000), Some(10_001), "this thread's clock counts on from the first sight");
    assert_eq!(clock.observe("a:1", None, 12_500), None, "alive again: the clock starts over");
    assert_eq!(clock.observe("a:1", Some(1), 13_000), Some(1));
    clock.retain(|_| false);
    assert_eq!(clock.observe("a:1", Some(1), 20_000), Some(1));
    // First seen late (its /metrics unanswered meanwhile): the view's lower bound counts.
    assert_eq!(clock.observe("b:1", Some(12_000), 30_000), Some(12_000));
    assert_eq!(clock.observe("b:1", Some(12_000), 30_500), Some(12_500), "a step the view has not moved past yet");
    assert_eq!(clock.observe("b:1", Some(17_000), 31_000), Some(17_000), "the view's next step, when it says more");
    assert_eq!(rescue(true, false, None, &cfg), None);
    assert_eq!(rescue(true, false, Some(1_999), &cfg), None, "held: not before the stall has lasted its margin");
    assert_eq!(rescue(true, false, Some(2_000), &cfg), Some(Rescue::RetryNow), "held: retried then, not after the per-try budget");
    assert_eq!(rescue(false, true, Some(9_999), &cfg), None, "released: the stream gets its bound");
    assert_eq!(rescue(false, true, Some(10_000), &cfg), Some(Rescue::EndStream));
    assert_eq!(rescue(false, false, Some(60_000), &cfg), None, "answered, rewritten or over: nothing to do");
}

#[test]
fn a_request_the_engine_never_sees_is_invisible() {
    let cfg = RescueConfig::default();
    // Held since t=0; at t=2.5 s a frame taken at t=1.2 s shows an idle engine: invisible.
    assert!(invisible_to_engine(0, 2_500, 1_200, true, true, false, &cfg));
    assert!(!invisible_to_engine(0, 2_499, 1_200, true, true, false, &cfg), "not held long enough");
    assert!(!invisible_to_engine(0, 3_000, 900, true, true, false, &cfg), "the frame predates the request showing");
    assert!(!invisible_to_engine(0, 60_000, 50_000, false, true, false, &cfg), "the engine counts work: a long prefill, not a hang");
    assert!(!invisible_to_engine(0, 60_000, 50_000, true, false, false, &cfg), "a fresh engine's first step shows nothing until it ends: not judged");
    // Sent at t=0, no headers yet: the API server may still prepare it (fetches, tokenization),
    // which no engine number shows; the rule waits longer for it.
    assert!(!invisible_to_engine(0, 29_999, 29_000, true, true, true, &cfg), "no headers: not before the longer bound");
    assert!(invisible_to_engine(0, 30_000, 29_000, true, true, true, &cfg));
    assert!(!invisible_to_engine(0, 60_000, 50_000, false, true, true, &cfg), "no headers, the engine counts work: not judged");
}

#[test]
fn a_held_attempt_on_a_stalled_worker_is_retried_now() {
    let mut d = Driver::new(CHAT);
    d.headers(200, SSE, false);
    d.body(ROLE, false);
    assert!(d.a.is_held());
    let (status, body) = d.a.on_worker_stalled(Rescue::RetryNow).unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("worker_stalled"));
    d.charges();
    assert_eq!(d.seen.charges, vec![Charge::Nothing], "a stall is judged by freshness, not charged to the breaker");
    // Whatever the hung worker still sends is dropped.
    d.body(TOKEN, false);
    assert!(d.seen.client.is_empty());
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::WorkerStalled));
    assert_eq!(d.seen.reports[0].rescued, Some(Rescue::RetryNow));
    assert_eq!(d.a.on_worker_stalled(Rescue::RetryNow), None, "once");
}

#[test]
fn the_last_attempt_is_known_from_envoys_count_and_the_pickers_allowance() {
    assert!(is_last_attempt(Some("3"), Some("3")));
    assert!(is_last_attempt(Some("1"), Some("1")));
    assert!(is_last_attempt(Some(" 4 "), Some("3")), "past the allowance (route retries): still the last");
    assert!(!is_last_attempt(Some("2"), Some("3")));
    // Unknown is not the last: the router's retries stay in charge.
    for (count, allowed) in [(None, Some("1")), (Some("1"), None), (None, None), (Some("x"), Some("1")), (Some("1"), Some("")), (Some("1"), Some("0")), (Some("-1"), Some("1"))] {
        assert!(!is_last_attempt(count, allowed), "{count:?} of {allowed:?}");
    }
}

#[test]
fn an_attempt_whose_headers_never_came_is_answered_on_a_stalled_worker() {
    // An answer that does not stream: its worker sends headers only with the whole answer.
    let mut d = Driver::new(CHAT);
    assert!(d.a.awaits_headers() && d.a.before_first_token() && !d.a.is_held());
    let (status, body) = d.a.on_worker_stalled(Rescue::RetryNow).unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("worker_stalled"));
    assert!(!d.a.awaits_headers() && !d.a.before_first_token(), "answered: not rescued twice");
    assert_eq!(d.a.on_worker_stalled(Rescue::RetryNow), None, "once");
    d.charges();
    assert_eq!(d.seen.charges, vec![Charge::Nothing], "a stall is judged by freshness, not charged");
    // The guard's own answer (headers, no body) comes back through it and passes; a body can
    // only be the worker's, and none of it reaches the client.
    d.headers(503, "application/json", false);
    assert_eq!(d.seen.failed_with, None, "not rewritten again");
    assert!(d.seen.headers_released);
    d.body(TOKEN, true);
    assert!(d.seen.client.is_empty());
    assert!(!d.a.needs_ending());
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::WorkerStalled));
    assert_eq!(d.seen.reports[0].rescued, Some(Rescue::RetryNow));
    assert!(!d.seen.reports[0].released);
}

#[test]
fn an_unseen_attempt_the_glue_cannot_move_charges_its_worker_once_and_waits_on() {
    let mut d = Driver::new(CHAT);
    let c = d.a.charge_unseen();
    assert_eq!(c, Some(Charge::Failure(FailReason::UnseenByEngine)));
    assert_eq!(d.a.charge_unseen(), None, "once");
    assert!(d.a.awaits_headers(), "not rescued: it waits on");
    // The worker's own answer, if it comes, passes whole, and charges nothing more.
    d.headers(200, "application/json", false);
    d.body(b"{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}", true);
    assert!(String::from_utf8_lossy(&d.seen.client).contains("hi"));
    d.charges();
    assert!(d.seen.charges.is_empty(), "{:?}", d.seen.charges);
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].rescued, None);
    // Only an attempt awaiting its headers, with nothing charged yet.
    let mut held = Driver::new(CHAT);
    held.headers(200, SSE, false);
    assert_eq!(held.a.charge_unseen(), None, "held: the rescue applies");
}

#[test]
fn an_answer_the_glue_could_not_send_leaves_the_attempt_as_it_was() {
    let mut d = Driver::new(CHAT);
    assert!(d.a.on_worker_stalled(Rescue::RetryNow).is_some());
    d.a.answer_not_sent();
    assert!(d.a.awaits_headers(), "rescued again at a later tick, if the stall lasts");
    d.charges();
    assert!(d.seen.charges.is_empty(), "nothing charged for a rescue that did not happen");
    // The worker's own answer, when it comes, passes whole.
    d.headers(200, "application/json", false);
    d.body(b"{\"choices\":[{\"message\":{\"content\":\"hi\"}}]}", true);
    assert!(String::from_utf8_lossy(&d.seen.client).contains("hi"));
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].rescued, None);
    assert!(!matches!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(_)), "{:?}", d.seen.reports[0]);
}

#[test]
fn a_request_unseen_by_an_idle_engine_is_retried_and_charged() {
    let mut d = Driver::new(CHAT);
    d.headers(200, SSE, false);
    let (status, body) = d.a.on_worker_stalled(Rescue::RetryUnseen).unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("unseen_by_engine"));
    d.charges();
    assert_eq!(d.seen.charges, vec![Charge::Failure(FailReason::UnseenByEngine)]);
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::FailedBeforeFirstToken(FailReason::UnseenByEngine));
}

#[test]
fn a_released_stream_on_a_stalled_worker_ends_truncated() {
    let mut d = Driver::new(CHAT);
    d.headers(200, SSE, false);
    d.body(&[ROLE, TOKEN].concat(), false);
    assert_eq!(d.a.on_worker_stalled(Rescue::RetryNow), None, "past the first token: no retry");
    assert_eq!(d.a.on_worker_stalled(Rescue::EndStream), None);
    d.done(Ending::default());
    assert_eq!(d.seen.reports[0].outcome, Outcome::Truncated);
    assert_eq!(d.seen.reports[0].rescued, Some(Rescue::EndStream));
    assert_eq!(d.seen.charges, vec![Charge::Success]);
}

#[test]
fn an_attempt_that_used_its_budget_was_timed_out() {
    let reset = Ending::from_envoy(0, Some("upstream_reset_before_response_started{connection_termination}"));
    assert!(!reset.timed_out);
    assert!(!reset.after(120, Some(500)).timed_out, "a reset well inside the budget stays a reset");
    assert!(reset.after(500, Some(500)).timed_out);
    assert!(reset.after(480, Some(500)).timed_out, "clock rounding");
    assert!(!reset.after(10_000, None).timed_out, "no budget known: the flags decide");
    assert!(!reset.after(10_000, Some(0)).timed_out);
    let cancel = Ending::from_envoy(0x4000, None).after(500, Some(500));
    assert!(cancel.client_went_away && cancel.timed_out, "the client still went away");
    // Judged: a timeout may follow the request (noted), a reset is the worker's (charged).
    let mut a = Attempt::new(CFG, "/v1/chat/completions");
    let r = a.on_done(reset.after(500, Some(500))).unwrap();
    assert!(matches!(r.outcome, Outcome::FailedBeforeFirstToken(FailReason::Timeout)), "{:?}", r.outcome);
}

#[test]
fn ending_from_envoy_flags() {
    assert!(Ending::from_envoy(0x4000, None).client_went_away);
    assert!(Ending::from_envoy(0, Some("downstream_remote_disconnect")).client_went_away);
    assert!(!Ending::from_envoy(0x10, Some("upstream_reset_before_response_started")).client_went_away);
    assert!(Ending::from_envoy(0x4, None).timed_out);
    assert!(Ending::from_envoy(0, Some("upstream_per_try_timeout")).timed_out);
}

fn arb_body() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let atoms: Vec<&'static [u8]> = vec![ROLE, TOKEN, ENGINE_DEAD, DONE, b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"abort\"}]}\n\n", b"data: {\"cho", b"\n", b": ka\n\n"];
    (proptest::collection::vec(prop::sample::select(atoms), 0..4), prop::bool::weighted(0.1)).prop_map(|(a, e)| (a.concat(), e))
}

/// An attempt as Envoy can deliver it: maybe headers, then body chunks, cut off anywhere
/// (a reset, a timeout or the client leaving) or ended cleanly; then the end.
type Headers = (u16, &'static str, bool);
type Chunks = Vec<(Vec<u8>, bool)>;

fn arb_attempt() -> impl Strategy<Value = (Option<Headers>, Chunks, usize, Ending)> {
    (
        proptest::option::weighted(0.9, (prop::sample::select(vec![200u16, 200, 200, 400, 500, 503]), prop::sample::select(vec![SSE, "application/json", "text/plain"]), prop::bool::weighted(0.1))),
        proptest::collection::vec(arb_body(), 0..8),
        0usize..10,
        (any::<bool>(), any::<bool>()).prop_map(|(c, t)| Ending { client_went_away: c, timed_out: t }),
    )
}

/// Runs one attempt through `d`: its headers, its chunks up to `cut` (or the clean end), its
/// end. Also says whether the upstream ended it cleanly.
fn drive(mut d: Driver, headers: Option<Headers>, bodies: &[(Vec<u8>, bool)], cut: usize, ending: Ending) -> (Driver, bool) {
    let mut clean_end = false;
    if let Some((st, ct, eos)) = headers {
        d.headers(st, ct, eos);
        clean_end = eos;
        for (b, e) in bodies.iter().take(cut) {
            if clean_end {
                break;
            }
            d.body(b, *e);
            clean_end = *e;
        }
    }
    d.done(ending);
    (d, clean_end)
}

proptest! {
    /// Whatever the order of events (resets and client exits anywhere): exactly one report
    /// and exactly one charge; a failed attempt leaks no byte; after release only whole
    /// events reach the client (but at a clean end); a client cancel never charges a failure.
    #[test]
    fn one_report_one_charge_no_leak(path in prop::sample::select(vec![CHAT, "/v1/completions", "/v1/responses", "/v1/embeddings"]), (headers, bodies, cut, ending) in arb_attempt()) {
        let (mut d, clean_end) = drive(Driver::new(path), headers, &bodies, cut, ending);
        d.done(ending);
        let s = &d.seen;
        prop_assert_eq!(s.reports.len(), 1);
        prop_assert_eq!(s.charges.len(), 1);
        let r = &s.reports[0];
        prop_assert_eq!(&r.charge, &s.charges[0]);
        if let Outcome::FailedBeforeFirstToken(_) = r.outcome {
            if s.failed_with.is_some() || d.held_headers {
                prop_assert!(s.client.is_empty(), "a failed attempt leaked {:?}", String::from_utf8_lossy(&s.client));
            }
        }
        if d.held_headers && !clean_end && !s.client.is_empty() {
            prop_assert!(s.client.ends_with(b"\n\n"), "not a whole event: {:?}", String::from_utf8_lossy(&s.client));
        }
        if matches!(r.outcome, Outcome::ClientCancelled { .. }) {
            prop_assert!(!matches!(r.charge, Charge::Failure(_)));
        }
    }
}


/// A recorded vLLM stream cut into chunks at every event boundary and at `cuts` (offsets, any
/// order, taken modulo its length): most chunks are whole events, as vLLM sends them.
fn recorded_chunks(file: &str, cuts: &[usize]) -> (u16, String, Vec<(Vec<u8>, bool)>) {
    let (status, ct, body) = capture(file, SSE);
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.extend(body.windows(2).enumerate().filter(|(_, w)| *w == b"\n\n").map(|(i, _)| i + 2));
    at.extend([0, body.len()]);
    at.sort_unstable();
    at.dedup();
    let chunks: Vec<(Vec<u8>, bool)> = at.windows(2).map(|w| (body[w[0]..w[1]].to_vec(), w[1] == body.len())).collect();
    (status, ct, chunks)
}

/// A capture's content type as the `'static` str [`Headers`] holds.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

proptest! {
    /// A host that passes the chunks [`Attempt::passes_clean_chunks`] allows without the filter
    /// changes nothing: the client gets the same bytes, the breaker the same charge, the stats
    /// the same report, whatever the chunks, the cuts and the ending. (The driver also checks,
    /// on every chunk the host passes, that the attempt would have passed it unchanged.)
    #[test]
    fn host_passing_clean_chunks_changes_nothing(path in prop::sample::select(vec![CHAT, "/v1/completions", "/v1/responses", "/v1/embeddings"]), (headers, bodies, cut, ending) in arb_attempt()) {
        let (plain, _) = drive(Driver::new(path), headers, &bodies, cut, ending);
        let (host, _) = drive(Driver::checking_host(path), headers, &bodies, cut, ending);
        prop_assert_eq!(format!("{:?}", plain.seen), format!("{:?}", host.seen));
    }

    /// The same on vLLM's recorded streams, cut between events and at random places: and there
    /// the host passes most chunks after the first token itself.
    #[test]
    fn host_passing_clean_chunks_on_recorded_streams(file in prop::sample::select(vec!["sse-chat.txt", "sse-chat-usage.txt", "sse-completions.txt", "sse-responses.txt"]), cuts in proptest::collection::vec(0usize..50_000, 0..6), cut in 0usize..400, went_away in any::<bool>()) {
        let path = if file.contains("responses") { "/v1/responses" } else if file.contains("completions") { "/v1/completions" } else { CHAT };
        let (status, ct, chunks) = recorded_chunks(file, &cuts);
        let headers = Some((status, leak(ct), false));
        let ending = Ending { client_went_away: went_away, timed_out: false };
        let (plain, _) = drive(Driver::new(path), headers, &chunks, cut, ending);
        let (host, _) = drive(Driver::checking_host(path), headers, &chunks, cut, ending);
        prop_assert_eq!(format!("{:?}", plain.seen), format!("{:?}", host.seen));
        if cut >= chunks.len() {
            prop_assert_eq!(&host.seen.reports[0].outcome, &Outcome::Served);
            // After the first token the filter sees the last chunk, each chunk a random cut made
            // with the one after it, and each with an error word in it (one token of
            // `sse-chat.txt` is " error").
            let worded = chunks.iter().filter(|(c, _)| crate::sse::has_error_word(c)).count();
            prop_assert!(host.host_passed + 1 + 2 * cuts.len() + worded >= host.after_release, "the host passed only {} of {} chunks after the first token", host.host_passed, host.after_release);
        }
    }
}
