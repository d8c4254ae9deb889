//! Streaming responses framed like the real vLLM 0.32.0 captures, headers before the first
//! token, and the injected failures: a real truncation and vLLM's in-stream engine error.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{capture, sse_events, Exchange, Worker};
use serde_json::Value;

const CHAT: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":5}"#;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The shape of an event: top-level keys, keys of choices[0], keys of its delta.
fn shape(v: &Value) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let choice = &v["choices"][0];
    (keys(v), keys(choice), keys(&choice["delta"]))
}

fn parse(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str(e).unwrap_or_else(|err| panic!("event is not JSON ({err}): {e}"))
        })
        .collect()
}

fn real_content_type() -> String {
    capture("kill-apiserver_curl.txt")
        .lines()
        .find_map(|l| {
            l.split_once("content-type: ")
                .map(|(_, v)| v.trim().to_owned())
        })
        .expect("the capture has a content-type header")
}

fn check_stream_like_capture(path: &str, body: &str, capture_file: &str, chat: bool) {
    let real_events = sse_events(&capture(capture_file));
    assert_eq!(real_events.last().map(String::as_str), Some("[DONE]"));
    let real = parse(&real_events);

    let w = Worker::start(&["--id", "w1", "--ttft-ms", "0", "--tokens-per-s", "0"]);
    let r = w.post(path, body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(real_content_type().as_str()));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.error.is_none(), "clean end: {:?}", r.error);
    let events = sse_events(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    // One event per chunk, like uvicorn.
    for c in &r.chunks {
        let c = String::from_utf8_lossy(c);
        assert!(
            c.starts_with("data: ") && c.ends_with("\n\n") && c.matches("data: ").count() == 1,
            "{c:?}"
        );
    }
    let fake = parse(&events);

    let (prefix, object) = if chat {
        ("chatcmpl-", "chat.completion.chunk")
    } else {
        ("cmpl-", "text_completion")
    };
    let id = fake[0]["id"].as_str().expect("id");
    let hex = id.strip_prefix(prefix).expect("id prefix");
    assert!(
        hex.len() == 16 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    for e in &fake {
        assert_eq!(e["id"], id);
        assert_eq!(e["object"], object);
        assert_eq!(e["model"], "tiny");
        assert!(e["created"].is_u64());
    }

    let mut fake = fake.as_slice();
    let mut real = real.as_slice();
    if chat {
        assert_eq!(shape(&fake[0]), shape(&real[0]), "role event");
        assert_eq!(
            fake[0]["choices"][0]["delta"],
            serde_json::json!({"role": "assistant", "content": ""})
        );
        fake = &fake[1..];
        real = &real[1..];
    }
    let (fake_last, fake_mid) = fake.split_last().expect("content events");
    let (real_last, real_mid) = real.split_last().expect("content events");
    assert_eq!(fake_mid.len(), 4);
    for e in fake_mid {
        assert_eq!(shape(e), shape(&real_mid[0]), "content event");
        assert!(e["choices"][0]["finish_reason"].is_null());
    }
    assert_eq!(shape(fake_last), shape(real_last), "last event");
    assert_eq!(fake_last["choices"][0]["finish_reason"], "length");

    let field = if chat {
        "/choices/0/delta/content"
    } else {
        "/choices/0/text"
    };
    let text: String = fake
        .iter()
        .filter_map(|e| e.pointer(field)?.as_str())
        .collect();
    assert_eq!(text, " w1:0 w1:1 w1:2 w1:3 w1:4");
}

#[test]
fn chat_stream_is_framed_like_vllm() {
    check_stream_like_capture("/v1/chat/completions", CHAT, "sse-chat.txt", true);
}

#[test]
fn completions_stream_is_framed_like_vllm() {
    let body = r#"{"model":"tiny","prompt":"hello","stream":true,"max_tokens":5}"#;
    check_stream_like_capture("/v1/completions", body, "sse-completions.txt", false);
}

#[test]
fn usage_event_comes_before_done() {
    let w = Worker::start(&["--ttft-ms", "0", "--tokens-per-s", "0"]);
    let body = r#"{"messages":[{"role":"user","content":"a b"}],"stream":true,"max_tokens":3,"stream_options":{"include_usage":true}}"#;
    let r = w.post("/v1/chat/completions", body);
    let events = sse_events(&r.text());
    assert_eq!(events.len(), 1 + 3 + 1 + 1);
    let usage: Value = serde_json::from_str(&events[4]).expect("usage event");
    assert_eq!(usage["choices"], serde_json::json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let prompt = usage["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    assert_eq!(usage["usage"]["total_tokens"], prompt + 3);
    assert_eq!(events[5], "[DONE]");
}

#[test]
fn headers_go_out_before_the_first_token() {
    let w = Worker::start(&["--ttft-ms", "700", "--tokens-per-s", "0"]);
    let start = Instant::now();
    let mut ex = Exchange::open(&w.addr, "POST", "/v1/chat/completions", Some(CHAT)).expect("open");
    let headers_at = start.elapsed();
    assert_eq!(ex.status, 200);
    assert!(ex.next_chunk().expect("first event").is_some());
    let first_at = start.elapsed();
    assert!(
        headers_at < Duration::from_millis(400),
        "headers took {headers_at:?}"
    );
    assert!(
        first_at >= Duration::from_millis(700),
        "first event after {first_at:?}"
    );
}

fn truncated_stream(reset_after: &str) -> (Vec<String>, common::Response) {
    let w = Worker::start(&[
        "--id",
        "w9",
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "100",
        "--reset-after-tokens",
        reset_after,
    ]);
    let r = w.post(
        "/v1/chat/completions",
        &CHAT.replace("\"max_tokens\":5", "\"max_tokens\":10"),
    );
    assert_eq!(r.status, 200);
    let err = r
        .error
        .as_ref()
        .expect("the stream must end without its last chunk");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err:?}"
    );
    (sse_events(&r.text()), r)
}

#[test]
fn reset_after_tokens_truncates_the_stream() {
    let (events, r) = truncated_stream("3");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    // Whole events only: the role event and exactly three tokens of this worker.
    assert!(r.text().ends_with("\n\n"));
    let values = parse(&events);
    assert_eq!(values.len(), 4);
    let text: String = values
        .iter()
        .filter_map(|e| e.pointer("/choices/0/delta/content")?.as_str())
        .collect();
    assert_eq!(text, " w9:0 w9:1 w9:2");
    assert!(values
        .iter()
        .all(|e| e["choices"][0]["finish_reason"].is_null()));
}

#[test]
fn reset_after_zero_tokens_cuts_right_after_the_headers() {
    let (events, r) = truncated_stream("0");
    assert!(events.is_empty(), "no event at all: {events:?}");
    assert!(r.body.is_empty());
}

#[test]
fn error_before_token_is_vllms_engine_death_event() {
    let real_tail = capture("kill-enginecore_stream_tail.txt");
    let real_error = real_tail
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .expect("the capture has the error event")
        .to_owned();

    let w = Worker::start(&["--ttft-ms", "0", "--error-before-token"]);
    let r = w.post("/v1/chat/completions", CHAT);
    assert_eq!(r.status, 200);
    assert!(r.error.is_none(), "vLLM ends this stream cleanly");
    assert_eq!(r.text(), format!("{real_error}\n\ndata: [DONE]\n\n"));
}

/// `n` choices: vLLM streams one event per choice and step, each with its `index`, the role
/// events of every choice first; every choice finishes; usage counts every choice's tokens.
#[test]
fn n_choices_stream_one_event_per_choice() {
    let w = Worker::start(&["--id", "w1", "--ttft-ms", "0", "--tokens-per-s", "0"]);
    let body = r#"{"model":"tiny","messages":[{"role":"user","content":"hello"}],"stream":true,"max_tokens":3,"n":2,"stream_options":{"include_usage":true}}"#;
    let r = w.post("/v1/chat/completions", body);
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(r.chunks.len(), events.len(), "one event per chunk");
    let parsed = parse(&events);
    let index = |v: &Value| v["choices"][0]["index"].as_u64();
    // Two role events, then 3 steps of two token events, then usage.
    assert_eq!(parsed.len(), 2 + 6 + 1);
    assert_eq!(parsed[..2].iter().map(index).collect::<Vec<_>>(), [Some(0), Some(1)]);
    assert!(parsed[..2].iter().all(|v| v["choices"][0]["delta"]["role"] == "assistant"));
    for choice in 0..2u64 {
        let mine: Vec<&Value> = parsed[2..8].iter().filter(|v| index(v) == Some(choice)).collect();
        let text: String = mine.iter().filter_map(|v| v["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, " w1:0 w1:1 w1:2", "choice {choice}");
        assert_eq!(mine.last().map(|v| &v["choices"][0]["finish_reason"]), Some(&Value::from("length")));
    }
    assert_eq!(parsed[8]["usage"]["completion_tokens"], 6);

    let full = w.post("/v1/completions", r#"{"model":"tiny","prompt":"hi","max_tokens":2,"n":3}"#).json();
    let choices = full["choices"].as_array().expect("choices");
    assert_eq!(choices.iter().map(|c| c["index"].as_u64()).collect::<Vec<_>>(), [Some(0), Some(1), Some(2)]);
    assert!(choices.iter().all(|c| c["text"] == " w1:0 w1:1"), "{full}");
    assert_eq!(full["usage"]["completion_tokens"], 6);

    let bad = w.post("/v1/chat/completions", r#"{"model":"tiny","messages":[{"role":"user","content":"x"}],"n":0}"#);
    assert_eq!(bad.status, 400);
}
