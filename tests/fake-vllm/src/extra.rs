//! The other APIs vLLM 0.32.0 serves that the openai SDK (or vLLM's own clients) call:
//! `POST /v1/embeddings`, `POST /tokenize`, `POST /detokenize`, `POST /v1/audio/transcriptions`.
//!
//! Shapes from vLLM's pydantic models: `EmbeddingResponse` / `EmbeddingResponseData`
//! (`vllm/entrypoints/pooling/embed/protocol.py`; `base64` is the float32 little-endian bytes),
//! `TokenizeResponse` / `DetokenizeResponse` (capture `tokenize.txt`), `TranscriptionResponse`
//! and `TranscriptionStreamResponse` (`vllm/entrypoints/openai/speech_to_text/protocol.py`,
//! streamed by `_speech_to_text_stream_generator` in `speech_to_text.py` with
//! `model_dump_json(exclude_unset=True)`, then `data: [DONE]`).
//!
//! Embeddings and transcriptions go through the engine (a hang stalls them, TTFT paces them);
//! tokenization is done by vLLM's API server process, so it keeps answering during a hang.
//! The fake tokenizer is byte-level (id = byte + 3, BOS = 1), so `/detokenize` inverts
//! `/tokenize` exactly; its counts are not the word counts the generation APIs report.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Event, Generation};
use crate::server::{self, App, Conn, ConnectionReset};
use crate::wire::{DONE_EVENT, ENGINE_DEAD_EVENT};

/// vLLM's `--max-model-len` in the captures.
pub const MAX_MODEL_LEN: u64 = 32768;
/// Embedding size when the request gives no `dimensions`.
pub const EMBEDDING_DIM: usize = 64;

const BOS: u32 = 1;
const BYTE_BASE: u32 = 3;

#[derive(Serialize)]
struct UsageInfo {
    prompt_tokens: u64,
    total_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<()>,
}

// ---------------------------------------------------------------- embeddings

#[derive(Deserialize)]
pub struct EmbeddingRequest {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

#[derive(Serialize)]
struct EmbeddingData {
    index: usize,
    object: &'static str,
    embedding: Value,
}

#[derive(Serialize)]
struct EmbeddingResponse<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Vec<EmbeddingData>,
    usage: UsageInfo,
}

/// The inputs of an embedding request, each with its token count: a string, a list of
/// strings, a list of token ids, or a list of lists of token ids (the OpenAI forms).
fn embedding_inputs(input: &Value) -> Option<Vec<(String, u64)>> {
    let one = |v: &Value| -> Option<(String, u64)> {
        match v {
            Value::String(s) => Some((s.clone(), (s.split_whitespace().count() as u64).max(1))),
            Value::Array(ids) if ids.iter().all(Value::is_u64) => Some((Value::Array(ids.clone()).to_string(), ids.len() as u64)),
            _ => None,
        }
    };
    match input {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => one(input).map(|x| vec![x]),
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::String(_) => one(input).map(|x| vec![x]),
        _ => None,
    }
}

/// A deterministic unit vector for `text`: the same input always embeds the same way.
fn embed(text: &str, dim: usize) -> Vec<f32> {
    // FNV-1a seeds a xorshift stream; no cryptography needed, only repeatability.
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Standard base64 with padding (what Python's `base64.b64encode` writes).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub async fn embeddings(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: EmbeddingRequest = match server::parse_json(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let model = match server::resolve_model(&app, req.model.as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Some(inputs) = req.input.as_ref().and_then(embedding_inputs) else {
        return server::bad_request("`input` must be a string, a list of strings, or token ids");
    };
    let base64_format = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return server::bad_request(&format!("Unsupported encoding_format: {other}")),
    };
    let dim = req.dimensions.unwrap_or(EMBEDDING_DIM);
    if dim == 0 || dim > 4096 {
        return server::bad_request(&format!("dimensions must be between 1 and 4096, got {dim}"));
    }
    if let Some(resp) = server::failing(&app) {
        return resp;
    }
    let prompt_tokens: u64 = inputs.iter().map(|(_, n)| n).sum();
    if app.engine.cfg.error_before_token {
        return server::engine_dead();
    }
    // A pooling request is one prefill step in the engine: it waits out a hang.
    app.engine.prefill(prompt_tokens).await;
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, (text, _))| {
            let v = embed(text, dim);
            let embedding = if base64_format {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64(&bytes))
            } else {
                Value::from(v.iter().map(|x| f64::from(*x)).collect::<Vec<_>>())
            };
            EmbeddingData {
                index,
                object: "embedding",
                embedding,
            }
        })
        .collect();
    let resp = EmbeddingResponse {
        id: format!("embd-{:032x}", rand::random::<u128>()),
        object: "list",
        created: server::unix_secs(),
        model: &model,
        data,
        usage: UsageInfo {
            prompt_tokens,
            total_tokens: prompt_tokens,
            completion_tokens: 0,
            prompt_tokens_details: None,
        },
    };
    let body = serde_json::to_string(&resp).unwrap_or_default();
    server::json_response(body)
}

// ---------------------------------------------------------------- tokenize / detokenize

#[derive(Deserialize)]
pub struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

#[derive(Serialize)]
struct TokenizeResponse {
    count: usize,
    max_model_len: u64,
    tokens: Vec<u32>,
    token_strs: Option<Vec<String>>,
}

/// The text a chat request renders to; a stand-in for the chat template.
fn render_messages(messages: &[Value]) -> String {
    messages
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join(""),
                _ => String::new(),
            };
            format!("<|{role}|>{content}\n")
        })
        .collect()
}

pub async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: TokenizeRequest = match server::parse_json(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Err(resp) = server::resolve_model(&app, req.model.as_deref()) {
        return resp;
    }
    let (text, special_default) = match (&req.prompt, &req.messages) {
        (Some(p), _) => (p.clone(), true),
        // Chat templates carry their own BOS, so vLLM defaults to no extra special tokens.
        (None, Some(m)) => (render_messages(m), false),
        (None, None) => return server::bad_request("Either `prompt` or `messages` is required"),
    };
    let mut tokens = Vec::with_capacity(text.len() + 1);
    if req.add_special_tokens.unwrap_or(special_default) {
        tokens.push(BOS);
    }
    tokens.extend(text.bytes().map(|b| u32::from(b) + BYTE_BASE));
    let token_strs = req.return_token_strs.then(|| {
        tokens
            .iter()
            .map(|&t| match t {
                BOS => "<s>".to_owned(),
                t => String::from_utf8_lossy(&[(t - BYTE_BASE) as u8]).into_owned(),
            })
            .collect()
    });
    let resp = TokenizeResponse {
        count: tokens.len(),
        max_model_len: MAX_MODEL_LEN,
        tokens,
        token_strs,
    };
    server::json_response(serde_json::to_string(&resp).unwrap_or_default())
}

#[derive(Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Option<Vec<i64>>,
}

pub async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: DetokenizeRequest = match server::parse_json(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if let Err(resp) = server::resolve_model(&app, req.model.as_deref()) {
        return resp;
    }
    let Some(tokens) = req.tokens else {
        return server::bad_request("Field required: `tokens`");
    };
    let mut bytes = Vec::with_capacity(tokens.len());
    for t in tokens {
        match u8::try_from(t - i64::from(BYTE_BASE)) {
            Ok(b) if t >= i64::from(BYTE_BASE) => bytes.push(b),
            // Special tokens (0..3) decode to nothing, as with skip_special_tokens.
            _ if (0..i64::from(BYTE_BASE)).contains(&t) => {}
            _ => return server::bad_request(&format!("Token id {t} is out of vocabulary")),
        }
    }
    let prompt = String::from_utf8_lossy(&bytes);
    server::json_response(serde_json::json!({ "prompt": prompt }).to_string())
}

// ---------------------------------------------------------------- transcriptions

/// One part of a `multipart/form-data` body.
pub struct Part<'a> {
    pub name: String,
    pub filename: Option<String>,
    pub data: &'a [u8],
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

fn disposition_param(line: &str, key: &str) -> Option<String> {
    line.split(';').map(str::trim).find_map(|kv| {
        let v = kv.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim_matches('"').to_owned())
    })
}

/// A small RFC 7578 parser: enough for the openai SDK's (httpx's) uploads. `None` when the
/// body is not multipart with this boundary.
pub fn parse_multipart<'a>(content_type: &str, body: &'a [u8]) -> Option<Vec<Part<'a>>> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))?
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let mut parts = Vec::new();
    let mut pos = find(body, delim, 0)? + delim.len();
    loop {
        if body.get(pos..pos + 2) == Some(b"--") {
            return Some(parts);
        }
        let head_start = pos + 2; // CRLF after the delimiter
        let head_end = find(body, b"\r\n\r\n", head_start)?;
        let head = std::str::from_utf8(body.get(head_start..head_end)?).ok()?;
        let data_start = head_end + 4;
        let next = find(body, delim, data_start)?;
        let data_end = next.checked_sub(2)?; // CRLF before the delimiter
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))?;
        parts.push(Part {
            name: disposition_param(disposition, "name")?,
            filename: disposition_param(disposition, "filename"),
            data: body.get(data_start..data_end)?,
        });
        pos = next + delim.len();
    }
}

/// Seconds of audio: from the WAV header when there is one, else a guess from the size
/// (16 kHz mono 16-bit), at least one second.
fn audio_seconds(data: &[u8]) -> f64 {
    if data.len() > 44 && &data[0..4] == b"RIFF" && &data[8..12] == b"WAVE" {
        let byte_rate = u32::from_le_bytes([data[28], data[29], data[30], data[31]]);
        if byte_rate > 0 {
            return (data.len() - 44) as f64 / f64::from(byte_rate);
        }
    }
    (data.len() as f64 / 32000.0).max(1.0)
}

pub async fn transcriptions(
    State(app): State<Arc<App>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return server::error(rejection.status(), &rejection.body_text(), "BadRequestError", None),
    };
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(parts) = parse_multipart(ct, &body) else {
        return server::bad_request("Expected a multipart/form-data body");
    };
    let field = |name: &str| parts.iter().find(|p| p.name == name && p.filename.is_none()).map(|p| String::from_utf8_lossy(p.data).into_owned());
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return server::bad_request("Field required: `file`");
    };
    let model = match server::resolve_model(&app, field("model").as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    match field("response_format").as_deref() {
        None | Some("json") => {}
        Some(_) => return server::bad_request("Currently only support response_format `json` in fake-vllm"),
    }
    let max_tokens = match field("max_completion_tokens").map(|s| s.trim().parse::<u32>()) {
        None => 16,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => return server::bad_request("max_completion_tokens must be a positive integer"),
    };
    let stream = field("stream").is_some_and(|s| s.trim() == "true");
    if let Some(resp) = server::failing(&app) {
        return resp;
    }
    let seconds = audio_seconds(file.data);
    // Whisper-style: a fixed-size encoder input; count a few decoder prompt tokens.
    let generation = app.engine.generate(4, max_tokens);
    let id = format!("transcribe-{:032x}", rand::random::<u128>());

    if stream {
        return server::sse_response(transcription_stream(generation, id, server::unix_secs(), model));
    }

    let mut generation = generation;
    let mut text = String::new();
    while let Some(event) = generation.next().await {
        match event {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Aborted => break,
            Event::EngineDead => return server::engine_dead(),
            Event::Reset | Event::Cut => {
                conn.kill();
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        }
    }
    // Built by hand: `json!` would sort the keys, vLLM writes `type` before `seconds`.
    let body = format!(
        "{{\"text\":{},\"usage\":{{\"type\":\"duration\",\"seconds\":{}}}}}",
        Value::from(text),
        seconds.ceil() as u64
    );
    server::json_response(body)
}

fn transcription_stream(
    generation: Generation,
    id: String,
    created: u64,
    model: String,
) -> impl futures_util::Stream<Item = Result<Bytes, ConnectionReset>> + Send + 'static {
    let head = format!(
        "data: {{\"id\":{},\"object\":\"transcription.chunk\",\"created\":{created},\"model\":{},\"choices\":[",
        Value::from(id),
        Value::from(model)
    );
    // (generation, head, done): `done` once `[DONE]` is out.
    futures_util::stream::unfold((generation, head, false), |(mut g, head, done)| async move {
        if done {
            return None;
        }
        let item = match g.next().await {
            Some(Event::Token { text, last, .. }) => {
                let tail = if last { ",\"finish_reason\":\"length\",\"stop_reason\":null" } else { "" };
                Ok(Bytes::from(format!("{head}{{\"delta\":{{\"content\":{}}}{tail}}}]}}\n\n", Value::from(text))))
            }
            Some(Event::Aborted) => Ok(Bytes::from(format!(
                "{head}{{\"delta\":{{\"content\":\"\"}},\"finish_reason\":\"abort\",\"stop_reason\":null}}]}}\n\n"
            ))),
            // The stream generator catches every exception and reports it in the stream.
            Some(Event::EngineDead) => Ok(Bytes::from_static(ENGINE_DEAD_EVENT.as_bytes())),
            Some(Event::Reset | Event::Cut) => {
                let r = server::reset().await;
                return Some((r, (g, head, true)));
            }
            None => return Some((Ok(Bytes::from_static(DONE_EVENT.as_bytes())), (g, head, true))),
        };
        Some((item, (g, head, false)))
    })
}

#[cfg(test)]
mod tests;
