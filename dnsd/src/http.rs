//! dnsd's HTTP side: `GET /v1/fleet` (the fleet view the Envoy filter polls), `GET /metrics`
//! (Prometheus text), `GET /healthz`, and for operators ([`crate::ops`]) `GET /v1/dns` (the DNS
//! answer right now) and the fleet page at `GET /` and `GET /fleet`; the authenticated admin API
//! under `/v1/admin` ([`crate::admin`]); and `POST /v3/discovery:endpoints`, the routers' worker
//! cluster over EDS ([`crate::xds`]). All of it over TLS with client certificates when the
//! config has `[http.tls]` ([`crate::tls`]); `http.metrics_listen` adds a plain listener for
//! `/metrics` and `/healthz` only ([`metrics_router`]).
//!
//! `/v1/fleet` takes two optional query parameters:
//!
//! * `pool=a,b`: only the workers (and pool counts) of these pools: a router asks only for the
//!   pools of its own cluster, so a fleet split into pools costs each router only its share.
//! * `ages=bounded`: the cacheable form ([`Ages::Bounded`]): ages change only when they matter
//!   to the 3 s freshness gate, and past it in a few steps (how long a stale worker has shown
//!   no sign of life, never overstated), and `now_ms` is 0. The body is built once
//!   per distinct content and carries an `ETag`; a request with a matching `If-None-Match`
//!   gets `304 Not Modified`, which re-vouches for the view the client already holds (its ages
//!   count from this response). Without it (`ages=exact`, the default) every answer is built
//!   afresh with exact ages, as the drills and humans read it.
//!
//! Both forms come as JSON, or in binary ([`gpuha_liveness::fleetwire`]) to a client whose
//! `Accept` names `application/x-gpuha-fleet` (the Envoy filter: no JSON parse per poll, and
//! numbers updated in place); each form has its own `ETag`, and every answer says `Vary: accept`.
//!
//! A query names at most [`MAX_QUERY_POOLS`] pools (more: `400`). Views are built from the
//! state's snapshot, never under the ingest lock, on the blocking pool and a few at a time, so
//! that what a client asks for here costs DNS answers and frame ingest nothing (see
//! [`crate::state`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use gpuha_liveness::frame::MAX_STR as MAX_POOL_ID_LEN;
use gpuha_liveness::{fleetwire, Ages, DropReason, FleetView};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::state::now_ms;
use crate::Services;

/// What [`serve`] allows a client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection whose request headers are not complete in this time is closed.
    pub header_read_timeout: Duration,
    /// Open connections at most; past it new ones are closed at once and counted.
    pub max_connections: usize,
}

/// Serves [`router`] on `listener` until `shutdown`, over HTTP/1.1 (what the filter and
/// Prometheus speak), over TLS with client certificates when `[http.tls]` is set
/// ([`crate::tls`]). Unlike `axum::serve` it bounds what a slow or greedy client can hold: a
/// TLS handshake or request headers that do not complete in time close the connection
/// (slowloris), and connections past the limit are closed on accept, so idle clients cannot use
/// up the file descriptors the UDP and DNS sockets share. On shutdown, requests in flight get
/// a few seconds to finish.
pub async fn serve(listener: tokio::net::TcpListener, services: Arc<Services>, limits: Limits, shutdown: impl Future<Output = ()>) {
    let app = router(services.clone());
    let tls = services.tls.is_some();
    serve_with(listener, services, app, tls, limits, shutdown).await;
}

/// Serves `app` on `listener` (see [`serve`]); over TLS when `tls` (with the configuration in
/// force in `services.tls` at each accept).
pub async fn serve_with(listener: tokio::net::TcpListener, services: Arc<Services>, app: Router, tls: bool, limits: Limits, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off a little instead of spinning.
                    tracing::warn!("http accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            services.http_rejected.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let closing = closing_rx.clone();
        let acceptor = if tls { services.tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.current())) } else { None };
        let services = services.clone();
        conns.spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                return serve_conn(stream, service, limits, closing, peer).await;
            };
            // The handshake has the header read timeout too: a client that opens a connection
            // and sends nothing holds a slot no longer over TLS than over plain HTTP.
            let accepted = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
            let Some(tls) = services.tls.as_ref() else { return };
            match accepted {
                Ok(Ok(stream)) => {
                    tls.note_accepted();
                    serve_conn(stream, service, limits, closing, peer).await;
                }
                Ok(Err(e)) => tls.note_refused(crate::tls::Refusal::of(&e), peer, &e.to_string(), now_ms()),
                Err(_) => tls.note_refused(crate::tls::Refusal::Timeout, peer, "no complete handshake within http.header_read_timeout_ms", now_ms()),
            }
        });
    }
    let _ = closing_tx.send(true);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        conns.abort_all();
    }
}

/// One connection: HTTP/1.1 with the header read timeout, closed gracefully on shutdown.
async fn serve_conn<S>(stream: S, service: TowerToHyperService<Router>, limits: Limits, mut closing: watch::Receiver<bool>, peer: std::net::SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "http connection ended: {e}");
    }
}

/// What `http.metrics_listen` serves (plain HTTP): `/metrics` and `/healthz` only.
pub fn metrics_router(services: Arc<Services>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(|| async { "ok\n" })).with_state(services)
}

pub fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/v1/fleet", get(fleet))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/dns", get(dns_status))
        .route("/", get(fleet_page))
        .route("/fleet", get(fleet_page))
        .route("/v1/admin", get(crate::admin_api::status))
        .route("/v1/admin/workers/{id}", post(crate::admin_api::set_worker))
        .route("/v1/admin/pools/{id}", post(crate::admin_api::set_pool))
        .route("/v1/admin/reload", post(crate::admin_api::reload))
        .route("/v3/discovery:endpoints", post(crate::xds::endpoints))
        .with_state(services)
}

#[derive(Debug, Default, Deserialize)]
pub struct FleetQuery {
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    ages: Option<String>,
}

/// Most pools one `/v1/fleet` query may name: a router names the pools of its own cluster, a
/// handful. It bounds the query's size and what the cache keeps per entry.
pub const MAX_QUERY_POOLS: usize = 1_024;

/// The latest bounded view per pool selection, its body and its entity tag; and how many views
/// may be built at once.
#[derive(Debug)]
pub struct FleetCache {
    entries: Mutex<HashMap<Vec<String>, Arc<Cached>>>,
    /// Half the cores (at least one): views cost O(workers) each, and more at once would take
    /// the CPU that DNS answers and frame ingest need.
    builds: Arc<Semaphore>,
}

impl Default for FleetCache {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        FleetCache { entries: Mutex::default(), builds: Arc::new(Semaphore::new((cores / 2).max(1))) }
    }
}

/// A view and its bodies, each form built on the first request that asks for it.
#[derive(Debug)]
struct Cached {
    view: FleetView,
    json: OnceLock<Form>,
    binary: OnceLock<Form>,
}

/// One representation of a view: its body and entity tag (the forms' tags differ).
#[derive(Debug)]
struct Form {
    body: Bytes,
    etag: String,
}

impl Cached {
    fn form(&self, binary: bool) -> &Form {
        let cell = if binary { &self.binary } else { &self.json };
        cell.get_or_init(|| {
            let body = Bytes::from(if binary { fleetwire::encode(&self.view) } else { self.view.to_json().into_bytes() });
            Form { etag: etag_of(&body), body }
        })
    }
}

/// Distinct pool selections remembered; more than this and the cache starts over (a handful
/// of routers' selections is the normal case).
const MAX_CACHED_SELECTIONS: usize = 64;

impl FleetCache {
    /// The cached entry for `pools` if it still holds `view`, else a new one built from it.
    fn get_or_build(&self, pools: &[String], view: FleetView) -> Arc<Cached> {
        if let Some(c) = self.lock().get(pools) {
            if c.view == view {
                return c.clone();
            }
        }
        // Serialised outside the lock (by the caller); two requests racing build the same bytes.
        let entry = Arc::new(Cached { view, json: OnceLock::new(), binary: OnceLock::new() });
        let mut g = self.lock();
        if g.len() >= MAX_CACHED_SELECTIONS && !g.contains_key(pools) {
            g.clear();
        }
        g.insert(pools.to_vec(), entry.clone());
        entry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Arc<Cached>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A strong entity tag from the body's content (the same body gets the same tag across dnsd
/// restarts, so a client's tag never names different content).
fn etag_of(body: &[u8]) -> String {
    // SipHash with fixed keys: deterministic across processes.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    body.hash(&mut h);
    format!("\"{:016x}-{:x}\"", h.finish(), body.len())
}

/// Whether an `If-None-Match` header value names `etag` (a list, `*`, or weak tags).
fn none_match_hits(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').map(str::trim).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
    })
}

/// Whether the client asks for the binary view ([`fleetwire::MEDIA_TYPE`] in `Accept`, with
/// no `q=0`): the Envoy filter does; a browser, curl or an older filter gets JSON.
pub fn wants_binary(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let refused = |p: &str| p.split_once('=').is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0));
        parts.next().is_some_and(|m| m.eq_ignore_ascii_case(fleetwire::MEDIA_TYPE)) && !parts.any(refused)
    })
}

/// The `pool=` selection: sorted, deduplicated, empty entries dropped; or why it is refused.
fn pools_of(q: &FleetQuery) -> Result<Vec<String>, String> {
    let mut pools: Vec<String> = Vec::new();
    for p in q.pool.as_deref().unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if pools.len() == MAX_QUERY_POOLS {
            return Err(format!("pool: more than {MAX_QUERY_POOLS} pools named; ask for the pools of one cluster\n"));
        }
        // No frame can carry a longer pool id: nothing to find, and nothing to keep in the cache.
        if p.len() <= MAX_POOL_ID_LEN {
            pools.push(p.to_string());
        }
    }
    pools.sort();
    pools.dedup();
    Ok(pools)
}

async fn fleet(State(s): State<Arc<Services>>, Query(q): Query<FleetQuery>, headers: HeaderMap) -> Response {
    let pools = match pools_of(&q) {
        Ok(p) => p,
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
    };
    let ages = match q.ages.as_deref() {
        None | Some("exact") => Ages::Exact,
        Some("bounded") => Ages::Bounded,
        Some(other) => {
            let msg = format!("ages: {other:?} is neither \"exact\" nor \"bounded\"\n");
            return (StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    // Held until the build ends (the semaphore is never closed).
    let Ok(permit) = s.fleet_cache.builds.clone().acquire_owned().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    // O(workers): off the runtime's workers, which answer DNS and receive frames.
    let built = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        fleet_response(&s, &pools, ages, &headers)
    })
    .await;
    built.unwrap_or_else(|e| {
        tracing::warn!("building a fleet view failed: {e}");
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    })
}

fn fleet_response(s: &Services, pools: &[String], ages: Ages, headers: &HeaderMap) -> Response {
    let now = now_ms();
    let mut view = s.state.snapshot().view_of(now, pools, ages);
    s.mark_drained(&mut view, now);
    let binary = wants_binary(headers);
    let media = if binary { fleetwire::MEDIA_TYPE } else { "application/json" };
    // The same URL answers in two forms: a cache must key on `Accept` too.
    let vary = (header::VARY, "accept");
    if ages == Ages::Exact {
        let body = if binary { fleetwire::encode(&view) } else { view.to_json().into_bytes() };
        return ([(header::CONTENT_TYPE, media), (header::CACHE_CONTROL, "no-store"), vary], body).into_response();
    }
    let c = s.fleet_cache.get_or_build(pools, view);
    let f = c.form(binary);
    // `no-cache`: a cache may keep it, but must ask again each time (ages count from the answer).
    if none_match_hits(headers, &f.etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, f.etag.as_str()), (header::CACHE_CONTROL, "no-cache"), vary]).into_response();
    }
    ([(header::CONTENT_TYPE, media), (header::CACHE_CONTROL, "no-cache"), (header::ETAG, f.etag.as_str()), vary], f.body.clone()).into_response()
}

async fn fleet_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], crate::ops::FLEET_PAGE).into_response()
}

async fn dns_status(State(s): State<Arc<Services>>) -> Response {
    let status = crate::ops::dns_status(s.dns.as_deref(), s.state.started_ms, now_ms());
    match serde_json::to_string(&status) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot serialise the DNS status: {e}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Arc<Services>>) -> impl IntoResponse {
    let now = now_ms();
    let mut out = String::with_capacity(4096);
    let c = s.state.counters();
    let _ = writeln!(out, "# HELP gpuha_dnsd_frames_accepted_total Telemetry frames accepted.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_frames_accepted_total counter");
    let _ = writeln!(out, "gpuha_dnsd_frames_accepted_total {}", c.accepted);
    let _ = writeln!(out, "# HELP gpuha_dnsd_frames_dropped_total Datagrams dropped, by reason.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_frames_dropped_total counter");
    for r in DropReason::ALL {
        let _ = writeln!(out, "gpuha_dnsd_frames_dropped_total{{reason=\"{}\"}} {}", r.as_str(), c.dropped(r));
    }
    let (known, fresh) = s.state.snapshot().fresh_of(now);
    let stale = known - fresh;
    let _ = writeln!(out, "# HELP gpuha_dnsd_http_connections_rejected_total HTTP connections closed on accept: http.max_connections were open.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_http_connections_rejected_total counter");
    let _ = writeln!(out, "gpuha_dnsd_http_connections_rejected_total {}", s.http_rejected.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP gpuha_dnsd_workers Known workers by freshness (3 s gate).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_workers gauge");
    let _ = writeln!(out, "gpuha_dnsd_workers{{state=\"fresh\"}} {fresh}");
    let _ = writeln!(out, "gpuha_dnsd_workers{{state=\"stale\"}} {stale}");
    let _ = writeln!(out, "# HELP gpuha_dnsd_workers_max Worker ids tracked at most (ingest.max_workers); frames from new ids past it are dropped as too_many_workers.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_workers_max gauge");
    let _ = writeln!(out, "gpuha_dnsd_workers_max {}", s.state.max_workers);
    let _ = writeln!(out, "# HELP gpuha_dnsd_start_time_seconds When this dnsd started (Unix time); its first 10 s are the cold start.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_start_time_seconds gauge");
    let _ = writeln!(out, "gpuha_dnsd_start_time_seconds {:.3}", s.state.started_ms as f64 / 1000.0);
    let configured: Vec<String> = s.dns.as_ref().map(|d| d.zones().pools.iter().map(|p| p.id.clone()).collect()).unwrap_or_default();
    // From the snapshot, never under the ingest lock: a scrape's cost is the client's to choose.
    crate::ops::render_fleet_metrics(&mut out, s.state.snapshot().workers(), &configured, now);
    if let Some(dns) = &s.dns {
        dns.render_metrics(&mut out, now);
    }
    s.admin.render_metrics(&mut out);
    s.eds.render(&mut out);
    if let Some(tls) = &s.tls {
        tls.render_metrics(&mut out);
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_config_reloads_total Config reloads (SIGHUP or POST /v1/admin/reload), by result; a refused one leaves the running config serving.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_config_reloads_total counter");
    let _ = writeln!(out, "gpuha_dnsd_config_reloads_total{{result=\"ok\"}} {}", s.reloads_ok.load(Ordering::Relaxed));
    let _ = writeln!(out, "gpuha_dnsd_config_reloads_total{{result=\"refused\"}} {}", s.reloads_failed.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP gpuha_dnsd_config_last_reload_ok 0 when the latest reload was refused: the file on disk is not what runs.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_config_last_reload_ok gauge");
    let _ = writeln!(out, "gpuha_dnsd_config_last_reload_ok {}", u8::from(!s.last_reload_failed.load(Ordering::Relaxed)));
    let _ = writeln!(out, "# HELP gpuha_dnsd_config_loaded_timestamp_seconds When the config in force was loaded (start or the last good reload).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_config_loaded_timestamp_seconds gauge");
    let _ = writeln!(out, "gpuha_dnsd_config_loaded_timestamp_seconds {:.3}", s.last_reload_ok_ms.load(Ordering::Relaxed) as f64 / 1000.0);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out)
}
