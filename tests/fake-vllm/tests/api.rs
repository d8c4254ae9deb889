//! Non-streaming responses, model listing, health and vLLM's error bodies.

mod common;

use common::{request, Worker};
use serde_json::Value;

fn error_of(r: &common::Response) -> Value {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some(), "{v}");
    assert_eq!(e["code"], r.status, "{v}");
    e.clone()
}

#[test]
fn non_streaming_chat_and_completion_have_vllms_shape() {
    let w = Worker::start(&["--id", "w3", "--ttft-ms", "0", "--tokens-per-s", "0"]);
    let r = w.post(
        "/v1/chat/completions",
        r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("chatcmpl-") && s.len() == 25),
        "{v}"
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], " w3:0 w3:1 w3:2");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let r = w.post(
        "/v1/completions",
        r#"{"model":"tiny","prompt":"hi","max_completion_tokens":2}"#,
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("cmpl-") && s.len() == 21),
        "{v}"
    );
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], " w3:0 w3:1");
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) + 2
    );

    // No max_tokens: 16 tokens.
    let v = w.post("/v1/completions", r#"{"prompt":"hi"}"#).json();
    assert_eq!(v["usage"]["completion_tokens"], 16);
}

#[test]
fn models_health_and_several_served_names() {
    let w = Worker::start(&["--model", "alpha", "--model", "beta"]);
    let v = w.get("/v1/models").json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["alpha", "beta"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "vllm");

    let h = w.get("/health");
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());

    let r = w.post(
        "/v1/completions",
        r#"{"model":"beta","prompt":"x","max_tokens":1}"#,
    );
    assert_eq!(r.json()["model"], "beta");
    // Metrics are labelled with the first served name, as in vLLM.
    assert!(w.get("/metrics").text().contains("model_name=\"alpha\""));
}

#[test]
fn errors_use_vllms_error_body() {
    let w = Worker::start(&[]);
    let r = w.post(
        "/v1/chat/completions",
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
    );
    assert_eq!(r.status, 404);
    let e = error_of(&r);
    assert_eq!(e["type"], "NotFoundError");
    assert_eq!(e["param"], "model");
    assert_eq!(e["message"], "The model `nope` does not exist.");

    let r = w.post("/v1/chat/completions", r#"{"model":"tiny","messages":"#);
    assert_eq!(r.status, 400);
    assert_eq!(error_of(&r)["type"], "BadRequestError");

    let r = w.post(
        "/v1/completions",
        r#"{"model":"tiny","prompt":"x","max_tokens":0}"#,
    );
    assert_eq!(r.status, 400);
    error_of(&r);

    let big = format!(
        r#"{{"model":"tiny","prompt":"{}"}}"#,
        "a".repeat(5 * 1024 * 1024)
    );
    let r = request(&w.addr, "POST", "/v1/completions", Some(&big));
    assert_eq!(r.status, 200, "no body limit by default, as in vLLM");

    let limited = Worker::start(&["--max-body-bytes", "4194304"]);
    let r = request(&limited.addr, "POST", "/v1/completions", Some(&big));
    assert_eq!(r.status, 413);
    error_of(&r);
}

#[test]
fn non_streaming_reset_closes_with_no_response() {
    let w = Worker::start(&[
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "0",
        "--reset-after-tokens",
        "1",
    ]);
    let got = common::Exchange::open(
        &w.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"x","max_tokens":4}"#),
    );
    assert!(
        got.is_err(),
        "expected the connection to close before any response"
    );
    // The worker itself lives on.
    assert_eq!(w.get("/health").status, 200);
}
