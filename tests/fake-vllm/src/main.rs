//! `fake-vllm`: prints `LISTENING <ip>:<port>` once bound, then serves until SIGTERM/SIGINT.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fake_vllm::{Config, EngineConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A fake vLLM 0.32.0 OpenAI server that fails only by really failing"
)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind; 0 picks a free one (read it from the LISTENING line).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Worker id; every token is ` <id>:<n>`.
    #[arg(long, default_value = "w0")]
    id: String,
    /// Served model name; may be given several times. The first labels the metrics.
    #[arg(long = "model", default_value = "tiny")]
    models: Vec<String>,
    /// Time to first token after admission, in milliseconds.
    #[arg(long, default_value_t = 50)]
    ttft_ms: u64,
    /// Decode rate per stream; 0 means no delay between tokens.
    #[arg(long, default_value_t = 200.0)]
    tokens_per_s: f64,
    /// Concurrent generations; further requests wait (counted in num_requests_waiting).
    #[arg(long, default_value_t = 8)]
    max_num_seqs: usize,
    /// KV cache capacity in tokens (denominator of vllm:kv_cache_usage_perc).
    #[arg(long, default_value_t = 4096)]
    kv_capacity_tokens: u64,
    /// Failure injection: drop the TCP connection after N tokens of every stream (0: right
    /// after the headers, before the first token).
    #[arg(long)]
    reset_after_tokens: Option<u32>,
    /// Failure injection: send vLLM's EngineCore-death error event then [DONE] in place of
    /// the first token.
    #[arg(long)]
    error_before_token: bool,
    /// Failure injection: send vLLM's EngineCore-death error event then [DONE] once N tokens
    /// of a stream are out (the engine dying mid-generation).
    #[arg(long)]
    error_after_tokens: Option<u32>,
    /// Failure injection: end every stream before its first token with vLLM's
    /// `finish_reason: "abort"` event then [DONE] (what vLLM 0.26 sends to the requests it
    /// aborts when its API server gets SIGTERM).
    #[arg(long)]
    abort_before_token: bool,
    /// Failure injection: answer every valid completion request with this HTTP status and a
    /// JSON error body (vLLM answers 500 to requests that reach an API server shutting down).
    #[arg(long)]
    fail_status: Option<u16>,
    /// Failure injection: each chat, completions and Responses request independently fails
    /// before its first token with this probability (0..1), in one of vLLM's ways drawn per
    /// request: connection reset mid-event, in-band engine error, HTTP 500/503, abort (Responses:
    /// its own shapes). Each injection is logged on stderr (`fake-vllm: flaky <shape> ...`).
    #[arg(long, default_value_t = 0.0, value_parser = probability)]
    flaky: f64,
    /// Seed of the --flaky draws (default: random).
    #[arg(long)]
    flaky_seed: Option<u64>,
    /// While slowed down (SIGUSR2, or --slow), TTFT and inter-token delays are multiplied by
    /// this.
    #[arg(long, default_value_t = 5.0)]
    slow_factor: f64,
    /// Start slowed down.
    #[arg(long)]
    slow: bool,
    /// Hang the engine this many milliseconds after start (SIGUSR1 resumes it).
    #[arg(long)]
    hang_after_ms: Option<u64>,
    /// Request bodies above this many bytes get 413 (default: no limit, as in vLLM).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// `/metrics` answers this many milliseconds late, with the numbers of the moment it
    /// answers, while requests are served as usual: vLLM's API server under load, whose event
    /// loop serves `/metrics` behind the token streams (real CPU build, 40 streams: up to 5 s).
    #[arg(long, default_value_t = 0)]
    metrics_delay_ms: u64,
    /// Prefill time per prompt token not found in the prefix cache, in microseconds, added to
    /// --ttft-ms (0: TTFT does not depend on the prompt).
    #[arg(long, default_value_t = 0)]
    prefill_us_per_token: u64,
    /// Prefix cache capacity in tokens (0: no prefix caching).
    #[arg(long, default_value_t = 65536)]
    prefix_cache_tokens: u64,
    /// LoRA adapters served under their own model names, `name=path` (vLLM's `--lora-modules`;
    /// several after one flag or the flag repeated). Nothing is read from the path.
    #[arg(long = "lora-modules", num_args = 1.., value_parser = lora_module)]
    lora_modules: Vec<(String, String)>,
    /// Adapters held loaded at once (vLLM's `--max-loras`); the least recently used one not in
    /// use is evicted to load another.
    #[arg(long, default_value_t = 1)]
    max_loras: usize,
    /// Time to load an adapter that is not loaded, added to the time to first token.
    #[arg(long, default_value_t = 200)]
    lora_load_ms: u64,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let inter_token = if args.tokens_per_s > 0.0 && args.tokens_per_s.is_finite() {
        Duration::from_secs_f64(1.0 / args.tokens_per_s)
    } else {
        Duration::ZERO
    };
    let config = Config {
        engine: EngineConfig {
            worker_id: args.id,
            ttft: Duration::from_millis(args.ttft_ms),
            inter_token,
            max_num_seqs: args.max_num_seqs,
            kv_capacity_tokens: args.kv_capacity_tokens,
            reset_after_tokens: args.reset_after_tokens,
            error_before_token: args.error_before_token,
            error_after_tokens: args.error_after_tokens,
            abort_before_token: args.abort_before_token,
            fail_status: args.fail_status,
            slow_factor: args.slow_factor,
            flaky: args.flaky,
            flaky_seed: args.flaky_seed,
            prefill_per_token: Duration::from_micros(args.prefill_us_per_token),
            prefix_cache_tokens: args.prefix_cache_tokens,
            lora: fake_vllm::lora::LoraConfig {
                adapters: args.lora_modules,
                max_loras: args.max_loras.max(1),
                load: Duration::from_millis(args.lora_load_ms),
            },
        },
        models: args.models,
        start_slow: args.slow,
        hang_after: args.hang_after_ms.map(Duration::from_millis),
        max_body_bytes: args.max_body_bytes,
        metrics_delay: Duration::from_millis(args.metrics_delay_ms),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-vllm: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fake-vllm: cannot bind {}:{}: {e}", args.host, args.port);
                return ExitCode::FAILURE;
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("fake-vllm: no local address: {e}");
                return ExitCode::FAILURE;
            }
        };
        let app = fake_vllm::build(config);
        // Before the LISTENING line: SIGUSR1/2 kill a process that has no handler yet.
        if let Err(e) = toggles(&app.engine) {
            eprintln!("fake-vllm: cannot install the SIGUSR1/SIGUSR2 handlers: {e}");
            return ExitCode::FAILURE;
        }
        let mut out = std::io::stdout().lock();
        if writeln!(out, "LISTENING {addr}")
            .and_then(|()| out.flush())
            .is_err()
        {
            eprintln!("fake-vllm: cannot write the LISTENING line to stdout");
        }
        drop(out);
        match fake_vllm::server::serve(listener, app, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fake-vllm: server error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGUSR1 toggles the engine hang, SIGUSR2 the slow-down; each toggle is logged on stderr
/// (tests and drills wait for that line).
#[cfg(unix)]
fn toggles(engine: &std::sync::Arc<fake_vllm::engine::Engine>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let e = std::sync::Arc::clone(engine);
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let hung = e.toggle_hang();
            log(if hung { "fake-vllm: engine hung (SIGUSR1)" } else { "fake-vllm: engine resumed (SIGUSR1)" });
        }
    });
    let e = std::sync::Arc::clone(engine);
    tokio::spawn(async move {
        while usr2.recv().await.is_some() {
            let slow = e.toggle_slow();
            log(if slow { "fake-vllm: engine slowed down (SIGUSR2)" } else { "fake-vllm: engine at full speed (SIGUSR2)" });
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn toggles(_: &std::sync::Arc<fake_vllm::engine::Engine>) -> std::io::Result<()> {
    Ok(())
}

/// A `--lora-modules` entry: `name=path`.
fn lora_module(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_owned(), p.to_owned())),
        _ => Err(format!("{s:?} is not name=path")),
    }
}

/// A probability: a number from 0 to 1.
fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability (a number from 0 to 1)")),
    }
}

/// A line on stderr; a closed stderr must not take the server down.
fn log(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
