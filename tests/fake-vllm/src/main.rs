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
    /// Failure injection: end every stream before its first token with vLLM's
    /// `finish_reason: "abort"` event then [DONE] (what vLLM 0.26 sends to the requests it
    /// aborts when its API server gets SIGTERM).
    #[arg(long)]
    abort_before_token: bool,
    /// Failure injection: answer every valid completion request with this HTTP status and a
    /// JSON error body (vLLM answers 500 to requests that reach an API server shutting down).
    #[arg(long)]
    fail_status: Option<u16>,
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
            abort_before_token: args.abort_before_token,
            fail_status: args.fail_status,
        },
        models: args.models,
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
        let mut out = std::io::stdout().lock();
        if writeln!(out, "LISTENING {addr}")
            .and_then(|()| out.flush())
            .is_err()
        {
            eprintln!("fake-vllm: cannot write the LISTENING line to stdout");
        }
        drop(out);
        match fake_vllm::run(config, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fake-vllm: server error: {e}");
                ExitCode::FAILURE
            }
        }
    })
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
