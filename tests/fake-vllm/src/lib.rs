//! A fake vLLM 0.32.0 worker for tests and benchmarks where there is no GPU.
//!
//! It speaks vLLM's real OpenAI wire format (SSE framing, ids, fields), exposes vLLM's real
//! `/metrics` names, queues requests beyond `max_num_seqs` like vLLM's scheduler, and fails
//! only by really failing: a dropped TCP connection, vLLM's own in-stream EngineCore error, or
//! the process being killed. Every generated token names the worker (` <id>:<n>`), so a stream
//! spliced from two workers is visible to the test that reads it.

pub mod engine;
pub mod extra;
pub mod metrics;
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
}

/// The worker's state, before it serves: the binary takes its engine to wire signals to it.
pub fn build(config: Config) -> Arc<server::App> {
    let mut models = config.models;
    if models.is_empty() {
        models.push("tiny".to_owned());
    }
    let engine = Arc::new(engine::Engine::new(config.engine, &models[0]));
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
