//! `gpuha-sidecar`: scrape an unmodified vLLM's /metrics, send signed telemetry frames.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gpuha_sidecar::{Config, Event, Sidecar};

#[derive(Parser, Debug)]
#[command(name = "gpuha-sidecar", version, about = "Scrape vLLM's /metrics and send signed, content-free UDP telemetry frames")]
struct Args {
    /// TOML config file; flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    metrics_url: Option<String>,
    /// dnsd ingest address (repeat for several dnsd instances).
    #[arg(long)]
    ingest: Vec<SocketAddr>,
    #[arg(long)]
    worker_id: Option<String>,
    #[arg(long)]
    pool: Option<String>,
    /// Address Envoy uses to reach this vLLM.
    #[arg(long)]
    serve_addr: Option<SocketAddr>,
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long)]
    key_id: Option<u16>,
    #[arg(long)]
    interval_ms: Option<u64>,
    #[arg(long)]
    scrape_timeout_ms: Option<u64>,
    /// Scrapes out at once while vLLM answers slowly (default 8).
    #[arg(long)]
    max_scrapes_in_flight: Option<usize>,
    /// Served model name (repeat); default: vLLM's `model_name` labels.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Scrape once, print the frame that would be sent, and exit (sends nothing).
    #[arg(long)]
    once: bool,
    /// Log every frame sent.
    #[arg(long, short)]
    verbose: bool,
}

fn config(args: &Args) -> Result<Config, String> {
    let mut c = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config {
            metrics_url: "http://127.0.0.1:8000/metrics".into(),
            ingest: vec![],
            worker_id: args.worker_id.clone().ok_or("--worker-id is required without --config")?,
            pool: args.pool.clone().ok_or("--pool is required without --config")?,
            serve_addr: args.serve_addr.ok_or("--serve-addr is required without --config")?,
            key_file: args.key_file.clone().ok_or("--key-file is required without --config")?,
            key_id: 1,
            interval_ms: 500,
            scrape_timeout_ms: gpuha_sidecar::config::DEFAULT_SCRAPE_TIMEOUT_MS,
            max_scrapes_in_flight: gpuha_sidecar::config::DEFAULT_MAX_SCRAPES_IN_FLIGHT,
            max_metrics_bytes: 8 << 20,
            models: vec![],
        },
    };
    if let Some(v) = &args.metrics_url {
        c.metrics_url = v.clone();
    }
    if !args.ingest.is_empty() {
        c.ingest = args.ingest.clone();
    }
    if let Some(v) = &args.worker_id {
        c.worker_id = v.clone();
    }
    if let Some(v) = &args.pool {
        c.pool = v.clone();
    }
    if let Some(v) = args.serve_addr {
        c.serve_addr = v;
    }
    if let Some(v) = &args.key_file {
        c.key_file = v.clone();
    }
    if let Some(v) = args.key_id {
        c.key_id = v;
    }
    if let Some(v) = args.interval_ms {
        c.interval_ms = v;
    }
    if let Some(v) = args.scrape_timeout_ms {
        c.scrape_timeout_ms = v;
    }
    if let Some(v) = args.max_scrapes_in_flight {
        c.max_scrapes_in_flight = v;
    }
    if !args.models.is_empty() {
        c.models = args.models.clone();
    }
    if args.once && c.ingest.is_empty() {
        // --once sends nothing; it needs no ingest address.
        c.ingest.push(SocketAddr::from(([127, 0, 0, 1], 9)));
    }
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let c = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpuha-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match c.read_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("gpuha-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let boot_id: u64 = rand::random();
    let mut sidecar = Sidecar::new(c.clone(), key, boot_id);
    if args.once {
        return match sidecar.scrape().and_then(|f| Ok((sidecar.encode(&f)?.len(), f))) {
            Ok((len, f)) => {
                println!("{f:#?}");
                println!("encoded: {len} bytes (limit {})", gpuha_liveness::MAX_FRAME_LEN);
                if !sidecar.saturated().is_empty() {
                    println!("saturated (beyond the range of f64, sent as +-f64::MAX): {:?}", sidecar.saturated());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gpuha-sidecar: scrape of {} failed: {e}", c.metrics_url);
                ExitCode::FAILURE
            }
        };
    }
    eprintln!(
        "gpuha-sidecar: worker {} pool {} serving {} scraping {} every {} ms, sending to {:?} (boot {boot_id:016x})",
        c.worker_id, c.pool, c.serve_addr, c.metrics_url, c.interval_ms, c.ingest
    );
    let verbose = args.verbose;
    let mut failing = false;
    let mut saturating = false;
    let result = sidecar.run(|ev| match ev {
        Event::Sent { frame, bytes, send_errors, saturated, saturated_total } => {
            if failing {
                eprintln!("gpuha-sidecar: scrapes work again, sending");
                failing = false;
            }
            // Like failures: the first scrape of a run that saturates, not every tick.
            if !saturated.is_empty() && (!saturating || verbose) {
                eprintln!("gpuha-sidecar: vLLM reported {saturated:?} beyond the range of f64 (summed over engines); sent as +-f64::MAX ({saturated_total} saturated so far)");
            }
            saturating = !saturated.is_empty();
            if verbose {
                if frame.adapters.is_empty() {
                    eprintln!("sent seq={} bytes={bytes} send_errors={send_errors}", frame.seq);
                } else {
                    eprintln!("sent seq={} bytes={bytes} send_errors={send_errors} adapters={}", frame.seq, frame.adapters.join(","));
                }
            }
        }
        Event::Overtaken { overtaken_total } => {
            if verbose {
                eprintln!("dropped an answer older than a frame already sent ({overtaken_total} so far)");
            }
        }
        Event::Skipped(e) => {
            // Log the first failure of a run of failures, not every tick.
            if !failing || verbose {
                eprintln!("gpuha-sidecar: scrape failed, sending nothing: {e}");
            }
            failing = true;
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpuha-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}
