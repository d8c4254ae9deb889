//! Embeddings, tokenization and transcriptions in vLLM's shapes, and unknown paths.

mod common;

use std::collections::BTreeSet;

use common::{capture, sse_events, Worker};
use serde_json::Value;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn fast() -> Worker {
    Worker::start(&["--id", "x1", "--ttft-ms", "0", "--tokens-per-s", "0"])
}

fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut out = Vec::new();
    for quad in s.as_bytes().chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|c| *c != b'=').collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (val(*c) << (18 - 6 * i)));
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[test]
fn embeddings_float_and_base64() {
    let w = fast();
    let r = w.post(
        "/v1/embeddings",
        r#"{"model":"tiny","input":["one two","three"]}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(
        keys(&v),
        ["created", "data", "id", "model", "object", "usage"]
            .map(String::from)
            .into()
    );
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("embd-")), "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 3);
    let data = v["data"].as_array().expect("data is a list");
    assert_eq!(data.len(), 2);
    let floats: Vec<f64> = data[0]["embedding"]
        .as_array()
        .expect("a float list")
        .iter()
        .map(|x| x.as_f64().expect("a float"))
        .collect();
    assert_eq!(data[0]["object"], "embedding");
    assert_eq!(data[1]["index"], 1);
    assert!(floats.len() > 1);
    let norm: f64 = floats.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-4, "normalized like vLLM: {norm}");

    // base64 is the float32 little-endian bytes of the same vector (the SDK's default format).
    let r = w.post(
        "/v1/embeddings",
        r#"{"model":"tiny","input":"one two","encoding_format":"base64"}"#,
    );
    assert_eq!(r.status, 200);
    let b64 = r.json()["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string")
        .to_owned();
    let decoded: Vec<f64> = unbase64(&b64)
        .chunks(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    // serde_json parses floats to within an ulp of f64: compare as the f32 they came from.
    let as_f32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<_>>();
    assert_eq!(as_f32(&decoded), as_f32(&floats));

    let r = w.post("/v1/embeddings", r#"{"model":"tiny","input":"x","dimensions":8}"#);
    assert_eq!(r.json()["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
    let r = w.post("/v1/embeddings", r#"{"model":"tiny"}"#);
    assert_eq!(r.status, 400);
}

#[test]
fn tokenize_has_the_captured_shape_and_detokenize_inverts_it() {
    let raw = capture("tokenize.txt");
    let real: Value = serde_json::from_str(&raw[raw.find('{').expect("a JSON body")..])
        .expect("the capture's body is JSON");
    let w = fast();
    let r = w.post("/tokenize", r#"{"model":"tiny","prompt":"Hello, world"}"#);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(keys(&v), keys(&real));
    assert_eq!(v["max_model_len"], real["max_model_len"]);
    assert_eq!(v["token_strs"], Value::Null);
    let tokens = v["tokens"].as_array().expect("tokens").clone();
    assert_eq!(v["count"], tokens.len());

    let body = serde_json::json!({"model": "tiny", "tokens": tokens}).to_string();
    let r = w.post("/detokenize", &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"prompt": "Hello, world"}));

    let r = w.post(
        "/tokenize",
        r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"return_token_strs":true}"#,
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["token_strs"].as_array().map(Vec::len), v["count"].as_u64().map(|n| n as usize));
    assert_eq!(w.post("/detokenize", r#"{"tokens":[999999]}"#).status, 400);
    assert_eq!(w.post("/tokenize", r#"{"model":"nope","prompt":"x"}"#).status, 404);
}

fn multipart(fields: &[(&str, &str)], audio: &[u8]) -> (String, Vec<u8>) {
    let boundary = "fakevllmboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(audio);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A silent WAV of `seconds` at 16 kHz mono 16-bit.
fn wav(seconds: u32) -> Vec<u8> {
    let data_len = 32_000 * seconds;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.resize(w.len() + data_len as usize, 0);
    w
}

#[test]
fn transcriptions_json_and_stream() {
    let w = fast();
    let (ct, body) = multipart(&[("model", "tiny"), ("max_completion_tokens", "3")], &wav(2));
    let r = w.post_bytes("/v1/audio/transcriptions", &ct, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"text":" x1:0 x1:1 x1:2","usage":{"type":"duration","seconds":2}}"#
    );

    let (ct, body) = multipart(&[("model", "tiny"), ("stream", "true"), ("max_completion_tokens", "2")], &wav(1));
    let r = w.post_bytes("/v1/audio/transcriptions", &ct, &body);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream; charset=utf-8"));
    assert!(r.error.is_none(), "clean end: {:?}", r.error);
    let events = sse_events(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    assert_eq!(chunks.len(), 2);
    for c in &chunks {
        assert_eq!(c["object"], "transcription.chunk");
        assert!(c["id"].as_str().is_some_and(|s| s.starts_with("transcribe-")), "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], " x1:0");
    assert!(chunks[0]["choices"][0].get("finish_reason").is_none(), "unset fields are left out");
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");

    let (ct, body) = multipart(&[("model", "tiny")], b"");
    let no_file = String::from_utf8_lossy(&body).replace("name=\"file\"", "name=\"other\"");
    assert_eq!(w.post_bytes("/v1/audio/transcriptions", &ct, no_file.as_bytes()).status, 400);
    assert_eq!(w.post_bytes("/v1/audio/transcriptions", "application/json", b"{}").status, 400);
}

#[test]
fn transcription_stream_reports_engine_death_in_band() {
    let w = Worker::start(&["--ttft-ms", "0", "--tokens-per-s", "0", "--error-before-token"]);
    let (ct, body) = multipart(&[("model", "tiny"), ("stream", "true")], &wav(1));
    let r = w.post_bytes("/v1/audio/transcriptions", &ct, &body);
    assert_eq!(r.status, 200);
    let events = sse_events(&r.text());
    assert_eq!(events.len(), 2, "{events:?}");
    let err: Value = serde_json::from_str(&events[0]).expect("error event is JSON");
    assert_eq!(err["error"]["code"], 500);
    assert_eq!(events[1], "[DONE]");
}

/// FastAPI's own 404: vLLM's `http_exception_handler` is registered for `fastapi.HTTPException`,
/// which the router's Starlette `HTTPException` for an unknown route is not.
#[test]
fn unknown_paths_get_fastapis_404() {
    let w = fast();
    for (method, path) in [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v2/models")] {
        let r = common::request(&w.addr, method, path, Some("{}"));
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), serde_json::json!({"detail": "Not Found"}));
    }
}
