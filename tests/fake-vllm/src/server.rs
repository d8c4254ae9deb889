//! HTTP routes with vLLM's paths, status codes and headers. Streaming responses send their
//! `200` headers at once, before the request is even scheduled, as vLLM does.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::engine::{Engine, Event, Fault, Generation};
use crate::flaky::{self, Shape};
use crate::wire::{self, Kind, SseFormat, DONE_EVENT, ENGINE_DEAD_EVENT};

pub struct App {
    pub engine: Arc<Engine>,
    pub models: Vec<String>,
    pub created: u64,
    pub fingerprint: String,
    /// `413` above this many body bytes; `None`: no limit (as vLLM).
    pub max_body_bytes: Option<usize>,
    pub metrics_delay: std::time::Duration, // see `crate::Config::metrics_delay`
}

/// Per-connection handle that lets a handler kill its own TCP connection (failure injection
/// for non-streaming requests, whose headers are not out yet). Also turns Nagle off: SSE
/// events are small and must leave at once.
#[derive(Clone)]
pub struct Conn {
    sock: Option<Arc<socket2::Socket>>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        let io = stream.io();
        let _ = io.set_nodelay(true);
        Self {
            sock: socket2::SockRef::from(io).try_clone().ok().map(Arc::new),
        }
    }
}

impl Conn {
    /// Ends the connection now: the peer gets a close with no response at all.
    pub(crate) fn kill(&self) {
        if let Some(s) = &self.sock {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    // vLLM sets no body limit; axum's default is 2 MB. `--max-body-bytes` sets one.
    let limit = match app.max_body_bytes {
        Some(n) => DefaultBodyLimit::max(n),
        None => DefaultBodyLimit::disable(),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(crate::responses::create))
        .route("/v1/embeddings", post(crate::extra::embeddings))
        .route("/tokenize", post(crate::extra::tokenize))
        .route("/detokenize", post(crate::extra::detokenize))
        .route("/v1/audio/transcriptions", post(crate::extra::transcriptions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ping", get(|| async { StatusCode::OK }))
        .route(
            "/version",
            get(|| async { Json(json!({"version": "0.32.0"})) }),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .layer(limit)
        .with_state(app)
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn error(status: StatusCode, message: &str, kind: &str, param: Option<&str>) -> Response {
    let ct = HeaderValue::from_static("application/json");
    (
        status,
        [(header::CONTENT_TYPE, ct)],
        wire::error_body(message, kind, param, status.as_u16()),
    )
        .into_response()
}

pub(crate) fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message, "BadRequestError", None)
}

/// A JSON body with the `content-type` FastAPI's `JSONResponse` sends.
pub(crate) fn json_response(body: String) -> Response {
    let ct = HeaderValue::from_static("application/json");
    ([(header::CONTENT_TYPE, ct)], body).into_response()
}

/// An SSE body with the headers uvicorn sends for vLLM's `StreamingResponse`.
pub(crate) fn sse_response<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = Result<Bytes, ConnectionReset>> + Send + 'static,
{
    let ct = HeaderValue::from_static("text/event-stream; charset=utf-8");
    ([(header::CONTENT_TYPE, ct)], Body::from_stream(stream)).into_response()
}

/// A JSON request body, or vLLM's 400/413 answer.
// The error is the handler's whole answer, returned at once: boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Response> {
    let body = body.map_err(|rejection| {
        error(rejection.status(), &rejection.body_text(), "BadRequestError", None)
    })?;
    serde_json::from_slice(&body).map_err(|e| bad_request(&format!("Invalid request body: {e}")))
}

/// The served model a request names (the first one when it names none), or vLLM's 404.
#[allow(clippy::result_large_err)]
pub(crate) fn resolve_model(app: &App, model: Option<&str>) -> Result<String, Response> {
    match model {
        None => Ok(app.models[0].clone()),
        Some(m) if app.models.iter().any(|x| x == m) => Ok(m.to_owned()),
        Some(m) => Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{m}` does not exist."),
            "NotFoundError",
            Some("model"),
        )),
    }
}

/// The `--fail-status` answer, when configured.
pub(crate) fn failing(app: &App) -> Option<Response> {
    let code = app.engine.cfg.fail_status?;
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(error(status, "The server is shutting down (fake-vllm --fail-status).", "InternalServerError", None))
}

/// This request's `--flaky` fate: the fault its generation meets, or the status answered now.
#[allow(clippy::result_large_err)]
pub(crate) fn flaky_fault(app: &App, api: flaky::Api, stream: bool) -> Result<Option<Fault>, Response> {
    match app.engine.flaky.draw(api, stream) {
        None => Ok(None),
        Some(Shape::Fault(f)) => Ok(Some(f)),
        Some(Shape::Status(503)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, "The engine is not ready to serve requests (fake-vllm --flaky).", "ServiceUnavailableError", None)),
        Some(Shape::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Err(error(status, wire::ENGINE_DEAD_MESSAGE, "InternalServerError", None))
        }
    }
}

/// What a non-streaming request gets when the EngineCore died under it.
pub(crate) fn engine_dead() -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, wire::ENGINE_DEAD_MESSAGE, "InternalServerError", None)
}

/// Lets hyper flush the whole events already written, then fails the body so hyper closes the
/// connection without the terminating chunk.
pub(crate) async fn reset() -> Result<Bytes, ConnectionReset> {
    tokio::time::sleep(Duration::from_millis(2)).await;
    Err(ConnectionReset)
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app
        .models
        .iter()
        .map(|m| {
            // vLLM lists a LoRA adapter with its path as root and the base model as parent.
            let (root, parent) = match app.engine.loras.path_of(m) {
                Some(path) => (json!(path), json!(app.models[0])),
                None => (json!(m), Value::Null),
            };
            json!({
                "id": m,
                "object": "model",
                "created": app.created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": 32768,
                "permission": [{
                    "id": format!("modelperm-{:032x}", rand::random::<u128>()),
                    "object": "model_permission",
                    "created": app.created,
                    "allow_create_engine": false,
                    "allow_sampling": true,
                    "allow_logprobs": true,
                    "allow_search_indices": false,
                    "allow_view": true,
                    "allow_fine_tuning": false,
                    "organization": "*",
                    "group": null,
                    "is_blocking": false,
                }],
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    if !app.metrics_delay.is_zero() {
        tokio::time::sleep(app.metrics_delay).await; // a busy API server's event loop
    }
    let ct = HeaderValue::from_static("text/plain; version=1.0.0; charset=utf-8");
    let mut text = app.engine.metrics.render();
    // Where vLLM has it: after the request-level histograms, before the process family.
    let lora = app.engine.loras.render();
    if !lora.is_empty() {
        let at = text.find("# HELP process_start_time_seconds").unwrap_or(text.len());
        text.insert_str(at, &lora);
    }
    ([(header::CONTENT_TYPE, ct)], text).into_response()
}

async fn chat(
    State(app): State<Arc<App>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(app, conn, body, Kind::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(app, conn, body, Kind::Completion).await
}

async fn complete(
    app: Arc<App>,
    conn: Conn,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            return error(status, &rejection.body_text(), "BadRequestError", None);
        }
    };
    let req: wire::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("Invalid request body: {e}")),
    };
    let model = match &req.model {
        None => app.models[0].clone(),
        Some(m) if app.models.contains(m) => m.clone(),
        Some(m) => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("The model `{m}` does not exist."),
                "NotFoundError",
                Some("model"),
            )
        }
    };
    match kind {
        Kind::Chat if req.messages.as_ref().is_none_or(|m| m.is_empty()) => {
            return bad_request("`messages` is required and must not be empty")
        }
        Kind::Completion if req.prompt.is_none() => return bad_request("`prompt` is required"),
        _ => {}
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(16);
    let Ok(max_tokens) = u32::try_from(max_tokens) else {
        return bad_request(&format!("max_tokens must be at least 1, got {max_tokens}."));
    };
    if max_tokens == 0 {
        return bad_request("max_tokens must be at least 1, got 0.");
    }
    let n = req.n.unwrap_or(1);
    let Some(n) = u32::try_from(n).ok().filter(|n| (1..=16).contains(n)) else {
        return bad_request(&format!("n must be between 1 and 16 in fake-vllm, got {n}."));
    };

    if let Some(code) = app.engine.cfg.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "The server is shutting down (fake-vllm --fail-status).", "InternalServerError", None);
    }

    let stream = req.stream == Some(true);
    let api = if kind == Kind::Chat { flaky::Api::Chat } else { flaky::Api::Completions };
    let fault = match flaky_fault(&app, api, stream) {
        Ok(f) => f,
        Err(resp) => return resp,
    };

    let id = match kind {
        Kind::Chat => format!("chatcmpl-{:016x}", rand::random::<u64>()),
        Kind::Completion => format!("cmpl-{:016x}", rand::random::<u64>()),
    };
    let created = unix_secs();
    let adapter = app.engine.loras.is_adapter(&model).then(|| model.clone());
    let generation = app.engine.generate_prompt(req.prompt_token_ids(kind), max_tokens).with_fault(fault).with_adapter(adapter);

    if stream {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
        let format = SseFormat::new(kind, &id, created, &model, &app.fingerprint);
        let stream = sse_stream(generation, format, include_usage, n);
        return sse_response(stream);
    }

    let mut generation = generation;
    let mut text = String::new();
    let mut finish = "length";
    while let Some(event) = generation.next().await {
        match event {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Aborted => {
                finish = "abort";
                break;
            }
            Event::EngineDead => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    wire::ENGINE_DEAD_MESSAGE,
                    "InternalServerError",
                    None,
                )
            }
            Event::Reset | Event::Cut => {
                conn.kill();
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        }
    }
    let output = wire::Output {
        id: &id,
        created,
        model: &model,
        fingerprint: &app.fingerprint,
        text: &text,
        finish,
        n,
        prompt_tokens: generation.prompt_tokens(),
        completion_tokens: u64::from(generation.sent()),
    };
    let ct = HeaderValue::from_static("application/json");
    (
        [(header::CONTENT_TYPE, ct)],
        wire::full_response(kind, &output),
    )
        .into_response()
}

/// The error a stream ends with to make hyper drop the connection without the last chunk.
#[derive(Debug)]
pub(crate) struct ConnectionReset;

impl std::fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for ConnectionReset {}

enum Phase {
    Generating,
    Usage,
    Done,
    /// Half an event is out: drop the connection.
    Cut,
    Over,
}

struct StreamState {
    generation: Generation,
    format: SseFormat,
    include_usage: bool,
    /// Choices: each engine event is one SSE event per choice, in index order (as vLLM
    /// streams `n` sequences).
    n: u32,
    role_sent: bool,
    pending: VecDeque<Bytes>,
    phase: Phase,
}

impl StreamState {
    /// Queues one event per choice, after the role events that open a chat stream, and
    /// returns the first one due.
    fn per_choice(&mut self, event: impl Fn(&SseFormat, u32) -> Bytes) -> Bytes {
        if !self.role_sent && self.format.kind() == Kind::Chat {
            self.role_sent = true;
            self.pending.extend((0..self.n).map(|i| self.format.role(i)));
        }
        self.pending.extend((0..self.n).map(|i| event(&self.format, i)));
        self.pending.pop_front().unwrap_or_default()
    }
}

/// One SSE event per item, so one chunk per write when tokens are paced.
fn sse_stream(
    generation: Generation,
    format: SseFormat,
    include_usage: bool,
    n: u32,
) -> impl futures_util::Stream<Item = Result<Bytes, ConnectionReset>> + Send + 'static {
    let state = StreamState {
        generation,
        format,
        include_usage,
        n,
        role_sent: false,
        pending: VecDeque::new(),
        phase: Phase::Generating,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if let Some(b) = st.pending.pop_front() {
            return Some((Ok(b), st));
        }
        let item = match st.phase {
            Phase::Generating => match st.generation.next().await {
                Some(Event::Token { text, last, .. }) => {
                    if last {
                        st.phase = if st.include_usage {
                            Phase::Usage
                        } else {
                            Phase::Done
                        };
                    }
                    Ok(st.per_choice(|f, i| f.token(i, &text, last)))
                }
                Some(Event::Aborted) => {
                    st.phase = if st.include_usage { Phase::Usage } else { Phase::Done };
                    Ok(st.per_choice(SseFormat::aborted))
                }
                Some(Event::EngineDead) => {
                    st.phase = Phase::Done;
                    Ok(Bytes::from_static(ENGINE_DEAD_EVENT.as_bytes()))
                }
                Some(Event::Reset) => {
                    st.phase = Phase::Over;
                    reset().await
                }
                Some(Event::Cut) => {
                    st.phase = Phase::Cut;
                    // Half of the event that was due: the role event for chat (it leaves with
                    // the first token), else the first token's.
                    let due = if st.format.kind() == Kind::Chat { st.format.role(0) } else { st.format.token(0, "", false) };
                    Ok(due.slice(..due.len() / 2))
                }
                None => return None,
            },
            Phase::Cut => {
                st.phase = Phase::Over;
                reset().await
            }
            Phase::Usage => {
                st.phase = Phase::Done;
                let g = &st.generation;
                Ok(st.format.usage(g.prompt_tokens(), u64::from(g.sent()) * u64::from(st.n)))
            }
            Phase::Done => {
                st.phase = Phase::Over;
                Ok(Bytes::from_static(DONE_EVENT.as_bytes()))
            }
            Phase::Over => return None,
        };
        Some((item, st))
    })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let make = router(app).into_make_service_with_connect_info::<Conn>();
    axum::serve(listener, make)
        .with_graceful_shutdown(shutdown)
        .await
}
