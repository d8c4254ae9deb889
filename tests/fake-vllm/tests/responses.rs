//! `POST /v1/responses` against the real vLLM 0.32.0 capture (`sse-responses.txt`): the event
//! sequence, the keys the openai SDK reads, and how the stream fails.

mod common;

use std::collections::BTreeSet;

use common::{capture, sse_typed_events, Worker};
use serde_json::Value;

const STREAM: &str = r#"{"model":"tiny","input":"hello there","stream":true,"max_output_tokens":3}"#;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The capture's events, from the body after the HTTP headers.
fn real_events() -> Vec<(String, Value)> {
    let raw = capture("sse-responses.txt");
    let start = raw.find("event: ").expect("the capture has events");
    sse_typed_events(&raw[start..].replace("\r\n", "\n"))
}

fn fast_worker(extra: &[&str]) -> Worker {
    let mut args = vec!["--id", "r1", "--ttft-ms", "0", "--tokens-per-s", "0"];
    args.extend_from_slice(extra);
    Worker::start(&args)
}

fn types(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(t, _)| t.as_str()).collect()
}

/// Every event: `event:` repeats `data.type`, and `sequence_number` counts from 0.
fn check_numbering(events: &[(String, Value)]) {
    for (i, (t, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], t.as_str(), "{data}");
        assert_eq!(data["sequence_number"], i, "{data}");
    }
}

#[test]
fn stream_has_vllms_event_sequence_and_keys() {
    let real = real_events();
    let w = fast_worker(&[]);
    let r = w.post("/v1/responses", STREAM);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.error.is_none(), "clean end: {:?}", r.error);
    let text = r.text();
    assert!(!text.contains("[DONE]"), "no [DONE] in a Responses stream");
    let events = sse_typed_events(&text);
    // One event per chunk, like uvicorn.
    assert_eq!(r.chunks.len(), events.len());
    check_numbering(&events);
    check_numbering(&real);

    let deltas = vec!["response.output_text.delta"; 3];
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(deltas);
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(types(&events), want);

    // Same keys as the real events of the same type, at every level the SDK reads.
    for (t, data) in &events {
        let (_, real_data) = real
            .iter()
            .find(|(rt, _)| rt == t)
            .unwrap_or_else(|| panic!("{t} is not in the capture"));
        assert_eq!(keys(data), keys(real_data), "keys of {t}");
        for inner in ["response", "item", "part"] {
            assert_eq!(keys(&data[inner]), keys(&real_data[inner]), "keys of {t}.{inner}");
        }
        assert_eq!(
            keys(&data["response"]["usage"]),
            keys(&real_data["response"]["usage"]),
            "keys of {t}.response.usage"
        );
    }

    let (_, created) = &events[0];
    assert!(
        created["response"]["id"]
            .as_str()
            .is_some_and(|s| s.starts_with("resp_")),
        "{created}"
    );
    assert_eq!(created["response"]["status"], "in_progress");
    assert_eq!(created["response"]["output"], serde_json::json!([]));

    let item_id = events[2].1["item"]["id"].as_str().expect("item id");
    assert!(item_id.starts_with("msg_"), "{item_id}");
    let streamed: String = events
        .iter()
        .filter(|(t, _)| t == "response.output_text.delta")
        .map(|(_, d)| {
            assert_eq!(d["item_id"], item_id);
            d["delta"].as_str().expect("delta is a string").to_owned()
        })
        .collect();
    assert_eq!(streamed, " r1:0 r1:1 r1:2");
    assert_eq!(events[7].1["text"], streamed);
    assert_eq!(events[9].1["item"]["content"][0]["text"], streamed);

    // Stopped by max_output_tokens: vLLM reports `incomplete`, as in the capture.
    let done = &events[10].1["response"];
    assert_eq!(done["status"], "incomplete");
    assert_eq!(done["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(done["output"][0]["id"], item_id);
    assert_eq!(done["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(done["output"][0]["content"][0]["text"], streamed);
    assert_eq!(done["usage"]["output_tokens"], 3);
    assert_eq!(
        done["usage"]["total_tokens"],
        done["usage"]["input_tokens"].as_u64().unwrap_or(0) + 3
    );
}

#[test]
fn non_streaming_response_has_output_text() {
    let real = real_events();
    let real_done = &real.last().expect("capture has events").1["response"];
    let w = fast_worker(&[]);
    let r = w.post(
        "/v1/responses",
        r#"{"model":"tiny","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"instructions":"be brief","max_output_tokens":2}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(keys(&v), keys(real_done));
    assert_eq!(v["object"], "response");
    assert_eq!(v["instructions"], "be brief");
    assert_eq!(v["model"], "tiny");
    let msg = &v["output"][0];
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["role"], "assistant");
    assert_eq!(msg["content"][0]["type"], "output_text");
    // What the SDK's `response.output_text` joins.
    assert_eq!(msg["content"][0]["text"], " r1:0 r1:1");
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["usage"]["output_tokens"], 2);
}

#[test]
fn responses_errors_use_vllms_error_body() {
    let w = fast_worker(&[]);
    let r = w.post("/v1/responses", r#"{"model":"nope","input":"x"}"#);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = w.post(
        "/v1/responses",
        r#"{"model":"tiny","input":"x","previous_response_id":"resp_123"}"#,
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["error"]["message"],
        "Response with id 'resp_123' not found."
    );
    let r = w.post("/v1/responses", r#"{"model":"tiny"}"#);
    assert_eq!(r.status, 400);
}

#[test]
fn engine_death_truncates_the_stream_after_in_progress() {
    let w = fast_worker(&["--error-before-token"]);
    let r = w.post("/v1/responses", STREAM);
    assert_eq!(r.status, 200);
    // vLLM's EngineDeadError escapes the Responses generator: uvicorn closes the connection.
    assert!(r.error.is_some(), "the stream must not end cleanly");
    let events = sse_typed_events(&r.text());
    assert_eq!(
        types(&events),
        ["response.created", "response.in_progress"]
    );

    let r = w.post("/v1/responses", r#"{"model":"tiny","input":"x"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "InternalServerError");
}

#[test]
fn abort_completes_without_output() {
    let w = fast_worker(&["--abort-before-token"]);
    let r = w.post("/v1/responses", STREAM);
    assert_eq!(r.status, 200);
    assert!(r.error.is_none(), "clean end: {:?}", r.error);
    let events = sse_typed_events(&r.text());
    check_numbering(&events);
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.completed"
        ]
    );
    let done = &events[2].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"], serde_json::json!([]));
    assert_eq!(done["usage"]["output_tokens"], 0);
}

#[test]
fn reset_after_tokens_truncates_after_whole_events() {
    let w = fast_worker(&["--reset-after-tokens", "2"]);
    let r = w.post(
        "/v1/responses",
        r#"{"model":"tiny","input":"x","stream":true,"max_output_tokens":5}"#,
    );
    assert_eq!(r.status, 200);
    assert!(r.error.is_some(), "the stream must not end cleanly");
    let events = sse_typed_events(&r.text());
    check_numbering(&events);
    assert_eq!(
        types(&events).last().copied(),
        Some("response.output_text.delta")
    );
    assert_eq!(
        events
            .iter()
            .filter(|(t, _)| t == "response.output_text.delta")
            .count(),
        2
    );
}
