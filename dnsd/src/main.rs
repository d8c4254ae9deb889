//! `gpuha-dnsd`: telemetry ingest, fleet view and authoritative DNS.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use gpuha_dnsd::config::{AdminConfig, Config, HttpConfig, IngestConfig, KeyConfig};
use gpuha_dnsd::reload::ReloadSource;
use gpuha_dnsd::{Listeners, RunOptions};

#[derive(Parser, Debug)]
#[command(name = "gpuha-dnsd", version, about = "GPU HA telemetry ingest, fleet view and authoritative DNS")]
struct Args {
    /// TOML config file. Flags below override its listen addresses.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP address for telemetry frames (port 0: pick a free one).
    #[arg(long)]
    ingest: Option<SocketAddr>,
    /// HTTP address for /v1/fleet and /metrics: a loopback address unless the config has
    /// [http.tls] (plain HTTP is refused elsewhere).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// HMAC key file (with no --config): key id --key-id.
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    key_id: u16,
    /// Bearer token file for the admin API (/v1/admin); without it (or `[admin] token_file`)
    /// dnsd accepts no admin request.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Where operators' overrides (drains, forced pools) are kept across restarts.
    #[arg(long)]
    admin_state_file: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
}

/// What the command line changes in a config file's settings: at start and on every reload.
fn adjust(args: &Args) -> impl Fn(&mut Config) + Send + Sync + 'static {
    let (ingest, http) = (args.ingest, args.http);
    let (token, state) = (args.admin_token_file.clone(), args.admin_state_file.clone());
    move |config: &mut Config| {
        if let Some(a) = ingest {
            config.ingest.listen = a;
        }
        if let Some(a) = http {
            config.http.listen = a;
        }
        if let Some(t) = &token {
            config.admin.token_file = Some(t.clone());
        }
        if let Some(s) = &state {
            config.admin.state_file = Some(s.clone());
        }
    }
}

fn load(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => {
            let file = args.key_file.clone().ok_or("give --config FILE, or --key-file FILE for a config-less run")?;
            Config {
                ingest: IngestConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
                    recv_buffer_bytes: 8 << 20,
                    max_skew_ms: gpuha_liveness::ingest::DEFAULT_MAX_SKEW_MS,
                    forget_after_ms: gpuha_dnsd::config::DEFAULT_FORGET_AFTER_MS,
                    max_workers: gpuha_liveness::ingest::DEFAULT_MAX_WORKERS,
                    keys: vec![KeyConfig { id: args.key_id, file }],
                },
                http: HttpConfig::default(),
                dns: None,
                admin: AdminConfig::default(),
                eds: Default::default(),
            }
        }
    };
    adjust(args)(&mut config);
    config.validate().map_err(|e| e.to_string())?;
    config.key_ring().map_err(|e| e.to_string())?;
    if let Some(p) = &config.admin.token_file {
        gpuha_dnsd::admin::read_token(p).map_err(|e| e.to_string())?;
    }
    if let Some(t) = &config.http.tls {
        gpuha_dnsd::tls::server_config(t).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &config.admin.state_file {
        gpuha_dnsd::admin::load_state(p).map_err(|e| e.to_string())?;
    }
    Ok(config)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GPUHA_LOG").unwrap_or_else(|_| gpuha_dnsd::DEFAULT_LOG_FILTER.into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpuha-dnsd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuha-dnsd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options_source = ReloadSource { config_path: args.config.clone(), adjust: Some(Arc::new(adjust(&args))) };
    let result = rt.block_on(async move {
        // SIGHUP reloads the config (see gpuha_dnsd::reload); installed before READY so a
        // SIGHUP sent once READY is printed is never the default action (exit).
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // Full: a reload is already pending, and it will read the newest file.
                let _ = reload_tx.try_send(());
            }
        });
        let options = RunOptions { reload_source: options_source, reload_requests: Some(reload_rx) };
        let listeners = Listeners::bind(&config)?;
        println!("{}", listeners.ready_line()?);
        let _ = std::io::stdout().flush();
        let shutdown = async {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        };
        gpuha_dnsd::run_with(config, listeners, options, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpuha-dnsd: {e}");
            ExitCode::FAILURE
        }
    }
}
