//! The fleet poll: one root context (one per Envoy thread) at a time fetches dnsd's
//! `/v1/fleet?ages=bounded` and publishes it in shared data for every thread.
//!
//! Every picker root context ticks, but only the one that wins the compare-and-swap on the
//! `gpuha.poll` slot polls, so dnsd sees one poll per interval however many threads Envoy runs,
//! and there is no leader whose loss would stop polling. The poll names the content held in
//! `If-None-Match`: an unchanged fleet is answered `304` with no body, which costs the threads
//! nothing but a vouch (the view's ages count from it). The view comes in binary
//! ([`gpuha_liveness::fleetwire`]) from a dnsd that serves it, JSON from an older one; threads
//! share it in binary.

use std::time::Duration;

use gpuha_liveness::slots::{decode_etag, decode_fleet, decode_version, encode_etag, encode_fleet, encode_u64, encode_version, u64_at, poll_due, FLEET_ETAG_KEY, FLEET_KEY, FLEET_VERSION_KEY, POLL_KEY};
use gpuha_liveness::{fleetwire, FleetView};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

use crate::cache;
use crate::config::PickerConfig;
use crate::host;
use crate::stats::{inc, Stats};

/// The path polled: `fleet_path` with the cacheable form and the router's pools asked for.
pub fn poll_path(p: &PickerConfig) -> String {
    let sep = if p.fleet_path.contains('?') { '&' } else { '?' };
    let mut path = format!("{}{sep}ages=bounded", p.fleet_path);
    if !p.pick.pools.is_empty() {
        path.push_str("&pool=");
        path.push_str(&p.pick.pools.join(","));
    }
    path
}

/// What the poll asks for: the binary view, JSON from a dnsd that does not serve it.
pub const ACCEPT: &str = "application/x-gpuha-fleet, application/json;q=0.5";

/// A poll in flight from this root context.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    pub token: u32,
    pub started: u64,
    /// The content version named in `If-None-Match`.
    pub tag_version: u64,
}

/// Starts a poll if this thread wins the slot. `in_flight`: this context's outstanding poll.
/// Whether it won (one thread per poll interval).
pub fn maybe_start(p: &PickerConfig, path: &str, in_flight: &mut Option<InFlight>, stats: &Stats, dispatch: impl FnOnce(Vec<(&str, &str)>, Duration) -> Result<u32, proxy_wasm::types::Status>) -> bool {
    let now = host::now_ms();
    if let Some(f) = in_flight {
        if now.checked_sub(f.started).is_some_and(|waited| waited <= p.poll_timeout_ms + 1_000) {
            return false;
        }
        // The host never answered: forget it.
        *in_flight = None;
    }
    let min_gap = p.poll_interval_ms * 9 / 10;
    let claimed = host::shared_update(POLL_KEY, |cur| poll_due(now, u64_at(cur, 0), min_gap).then(|| (encode_u64(now), ())));
    if claimed.is_none() {
        return false;
    }
    let tag = host::shared_get(FLEET_ETAG_KEY).0.unwrap_or_default();
    let (tag_version, etag) = decode_etag(&tag);
    let mut headers = vec![(":method", "GET"), (":path", path), (":authority", p.fleet_authority.as_str()), ("accept", ACCEPT)];
    if !etag.is_empty() {
        headers.push(("if-none-match", etag));
    }
    match dispatch(headers, Duration::from_millis(p.poll_timeout_ms)) {
        Ok(token) => {
            inc(stats.fleet_polls);
            *in_flight = Some(InFlight { token, started: now, tag_version });
        }
        Err(e) => {
            inc(stats.fleet_poll_failures);
            host::warn(&format!("gpuha: fleet poll via cluster {}: {e:?}", p.fleet_cluster));
        }
    }
    true
}

/// A failed poll is logged at most this often (per Envoy thread).
pub const FAILURE_LOG_EVERY_MS: u64 = 10_000;

thread_local! {
    static LAST_FAILURE_LOG_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn failure_log_due(now: u64) -> bool {
    LAST_FAILURE_LOG_MS.with(|last| {
        let due = last.get() == 0 || now.saturating_sub(last.get()) >= FAILURE_LOG_EVERY_MS;
        if due {
            last.set(now);
        }
        due
    })
}

/// Handles dnsd's answer to `f`; whether a new view was published (this thread holds it
/// decoded already, [`cache::accept`]).
pub fn on_response(f: InFlight, body_size: usize, stats: &Stats) -> bool {
    let status = host::header(MapType::HttpCallResponseHeaders, ":status");
    let now = host::now_ms();
    if status.as_deref() == Some("304") {
        // dnsd vouches, as of now, for the content we named, if it is still the current one.
        inc(stats.fleet_not_modified);
        host::shared_update(FLEET_VERSION_KEY, |cur| {
            let (v, vouched) = decode_version(cur);
            // (`!=`, not `<`: after the wall clock stepped back, now vouches too.)
            (cur.is_some() && v == f.tag_version && vouched != now).then(|| (encode_version(v, now), ()))
        });
        return false;
    }
    if status.as_deref() != Some("200") {
        inc(stats.fleet_poll_failures);
        // Why, as Envoy says it: an unreachable dnsd or a refused TLS handshake (a wrong CA or
        // client certificate) comes back as Envoy's own 503 whose body names the transport
        // failure. Every failure is counted; one line per FAILURE_LOG_EVERY_MS is logged.
        if failure_log_due(now) {
            let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(300)).ok().flatten().unwrap_or_default();
            host::warn(&format!(
                "fleet poll failed (the picker fails open on its last view, then on no view): status {}: {}",
                status.as_deref().unwrap_or("none (reset)"),
                String::from_utf8_lossy(&body).trim()
            ));
        }
        return false;
    }
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
    // Binary from a dnsd that serves it; JSON from an older one (or another server), converted
    // here once, so that what the threads share is always binary and updates in place.
    let bin;
    let shared: &[u8] = if fleetwire::is_binary(&body) {
        &body
    } else {
        match FleetView::from_json(&body) {
            Ok(v) => {
                bin = fleetwire::encode(&v);
                &bin
            }
            Err(e) => {
                inc(stats.fleet_poll_failures);
                host::warn(&format!("gpuha: fleet view from dnsd unreadable: {e}"));
                return false;
            }
        }
    };
    // Decoded into this thread's cache first: what cannot be read is never published.
    if let Err(e) = cache::accept(now, shared) {
        inc(stats.fleet_poll_failures);
        host::warn(&format!("gpuha: fleet view from dnsd unreadable: {e}"));
        return false;
    }
    let etag = host::header(MapType::HttpCallResponseHeaders, "etag").unwrap_or_default();
    let value = encode_fleet(now, shared);
    // A slow answer must not replace a view fetched after this poll started (one fetched "after
    // now" is from before the wall clock stepped back: replaced).
    if !host::shared_set_if(FLEET_KEY, &value, |cur| cur.map(|c| decode_fleet(c).0).is_none_or(|at| at <= f.started || at > now)) {
        return false;
    }
    host::shared_update(FLEET_VERSION_KEY, |_| Some((encode_version(now, now), ())));
    host::shared_update(FLEET_ETAG_KEY, |_| Some((encode_etag(now, &etag), ())));
    true
}
