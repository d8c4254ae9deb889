//! The one crate both tiers run (natively inside `dnsd`, compiled to `wasm32-wasip1` inside
//! Envoy): every decision of the HA layer, as pure code with time passed in.
//!
//! | module | owns |
//! |---|---|
//! | [`frame`] | the telemetry frame: codec, HMAC, key ring |
//! | [`ingest`] | authenticated ingest: replay order, clock checks, drop reasons |
//! | [`membership`] | who the routers' worker cluster lists (EDS): members from telemetry, pools per router, leave-after, tiers at priority 1 |
//! | [`fleet`] | fleet state: freshness and progress (a hang is not silence), pool liveness, gray failures, the fleet view dnsd serves |
//! | [`fleetwire`] | the fleet view in binary: what the filter polls and shares between its threads, numbers updated in place |
//! | [`admin`] | operators' overrides: drained workers and pools, pools forced out of or into the answer, when a drained pool is safe |
//! | [`pick`] | picking workers: scoring, anti-herding, the breaker's last resorts |
//! | [`inflight`] | requests in flight per worker (shared across threads): what they add to a frame's load |
//! | [`busylist`] | the workers with requests in flight, so that a pick reads only their slots |
//! | [`lora`] | LoRA affinity: a request for an adapter prefers the workers that have it loaded |
//! | [`affinity`] | prefix-cache and session affinity: the request's key (session, `user`, prompt fingerprint) and its rendezvous order over the workers |
//! | [`breaker`] | the per-worker circuit breaker |
//! | [`attempt`] | one upstream attempt: events in, actions out, one report and one charge; rescue of attempts on stalled workers |
//! | [`guard`] | the first-token byte holder the attempt drives |
//! | [`sse`] | SSE framing (where an event ends) |
//! | [`output`] | what an OpenAI-API event or body means (output, error, abort), chat and Responses dialects |
//! | [`blame`] | who is charged for a request's failed attempts (a failure that follows the request charges nobody) |
//! | [`request`] | the picker's bounded scan of a request body for `model` and `stream` |
//! | [`slots`] | byte layouts of the filter's shared-data slots |
//! | [`named_headers`] | the native host's one-call read of the few headers a hook needs |
//! | [`openai_error`] | OpenAI-shaped error bodies (JSON and SSE) |
//! | [`tier`] | the fallback chain: tiers after the own workers, the spill budget, adapting a request to a degraded tier or a provider |
//!
//! Everything here is pure: no clocks (banned by this crate's `clippy.toml`), no sockets, no
//! threads. Time is milliseconds since the Unix epoch passed in as `now_ms`, so tests drive
//! time by hand.

pub mod admin;
pub mod affinity;
pub mod attempt;
pub mod blame;
pub mod breaker;
pub mod busylist;
pub mod fleet;
pub mod fleetwire;
pub mod frame;
pub mod guard;
pub mod inflight;
pub mod ingest;
pub mod lora;
pub mod membership;
pub mod named_headers;
pub mod openai_error;
pub mod output;
pub mod pick;
pub mod request;
pub mod slots;
pub mod sse;
pub mod tier;
mod worker_key;

/// `bytes` as text, invalid UTF-8 replaced as `String::from_utf8_lossy` replaces it. Valid text
/// (nearly all of it) is checked by `from_utf8`, which reads ASCII a word at a time; the lossy
/// conversion reads byte by byte, so it runs only when the check fails.
pub fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

pub use fleet::{bounded_age_ms, Ages, Condition, FAILBACK_HOLD_DOWN_MS, FleetState, FleetView, Liveness, PoolOutlook, PoolView, WorkerView, VIEW_AGE_FLOOR_MS, VIEW_AGE_STALE_MS};
pub use frame::{Frame, FrameError, FrameRef, KeyRing, Metrics, MAX_FRAME_LEN};
pub use ingest::{DropReason, Ingest, IngestCounters};

/// A worker whose last valid frame is older than this gets no new requests.
pub const FRESHNESS_GATE_MS: u64 = 3_000;
/// A pool with fewer than `min_workers` workers heard from within this window is evicted.
pub const EVICTION_WINDOW_MS: u64 = 10_000;

/// The first byte from `i` on that ends a run of plain bytes in a JSON string: a quote, a
/// backslash, or (with `controls`) a control byte. `None`: none before the end.
///
/// Most runs are short (keys, names, tokens): the first 32 bytes go eight a step, where a call
/// into `memchr` would cost more than the search. In each of the masks the lowest flagged byte
/// is a true one (a borrow can only flag bytes above it), so the lowest of them is the first
/// stop. A longer run (a prompt) goes on with `memchr`.
#[inline]
pub(crate) fn json_string_stop(b: &[u8], mut i: usize, controls: bool) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let short = i.saturating_add(32);
    while let Some(w) = b.get(i..i.saturating_add(8)).filter(|_| i < short) {
        let x = u64::from_le_bytes(w.try_into().ok()?);
        let mut m = below(x ^ (ONES * u64::from(b'"')), 1) | below(x ^ (ONES * u64::from(b'\\')), 1);
        if controls {
            m |= below(x, 0x20);
        }
        if m != 0 {
            return Some(i + m.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    let rest = b.get(i..)?;
    let end = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
    let end = if controls { rest[..end].iter().position(|&c| c < 0x20).unwrap_or(end) } else { end };
    (end < rest.len()).then_some(i + end)
}
