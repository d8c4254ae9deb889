//! The floor of a native filter pair on stock Envoy (`bench/run.py --only l7_floor`): a dynamic
//! module whose filters run no code of their own, only the Envoy-side behaviour of GPU HA's
//! picker and guard, chosen by the same configuration keys as the Proxy-Wasm floor
//! (`bench/wasm-floor`):
//!
//! - `"pause_request": true`: the request is held until its body is in (the picker reads it
//!   whole), then `x-gpuha-endpoints` is set if `"endpoints": "a,b"` is given (the picker's
//!   pick, for the `override_host` load balancer) with `x-envoy-max-retries`;
//! - `"hold_response": true`: the answer is held as the guard holds it: a stream
//!   (`text/event-stream`) until its first bytes (the guard releases at the first token), any
//!   other answer until it is whole (Envoy buffers it).
//!
//! - `"calls": "picker"` / `"calls": "guard"`: on top of the above, the Envoy calls that role of
//!   the gpuha filter makes on a request, answered and dropped (`bench/results/2026-12-02-callfloor`):
//!   the request's header views read once (picker and guard), the request body's chunks read
//!   (picker), the upstream address read (guard, at its request and its answer; picker, at the
//!   answer), `:status` read and a mark set on the answer's headers (both; the guard reads
//!   `content-type` too), a json answer's bytes read, drained and appended again whole, each
//!   chunk of a stream read in place (guard), and
//!   the ending's flags, details and upstream address read when the stream completes (picker). No
//!   decision, no shared data, no counter: the floor of the filter's Envoy calls.
//! - `"decide": true` (with `"calls"`): on top of the calls, the filter's pure decisions
//!   (`gpuha-liveness`) run on the bytes those calls read, with none of the filter's glue (no
//!   Proxy-Wasm SDK, no host, no shared data, no breaker, no counter): the picker's request scan
//!   (`RequestScanner`, affinity on as by default) and pick (`pick_ranked` over a fleet view of
//!   the `endpoints`, every worker fresh, serving the request's model), whose list is the one
//!   set; the guard's `Attempt` on the answer's headers, each body chunk as the filter reads
//!   it (`Attempt::reads`; a released stream's clean chunks by their tail, as the native host
//!   checks them) and its end. What Envoy is asked to do stays the call floor's (the decisions'
//!   answers are dropped): the decision floor (`bench/results/2026-12-02-decisions`).
//!
//! Nothing set: every hook continues. Other keys are ignored. Bench code: it trusts Envoy's
//! pointers as the ABI promises.
#![allow(unsafe_code)]
// The hooks are `extern "C"` for Envoy, which passes the pointers the ABI promises.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::cell::RefCell;
use std::ffi::c_char;

use gpuha_dm_abi as abi;
use gpuha_liveness::attempt::{Attempt, AttemptConfig, Chunk, Ending, Read};
use gpuha_liveness::guard::{DEFAULT_MAX_HELD_BYTES, TAIL_PEEK_BYTES};
use gpuha_liveness::pick::{pick_ranked, Decision, LoadView, PickConfig, Ranked, Rng};
use gpuha_liveness::request::{BodyKind, RequestScanner, Scan};
use gpuha_liveness::FleetView;

#[derive(Default)]
struct Behaviour {
    pause_request: bool,
    endpoints: Option<Vec<u8>>,
    hold_response: bool,
    calls: Calls,
    decide: bool,
}

/// Whose Envoy calls the filter makes (`"calls"`).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Calls {
    #[default]
    None,
    Picker,
    Guard,
}

impl Behaviour {
    /// The keys above, found in the JSON text (no JSON parser in a do-nothing module).
    fn parse(text: &str) -> Behaviour {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let endpoints = compact.split_once("\"endpoints\":\"").and_then(|(_, rest)| rest.split_once('"')).map(|(v, _)| v.as_bytes().to_vec());
        let calls = if compact.contains("\"calls\":\"picker\"") {
            Calls::Picker
        } else if compact.contains("\"calls\":\"guard\"") {
            Calls::Guard
        } else {
            Calls::None
        };
        Behaviour { pause_request: compact.contains("\"pause_request\":true"), endpoints, hold_response: compact.contains("\"hold_response\":true"), calls, decide: compact.contains("\"decide\":true") }
    }
}

struct Stream {
    cfg: *const Behaviour,
    /// The answer is a stream: released with its first bytes.
    sse: bool,
    /// A json answer's bytes, drained as they come and appended whole at its end (`calls`).
    held: Vec<u8>,
    /// The request's path and the guard's attempt (`decide`).
    path: String,
    attempt: Option<Attempt>,
}

/// The picker's decisions on one thread (`decide`): the fleet view of the `endpoints` and its
/// ranking, built at the first request (with its model), as the filter keeps them per thread.
struct Pick {
    view: FleetView,
    ranked: Ranked,
    rng: Rng,
    cfg: PickConfig,
}

thread_local! {
    static PICK: RefCell<Option<Pick>> = const { RefCell::new(None) };
}

/// No request of this router in flight anywhere (the filter reads its shared counts).
struct NoLoad;

impl LoadView for NoLoad {
    fn ours(&self, _addr: &str, _frame_local_ms: u64, _frame_load: f64) -> f64 {
        0.0
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The picker's decisions on a request body: scanned, then a pick; the endpoint list to set.
fn decide(body: &[u8], endpoints: &[u8]) -> Option<Vec<u8>> {
    let cfg = PickConfig::default();
    let mut scanner = RequestScanner::with_affinity(&BodyKind::from_content_type(Some("application/json")), &cfg.affinity);
    let fields = match scanner.feed(body) {
        Scan::Done(f) => f,
        _ => match scanner.finish() {
            Scan::Done(f) => f,
            _ => return None,
        },
    };
    let model = fields.model.as_deref()?;
    let now = now_ms();
    PICK.with(|p| {
        let mut p = p.borrow_mut();
        if p.is_none() {
            // An address or model that does not make a view leaves the fixed list set (and
            // `l7_instr` fails a decision floor that decides nothing).
            let workers: Vec<String> = String::from_utf8_lossy(endpoints).split(',').enumerate()
                .map(|(i, a)| format!(r#"{{"id":"w{i}","pool":"p","models":["{model}"],"addr":"{a}","age_ms":0,"fresh":true,"boot":1,"running":0,"waiting":0,"kv":0.1,"ttft_ms":20}}"#))
                .collect();
            let view: FleetView = serde_json::from_str(&format!(r#"{{"now_ms":0,"workers":[{}]}}"#, workers.join(","))).ok()?;
            let ranked = Ranked::build(&view, &cfg);
            *p = Some(Pick { view, ranked, rng: Rng::new(now), cfg: cfg.clone() });
        }
        let p = p.as_mut()?;
        let (d, _) = pick_ranked(&p.ranked, &p.view, now, now, Some(model), None, &NoLoad, &mut p.rng, &p.cfg, &[], |_| gpuha_liveness::breaker::Admission::Allow, |_| false);
        match d {
            Decision::Endpoints { endpoints, .. } => Some(endpoints.join(",").into_bytes()),
            _ => None,
        }
    })
}

/// What the calls read, summed so that no read is optimised away.
fn sink(bytes: &[u8]) {
    std::hint::black_box(bytes.len());
}

/// The request's (or answer's) header views, read once onto the stack, as the gpuha filter's
/// named read does.
fn read_views(e: abi::HttpFilterEnvoyPtr, map: abi::HttpHeaderType) {
    const MAX: usize = 64;
    // SAFETY: live filter, inside its hook.
    let n = unsafe { abi::envoy_dynamic_module_callback_http_get_headers_size(e, map) };
    if n == 0 || n > MAX {
        return;
    }
    let mut views = [abi::EnvoyHttpHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 }; MAX];
    // SAFETY: room for the `n` entries Envoy reported; read only when it answers true.
    if unsafe { abi::envoy_dynamic_module_callback_http_get_headers(e, map, views.as_mut_ptr()) } {
        for h in &views[..n] {
            std::hint::black_box(h.key_length + h.value_length);
        }
    }
}

/// The first value of `name` (empty when absent), valid in the running hook.
fn header<'a>(e: abi::HttpFilterEnvoyPtr, map: abi::HttpHeaderType, name: &[u8]) -> &'a [u8] {
    let mut v = abi::EnvoyBuffer::null();
    // SAFETY: live filter, inside its hook; the view is read at once.
    if unsafe { abi::envoy_dynamic_module_callback_http_get_header(e, map, abi::ModuleBuffer::from_bytes(name), &mut v, 0, std::ptr::null_mut()) } {
        // SAFETY: Envoy's view, valid in this hook.
        let bytes = unsafe { v.as_bytes() };
        sink(bytes);
        return bytes;
    }
    &[]
}

fn attr_string(e: abi::HttpFilterEnvoyPtr, id: abi::AttributeId) {
    let mut v = abi::EnvoyBuffer::null();
    // SAFETY: live filter, inside its hook; the view is read at once.
    if unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(e, id, &mut v) } {
        // SAFETY: Envoy's view, valid in this hook.
        sink(unsafe { v.as_bytes() });
    }
}

/// The body's chunks, read (and copied into `into` when given).
fn read_body(e: abi::HttpFilterEnvoyPtr, body: abi::HttpBodyType, into: Option<&mut Vec<u8>>) -> usize {
    const MAX: usize = 16;
    // SAFETY: live filter, inside its hook.
    let n = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(e, body) };
    if n == 0 || n > MAX {
        return 0;
    }
    let mut chunks = [abi::EnvoyBuffer::null(); MAX];
    // SAFETY: room for the `n` chunks Envoy reported.
    if !unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks(e, body, chunks.as_mut_ptr()) } {
        return 0;
    }
    let mut len = 0;
    let mut into = into;
    for c in &chunks[..n] {
        // SAFETY: Envoy's views, valid in this hook until the body changes.
        let b = unsafe { c.as_bytes() };
        len += b.len();
        match into.as_deref_mut() {
            Some(v) => v.extend_from_slice(b),
            None => sink(b),
        }
    }
    len
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(_e: abi::HttpFilterConfigEnvoyPtr, _name: abi::EnvoyBuffer, config: abi::EnvoyBuffer) -> abi::HttpFilterConfigModulePtr {
    // SAFETY: Envoy's view of filter_config, valid during this call.
    let b = Behaviour::parse(&String::from_utf8_lossy(unsafe { config.as_bytes() }));
    Box::into_raw(Box::new(b)) as abi::HttpFilterConfigModulePtr
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: abi::HttpFilterConfigModulePtr) {
    // SAFETY: ours, given back once.
    drop(unsafe { Box::from_raw(config as *mut Behaviour) });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(config: abi::HttpFilterConfigModulePtr, _e: abi::HttpFilterEnvoyPtr) -> abi::HttpFilterModulePtr {
    Box::into_raw(Box::new(Stream { cfg: config as *const Behaviour, sse: false, held: Vec::new(), path: String::new(), attempt: None })) as abi::HttpFilterModulePtr
}

/// # Safety
/// `f` is a pointer `on_http_filter_new` returned, not yet destroyed.
unsafe fn behaviour<'a>(f: abi::HttpFilterModulePtr) -> &'a Behaviour {
    // SAFETY: per the contract; the configuration outlives its filters.
    unsafe { &*(*(f as *const Stream)).cfg }
}

fn set_endpoints(e: abi::HttpFilterEnvoyPtr, b: &Behaviour) {
    let mut picked = None;
    if b.calls == Calls::Picker {
        let mut body = Vec::new();
        // As the native host reads a body: what Envoy buffered, then what this hook got, unless
        // that is the buffer itself.
        // SAFETY: live filter, inside its hook.
        let buffered = unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(e, abi::BODY_BUFFERED_REQUEST) } > 0;
        if buffered {
            read_body(e, abi::BODY_BUFFERED_REQUEST, b.decide.then_some(&mut body));
        }
        // SAFETY: as above.
        if !buffered || !unsafe { abi::envoy_dynamic_module_callback_http_received_buffered_request_body(e) } {
            read_body(e, abi::BODY_RECEIVED_REQUEST, b.decide.then_some(&mut body));
        }
        if b.decide {
            picked = b.endpoints.as_deref().and_then(|list| decide(&body, list));
        }
    }
    if let Some(v) = picked.as_ref().or(b.endpoints.as_ref()) {
        for (k, v) in [(&b"x-gpuha-endpoints"[..], v.as_slice()), (b"x-envoy-max-retries", b"2")] {
            // SAFETY: live filter; Envoy copies both.
            unsafe { abi::envoy_dynamic_module_callback_http_set_header(e, abi::HEADER_REQUEST, abi::ModuleBuffer::from_bytes(k), abi::ModuleBuffer::from_bytes(v)) };
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::HeadersStatus {
    // SAFETY: ours.
    let b = unsafe { behaviour(f) };
    if b.calls == Calls::Guard {
        attr_string(e, abi::ATTR_UPSTREAM_ADDRESS);
    }
    if b.calls != Calls::None {
        read_views(e, abi::HEADER_REQUEST);
    }
    if b.calls == Calls::Guard && b.decide {
        // SAFETY: ours.
        unsafe { (*(f as *mut Stream)).path = String::from_utf8_lossy(header(e, abi::HEADER_REQUEST, b":path")).into_owned() };
    }
    if !b.pause_request {
        return abi::HEADERS_CONTINUE;
    }
    if end_of_stream {
        set_endpoints(e, b);
        return abi::HEADERS_CONTINUE;
    }
    abi::HEADERS_STOP_ITERATION
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::BodyStatus {
    // SAFETY: ours.
    let b = unsafe { behaviour(f) };
    if !b.pause_request {
        return abi::BODY_CONTINUE;
    }
    if !end_of_stream {
        return abi::BODY_STOP_ITERATION_AND_BUFFER;
    }
    set_endpoints(e, b);
    abi::BODY_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::HeadersStatus {
    // SAFETY: ours.
    let b = unsafe { behaviour(f) };
    if b.calls != Calls::None {
        let status = header(e, abi::HEADER_RESPONSE, b":status");
        if b.calls == Calls::Guard && b.decide {
            let status = std::str::from_utf8(status).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            let ct = std::str::from_utf8(header(e, abi::HEADER_RESPONSE, b"content-type")).ok();
            // SAFETY: ours.
            let s = unsafe { &mut *(f as *mut Stream) };
            let mut a = Attempt::new(AttemptConfig { max_held_bytes: DEFAULT_MAX_HELD_BYTES, retry_status: 503 }, &s.path);
            std::hint::black_box(a.on_response_headers(status, ct, None, end_of_stream));
            s.attempt = Some(a);
        }
        attr_string(e, abi::ATTR_UPSTREAM_ADDRESS);
        let mark: (&[u8], &[u8]) = if b.calls == Calls::Guard { (b"x-gpuha-guard", b"passed") } else { (b"x-gpuha-tier", b"own") };
        // SAFETY: live filter, inside its hook; Envoy copies both.
        unsafe { abi::envoy_dynamic_module_callback_http_set_header(e, abi::HEADER_RESPONSE, abi::ModuleBuffer::from_bytes(mark.0), abi::ModuleBuffer::from_bytes(mark.1)) };
    }
    if !b.hold_response || end_of_stream {
        return abi::HEADERS_CONTINUE;
    }
    let mut ct = abi::EnvoyBuffer::null();
    // SAFETY: live filter, inside its hook; the view is read at once.
    let sse = unsafe { abi::envoy_dynamic_module_callback_http_get_header(e, abi::HEADER_RESPONSE, abi::ModuleBuffer::from_bytes(b"content-type"), &mut ct, 0, std::ptr::null_mut()) && ct.as_bytes().starts_with(b"text/event-stream") };
    // SAFETY: ours.
    unsafe { (*(f as *mut Stream)).sse = sse };
    abi::HEADERS_STOP_ITERATION
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::BodyStatus {
    // SAFETY: ours.
    let (b, sse) = unsafe { (behaviour(f), (*(f as *const Stream)).sse) };
    if b.calls == Calls::Guard && b.hold_response && !sse {
        // As the guard holds a json answer: each chunk's bytes kept and drained, the whole
        // appended at the end.
        // SAFETY: ours.
        let s = unsafe { &mut *(f as *mut Stream) };
        let n = read_body(e, abi::BODY_RECEIVED_RESPONSE, Some(&mut s.held));
        if n > 0 {
            // SAFETY: live filter, inside its hook.
            unsafe { abi::envoy_dynamic_module_callback_http_drain_body(e, abi::BODY_RECEIVED_RESPONSE, n) };
        }
        if !end_of_stream {
            return abi::BODY_STOP_ITERATION_AND_BUFFER;
        }
        let held = std::mem::take(&mut s.held);
        // SAFETY: live filter, inside its hook; Envoy copies the bytes.
        unsafe { abi::envoy_dynamic_module_callback_http_append_body(e, abi::BODY_RECEIVED_RESPONSE, abi::ModuleBuffer::from_bytes(&held)) };
        return abi::BODY_CONTINUE;
    }
    if b.calls == Calls::Guard && sse {
        // SAFETY: ours.
        match unsafe { (*(f as *mut Stream)).attempt.as_mut() } {
            Some(a) if b.decide => guard_decides(e, a, end_of_stream),
            // As the guard checks each chunk of a released stream: its bytes looked at in place.
            _ => {
                read_body(e, abi::BODY_RECEIVED_RESPONSE, None);
            }
        }
    }
    if b.hold_response && !sse && !end_of_stream { abi::BODY_STOP_ITERATION_AND_BUFFER } else { abi::BODY_CONTINUE }
}

/// The guard's decisions on a chunk of a stream (`decide`): a released stream's clean chunk by
/// its tail, as the native host passes it; any other chunk to the attempt as the filter reads
/// it (nothing, its tail, or all of it, copied).
fn guard_decides(e: abi::HttpFilterEnvoyPtr, a: &mut Attempt, end_of_stream: bool) {
    if a.passes_clean_chunks() && !end_of_stream {
        if let Some(clean) = last_slice_tail(e, gpuha_liveness::sse::clean_tail) {
            if clean {
                return;
            }
        }
    }
    let mut bytes = Vec::new();
    read_body(e, abi::BODY_RECEIVED_RESPONSE, Some(&mut bytes));
    let chunk = match a.reads() {
        Read::Nothing => Chunk::Unread,
        Read::Tail if bytes.len() > TAIL_PEEK_BYTES => Chunk::Tail(&bytes[bytes.len() - TAIL_PEEK_BYTES..]),
        _ => Chunk::All(&bytes),
    };
    std::hint::black_box(a.on_body(chunk, end_of_stream));
}

/// `f` of the received chunk's last `TAIL_PEEK_BYTES` (all of it when shorter), read in place
/// when they lie in its last slice, as the native host reads them; `None` otherwise.
fn last_slice_tail(e: abi::HttpFilterEnvoyPtr, f: impl FnOnce(&[u8]) -> bool) -> Option<bool> {
    const MAX: usize = 16;
    // SAFETY: live filter, inside its hook.
    let n = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(e, abi::BODY_RECEIVED_RESPONSE) };
    let mut views = [abi::EnvoyBuffer::null(); MAX];
    // SAFETY: room for the `n` slices Envoy reported.
    if !(1..=MAX).contains(&n) || !unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks(e, abi::BODY_RECEIVED_RESPONSE, views.as_mut_ptr()) } {
        return None;
    }
    let total: usize = views[..n].iter().map(|v| v.length).sum();
    // SAFETY: Envoy's view, valid in this hook.
    let last = unsafe { views[n - 1].as_bytes() };
    let from = last.len().checked_sub(total.min(TAIL_PEEK_BYTES))?;
    Some(f(&last[from..]))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_e: abi::HttpFilterEnvoyPtr, _f: abi::HttpFilterModulePtr) -> abi::TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_e: abi::HttpFilterEnvoyPtr, _f: abi::HttpFilterModulePtr) -> abi::TrailersStatus {
    abi::TRAILERS_CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr) {
    // SAFETY: ours.
    if unsafe { behaviour(f) }.calls == Calls::Picker {
        let mut flags = 0u64;
        // SAFETY: live filter, inside its hook.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(e, abi::ATTR_RESPONSE_FLAGS, &mut flags) };
        std::hint::black_box(flags);
        attr_string(e, abi::ATTR_RESPONSE_CODE_DETAILS);
        attr_string(e, abi::ATTR_UPSTREAM_ADDRESS);
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(f: abi::HttpFilterModulePtr) {
    // SAFETY: ours, given back once.
    let mut s = unsafe { Box::from_raw(f as *mut Stream) };
    if let Some(a) = s.attempt.as_mut() {
        std::hint::black_box(a.on_done(Ending::from_envoy(0, None)));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_e: abi::HttpFilterEnvoyPtr, _f: abi::HttpFilterModulePtr, _event: u64) {}

// Each hook has the signature the ABI declares.
const _: abi::OnProgramInit = envoy_dynamic_module_on_program_init;
const _: abi::OnHttpFilterConfigNew = envoy_dynamic_module_on_http_filter_config_new;
const _: abi::OnHttpFilterConfigDestroy = envoy_dynamic_module_on_http_filter_config_destroy;
const _: abi::OnHttpFilterNew = envoy_dynamic_module_on_http_filter_new;
const _: abi::OnHttpFilterRequestHeaders = envoy_dynamic_module_on_http_filter_request_headers;
const _: abi::OnHttpFilterRequestBody = envoy_dynamic_module_on_http_filter_request_body;
const _: abi::OnHttpFilterResponseHeaders = envoy_dynamic_module_on_http_filter_response_headers;
const _: abi::OnHttpFilterResponseBody = envoy_dynamic_module_on_http_filter_response_body;
const _: abi::OnHttpFilterRequestTrailers = envoy_dynamic_module_on_http_filter_request_trailers;
const _: abi::OnHttpFilterResponseTrailers = envoy_dynamic_module_on_http_filter_response_trailers;
const _: abi::OnHttpFilterStreamComplete = envoy_dynamic_module_on_http_filter_stream_complete;
const _: abi::OnHttpFilterDestroy = envoy_dynamic_module_on_http_filter_destroy;
const _: abi::OnHttpFilterScheduled = envoy_dynamic_module_on_http_filter_scheduled;

abi::unused_http_hooks!();
