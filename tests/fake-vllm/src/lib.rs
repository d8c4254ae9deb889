//! A fake vLLM 0.32.0 worker for tests and benchmarks where there is no GPU.
//!
//! It speaks vLLM's real OpenAI wire format (SSE framing, ids, fields), exposes vLLM's real
//! `/metrics` names, queues requests beyond `max_num_seqs` like vLLM's scheduler, and fails
//! only by really failing: a dropped TCP connection, vLLM's own in-stream EngineCore error, or
//! the process being killed. Every generated token names the worker (` <id>:<n>`), so a stream
//! spliced from two workers is visible to the test that reads it.
//!
//! # Endpoints
//!
//! | path | what | engine? |
//! |---|---|---|
//! | `POST /v1/chat/completions`, `POST /v1/completions` | JSON or SSE (`data:` chunks, `data: [DONE]`) | yes |
//! | `POST /v1/responses` | Response object, or SSE with `event:` lines: `response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`…, `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, `response.completed`; `sequence_number` from 0, no `[DONE]` | yes |
//! | `POST /v1/embeddings` | `encoding_format` `float` or `base64` (float32 LE), `dimensions` | yes (one prefill step) |
//! | `POST /v1/audio/transcriptions` | multipart `file` + `model`; `{"text","usage"}`, or `stream=true`: `transcription.chunk` SSE then `[DONE]` | yes |
//! | `POST /tokenize`, `POST /detokenize` | byte-level fake tokenizer, `/detokenize` inverts `/tokenize` | no |
//! | `GET /v1/models`, `/health`, `/ping`, `/version`, `/metrics` | | no |
//! | anything else | `404 {"detail":"Not Found"}` (FastAPI's, as vLLM answers) | no |
//!
//! Errors use vLLM's body `{"error":{"message","type","param","code"}}`.
//!
//! # Failures
//!
//! Fixed at start (flags): `--reset-after-tokens N` (connection dropped after N tokens of every
//! stream), `--error-before-token` (EngineCore death: chat/completions/transcription streams get
//! vLLM's in-stream `{"error":…}` + `[DONE]`; a Responses stream is cut after
//! `response.in_progress`, as uvicorn cuts it when `EngineDeadError` escapes; non-streaming: 500),
//! `--error-after-tokens N` (the same EngineCore death once N tokens of a stream are out),
//! `--abort-before-token` (`finish_reason: "abort"`; Responses: `response.completed` with no
//! output), `--fail-status CODE`.
//!
//! Drawn per request: `--flaky P` (with `--flaky-seed`): each chat, completions and Responses
//! request fails before its first token with probability P, in one of the shapes above drawn at
//! random (reset mid-event, engine error, 500/503, abort; a Responses stream is cut after
//! `response.in_progress`). Each injection is one stderr line, `fake-vllm: flaky <shape> ...`
//! (see [`flaky`]).
//!
//! Toggled at run time on the live process (the binary logs each toggle on stderr):
//! - `SIGUSR1`: engine **hang** on/off (also `--hang-after-ms N`). While hung no token leaves
//!   and nothing is admitted; in-flight streams send nothing and stay open; new requests get
//!   `200` and headers at once (a Responses stream also its `created`/`in_progress` events),
//!   then nothing; `/metrics` answers with the exposition frozen when the hang began
//!   (`vllm:iteration_tokens_total_count`, generation and prompt token counters,
//!   `num_requests_running`). `/tokenize` keeps working (vLLM's API server does it).
//! - `SIGUSR2`: **slow-down** on/off (also `--slow`): TTFT and inter-token delays times
//!   `--slow-factor` (default 5).
//!
//! Fixed at start, not a failure: `--metrics-delay-ms N`, `/metrics` answered N ms late with the
//! numbers of the moment it answers (vLLM's API server under load), requests served as usual.
//!
//! Prefix caching (as vLLM's, on by default): [`prefix`]. `--prefill-us-per-token N` makes the
//! time to first token grow by N µs per prompt token not found in the cache.
//!
//! LoRA adapters (`--lora-modules name=path`, `--max-loras`, `--lora-load-ms`): [`lora`].
//!
//! The real death is the process killed (SIGKILL, SIGSTOP); SIGTERM/SIGINT shut it down.

pub mod engine;
pub mod extra;
pub mod flaky;
pub mod lora;
pub mod metrics;
pub mod prefix;
pub mod responses;
pub mod server;
pub mod wire;

use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

pub use engine::EngineConfig;

/// Everything one worker needs besides its listener.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: EngineConfig,
    /// Served model names; the first one labels the metrics (as in vLLM).
    pub models: Vec<String>,
    /// Start slowed down (as if the slow-down had been toggled on).
    pub start_slow: bool,
    /// Hang the engine this long after `run` starts (drills: a hang at a known time).
    pub hang_after: Option<Duration>,
    /// Request bodies above this get `413`; `None` (the default) accepts any size, as vLLM
    /// does (long contexts and base64 images make multi-MB bodies ordinary).
    pub max_body_bytes: Option<usize>,
    /// `/metrics` answers this late (a busy API server's event loop), with the numbers of the
    /// moment it answers.
    pub metrics_delay: Duration,
}

/// The worker's state, before it serves: the binary takes its engine to wire signals to it.
pub fn build(config: Config) -> Arc<server::App> {
    let mut models = config.models;
    if models.is_empty() {
        models.push("tiny".to_owned());
    }
    let engine = Arc::new(engine::Engine::new(config.engine, &models[0]));
    // Adapters are served under their own names, after the base models (vLLM: `--lora-modules`).
    for (name, _) in &engine.cfg.lora.adapters {
        if !models.contains(name) {
            models.push(name.clone());
        }
    }
    engine.set_slow(config.start_slow);
    if let Some(after) = config.hang_after {
        let e = Arc::clone(&engine);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            e.set_hung(true);
            let _ = writeln!(std::io::stderr(), "fake-vllm: engine hung (--hang-after-ms)");
        });
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let fingerprint = format!("vllm-0.32.0-{:08x}", rand::random::<u32>());
    Arc::new(server::App {
        engine,
        models,
        created,
        fingerprint,
        max_body_bytes: config.max_body_bytes,
        metrics_delay: config.metrics_delay,
    })
}

/// Serves on `listener` until `shutdown` resolves. Call from within a Tokio runtime.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(listener, build(config), shutdown).await
}
