//! dnsd: receives sidecars' telemetry frames over UDP, keeps the fleet state, serves the fleet
//! view over HTTP for the Envoy filter, and answers DNS for the service names (see [`dns`]).
//!
//! [`run`] takes already-bound sockets so tests (and systemd socket activation) can bind port 0.
//! Operators steer it through [`admin`] (authenticated overrides, persisted) and reload its
//! config without a restart ([`reload`]).

pub mod admin;
pub mod admin_api;
pub mod config;
pub mod error;
pub mod dns;
pub mod http;
pub mod ops;
mod prom;
pub mod reload;
pub mod state;
pub mod tls;
pub mod udp_batch;
pub mod xds;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, watch};

pub use config::{Config, ConfigError};
use dns::DnsService;
use state::{now_ms, AppState};

/// The log filter when `GPUHA_LOG` is not set. hickory logs a WARN per malformed EDNS option
/// (and the like) in packets anyone can send: at the default level a query flood would be a
/// log flood. hickory then drops just the options and the query is answered as usual; queries
/// that do not parse at all are counted in `gpuha_dnsd_dns_malformed_total`.
pub const DEFAULT_LOG_FILTER: &str = "info,hickory_proto=error,hickory_server=error";

/// What the HTTP and DNS handlers share.
pub struct Services {
    pub state: Arc<AppState>,
    pub dns: Option<Arc<DnsService>>,
    /// `/v1/fleet?ages=bounded` bodies and their entity tags.
    pub fleet_cache: http::FleetCache,
    /// HTTP connections closed at once because `http.max_connections` were open.
    pub http_rejected: std::sync::atomic::AtomicU64,
    /// Operators' overrides and the admin token.
    pub admin: Arc<admin::Admin>,
    /// Where a reload reads the config from.
    pub reload_source: reload::ReloadSource,
    /// The config in force (the last one loaded): a reload compares against it.
    pub running: Mutex<Config>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// When the config in force was loaded (start or the last good reload).
    pub last_reload_ok_ms: AtomicU64,
    /// The latest reload was refused (the running config is older than the file).
    pub last_reload_failed: AtomicBool,
    /// EDS answers by outcome ([`xds`]).
    pub eds: xds::EdsCounters,
    /// `[http.tls]`: the HTTP side's TLS configuration and refusals; `None`: plain (loopback).
    pub tls: Option<tls::Tls>,
}

impl Services {
    /// Marks the workers of `view` an operator drained, by id or by pool (once the pool is
    /// safe: [`gpuha_liveness::admin`]). A pool this dnsd hands out no answers for is safe
    /// at once.
    pub fn mark_drained(&self, view: &mut gpuha_liveness::FleetView, now_ms: u64) {
        let ov = self.admin.overrides();
        if ov.is_empty() {
            return;
        }
        let mut safe: std::collections::HashMap<String, Option<u64>> = std::collections::HashMap::new();
        gpuha_liveness::admin::mark_drained(view, &ov, now_ms, |pool| {
            if !ov.pools.contains_key(pool) {
                return None;
            }
            *safe.entry(pool.to_string()).or_insert_with(|| Some(self.dns.as_ref().and_then(|d| d.safe_at(pool)).unwrap_or(0)))
        });
    }
}

/// What [`run_with`] takes beside the config: where reloads read from, and a channel whose
/// messages trigger one (`main` sends one per SIGHUP).
#[derive(Debug, Default)]
pub struct RunOptions {
    pub reload_source: reload::ReloadSource,
    pub reload_requests: Option<mpsc::Receiver<()>>,
}

/// Bound sockets for every service dnsd runs.
pub struct Listeners {
    pub ingest: std::net::UdpSocket,
    pub http: std::net::TcpListener,
    pub dns: Option<(std::net::UdpSocket, std::net::TcpListener)>,
    /// `http.metrics_listen`: plain `/metrics` and `/healthz`.
    pub metrics: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the addresses in `config` (port 0 picks a free port).
    pub fn bind(config: &Config) -> io::Result<Self> {
        let ingest = bind_udp(config.ingest.listen, config.ingest.recv_buffer_bytes)?;
        let http = std::net::TcpListener::bind(config.http.listen)?;
        let dns = match &config.dns {
            Some(d) => Some(bind_dns(d.listen)?),
            None => None,
        };
        let metrics = match config.http.metrics_listen {
            Some(a) => Some(std::net::TcpListener::bind(a)?),
            None => None,
        };
        Ok(Listeners { ingest, http, dns, metrics })
    }

    /// The line dnsd prints once every socket is bound; tests wait for it.
    pub fn ready_line(&self) -> io::Result<String> {
        let dns = match &self.dns {
            Some((u, _)) => u.local_addr()?.to_string(),
            None => "-".into(),
        };
        let mut line = format!("READY ingest={} http={} dns={}", self.ingest.local_addr()?, self.http.local_addr()?, dns);
        if let Some(m) = &self.metrics {
            line.push_str(&format!(" metrics={}", m.local_addr()?));
        }
        Ok(line)
    }
}

/// DNS over UDP and TCP on one port. With port 0 the kernel picks the UDP port, and that port
/// may be taken for TCP: try again with another.
fn bind_dns(addr: SocketAddr) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let mut tries = 0;
    loop {
        let udp = bind_udp(addr, 4 << 20)?;
        match std::net::TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse && tries < 32 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

fn bind_udp(addr: SocketAddr, rcvbuf: usize) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // The kernel may clamp this to net.core.rmem_max; a smaller buffer still works.
    let _ = sock.set_recv_buffer_size(rcvbuf);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Runs dnsd until `shutdown` resolves, with no reload source.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow_lite::Result<()> {
    run_with(config, listeners, RunOptions::default(), shutdown).await
}

/// Runs dnsd until `shutdown` resolves; `options` say how it reloads.
pub async fn run_with(config: Config, listeners: Listeners, options: RunOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow_lite::Result<()> {
    let keys = config.key_ring()?;
    let token = match &config.admin.token_file {
        Some(p) => Some(admin::read_token(p)?),
        None => None,
    };
    let admin = Arc::new(admin::Admin::new(config.admin.state_file.clone(), token)?);
    let tls = match &config.http.tls {
        Some(t) => Some(tls::Tls::new(tls::server_config(t)?)),
        None => None,
    };
    let started = now_ms();
    let state = Arc::new(AppState::new(keys, config.ingest.max_skew_ms, config.ingest.forget_after_ms, config.ingest.max_workers, started));
    let dns = match &config.dns {
        Some(d) => Some(Arc::new(DnsService::new(d, state.clone(), admin.clone())?)),
        None => None,
    };
    let services = Arc::new(Services {
        state: state.clone(),
        dns: dns.clone(),
        fleet_cache: http::FleetCache::default(),
        http_rejected: Default::default(),
        admin,
        reload_source: options.reload_source,
        running: Mutex::new(config.clone()),
        reloads_ok: AtomicU64::new(0),
        reloads_failed: AtomicU64::new(0),
        last_reload_ok_ms: AtomicU64::new(started),
        last_reload_failed: AtomicBool::new(false),
        eds: xds::EdsCounters::default(),
        tls,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let udp = tokio::net::UdpSocket::from_std(listeners.ingest)?;
    let ingest_task = tokio::spawn(ingest_loop(udp, state.clone(), stopped(stop_rx.clone())));

    let housekeeping = {
        let state = state.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            let tick = async {
                let mut iv = tokio::time::interval(Duration::from_secs(5));
                loop {
                    iv.tick().await;
                    state.housekeeping(now_ms());
                }
            };
            tokio::select! { _ = tick => {}, _ = stop => {} }
        })
    };

    listeners.http.set_nonblocking(true)?;
    let http_listener = tokio::net::TcpListener::from_std(listeners.http)?;
    let http_stop = stopped(stop_rx.clone());
    let http_limits = http::Limits {
        header_read_timeout: Duration::from_millis(config.http.header_read_timeout_ms),
        max_connections: config.http.max_connections,
    };
    let reload_task = options.reload_requests.map(|mut rx| {
        let services = services.clone();
        let stop = stopped(stop_rx.clone());
        tokio::spawn(async move {
            let work = async {
                while rx.recv().await.is_some() {
                    let s = services.clone();
                    // The outcome is logged and counted by `reload`.
                    let _ = tokio::task::spawn_blocking(move || reload::reload(&s, "SIGHUP")).await;
                }
            };
            tokio::select! { _ = work => {}, _ = stop => {} }
        })
    });
    let metrics_task = match listeners.metrics {
        Some(m) => {
            m.set_nonblocking(true)?;
            let m = tokio::net::TcpListener::from_std(m)?;
            Some(tokio::spawn(http::serve_with(m, services.clone(), http::metrics_router(services.clone()), false, http_limits, stopped(stop_rx.clone()))))
        }
        None => None,
    };
    let http_task = tokio::spawn(http::serve(http_listener, services, http_limits, http_stop));

    let dns_task = match (dns, listeners.dns) {
        (Some(svc), Some((u, t))) => {
            t.set_nonblocking(true)?;
            let u = tokio::net::UdpSocket::from_std(u)?;
            let t = tokio::net::TcpListener::from_std(t)?;
            Some(tokio::spawn(svc.serve(u, t, stopped(stop_rx.clone()))))
        }
        _ => None,
    };

    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = ingest_task.await;
    let _ = housekeeping.await;
    let _ = http_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    if let Some(t) = dns_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!("dns server ended with an error: {e}");
        }
    }
    Ok(())
}

async fn ingest_loop(sock: tokio::net::UdpSocket, state: Arc<AppState>, stop: impl Future<Output = ()>) {
    // One byte over the frame limit, so an oversized datagram is seen as such and dropped.
    let mut batch = udp_batch::RecvBatch::new(gpuha_liveness::MAX_FRAME_LEN + 1);
    let work = async {
        loop {
            match batch.recv(&sock).await {
                // One lock and one clock read for the whole batch (frames that arrived together).
                Ok(n) => state.ingest_batch((0..n).map(|i| batch.get(i)), now_ms(), |from, reason| {
                    tracing::debug!(from = ?from, reason = reason.as_str(), "dropped datagram");
                }),
                // ICMP errors and the like surface here on some platforms: keep receiving.
                Err(e) => tracing::debug!("udp recv error: {e}"),
            }
        }
    };
    tokio::select! { _ = work => {}, _ = stop => {} }
}

/// A tiny boxed error so `run` can return config, io and DNS errors alike.
pub mod anyhow_lite {
    pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
    pub type Result<T> = std::result::Result<T, Error>;
}
