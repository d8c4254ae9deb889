//! The Proxy-Wasm host functions the SDK imports (`proxy_log`, `proxy_get_header_map_value`, ...),
//! defined natively over Envoy's dynamic-modules ABI ([`crate::dm`]), so that `gpuha-filter` and
//! the SDK run here unchanged, as they run in Envoy's Wasm VM.
//!
//! Every call acts on what [`Cur`] says the thread is doing: a root context (configure, tick),
//! an HTTP context (its Envoy filter), or an HTTP call's response. What cannot be done in that
//! state is refused with a status the SDK's wrapper for that call maps to an error (`NotFound`,
//! `BadArgument`), or, for the calls whose wrapper takes only `Ok` (any other status panics the
//! SDK), logged and answered `Ok`; the filter's host wrappers fail open on either. Buffers handed
//! to the SDK are allocated with the
//! global allocator at exactly their length: the SDK takes them back with
//! `Vec::from_raw_parts(ptr, len, len)`.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;

use crate::dm::{Attr, Dir, Filter, HeaderMap, Level};
use crate::hooks::{Body, Reply};
use crate::plugin::{Callout, Plugin};
use crate::wire;

/// The SDK's imports nothing in the filter uses.
mod unused;

/// Proxy-Wasm statuses (the SDK's `Status`, as the numbers its imports return).
const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const BAD_ARGUMENT: u32 = 2;
const CAS_MISMATCH: u32 = 8;
const INTERNAL_FAILURE: u32 = 10;

/// What the thread's current Proxy-Wasm call acts on.
#[derive(Clone, Default)]
pub enum Cur {
    #[default]
    Idle,
    Root(Arc<Plugin>),
    /// An HTTP context: its filter and its context id.
    Http(Arc<Plugin>, Filter, u32),
    /// An HTTP call's response, delivered to a root context.
    Callout(Arc<Plugin>, Arc<Callout>),
}

impl Cur {
    fn plugin(&self) -> Option<&Arc<Plugin>> {
        match self {
            Cur::Idle => None,
            Cur::Root(p) | Cur::Http(p, ..) | Cur::Callout(p, _) => Some(p),
        }
    }

    pub fn filter(&self) -> Option<Filter> {
        match self {
            Cur::Http(_, f, _) => Some(*f),
            _ => None,
        }
    }
}

/// The request key header (`gpuha_filter::REQUEST_KEY_HEADER`) as bytes.
const REQUEST_KEY: &[u8] = gpuha_filter::REQUEST_KEY_HEADER.as_bytes();

/// Notes the picker's key for the request as it writes it, as the guard's read of it is noted.
fn note_request_key(f: Filter, m: HeaderMap, key: &[u8], value: &[u8]) {
    if m == HeaderMap::RequestHeaders && key == REQUEST_KEY {
        crate::hooks::saw_request_header(f, key, value);
    }
}

thread_local! {
    static CUR: RefCell<Cur> = const { RefCell::new(Cur::Idle) };
}

/// Runs `f` with the thread's current call set to `cur`, restoring the previous one after (a
/// hook can run inside another: a local reply sent from a callback re-enters the filter).
pub fn with_cur<T>(cur: Cur, f: impl FnOnce() -> T) -> T {
    let prev = CUR.with(|c| c.replace(cur));
    let out = f();
    CUR.with(|c| *c.borrow_mut() = prev);
    out
}

fn cur() -> Cur {
    CUR.with(|c| c.borrow().clone())
}

/// `f` of the current call, borrowed (no clone of the plugin's handle).
fn with<T>(f: impl FnOnce(&Cur) -> T) -> T {
    CUR.with(|c| f(&c.borrow()))
}

fn set_cur(cur: Cur) {
    CUR.with(|c| *c.borrow_mut() = cur);
}

/// `bytes` for the SDK to own (see the module doc): a slice is copied, a vector handed over
/// (copied only when its capacity is above its length).
fn give(bytes: impl Into<Box<[u8]>>, data: *mut *mut u8, size: *mut usize) {
    let boxed: Box<[u8]> = bytes.into();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed).cast::<u8>();
    // SAFETY: the SDK passes pointers to its own locals for the two results.
    unsafe {
        *data = ptr;
        *size = len;
    }
}

/// The `len` bytes at `ptr` the SDK passed in (valid for the call).
fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: the SDK passes a pointer and length of one of its live buffers.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

fn map_of(map_type: u32) -> Option<HeaderMap> {
    Some(match map_type {
        0 => HeaderMap::RequestHeaders,
        1 => HeaderMap::RequestTrailers,
        2 => HeaderMap::ResponseHeaders,
        3 => HeaderMap::ResponseTrailers,
        _ => return None,
    })
}

#[no_mangle]
pub extern "C" fn proxy_log(level: u32, data: *const u8, size: usize) -> u32 {
    let level = match level {
        0 => Level::Trace,
        1 => Level::Debug,
        2 => Level::Info,
        3 => Level::Warn,
        4 => Level::Error,
        _ => Level::Critical,
    };
    crate::dm::log(level, slice(data, size));
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_log_level(level: *mut u32) -> u32 {
    // The SDK only asks to skip formatting; Envoy's logger filters by its own level.
    // SAFETY: a pointer to the SDK's local.
    unsafe { *level = 0 };
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // SAFETY: a pointer to the SDK's local.
    unsafe { *time = now };
    OK
}

#[no_mangle]
pub extern "C" fn proxy_set_tick_period_milliseconds(period: u32) -> u32 {
    // The SDK takes only `Ok` here (anything else panics it): a tick asked outside a root
    // context is ignored.
    if let Cur::Root(p) = cur() {
        p.set_tick(period);
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_buffer_bytes(buffer_type: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    with(|c| {
        let part = match (buffer_type, c) {
            (0, Cur::Http(_, f, _)) => f.body_window(Dir::Request, start, max),
            (1, Cur::Http(_, f, _)) => f.body_window(Dir::Response, start, max),
            (4, Cur::Callout(_, r)) => return window(&r.body, start, max, data, size),
            (7, _) => match c.plugin() {
                Some(p) => return window(&p.configuration, start, max, data, size),
                None => return NOT_FOUND,
            },
            _ => return NOT_FOUND,
        };
        match part {
            Some(p) => {
                give(p, data, size);
                OK
            }
            None => NOT_FOUND,
        }
    })
}

fn window(whole: &[u8], start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    let Some(rest) = whole.get(start..) else { return NOT_FOUND };
    give(&rest[..rest.len().min(max)], data, size);
    OK
}

#[no_mangle]
pub extern "C" fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, data: *const u8, len: usize) -> u32 {
    // The SDK takes only `Ok` here: a write that cannot be done is logged and dropped.
    let dir = match buffer_type {
        0 => Dir::Request,
        _ => Dir::Response,
    };
    match with(Cur::filter) {
        // The filter only ever replaces a body whole (`host::set_body`).
        Some(f) if start == 0 && size >= f.body_len(dir) && buffer_type <= 1 => {
            if !f.replace_body(dir, slice(data, len)) {
                crate::dm::log(Level::Warn, b"gpuha native: body not replaced");
            }
        }
        _ => crate::dm::log(Level::Warn, b"gpuha native: set_buffer outside a body or of part of it: ignored"),
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, size: *mut usize) -> u32 {
    with(|c| match (map_type, c) {
        (6, Cur::Callout(_, r)) => give_map(&r.headers, data, size),
        (t, Cur::Http(_, f, _)) => match map_of(t) {
            Some(m) => f.with_headers(m, |pairs| {
                if m == HeaderMap::RequestHeaders {
                    if let Some((k, v)) = pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(REQUEST_KEY)) {
                        crate::hooks::saw_request_header(*f, k, v);
                    }
                }
                give_map(pairs, data, size)
            }),
            None => give_map::<&[u8]>(&[], data, size),
        },
        // The SDK takes only `Ok` here: no map reads as an empty one.
        _ => give_map::<&[u8]>(&[], data, size),
    })
}

fn give_map<B: AsRef<[u8]>>(pairs: &[(B, B)], data: *mut *mut u8, size: *mut usize) -> u32 {
    give(wire::encode_map(pairs), data, size);
    OK
}

#[no_mangle]
pub extern "C" fn proxy_set_header_map_pairs(_map_type: u32, _data: *const u8, _size: usize) -> u32 {
    crate::dm::log(Level::Warn, b"gpuha native: set_map is not supported: ignored");
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_header_map_value(map_type: u32, key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    let key = slice(key, key_size);
    let value = match with(|c| match (map_type, c) {
        (6, Cur::Callout(_, r)) => Some(r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone())),
        (t, Cur::Http(_, f, _)) => map_of(t).map(|m| {
            let v = f.header(m, key);
            if let (HeaderMap::RequestHeaders, Some(v)) = (m, &v) {
                crate::hooks::saw_request_header(*f, key, v);
            }
            v
        }),
        _ => None,
    }) {
        Some(v) => v,
        None => return NOT_FOUND,
    };
    match value {
        Some(v) => {
            give(v, data, size);
            OK
        }
        None => NOT_FOUND,
    }
}

#[no_mangle]
pub extern "C" fn proxy_remove_header_map_value(map_type: u32, key: *const u8, key_size: usize) -> u32 {
    // The SDK takes only `Ok` for header writes.
    if let (Some(m), Some(f)) = (map_of(map_type), with(Cur::filter)) {
        f.remove_header(m, slice(key, key_size));
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_replace_header_map_value(map_type: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32 {
    if let (Some(m), Some(f)) = (map_of(map_type), with(Cur::filter)) {
        let (key, value) = (slice(key, key_size), slice(value, value_size));
        if !f.set_header(m, key, value) {
            crate::dm::log(Level::Debug, b"gpuha native: header not set (no such map now)");
        }
        note_request_key(f, m, key, value);
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_add_header_map_value(map_type: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32 {
    if let (Some(m), Some(f)) = (map_of(map_type), with(Cur::filter)) {
        let (key, value) = (slice(key, key_size), slice(value, value_size));
        if !f.add_header(m, key, value) {
            crate::dm::log(Level::Debug, b"gpuha native: header not added (no such map now)");
        }
        note_request_key(f, m, key, value);
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_property(path: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    let Some(f) = with(Cur::filter) else { return NOT_FOUND };
    let parts = wire::path_parts(slice(path, path_size));
    let value = match parts.as_slice() {
        // At a filter's end (destroy) Envoy shows no attributes: what was kept of them. An
        // upstream filter (the guard) sees its own attempt's stream; Envoy's Wasm host shows it
        // the downstream stream's `response.*`, which says whether the client went away.
        [b"upstream", b"address"] => f.attr_string(Attr::UpstreamAddress).or_else(|| crate::hooks::kept(f).and_then(|k| k.upstream_address)),
        [b"response", b"code_details"] => f.attr_string(Attr::ResponseCodeDetails).or_else(|| ending(f).and_then(|e| e.details)),
        [b"response", b"flags"] => f.attr_int(Attr::ResponseFlags).or_else(|| ending(f).map(|e| e.flags)).map(|v| v.to_le_bytes().to_vec()),
        [b"response", b"code"] => f.attr_int(Attr::ResponseCode).map(|v| v.to_le_bytes().to_vec()),
        [b"request", b"id"] => f.attr_string(Attr::RequestId),
        _ => None,
    };
    match value {
        Some(v) => {
            give(v, data, size);
            OK
        }
        None => NOT_FOUND,
    }
}

/// How `f`'s stream ended (a downstream filter), or its request's downstream stream (an upstream one).
fn ending(f: Filter) -> Option<crate::hooks::Ending> {
    crate::hooks::kept(f).and_then(|k| k.ending).or_else(|| crate::hooks::downstream_ending(f))
}

/// The foreign functions here:
/// - `gpuha.single_header_reads`: answers `Ok`. Here a host call is a plain function call, so
///   the filter reads the headers it needs by name (below) or one by one, never the whole map
///   (`gpuha_filter::host::Headers`);
/// - `gpuha.read_headers`: the first values of the named headers of one map, in one walk of
///   Envoy's map ([`gpuha_liveness::named_headers`]; `BadArgument` outside an HTTP context or for
///   an ask that does not decode);
/// - `gpuha.skip_response_body`: the filter's hint that its context is done with the stream's
///   response body (`gpuha_filter::host::skip_response_body`). Its remaining response-body hooks
///   are answered `Continue` without entering the SDK ([`crate::hooks`]);
/// - `gpuha.pass_clean_response_chunks`: the filter's hint that its context would pass its next
///   response-body chunks untouched while each is clean (`gpuha_liveness::sse::clean_tail`) and
///   does not end the stream (`gpuha_filter::host::pass_clean_response_chunks`). Those are
///   answered `Continue` without entering the SDK, until one is not ([`crate::hooks`]);
/// - `gpuha.answer_as_upstream`: answers the calling context's attempt with a status and no
///   body, marked `x-gpuha-guard` (`args`: the status as two bytes, little-endian, then the
///   mark), sent from the filter's place as the worker's own answer
///   ([`crate::dm::Filter::send_upstream_answer`]): in the guard, an upstream filter, the router
///   retries it by its policy. `BadArgument` outside an HTTP context or for other `args`.
#[no_mangle]
pub extern "C" fn proxy_call_foreign_function(name: *const u8, name_size: usize, args: *const u8, args_size: usize, data: *mut *mut u8, size: *mut usize) -> u32 {
    let body = match slice(name, name_size) {
        b"gpuha.single_header_reads" => return OK,
        b"gpuha.read_headers" => return read_headers(slice(args, args_size), data, size),
        b"gpuha.answer_as_upstream" => return answer_as_upstream(slice(args, args_size)),
        b"gpuha.skip_response_body" => Body::Skip,
        b"gpuha.pass_clean_response_chunks" => Body::PassClean,
        _ => return NOT_FOUND,
    };
    match with(Cur::filter) {
        Some(f) => {
            crate::hooks::body_hint(f, body);
            OK
        }
        None => BAD_ARGUMENT,
    }
}

fn answer_as_upstream(args: &[u8]) -> u32 {
    let (Some(f), Some((status, mark))) = (with(Cur::filter), args.split_first_chunk::<2>()) else { return BAD_ARGUMENT };
    let status = u16::from_le_bytes(*status);
    if !(100..=999).contains(&status) {
        return BAD_ARGUMENT;
    }
    f.send_upstream_answer(u32::from(status), &[(gpuha_filter::GUARD_HEADER.as_bytes(), mark)]);
    OK
}

fn read_headers(ask: &[u8], data: *mut *mut u8, size: *mut usize) -> u32 {
    use gpuha_liveness::named_headers::{push_value, Ask, MAX_NAMES};
    let Some(ask) = Ask::parse(ask) else { return BAD_ARGUMENT };
    let (Some(m), Some(f)) = (map_of(u32::from(ask.map)), with(Cur::filter)) else { return BAD_ARGUMENT };
    let lengths = ask.lengths();
    let answer = f.with_header_views(m, |views| {
        let mut found: [Option<&[u8]>; MAX_NAMES] = [None; MAX_NAMES];
        for h in views {
            let (k, v) = h.bytes();
            // Most headers are passed over on their length.
            if lengths >> (k.len() % 64) & 1 == 0 {
                continue;
            }
            // The first value of a name, as a single read answers. Envoy keeps names lower-cased
            // (as the filter asks): the exact comparison nearly always decides.
            for (name, slot) in ask.names().zip(found.iter_mut()) {
                if name.len() == k.len() && slot.is_none() && (k == name || k.eq_ignore_ascii_case(name)) {
                    *slot = Some(v);
                }
            }
        }
        let found = &found[..ask.len()];
        let mut out = Vec::with_capacity(found.iter().map(|v| 4 + v.map_or(0, <[u8]>::len)).sum());
        for (name, value) in ask.names().zip(found) {
            if let (HeaderMap::RequestHeaders, Some(v), true) = (m, value, name == REQUEST_KEY) {
                crate::hooks::saw_request_header(f, name, v);
            }
            push_value(&mut out, *value);
        }
        out
    });
    give(answer, data, size);
    OK
}

#[no_mangle]
pub extern "C" fn proxy_set_property(_path: *const u8, _path_size: usize, _value: *const u8, _value_size: usize) -> u32 {
    crate::dm::log(Level::Warn, b"gpuha native: set_property is not supported: ignored");
    OK
}

#[no_mangle]
pub extern "C" fn proxy_get_shared_data(key: *const u8, key_size: usize, data: *mut *mut u8, size: *mut usize, cas: *mut u32) -> u32 {
    let found = crate::plugin::SHARED.read(slice(key, key_size), |v, token| {
        give(v, data, size);
        // SAFETY: a pointer to the SDK's local.
        unsafe { *cas = token };
    });
    if found.is_some() { OK } else { NOT_FOUND }
}

#[no_mangle]
pub extern "C" fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32 {
    match crate::plugin::SHARED.set(slice(key, key_size), slice(value, value_size), cas) {
        crate::shared::SetResult::Ok => OK,
        crate::shared::SetResult::CasMismatch => CAS_MISMATCH,
    }
}

#[no_mangle]
pub extern "C" fn proxy_continue_stream(stream_type: u32) -> u32 {
    // The SDK takes only `Ok` here.
    match (with(Cur::filter), stream_type) {
        (Some(f), 0) => f.continue_decoding(),
        (Some(f), 1) => f.continue_encoding(),
        _ => crate::dm::log(Level::Warn, b"gpuha native: continue outside an HTTP stream: ignored"),
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_close_stream(stream_type: u32) -> u32 {
    // The SDK takes only `Ok` here.
    match (with(Cur::filter), stream_type) {
        (Some(f), 0 | 1) => f.reset(),
        _ => crate::dm::log(Level::Warn, b"gpuha native: close outside an HTTP stream: ignored"),
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_send_local_response(status: u32, details: *const u8, details_size: usize, body: *const u8, body_size: usize, headers: *const u8, headers_size: usize, _grpc_status: i32) -> u32 {
    // The SDK takes only `Ok` here.
    match (with(Cur::filter), wire::decode_map(slice(headers, headers_size))) {
        (Some(f), Some(headers)) => {
            let reply = Reply { status, headers: headers.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(), body: slice(body, body_size).to_vec(), details: slice(details, details_size).to_vec() };
            // From inside the filter's own hook it goes out when the hook returns (see `hooks`).
            if let Err(reply) = crate::hooks::hold_reply(f, reply) {
                crate::hooks::send(f, &reply);
            }
        }
        _ => crate::dm::log(Level::Warn, b"gpuha native: local reply outside an HTTP stream or with a malformed header map: not sent"),
    }
    OK
}

#[no_mangle]
pub extern "C" fn proxy_http_call(upstream: *const u8, upstream_size: usize, headers: *const u8, headers_size: usize, body: *const u8, body_size: usize, _trailers: *const u8, _trailers_size: usize, timeout_ms: u32, token: *mut u32) -> u32 {
    let Cur::Root(p) = cur() else { return BAD_ARGUMENT };
    let Some(headers) = wire::decode_map(slice(headers, headers_size)) else { return BAD_ARGUMENT };
    let Ok(cluster) = std::str::from_utf8(slice(upstream, upstream_size)) else { return BAD_ARGUMENT };
    match p.callout(cluster, &headers, slice(body, body_size), timeout_ms) {
        Some(t) => {
            // SAFETY: a pointer to the SDK's local.
            unsafe { *token = t };
            OK
        }
        None => INTERNAL_FAILURE,
    }
}

#[no_mangle]
pub extern "C" fn proxy_set_effective_context(context_id: u32) -> u32 {
    // The SDK names the context of each callback: mostly the one the hook is on already.
    if with(|c| matches!(c, Cur::Http(_, _, id) if *id == context_id)) {
        return OK;
    }
    if let Some(f) = crate::hooks::filter_of(context_id) {
        let Some(p) = with(|c| c.plugin().cloned()) else { return BAD_ARGUMENT };
        set_cur(Cur::Http(p, f, context_id));
        return OK;
    }
    if !crate::hooks::is_root(context_id) {
        return BAD_ARGUMENT;
    }
    // Before each root callback: an HTTP call's answer stays readable.
    match with(|c| if matches!(c, Cur::Root(_) | Cur::Callout(..)) { None } else { Some(c.plugin().cloned()) }) {
        None => OK,
        Some(Some(p)) => {
            set_cur(Cur::Root(p));
            OK
        }
        Some(None) => BAD_ARGUMENT,
    }
}

#[no_mangle]
pub extern "C" fn proxy_define_metric(metric_type: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32 {
    // The SDK takes only `Ok` here: a metric that cannot be defined gets an id no metric has,
    // whose increments answer `NotFound` (the filter skips them).
    let plugin = cur().plugin().cloned();
    let name = std::str::from_utf8(slice(name, name_size)).ok();
    // Only counters: the filter defines nothing else.
    let m = match (plugin, name, metric_type) {
        (Some(p), Some(name), 0) => p.counter(name),
        _ => None,
    };
    // SAFETY: a pointer to the SDK's local.
    unsafe { *id = m.unwrap_or(u32::MAX) };
    OK
}

#[no_mangle]
pub extern "C" fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32 {
    let Ok(n) = u64::try_from(offset) else { return BAD_ARGUMENT };
    match with(|c| c.plugin().map(|p| p.increment(metric_id, n))) {
        Some(true) => OK,
        Some(false) => NOT_FOUND,
        None => BAD_ARGUMENT,
    }
}

#[no_mangle]
pub extern "C" fn proxy_record_metric(_metric_id: u32, _value: u64) -> u32 {
    NOT_FOUND
}

#[no_mangle]
pub extern "C" fn proxy_get_metric(_metric_id: u32, _value: *mut u64) -> u32 {
    NOT_FOUND
}
