//! Operators' overrides over HTTP, authenticated and persisted: drain and undrain a worker or a
//! pool, force a pool out of or into the DNS answer, reload the config. What each override does
//! is decided in [`gpuha_liveness::admin`]; this module keeps them.
//!
//! **Authentication.** Every `/v1/admin` request needs `Authorization: Bearer <token>`, the token
//! being the contents of `[admin] token_file` (`--admin-token-file`; a trailing newline is
//! stripped). The presented token and the configured one are compared as SHA-256 digests in
//! constant time, so neither their contents nor their lengths show in the timing. A dnsd with no
//! token file accepts no admin request at all (403): there is no unauthenticated mode.
//!
//! **Persistence.** With `[admin] state_file` (`--admin-state-file`), every change is written to
//! that file before it takes effect (a change that cannot be written is refused, and nothing
//! changes), atomically: a temporary file beside it, fsynced, renamed over it. dnsd reads it at
//! start; a file that does not parse stops dnsd with an error naming it (it holds the operators'
//! drains: starting without them would put drained workers back into service). A missing file
//! is an empty state (first start). The format is JSON, readable and editable by hand while dnsd
//! is stopped:
//!
//! ```json
//! {
//!   "version": 1,
//!   "workers": { "w3": { "at_ms": 1767225600000, "reason": "kernel upgrade" } },
//!   "pools": { "us-east-gcp": { "state": "drain", "at_ms": 1767225600000 } }
//! }
//! ```
//!
//! `workers` are the drained workers by worker id; `pools` the overridden pools by pool id with
//! `state` one of `drain`, `force_out`, `force_in`. Like gdnsd's `admin_state` file, it names
//! what the operator forced and nothing else; unlike it, dnsd rewrites it itself (changes come
//! through the authenticated API, which logs and counts each one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gpuha_liveness::admin::{Change, DrainProgress, Mark, Overrides, PoolCommand, PoolMark, WorkerCommand};
use gpuha_liveness::frame::MAX_STR;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::dns::metrics::esc;
use crate::state::now_ms;
use crate::Services;

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;
/// Tokens shorter than this are refused: a guessable token is no authentication.
pub const MIN_TOKEN_LEN: usize = 16;

/// The state file as written (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    #[serde(default)]
    workers: BTreeMap<String, Mark>,
    #[serde(default)]
    pools: BTreeMap<String, PoolMark>,
}

#[derive(Debug, thiserror::Error)]
#[error("admin state file {}: {reason}. It holds the operators' drains and forced pools: fix it, or move it away to start with none", path.display())]
pub struct StateFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// Reads the state file at `path`; a missing file is an empty state.
pub fn load_state(path: &Path) -> Result<Overrides, StateFileError> {
    let err = |reason: String| StateFileError { path: path.to_path_buf(), reason };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Overrides::default()),
        Err(e) => return Err(err(format!("cannot read it: {e}"))),
    };
    let f: StateFile = serde_json::from_str(&text).map_err(|e| err(format!("not a valid state file: {e}")))?;
    if f.version != STATE_VERSION {
        return Err(err(format!("version {} is not the version this dnsd writes ({STATE_VERSION})", f.version)));
    }
    for id in f.workers.keys().chain(f.pools.keys()) {
        check_id(id).map_err(|why| err(format!("id {id:?}: {why}")))?;
    }
    Ok(Overrides { workers: f.workers, pools: f.pools })
}

/// Writes `ov` to `path` atomically: a temporary file in the same directory, fsynced, renamed
/// over `path`, then the directory fsynced (so the rename survives a power cut).
pub fn save_state(path: &Path, ov: &Overrides) -> std::io::Result<()> {
    let f = StateFile { version: STATE_VERSION, workers: ov.workers.clone(), pools: ov.pools.clone() };
    let mut text = serde_json::to_string_pretty(&f).map_err(std::io::Error::other)?;
    text.push('\n');
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "admin_state".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Not every filesystem lets a directory be opened for this; the rename is done either way.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the admin token file (`admin.token_file`).
pub fn read_token(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bad = |reason: String| ConfigError::invalid("admin.token_file", format!("{}: {reason}", path.display()));
    let mut bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    while bytes.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.len() < MIN_TOKEN_LEN {
        return Err(bad(format!("the token is {} bytes; use at least {MIN_TOKEN_LEN} random characters (e.g. `openssl rand -hex 32`)", bytes.len())));
    }
    if bytes.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(bad("the token must be printable ASCII without spaces (it travels in an HTTP header)".into()));
    }
    Ok(bytes)
}

/// Equality of two secrets in time independent of their contents and lengths.
fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > MAX_STR {
        return Err(format!("longer than {MAX_STR} bytes: no frame can carry it"));
    }
    Ok(())
}

/// Why an admin request was refused before it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// dnsd has no token: no admin request is accepted.
    Disabled,
    /// No `Authorization: Bearer` header.
    NoToken,
    /// A token that is not the configured one.
    BadToken,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Disabled, Refusal::NoToken, Refusal::BadToken];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::NoToken => "no_token",
            Refusal::BadToken => "bad_token",
        }
    }

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

/// The overrides in force, the token, and the counters.
#[derive(Debug, Default)]
pub struct Admin {
    overrides: RwLock<Arc<Overrides>>,
    /// Serialises changes, so the state file is written in the order they are made.
    change: Mutex<()>,
    state_file: Option<PathBuf>,
    token: RwLock<Option<Vec<u8>>>,
    /// (target, action) -> changes made.
    changes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admin {
    /// The overrides read from `state_file` (if any), and `token` (none: admin API disabled).
    pub fn new(state_file: Option<PathBuf>, token: Option<Vec<u8>>) -> Result<Self, StateFileError> {
        let ov = match &state_file {
            Some(p) => load_state(p)?,
            None => Overrides::default(),
        };
        if !ov.is_empty() {
            tracing::warn!(workers = ?ov.workers.keys().collect::<Vec<_>>(), pools = ?ov.pools.iter().map(|(k, m)| format!("{k}={}", m.state.as_str())).collect::<Vec<_>>(), "operators' overrides in force from the admin state file");
        }
        Ok(Admin { overrides: RwLock::new(Arc::new(ov)), state_file, token: RwLock::new(token), ..Admin::default() })
    }

    pub fn overrides(&self) -> Arc<Overrides> {
        self.overrides.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reload's new token (`None`: the admin API is disabled from now on).
    pub fn set_token(&self, token: Option<Vec<u8>>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    pub fn enabled(&self) -> bool {
        self.token.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    pub fn state_file(&self) -> Option<&Path> {
        self.state_file.as_deref()
    }

    /// Whether `headers` carry the admin token; a refusal is counted.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let r = self.check(headers);
        if let Err(why) = r {
            *lock(&self.refused).entry(why.as_str()).or_default() += 1;
        }
        r
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let token = self.token.read().unwrap_or_else(|e| e.into_inner());
        let Some(token) = token.as_deref() else { return Err(Refusal::Disabled) };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            None => Err(Refusal::NoToken),
            Some(t) if secret_eq(t.as_bytes(), token) => Ok(()),
            Some(_) => Err(Refusal::BadToken),
        }
    }

    /// Applies `f` to a copy of the overrides; if it changed anything, writes the state file
    /// and then puts the copy in force. A write that fails changes nothing.
    pub fn change(&self, target: &'static str, f: impl FnOnce(&mut Overrides) -> Change) -> Result<Change, String> {
        let _g = lock(&self.change);
        let mut next = (*self.overrides()).clone();
        let c = f(&mut next);
        if c.changed {
            if let Some(p) = &self.state_file {
                save_state(p, &next).map_err(|e| format!("cannot write the admin state file {}: {e}; nothing was changed", p.display()))?;
            }
            *self.overrides.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            *lock(&self.changes).entry((target, c.action)).or_default() += 1;
        }
        Ok(c)
    }

    /// `gpuha_dnsd_admin_*` metrics.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP gpuha_dnsd_admin_changes_total Operators' override changes made, by target (worker, pool) and action (drain, force_out, force_in, auto).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_admin_changes_total counter");
        let changes = lock(&self.changes);
        for target in ["worker", "pool"] {
            let actions: &[&str] = if target == "worker" { &["drain", "auto"] } else { &["drain", "force_out", "force_in", "auto"] };
            for a in actions {
                let n = changes.get(&(target, *a)).copied().unwrap_or(0);
                let _ = writeln!(out, "gpuha_dnsd_admin_changes_total{{target=\"{target}\",action=\"{a}\"}} {n}");
            }
        }
        drop(changes);
        let _ = writeln!(out, "# HELP gpuha_dnsd_admin_refused_total Admin requests refused before they were read: disabled (no token configured), no_token, bad_token.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_admin_refused_total counter");
        let refused = lock(&self.refused);
        for r in Refusal::ALL {
            let _ = writeln!(out, "gpuha_dnsd_admin_refused_total{{reason=\"{}\"}} {}", r.as_str(), refused.get(r.as_str()).copied().unwrap_or(0));
        }
        drop(refused);
        let _ = writeln!(out, "# HELP gpuha_dnsd_admin_enabled 1 when an admin token is configured (the admin API accepts authenticated changes).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_admin_enabled gauge");
        let _ = writeln!(out, "gpuha_dnsd_admin_enabled {}", u8::from(self.enabled()));
        let ov = self.overrides();
        let _ = writeln!(out, "# HELP gpuha_dnsd_worker_drained 1 for each worker an operator drained by id (it gets no new requests; a drained pool's workers are in gpuha_dnsd_pool_admin_state).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_worker_drained gauge");
        for w in ov.workers.keys() {
            let _ = writeln!(out, "gpuha_dnsd_worker_drained{{worker=\"{}\"}} 1", esc(w));
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
    if let Err(why) = check_id(&id) {
        return error(StatusCode::BAD_REQUEST, &format!("worker id: {why}"));
    }
    if req.reason.len() > MAX_REASON {
        return error(StatusCode::BAD_REQUEST, &format!("reason: longer than {MAX_REASON} bytes"));
    }
    let known = s.state.snapshot().workers().any(|w| w.frame.worker_id == id);
    if !known && !s.admin.overrides().workers.contains_key(&id) {
        return error(StatusCode::NOT_FOUND, &format!("unknown worker {id:?}: dnsd has no frame from it (worker ids are the sidecars' --worker-id; see GET /v1/fleet)"));
    }
    let now = now_ms();
    let (s2, id2, reason) = (s.clone(), id.clone(), req.reason.clone());
    let done = tokio::task::spawn_blocking(move || s2.admin.change("worker", |ov| ov.set_worker(&id2, req.state, &reason, now))).await;
    let c = match done {
        Ok(Ok(c)) => c,
        Ok(Err(msg)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &msg),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the change did not run: {e}")),
    };
    if c.changed {
        tracing::warn!(worker = %id, action = c.action, before = c.before, reason = %req.reason, "admin: worker override changed");
    }
    json(serde_json::json!({ "worker": id, "state": c.action, "before": c.before, "changed": c.changed }))
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
    if let Err(why) = check_id(&id) {
        return error(StatusCode::BAD_REQUEST, &format!("pool id: {why}"));
    }
    if req.reason.len() > MAX_REASON {
        return error(StatusCode::BAD_REQUEST, &format!("reason: longer than {MAX_REASON} bytes"));
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
    let (s2, id2, reason) = (s.clone(), id.clone(), req.reason.clone());
    let done = tokio::task::spawn_blocking(move || s2.admin.change("pool", |ov| ov.set_pool(&id2, req.state, &reason, now))).await;
    let c = match done {
        Ok(Ok(c)) => c,
        Ok(Err(msg)) => return error(StatusCode::INTERNAL_SERVER_ERROR, &msg),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the change did not run: {e}")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content() {
        assert!(secret_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!secret_eq(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!secret_eq(b"0123456789abcdef", b"0123456789abcdef0"));
        assert!(!secret_eq(b"", b"x"));
    }

    #[test]
    fn state_file_round_trip_and_atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin_state.json");
        assert_eq!(load_state(&path).unwrap(), Overrides::default(), "missing: empty");
        let mut ov = Overrides::default();
        ov.set_worker("w1", WorkerCommand::Drain, "why", 5);
        ov.set_pool("p", PoolCommand::Drain, "", 6);
        save_state(&path, &ov).unwrap();
        assert_eq!(load_state(&path).unwrap(), ov);
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["admin_state.json".to_string()], "no temporary file left behind");
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin_state.json");
        for bad in ["{\"version\":1,\"workers\":{\"w\":{}}}", "not json", "{\"version\":9}", "{\"version\":1,\"pools\":{\"\":{\"state\":\"drain\",\"at_ms\":1}}}"] {
            std::fs::write(&path, bad).unwrap();
            let e = load_state(&path).unwrap_err().to_string();
            assert!(e.contains("admin_state.json"), "{e}");
        }
    }

    #[test]
    fn tokens_must_be_long_and_printable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert_eq!(read_token(&path).unwrap(), b"0123456789abcdef0123");
        std::fs::write(&path, "short\n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("admin.token_file"));
        std::fs::write(&path, "0123456789 abcdef0123").unwrap();
        assert!(read_token(&path).is_err());
    }
}
