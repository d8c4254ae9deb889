#![allow(clippy::unwrap_used)]
use super::*;
use crate::output::{event_signal, whole_body_signal, Api, Signal};
use crate::sse::{next_event_end, parse_event};

fn classify_event(ev: &[u8]) -> Signal {
    event_signal(Api::Chat, &parse_event(ev))
}

fn whole_body_aborted(body: &[u8]) -> Option<String> {
    match whole_body_signal(Api::Chat, body) {
        Signal::Aborted(r) => Some(r),
        _ => None,
    }
}
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
                assert!(released.is_some() || mode != Mode::Sse(Api::Chat));
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
    let (rel, fwd, fail) = run(Mode::Sse(Api::Chat), &[&body], true);
    assert!(fail.is_none());
    // All in one chunk at a clean end: everything goes at release.
    assert_eq!(rel.unwrap(), body);
    assert!(fwd.is_empty());
    // Event by event: the role event (empty content) is held, the first " list" releases.
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
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
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
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
    let (rel, fwd, _) = run(Mode::Sse(Api::Chat), &[&body[..first_end + 3], &body[first_end + 3..]], true);
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
    let (rel, fwd, fail) = run(Mode::Sse(Api::Chat), &[role, &tail[err_at..]], true);
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
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
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
    let (rel, fwd, _) = run(Mode::Sse(Api::Chat), &[&body[..cut / 2], &body[cut / 2..cut]], false);
    let mut out = rel.unwrap();
    out.extend(fwd);
    assert!(out.ends_with(b"\n\n"));
    assert!(body.starts_with(&out));
    assert!(out.len() <= cut && out.len() + 400 > cut);
}

#[test]
fn non_streaming_json_is_held_to_the_end() {
    let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}]}"#;
    let mut g = Guard::new(mode_for(Some(Api::Chat), 200, Some("application/json"), None), 1024);
    assert_eq!(g.on_body(&body[..10], false), Step::Hold);
    assert_eq!(g.on_body(&body[10..], true), Step::Release(body.to_vec()));
}

#[test]
fn released_stream_chunks_on_event_boundaries_pass_untouched() {
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
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
    let w = Guard::new(Mode::Whole(Api::Chat), 10);
    assert!(!w.passes_untouched(b"x\n\n", false));
}

#[test]
fn an_error_event_on_the_last_chunk_is_noted() {
    // An HTTP/2 or length-delimited upstream ends the stream on the chunk that carries it.
    let err: &[u8] = b"data: {\"error\":{\"message\":\"EngineCore encountered an issue\"}}\n\ndata: [DONE]\n\n";
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
    assert!(matches!(g.on_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false), Step::Release(_)));
    assert!(!g.passes_untouched(err, true), "the last chunk's error is looked at");
    assert!(g.passes_untouched(b"data: [DONE]\n\n", true));
    assert_eq!(g.on_body(err, true), Step::Forward(err.to_vec()));
    assert!(g.post_release_error().unwrap().starts_with("EngineCore"));
    // A partial event at the end goes to the client as before, unread (a client drops it).
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
    assert!(matches!(g.on_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false), Step::Release(_)));
    assert_eq!(g.on_body(b"data: {\"error\":{\"message\":\"x\"}}\n", true), Step::Forward(b"data: {\"error\":{\"message\":\"x\"}}\n".to_vec()));
    assert_eq!(g.post_release_error(), None);
}

#[test]
fn modes_from_status_and_content_type() {
    let chat = Some(Api::Chat);
    assert_eq!(mode_for(chat, 200, Some("text/event-stream; charset=utf-8"), None), Mode::Sse(Api::Chat));
    assert_eq!(mode_for(Some(Api::Responses), 200, Some("text/event-stream"), None), Mode::Sse(Api::Responses));
    assert_eq!(mode_for(chat, 200, Some("application/json"), None), Mode::Whole(Api::Chat));
    assert_eq!(mode_for(chat, 200, None, None), Mode::Whole(Api::Chat));
    assert_eq!(mode_for(chat, 400, Some("application/json"), None), Mode::Pass);
    assert_eq!(mode_for(chat, 503, Some("text/event-stream"), None), Mode::Pass);
    // Unknown APIs and formats pass through, never judged.
    assert_eq!(mode_for(None, 200, Some("text/event-stream"), None), Mode::Pass);
    assert_eq!(mode_for(None, 200, Some("application/json"), None), Mode::Pass);
    assert_eq!(mode_for(chat, 200, Some("multipart/form-data"), None), Mode::Pass);
    // A coded body (gzip from a provider or a compressing proxy) cannot be read: passed, never
    // judged. `identity` is no coding.
    assert_eq!(mode_for(chat, 200, Some("text/event-stream"), Some("gzip")), Mode::Pass);
    assert_eq!(mode_for(chat, 200, Some("application/json"), Some(" BR ")), Mode::Pass);
    assert_eq!(mode_for(chat, 200, Some("text/event-stream"), Some("Identity")), Mode::Sse(Api::Chat));
    assert_eq!(mode_for(chat, 200, Some("text/event-stream"), Some("")), Mode::Sse(Api::Chat));
}

#[test]
fn an_error_event_behind_the_first_output_on_the_last_chunk_is_noted() {
    // One chunk that holds the first token, an error and the end: an HTTP/2 or
    // length-delimited upstream can end the stream on it.
    let err = b"data: {\"error\": {\"message\": \"EngineCore encountered an issue.\", \"type\": \"InternalServerError\", \"code\": 500}}\n\n";
    let token = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    let all = [ROLE, &token[..], &err[..], b"data: [DONE]\n\n"].concat();
    for eos in [false, true] {
        let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
        assert_eq!(g.on_body(&all, eos), Step::Release(all.clone()), "eos {eos}");
        assert!(g.post_release_error().is_some_and(|m| m.contains("EngineCore")), "eos {eos}");
    }
}

#[test]
fn a_partial_event_held_after_release_is_bounded() {
    let line = [&b"data: "[..], &[b'x'; 100], b"\n"].concat();
    // No event ever ends: at `max_held` the guard lets it all go, then forwards as it comes.
    let mut g = Guard::new(Mode::Sse(Api::Chat), 256);
    let (mut out, mut fed) = (0, 0);
    for _ in 0..50 {
        fed += line.len();
        match g.on_body(&line, false) {
            Step::Hold => {}
            Step::Release(b) | Step::Forward(b) => out += b.len(),
            s => panic!("{s:?}"),
        }
        assert!(g.held() < 256, "held {} of {fed}", g.held());
    }
    assert!(g.overflowed());
    assert_eq!(out + g.held(), fed);
    // Released on a first token, then an event that never ends: the same bound.
    let mut g = Guard::new(Mode::Sse(Api::Chat), 256);
    assert!(matches!(g.on_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false), Step::Release(_)));
    assert!(!g.overflowed());
    for _ in 0..50 {
        assert!(matches!(g.on_body(&line, false), Step::Forward(_)));
        assert!(g.held() < 256);
    }
    assert!(g.overflowed());
}

#[test]
fn an_event_ended_by_a_lone_cr_at_the_stream_s_end_is_read() {
    // The SSE spec's third line end: `\r` alone. At the end of the stream no `\n` can follow it.
    let ev = b"data: {\"choices\":[{\"text\":\"a\",\"finish_reason\":\"stop\"}]}\r\r";
    assert_eq!(next_event_end(ev, 0), None, "mid-stream a last \\r may be half of \\r\\n");
    assert_eq!(crate::sse::event_end(ev, 0, true), Some(ev.len()));
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[ev], true);
    assert!(fail.is_none(), "{fail:?}");
    assert_eq!(rel.as_deref(), Some(&ev[..]));
    // Released, an error event ended the same way at the end is noted.
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
    assert!(matches!(g.on_body(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", false), Step::Release(_)));
    assert!(matches!(g.on_body(b"data: {\"error\":{\"message\":\"boom\"}}\r\r", true), Step::Forward(_)));
    assert!(g.post_release_error().is_some());
}

const ROLE: &[u8] = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";

#[test]
fn done_or_clean_end_without_output_fails() {
    // vLLM 0.26 after SIGTERM, to a request still queued: role event, then `[DONE]`.
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[ROLE, b"data: [DONE]\n\n"], false);
    assert!(rel.is_none());
    assert_eq!(fail, Some(FailReason::EndedWithoutOutput));
    // ... or the connection's clean end right after the role event.
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[ROLE], true);
    assert!(rel.is_none());
    assert_eq!(fail.as_ref().map(FailReason::label).as_deref(), Some("ended_without_output"));
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[b"", b""], true);
    assert!(rel.is_none() && fail == Some(FailReason::EndedWithoutOutput));
}

#[test]
fn abort_or_error_finish_before_output_fails_after_output_passes() {
    let abort = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"abort\"}]}\n\n";
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[ROLE, abort, b"data: [DONE]\n\n"], true);
    assert!(rel.is_none());
    assert_eq!(fail, Some(FailReason::Aborted("abort".into())));
    assert_eq!(FailReason::Aborted("abort".into()).label(), "finish_reason_abort");
    let err = b"data: {\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"error\"}]}\n\n";
    assert_eq!(classify_event(err), Signal::Aborted("error".into()));
    // After the first token an abort is the worker's own clean end: passed on as it is.
    let tok = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n";
    let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
    assert!(matches!(g.on_body(&[ROLE, tok].concat(), false), Step::Release(_)));
    assert_eq!(g.on_body(abort, false), Step::Forward(abort.to_vec()));
    // A model that finished with nothing to say is an answer, not a failure.
    let stop = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    let (rel, _, fail) = run(Mode::Sse(Api::Chat), &[ROLE, stop, b"data: [DONE]\n\n"], true);
    assert!(fail.is_none() && rel.is_some());
    // An aborted choice beside one with output: the output wins (it must reach the client).
    let mixed = b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"abort\"},{\"index\":1,\"delta\":{\"content\":\"x\"}}]}\n\n";
    assert_eq!(classify_event(mixed), Signal::Output);
}

#[test]
fn whole_body_aborted_fails_answers_pass() {
    let aborted = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""},"finish_reason":"abort"}]}"#;
    let (rel, _, fail) = run(Mode::Whole(Api::Chat), &[&aborted[..10], &aborted[10..]], true);
    assert!(rel.is_none());
    assert_eq!(fail, Some(FailReason::Aborted("abort".into())));
    let partial = br#"{"choices":[{"index":0,"text":"some","finish_reason":"abort"}]}"#;
    assert_eq!(whole_body_aborted(partial), None);
    let done = br#"{"choices":[{"index":0,"message":{"content":"error"},"finish_reason":"stop"}]}"#;
    assert_eq!(whole_body_aborted(done), None);
    let (rel, _, fail) = run(Mode::Whole(Api::Chat), &[done], true);
    assert!(fail.is_none() && rel.is_some());
    assert_eq!(whole_body_aborted(b"\"abort\" not json"), None);
    assert_eq!(whole_body_aborted(br#"{"choices":[]}"#), None);
}

#[test]
fn overflow_releases() {
    let mut g = Guard::new(Mode::Sse(Api::Chat), 64);
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
    assert_eq!(classify_event(ev), Signal::Output);
    assert_eq!(classify_event(b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n"), Signal::Output);
    assert_eq!(classify_event(b"data: {\"choices\":[],\"usage\":{}}\n\n"), Signal::Other);
    assert_eq!(classify_event(b": keepalive\n\n"), Signal::Other);
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
        if matches!(classify_event(&body[from..end]), Signal::Output) {
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
            let mut g = Guard::new(Mode::Sse(Api::Chat), DEFAULT_MAX_HELD_BYTES);
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
        let whole = outcome(Mode::Sse(Api::Chat), &body, &[0, body.len()], eos);
        let split = outcome(Mode::Sse(Api::Chat), &body, &cuts, eos);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn error_stream_split_anywhere_same_output(cuts in split_points(300)) {
        let mut body = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n".to_vec();
        body.extend_from_slice(b"data: {\"error\": {\"message\": \"EngineCore encountered an issue.\", \"type\": \"InternalServerError\", \"code\": 500}}\n\ndata: [DONE]\n\n");
        let cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
        let mut cuts = cuts; cuts.push(body.len()); cuts.sort_unstable(); cuts.dedup();
        let (rel, fwd, fail, released) = outcome(Mode::Sse(Api::Chat), &body, &cuts, true);
        prop_assert!(rel.is_empty() && fwd.is_empty() && !released);
        prop_assert!(matches!(fail, Some(FailReason::SseError(_))));
    }

    /// Released + forwarded bytes are always a prefix of the input that ends on an event
    /// boundary (or is all of it at a clean end).
    #[test]
    fn output_is_whole_event_prefix(cuts in split_points(fixture("sse-completions.txt").len())) {
        let body = fixture("sse-completions.txt");
        let (rel, fwd, _, _) = outcome(Mode::Sse(Api::Chat), &body, &cuts, false);
        let out = [rel, fwd].concat();
        prop_assert!(body.starts_with(&out));
        prop_assert!(out.is_empty() || out.ends_with(b"\n\n"));
    }
}
