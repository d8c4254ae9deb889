//! `POST /v1/responses`: vLLM 0.32.0's Responses API, byte for byte as in
//! `tests/data/vllm-0.32.0-cpu/sse-responses.txt` (field order of vLLM's pydantic models and of
//! the openai SDK's event types), with tokens from the same engine as chat.
//!
//! How vLLM streams it (`vllm/entrypoints/openai/responses/serving.py`,
//! `responses_stream_generator`, and `api_router.py`, `_convert_stream_to_sse_events`): every
//! event is `event: <type>\ndata: <json>\n\n`, `sequence_number` counts from 0, and there is no
//! `data: [DONE]`. `response.created` and `response.in_progress` are sent before the engine
//! is even asked, so they go out at once, before queueing and TTFT (and during a hang).
//!
//! How it fails, read from the same code:
//! - EngineCore death: `EngineDeadError` is not caught there (only `GenerationError` is, and its
//!   `{"error": ...}` JSON does not even validate as a streaming event), nor in
//!   `_convert_stream_to_sse_events`: the exception leaves the ASGI app after the headers, and
//!   uvicorn closes the connection without the last chunk. So no `error` or `response.failed`
//!   event: a truncated stream. Non-streaming: the router's `create_error_response` → 500.
//! - Abort before any output: empty deltas are filtered, so no output item is opened, and
//!   `response.completed` comes with `status: "completed"` (only `length` makes it
//!   `incomplete`) and a message with no content.
//!
//! (Over 500 lines on purpose: the Responses API's whole event sequence, byte for byte, in one
//! place beside the capture it copies.)

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Event, Generation};
use crate::server::{self, App, Conn, ConnectionReset};
use crate::wire::words;

/// The fields of a Responses request the fake reads; the rest is ignored, as unknown fields
/// are by vLLM.
#[derive(Deserialize)]
pub struct Request {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub stream: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: Option<Value>,
    pub user: Option<String>,
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

/// What the Response object echoes of its request; owned, so a stream can rebuild it.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    metadata: Option<Value>,
    user: Option<String>,
    tools: Vec<Value>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    temperature: f64,
    top_p: f64,
    max_output_tokens: u32,
}

#[derive(Serialize)]
struct OutputText<'a> {
    annotations: [(); 0],
    text: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    /// `[]` in `content_part.added`, `null` once done (as in the capture).
    logprobs: Option<[(); 0]>,
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    content: Vec<OutputText<'a>>,
    role: &'static str,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    phase: Option<()>,
}

impl<'a> Message<'a> {
    fn new(id: &'a str, status: &'static str, content: Vec<OutputText<'a>>) -> Self {
        Self {
            id,
            content,
            role: "assistant",
            status,
            kind: "message",
            phase: None,
        }
    }
}

fn done_text(text: &str) -> OutputText<'_> {
    OutputText {
        annotations: [],
        text,
        kind: "output_text",
        logprobs: None,
    }
}

#[derive(Serialize)]
struct IncompleteDetails {
    reason: &'static str,
}

#[derive(Serialize)]
struct InputTokensDetails {
    cached_tokens: u64,
    cache_write_tokens: u64,
    input_tokens_per_turn: [(); 0],
    cached_tokens_per_turn: [(); 0],
}

#[derive(Serialize)]
struct OutputTokensDetails {
    reasoning_tokens: u64,
    tool_output_tokens: u64,
    output_tokens_per_turn: [(); 0],
    tool_output_tokens_per_turn: [(); 0],
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    input_tokens_details: InputTokensDetails,
    output_tokens: u64,
    output_tokens_details: OutputTokensDetails,
    total_tokens: u64,
}

/// vLLM's `ResponsesResponse`, fields in its order.
#[derive(Serialize)]
struct ResponseObject<'a> {
    id: &'a str,
    created_at: u64,
    incomplete_details: Option<IncompleteDetails>,
    instructions: Option<&'a str>,
    metadata: Option<&'a Value>,
    model: &'a str,
    object: &'static str,
    output: Vec<Message<'a>>,
    parallel_tool_calls: bool,
    temperature: f64,
    tool_choice: &'a Value,
    tools: &'a [Value],
    top_p: f64,
    background: bool,
    max_output_tokens: u32,
    max_tool_calls: Option<()>,
    previous_response_id: Option<()>,
    prompt: Option<()>,
    reasoning: Option<()>,
    service_tier: &'static str,
    status: &'static str,
    text: Option<()>,
    top_logprobs: Option<()>,
    truncation: &'static str,
    usage: Option<Usage>,
    user: Option<&'a str>,
    presence_penalty: f64,
    frequency_penalty: f64,
    kv_transfer_params: Option<()>,
    ec_transfer_params: Option<()>,
    input_messages: Option<()>,
    output_messages: Option<()>,
}

/// How a generation ended, as the Response object reports it.
struct Outcome<'a> {
    status: &'static str,
    /// `None` while in progress (no output, no usage yet).
    output: Option<(&'a str, &'a str)>,
    prompt_tokens: u64,
    output_tokens: u64,
}

impl Echo {
    fn object<'a>(&'a self, o: &Outcome<'a>) -> ResponseObject<'a> {
        let (output, usage) = match o.output {
            None => (Vec::new(), None),
            Some((item_id, text)) => {
                // vLLM's fallback output: no content part at all when nothing was generated.
                let content = if text.is_empty() {
                    Vec::new()
                } else {
                    vec![done_text(text)]
                };
                let usage = Usage {
                    input_tokens: o.prompt_tokens,
                    input_tokens_details: InputTokensDetails {
                        cached_tokens: 0,
                        cache_write_tokens: 0,
                        input_tokens_per_turn: [],
                        cached_tokens_per_turn: [],
                    },
                    output_tokens: o.output_tokens,
                    output_tokens_details: OutputTokensDetails {
                        reasoning_tokens: 0,
                        tool_output_tokens: 0,
                        output_tokens_per_turn: [],
                        tool_output_tokens_per_turn: [],
                    },
                    total_tokens: o.prompt_tokens + o.output_tokens,
                };
                (vec![Message::new(item_id, "completed", content)], Some(usage))
            }
        };
        ResponseObject {
            id: &self.id,
            created_at: self.created_at,
            incomplete_details: (o.status == "incomplete").then_some(IncompleteDetails {
                reason: "max_output_tokens",
            }),
            instructions: self.instructions.as_deref(),
            metadata: self.metadata.as_ref(),
            model: &self.model,
            object: "response",
            output,
            parallel_tool_calls: self.parallel_tool_calls,
            temperature: self.temperature,
            tool_choice: &self.tool_choice,
            tools: &self.tools,
            top_p: self.top_p,
            background: false,
            max_output_tokens: self.max_output_tokens,
            max_tool_calls: None,
            previous_response_id: None,
            prompt: None,
            reasoning: None,
            service_tier: "auto",
            status: o.status,
            text: None,
            top_logprobs: None,
            truncation: "disabled",
            usage,
            user: self.user.as_deref(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            kv_transfer_params: None,
            ec_transfer_params: None,
            input_messages: None,
            output_messages: None,
        }
    }
}

/// One streaming event; the openai SDK's event models list their fields alphabetically, which
/// is the order here. Absent fields are left out.
#[derive(Serialize, Default)]
struct StreamEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<OutputText<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<ResponseObject<'a>>,
    sequence_number: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl StreamEvent<'_> {
    fn frame(&self) -> Bytes {
        // Serializing these plain structs cannot fail; an empty object keeps the framing valid.
        let data = serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned());
        Bytes::from(format!("event: {}\ndata: {data}\n\n", self.kind))
    }
}

fn hex_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A rough prompt length: one token per word of the input and instructions, plus the chat
/// template's overhead (as for chat).
fn prompt_tokens(req: &Request) -> u64 {
    let input = req.input.as_ref().map(words).unwrap_or(0);
    let instructions = req.instructions.as_deref().map(|s| s.split_whitespace().count() as u64).unwrap_or(0);
    input + instructions + 7
}

pub async fn create(
    State(app): State<Arc<App>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: Request = match server::parse_json(body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let model = match server::resolve_model(&app, req.model.as_deref()) {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    if req.input.is_none() {
        return server::bad_request("Field required: `input`");
    }
    if let Some(prev) = &req.previous_response_id {
        // vLLM stores nothing unless VLLM_ENABLE_RESPONSES_API_STORE is set.
        return server::error(
            StatusCode::NOT_FOUND,
            &format!("Response with id '{prev}' not found."),
            "invalid_request_error",
            Some("response_id"),
        );
    }
    let max_tokens = req.max_output_tokens.unwrap_or(16);
    let max_tokens = match u32::try_from(max_tokens) {
        Ok(n) if n > 0 => n,
        _ => return server::bad_request(&format!("max_tokens must be at least 1, got {max_tokens}.")),
    };
    if let Some(resp) = server::failing(&app) {
        return resp;
    }

    let tool_choice = req.tool_choice.clone().unwrap_or_else(|| {
        Value::from(if req.tools.is_empty() { "none" } else { "auto" })
    });
    let prompt = prompt_tokens(&req);
    let echo = Echo {
        id: hex_id("resp"),
        created_at: server::unix_secs(),
        model,
        instructions: req.instructions,
        metadata: req.metadata,
        user: req.user,
        tools: req.tools,
        tool_choice,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        max_output_tokens: max_tokens,
    };
    let stream_it = req.stream == Some(true);
    let fault = match server::flaky_fault(&app, crate::flaky::Api::Responses, stream_it) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let generation = app.engine.generate(prompt, max_tokens).with_fault(fault);
    let item_id = hex_id("msg");

    if stream_it {
        return server::sse_response(stream(echo, item_id, generation));
    }

    let mut generation = generation;
    let mut text = String::new();
    let mut status = "incomplete";
    while let Some(event) = generation.next().await {
        match event {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Aborted => {
                status = "completed";
                break;
            }
            Event::EngineDead => return server::engine_dead(),
            Event::Reset | Event::Cut => {
                conn.kill();
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        }
    }
    let outcome = Outcome {
        status,
        output: Some((&item_id, &text)),
        prompt_tokens: generation.prompt_tokens(),
        output_tokens: u64::from(generation.sent()),
    };
    let body = serde_json::to_string(&echo.object(&outcome)).unwrap_or_else(|e| {
        crate::wire::error_body(&e.to_string(), "InternalServerError", None, 500)
    });
    server::json_response(body)
}

struct StreamState {
    echo: Echo,
    item_id: String,
    generation: Generation,
    text: String,
    seq: u64,
    /// The message item and its content part are open (after the first token).
    open: bool,
    pending: VecDeque<Bytes>,
    over: bool,
}

impl StreamState {
    fn push(&mut self, mut ev: StreamEvent<'_>) {
        ev.sequence_number = self.seq;
        self.seq += 1;
        let frame = ev.frame();
        self.pending.push_back(frame);
    }

    fn response_event(&mut self, kind: &'static str, outcome: Option<&'static str>) {
        let frame = {
            let o = match outcome {
                None => Outcome {
                    status: "in_progress",
                    output: None,
                    prompt_tokens: 0,
                    output_tokens: 0,
                },
                Some(status) => Outcome {
                    status,
                    output: Some((&self.item_id, &self.text)),
                    prompt_tokens: self.generation.prompt_tokens(),
                    output_tokens: u64::from(self.generation.sent()),
                },
            };
            StreamEvent {
                response: Some(self.echo.object(&o)),
                sequence_number: self.seq,
                kind,
                ..Default::default()
            }
            .frame()
        };
        self.seq += 1;
        self.pending.push_back(frame);
    }

    fn open_item(&mut self) {
        let id = self.item_id.clone();
        self.push(StreamEvent {
            item: Some(Message::new(&id, "in_progress", Vec::new())),
            output_index: Some(0),
            kind: "response.output_item.added",
            ..Default::default()
        });
        self.push(StreamEvent {
            content_index: Some(0),
            item_id: Some(&id),
            output_index: Some(0),
            part: Some(OutputText {
                annotations: [],
                text: "",
                kind: "output_text",
                logprobs: Some([]),
            }),
            kind: "response.content_part.added",
            ..Default::default()
        });
        self.open = true;
    }

    fn delta(&mut self, delta: &str) {
        let id = self.item_id.clone();
        self.push(StreamEvent {
            content_index: Some(0),
            delta: Some(delta),
            item_id: Some(&id),
            logprobs: Some([]),
            output_index: Some(0),
            kind: "response.output_text.delta",
            ..Default::default()
        });
    }

    fn close_item(&mut self) {
        let id = self.item_id.clone();
        let text = self.text.clone();
        self.push(StreamEvent {
            content_index: Some(0),
            item_id: Some(&id),
            logprobs: Some([]),
            output_index: Some(0),
            text: Some(&text),
            kind: "response.output_text.done",
            ..Default::default()
        });
        self.push(StreamEvent {
            content_index: Some(0),
            item_id: Some(&id),
            output_index: Some(0),
            part: Some(done_text(&text)),
            kind: "response.content_part.done",
            ..Default::default()
        });
        self.push(StreamEvent {
            item: Some(Message::new(&id, "completed", vec![done_text(&text)])),
            output_index: Some(0),
            kind: "response.output_item.done",
            ..Default::default()
        });
        self.open = false;
    }
}

/// One SSE event per item, so one chunk per write, like uvicorn.
fn stream(
    echo: Echo,
    item_id: String,
    generation: Generation,
) -> impl futures_util::Stream<Item = Result<Bytes, ConnectionReset>> + Send + 'static {
    let mut st = StreamState {
        echo,
        item_id,
        generation,
        text: String::new(),
        seq: 0,
        open: false,
        pending: VecDeque::new(),
        over: false,
    };
    st.response_event("response.created", None);
    st.response_event("response.in_progress", None);
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok(b), st));
            }
            if st.over {
                return None;
            }
            match st.generation.next().await {
                Some(Event::Token { text, last, .. }) => {
                    if !st.open {
                        st.open_item();
                    }
                    st.text.push_str(&text);
                    st.delta(&text);
                    if last {
                        st.close_item();
                        st.response_event("response.completed", Some("incomplete"));
                        st.over = true;
                    }
                }
                Some(Event::Aborted) => {
                    if st.open {
                        st.close_item();
                    }
                    st.response_event("response.completed", Some("completed"));
                    st.over = true;
                }
                Some(Event::EngineDead | Event::Reset | Event::Cut) => {
                    st.over = true;
                    return Some((server::reset().await, st));
                }
                None => return None,
            }
        }
    })
}
