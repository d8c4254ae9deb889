//! EDS for the routers' worker cluster: `POST /v3/discovery:endpoints`, Envoy's REST-JSON xDS
//! (`api_config_source: {api_type: REST, ...}`), answered from the telemetry: who is a member,
//! which pools a router gets and where its tiers go are decided in
//! [`gpuha_liveness::membership`]; this module is the HTTP glue.
//!
//! Why REST-JSON and not gRPC: stock Envoy polls it every `refresh_delay` with the same
//! `DiscoveryRequest` a stream would carry, dnsd answers it with the axum stack it already
//! runs (no protobuf, no HTTP/2 server), and a router's poll costs dnsd one O(workers) pass.
//! What it costs: a poll per router per refresh (Envoy 1.40 posts its whole node, about 77 KB
//! of JSON, each time) and up to one `refresh_delay` of delay; a gRPC stream would push at once.
//! When dnsd is down or answers an error, Envoy counts `update_failure` and keeps the membership
//! it has (measured, Envoy 1.40: hosts kept through 5 failed polls).
//!
//! Answers: `200` with a `DiscoveryResponse`; `304` when the poll names the version it would get
//! (Envoy's REST fetcher then keeps what it has without parsing: the cost of a stable fleet); `400` naming what is wrong with a malformed
//! request; `503` during the warm-up after a start (dnsd does not know the fleet yet: an empty
//! answer would empty every router's cluster, an error keeps what they have).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use gpuha_liveness::membership;

use crate::state::now_ms;
use crate::Services;

/// EDS answers by outcome, for `/metrics`.
#[derive(Debug, Default)]
pub struct EdsCounters {
    pub ok: AtomicU64,
    pub not_modified: AtomicU64,
    pub bad_request: AtomicU64,
    pub warming_up: AtomicU64,
}

impl EdsCounters {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP gpuha_dnsd_eds_requests_total EDS polls (POST /v3/discovery:endpoints) by result: ok (200), not_modified (304: the router holds this version already), bad_request (400), warming_up (503 in the first seconds after a start; routers keep their membership).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_eds_requests_total counter");
        for (result, n) in [("ok", &self.ok), ("not_modified", &self.not_modified), ("bad_request", &self.bad_request), ("warming_up", &self.warming_up)] {
            let _ = writeln!(out, "gpuha_dnsd_eds_requests_total{{result=\"{result}\"}} {}", n.load(Ordering::Relaxed));
        }
    }
}

pub async fn endpoints(State(s): State<Arc<Services>>, body: Bytes) -> Response {
    let now = now_ms();
    if !membership::ready(s.state.started_ms, now) {
        s.eds.warming_up.fetch_add(1, Ordering::Relaxed);
        let msg = "dnsd started moments ago and does not know the fleet yet; keep the membership you have\n";
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], msg).into_response();
    }
    let q = match membership::parse_request(&body) {
        Ok(q) => q,
        Err(msg) => {
            s.eds.bad_request.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response();
        }
    };
    let leave_after_ms = s.running.lock().unwrap_or_else(|e| e.into_inner()).eds.leave_after_ms;
    let a = membership::assignment(s.state.snapshot().workers(), now, &q, leave_after_ms);
    if membership::unchanged(&q, &a) {
        s.eds.not_modified.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_MODIFIED, [(header::CACHE_CONTROL, "no-store")]).into_response();
    }
    s.eds.ok.fetch_add(1, Ordering::Relaxed);
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], membership::discovery_response(&q.resource_names, &a)).into_response()
}
