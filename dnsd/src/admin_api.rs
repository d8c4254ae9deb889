//! The admin API's HTTP handlers (`/v1/admin...`, routed by the HTTP server): authenticate,
//! read the request, apply it through [`crate::admin::Admin`], answer JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gpuha_liveness::admin::{Change, DrainProgress, Overrides, PoolCommand, WorkerCommand};
use serde::Deserialize;

use crate::admin::{check_id, Refusal};
use crate::state::now_ms;
use crate::Services;

impl Refusal {
    fn response(self) -> Response {
        match self {
            Refusal::Disabled => error(
                StatusCode::FORBIDDEN,
                "the admin API is disabled: this dnsd was started without an admin token (--admin-token-file FILE or [admin] token_file); it accepts no admin change",
            ),
            Refusal::NoToken => {
                let mut r = error(StatusCode::UNAUTHORIZED, "missing admin token: send `Authorization: Bearer <the contents of the admin token file>`");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"gpuha-dnsd\""));
                r
            }
            Refusal::BadToken => {
                let mut r = error(StatusCode::UNAUTHORIZED, "wrong admin token: it does not match the admin token file");
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"gpuha-dnsd\", error=\"invalid_token\""));
                r
            }
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message, "code": status.as_u16() } }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body + "\n").into_response()
}

fn json(body: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body.to_string() + "\n").into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerRequest {
    state: WorkerCommand,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolRequest {
    state: PoolCommand,
    #[serde(default)]
    reason: String,
}

/// Longest `reason` kept: it goes into the log, the state file and `/v1/admin`.
const MAX_REASON: usize = 512;

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], expected: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad admin request body: {e}; expected {expected}"))
}

/// The drain progress of every configured pool that is overridden or out of the answer.
fn pool_rows(s: &Services, now: u64) -> Vec<serde_json::Value> {
    let ov = s.admin.overrides();
    let Some(dns) = &s.dns else {
        return ov.pools.iter().map(|(id, m)| serde_json::json!({ "pool": id, "state": m.state.as_str(), "at_ms": m.at_ms, "reason": m.reason, "configured": false })).collect();
    };
    let snap = dns.pool_states(now);
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for (i, p) in snap.zones.pools.iter().enumerate() {
        let m = ov.pools.get(&p.id);
        let d: Option<DrainProgress> = dns.drain_progress(&snap, i, now);
        rows.push(serde_json::json!({
            "pool": p.id,
            "state": m.map_or("auto", |m| m.state.as_str()),
            "at_ms": m.map(|m| m.at_ms),
            "reason": m.map(|m| m.reason.as_str()),
            "liveness": snap.states.get(i).as_str(),
            "answered": snap.states.answered(i),
            "safe_at_ms": d.map(|d| d.safe_at_ms),
            "safe": d.map(|d| d.safe),
            "configured": true,
        }));
    }
    for (id, m) in ov.pools.iter().filter(|(id, _)| !snap.zones.pools.iter().any(|p| &p.id == *id)) {
        rows.push(serde_json::json!({ "pool": id, "state": m.state.as_str(), "at_ms": m.at_ms, "reason": m.reason, "configured": false }));
    }
    rows
}

/// `GET /v1/admin`: the overrides in force, and every configured pool's drain progress.
pub async fn status(State(s): State<Arc<Services>>, headers: HeaderMap) -> Response {
    if let Err(r) = s.admin.authorize(&headers) {
        return r.response();
    }
    let now = now_ms();
    let ov = s.admin.overrides();
    json(serde_json::json!({
        "now_ms": now,
        "state_file": s.admin.state_file().map(|p| p.display().to_string()),
        "workers": ov.workers,
        "pools": pool_rows(&s, now),
    }))
}

/// `POST /v1/admin/workers/{id}` with `{"state": "drain" | "auto", "reason": "..."}`.
pub async fn set_worker(State(s): State<Arc<Services>>, UrlPath(id): UrlPath<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = s.admin.authorize(&headers) {
        return r.response();
    }
    let req: WorkerRequest = match parse(&body, r#"{"state": "drain" | "auto", "reason": "why (optional)"}"#) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    if let Err(msg) = check_request("worker", &id, &req.reason) {
        return error(StatusCode::BAD_REQUEST, &msg);
    }
    let known = s.state.snapshot().workers().any(|w| w.frame.worker_id == id);
    if !known && !s.admin.overrides().workers.contains_key(&id) {
        return error(StatusCode::NOT_FOUND, &format!("unknown worker {id:?}: dnsd has no frame from it (worker ids are the sidecars' --worker-id; see GET /v1/fleet)"));
    }
    let now = now_ms();
    let (id2, reason) = (id.clone(), req.reason.clone());
    let c = match apply(&s, "worker", move |ov| ov.set_worker(&id2, req.state, &reason, now)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if c.changed {
        tracing::warn!(worker = %id, action = c.action, before = c.before, reason = %req.reason, "admin: worker override changed");
    }
    json(serde_json::json!({ "worker": id, "state": c.action, "before": c.before, "changed": c.changed }))
}

/// The checks every override request gets: the id a frame could carry, a bounded reason.
fn check_request(what: &str, id: &str, reason: &str) -> Result<(), String> {
    check_id(id).map_err(|why| format!("{what} id: {why}"))?;
    if reason.len() > MAX_REASON {
        return Err(format!("reason: longer than {MAX_REASON} bytes"));
    }
    Ok(())
}

/// Applies one override change off the async runtime (it writes the state file).
async fn apply(s: &Arc<Services>, target: &'static str, f: impl FnOnce(&mut Overrides) -> Change + Send + 'static) -> Result<Change, Response> {
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || s2.admin.change(target, f)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(msg)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &msg)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the change did not run: {e}"))),
    }
}

/// `POST /v1/admin/pools/{id}` with `{"state": "drain" | "force_out" | "force_in" | "auto"}`.
pub async fn set_pool(State(s): State<Arc<Services>>, UrlPath(id): UrlPath<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = s.admin.authorize(&headers) {
        return r.response();
    }
    let req: PoolRequest = match parse(&body, r#"{"state": "drain" | "force_out" | "force_in" | "auto", "reason": "why (optional)"}"#) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, &msg),
    };
    if let Err(msg) = check_request("pool", &id, &req.reason) {
        return error(StatusCode::BAD_REQUEST, &msg);
    }
    let configured = s.dns.as_ref().is_some_and(|d| d.zones().pools.iter().any(|p| p.id == id));
    let known = configured || s.admin.overrides().pools.contains_key(&id) || s.state.snapshot().workers().any(|w| w.frame.pool_id == id);
    if !known {
        return error(StatusCode::NOT_FOUND, &format!("unknown pool {id:?}: not in [[dns.pools]] and no frame names it"));
    }
    if matches!(req.state, PoolCommand::ForceIn | PoolCommand::ForceOut) && !configured {
        return error(StatusCode::CONFLICT, &format!("pool {id:?} is not in this dnsd's [[dns.pools]]: forcing it in or out of the DNS answer means nothing here"));
    }
    let now = now_ms();
    let (id2, reason) = (id.clone(), req.reason.clone());
    let c = match apply(&s, "pool", move |ov| ov.set_pool(&id2, req.state, &reason, now)).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if c.changed {
        tracing::warn!(pool = %id, action = c.action, before = c.before, reason = %req.reason, "admin: pool override changed");
        if let Some(dns) = &s.dns {
            dns.invalidate();
            dns.record_admin(&id, c.action, now);
        }
    }
    let row = pool_rows(&s, now).into_iter().find(|r| r["pool"] == id.as_str());
    json(serde_json::json!({ "pool": id, "state": c.action, "before": c.before, "changed": c.changed, "now": row }))
}

/// `POST /v1/admin/reload`: reloads the config file (see [`crate::reload`]).
pub async fn reload(State(s): State<Arc<Services>>, headers: HeaderMap) -> Response {
    if let Err(r) = s.admin.authorize(&headers) {
        return r.response();
    }
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || crate::reload::reload(&s2, "admin API")).await {
        Ok(Ok(summary)) => json(serde_json::json!({ "reloaded": true, "summary": summary })),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, &format!("reload refused, the running config keeps serving: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the reload did not run: {e}")),
    }
}
