//! A fake vLLM 0.32.0 worker for tests and benchmarks where there is no GPU.
//!
//! It speaks vLLM's real OpenAI wire format (SSE framing, ids, fields), exposes vLLM's real
//! `/metrics` names, queues requests beyond `max_num_seqs` like vLLM's scheduler, and fails
//! only by really failing: a dropped TCP connection, vLLM's own in-stream EngineCore error, or
//! the process being killed. Every generated token names the worker (` <id>:<n>`), so a stream
//! spliced from two workers is visible to the test that reads it.

pub mod engine;
pub mod metrics;
pub mod server;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

pub use engine::EngineConfig;

/// Everything one worker needs besides its listener.
#[derive(Clone, Debug)]
pub struct Config {
    pub engine: EngineConfig,
    /// Served model names; the first one labels the metrics (as in vLLM).
    pub models: Vec<String>,
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut models = config.models;
    if models.is_empty() {
        models.push("tiny".to_owned());
    }
    let engine = Arc::new(engine::Engine::new(config.engine, &models[0]));
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let fingerprint = format!("vllm-0.32.0-{:08x}", rand::random::<u32>());
    let app = Arc::new(server::App {
        engine,
        models,
        created,
        fingerprint,
    });
    server::serve(listener, app, shutdown).await
}
