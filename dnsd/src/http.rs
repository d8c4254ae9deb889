//! dnsd's HTTP side: `GET /v1/fleet` (the fleet view the Envoy filter polls), `GET /metrics`
//! (Prometheus text), `GET /healthz`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use gpuha_liveness::DropReason;

use crate::state::now_ms;
use crate::Services;

pub fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/v1/fleet", get(fleet))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(services)
}

async fn fleet(State(s): State<Arc<Services>>) -> impl IntoResponse {
    let body = s.state.view(now_ms()).to_json();
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
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
    let (fresh, stale) = s.state.with_fleet(|f| {
        let fresh = f.workers().filter(|w| w.is_fresh(now)).count();
        (fresh, f.len() - fresh)
    });
    let _ = writeln!(out, "# HELP gpuha_dnsd_workers Known workers by freshness (3 s gate).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_workers gauge");
    let _ = writeln!(out, "gpuha_dnsd_workers{{state=\"fresh\"}} {fresh}");
    let _ = writeln!(out, "gpuha_dnsd_workers{{state=\"stale\"}} {stale}");
    if let Some(dns) = &s.dns {
        dns.render_metrics(&mut out, now);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out)
}
