//! `--flaky P`: every generation request fails before its first token with probability P, in
//! each of vLLM's shapes, chosen per request; each injection is logged (and counted) on stderr.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{sse_events, sse_typed_events, Exchange, Worker};
use serde_json::Value;

const CHAT_STREAM: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":3}"#;
const CHAT: &str = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
const COMPLETION_STREAM: &str = r#"{"model":"tiny","prompt":"hi","stream":true,"max_tokens":3}"#;
const RESPONSES_STREAM: &str = r#"{"model":"tiny","input":"hi","stream":true,"max_output_tokens":3}"#;
const RESPONSES: &str = r#"{"model":"tiny","input":"hi","max_output_tokens":3}"#;

fn flaky_worker(p: &str, seed: &str) -> Worker {
    Worker::start_logged(&["--id", "f1", "--ttft-ms", "0", "--tokens-per-s", "0", "--flaky", p, "--flaky-seed", seed])
}

/// What one request saw, named like the shapes of `--flaky` (`ok` when it was served).
fn classify(w: &Worker, path: &str, body: &str) -> String {
    let Ok(ex) = Exchange::open(&w.addr, "POST", path, Some(body)) else {
        return "reset".into(); // closed with no response at all
    };
    let r = ex.finish();
    if r.status != 200 {
        let err = &r.json()["error"];
        assert_eq!(err["code"], r.status, "an OpenAI-shaped error body: {}", r.text());
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text());
        return format!("status_{}", r.status);
    }
    let text = r.text();
    let streamed = r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
    let responses = path == "/v1/responses";
    match (streamed, responses) {
        (true, false) => {
            if r.error.is_some() {
                // Half an event and no more: no token, no complete event.
                assert!(!text.contains(":0"), "a token before the reset: {text:?}");
                assert!(!text.ends_with("\n\n"), "the reset comes mid-event: {text:?}");
                return "reset".into();
            }
            let mut events = sse_events(&text);
            assert_eq!(events.pop().as_deref(), Some("[DONE]"), "{text}");
            // Chat opens with the role event, which carries no output.
            let events: Vec<Value> = events
                .iter()
                .map(|e| serde_json::from_str(e).unwrap_or_default())
                .filter(|v: &Value| v["choices"][0]["delta"]["role"].is_null())
                .collect();
            if events[0]["error"]["code"] == 500 {
                assert_eq!(events.len(), 1, "{text}");
                return "engine_error".into();
            }
            if events[0]["choices"][0]["finish_reason"] == "abort" {
                assert_eq!(events.len(), 1, "{text}");
                return "abort".into();
            }
            assert!(text.contains(":0\""), "{text}");
            "ok".into()
        }
        (false, false) => {
            let v = r.json();
            match v["choices"][0]["finish_reason"].as_str() {
                Some("abort") => {
                    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
                    "abort".into()
                }
                Some("length") => "ok".into(),
                other => panic!("finish_reason {other:?}: {v}"),
            }
        }
        (true, true) => {
            let events = sse_typed_events(&text);
            let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
            if r.error.is_some() {
                assert_eq!(types, ["response.created", "response.in_progress"], "cut after in_progress");
                return "cut".into();
            }
            let last = &events.last().expect("events").1;
            assert_eq!(last["type"], "response.completed");
            if types.contains(&"response.output_text.delta") {
                "ok".into()
            } else {
                assert_eq!(last["response"]["output"][0]["content"], Value::Array(vec![]), "{last}");
                "abort".into()
            }
        }
        (false, true) => {
            let v = r.json();
            let content = &v["output"][0]["content"];
            if content.as_array().is_some_and(Vec::is_empty) {
                assert_eq!(v["status"], "completed");
                "abort".into()
            } else {
                "ok".into()
            }
        }
    }
}

/// `(shape, count)` from the log lines `fake-vllm: flaky <shape> <api> stream=<b> #<n>`.
fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in lines {
        let shape = l.split_whitespace().nth(2).expect("a shape in the log line").to_owned();
        *out.entry(shape).or_default() += 1;
    }
    out
}

fn run(w: &Worker, path: &str, body: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(classify(w, path, body)).or_insert(0) += 1;
    }
    seen
}

#[test]
fn flaky_one_fails_every_request_in_every_shape_and_logs_each() {
    let w = flaky_worker("1", "11");
    let cases = [
        ("/v1/chat/completions", CHAT_STREAM, &["reset", "engine_error", "status_500", "status_503", "abort"][..]),
        ("/v1/chat/completions", CHAT, &["reset", "engine_error", "status_500", "status_503", "abort"][..]),
        ("/v1/completions", COMPLETION_STREAM, &["reset", "engine_error", "status_500", "status_503", "abort"][..]),
        ("/v1/responses", RESPONSES_STREAM, &["cut", "status_500", "status_503", "abort"][..]),
    ];
    for (path, body, shapes) in cases {
        let n = 60;
        let seen = run(&w, path, body, n);
        let logged = tally(&w.log_lines("fake-vllm: flaky ", n, Duration::from_secs(10)));
        // A non-streaming engine error is a 500 with the same body as a status_500.
        let mut want = logged.clone();
        if body == CHAT {
            if let Some(e) = want.remove("engine_error") {
                *want.entry("status_500".into()).or_default() += e;
            }
        }
        assert_eq!(seen, want, "{path} {body}: what the client saw = what was logged");
        for s in shapes {
            assert!(logged.contains_key(*s), "{path} {body}: {s} never injected: {logged:?}");
        }
        assert!(!seen.contains_key("ok"), "{path}: served with --flaky 1: {seen:?}");
    }
    // Non-streaming Responses: the same families, none served.
    let seen = run(&w, "/v1/responses", RESPONSES, 40);
    assert!(!seen.contains_key("ok"), "{seen:?}");
    w.log_lines("fake-vllm: flaky ", 40, Duration::from_secs(10));

    // Never made flaky: embeddings, tokenize, models.
    for _ in 0..10 {
        assert_eq!(w.post("/v1/embeddings", r#"{"model":"tiny","input":"hi"}"#).status, 200);
        assert_eq!(w.post("/tokenize", r#"{"model":"tiny","prompt":"hi"}"#).status, 200);
        assert_eq!(w.get("/v1/models").status, 200);
    }
}

#[test]
fn flaky_fails_about_p_of_the_requests_and_serves_the_rest_whole() {
    let w = flaky_worker("0.33", "5");
    let n = 300;
    let seen = run(&w, "/v1/chat/completions", CHAT_STREAM, n);
    let failed = n - seen.get("ok").copied().unwrap_or(0);
    assert!((60..=140).contains(&failed), "{failed} of {n} failed with --flaky 0.33: {seen:?}");
    let logged = tally(&w.log_lines("fake-vllm: flaky ", failed, Duration::from_secs(10)));
    let mut seen_failures = seen.clone();
    seen_failures.remove("ok");
    assert_eq!(seen_failures, logged);
}

#[test]
fn flaky_zero_is_the_default_and_a_bad_probability_is_refused() {
    let w = Worker::start(&["--ttft-ms", "0", "--tokens-per-s", "0"]);
    let seen = run(&w, "/v1/chat/completions", CHAT_STREAM, 50);
    assert_eq!(seen, BTreeMap::from([("ok".to_owned(), 50)]));
    for bad in ["1.5", "-0.1", "x"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fake-vllm"))
            .args(["--port", "0", &format!("--flaky={bad}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run fake-vllm");
        assert!(!out.status.success(), "--flaky {bad} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("probability"), "{out:?}");
    }
}
