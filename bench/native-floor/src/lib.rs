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
//! Nothing set: every hook continues. Other keys are ignored. Bench code: it trusts Envoy's
//! pointers as the ABI promises.
#![allow(unsafe_code)]
// The hooks are `extern "C"` for Envoy, which passes the pointers the ABI promises.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::c_char;

use gpuha_dm_abi as abi;

#[derive(Default)]
struct Behaviour {
    pause_request: bool,
    endpoints: Option<Vec<u8>>,
    hold_response: bool,
}

impl Behaviour {
    /// The keys above, found in the JSON text (no JSON parser in a do-nothing module).
    fn parse(text: &str) -> Behaviour {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let endpoints = compact.split_once("\"endpoints\":\"").and_then(|(_, rest)| rest.split_once('"')).map(|(v, _)| v.as_bytes().to_vec());
        Behaviour { pause_request: compact.contains("\"pause_request\":true"), endpoints, hold_response: compact.contains("\"hold_response\":true") }
    }
}

struct Stream {
    cfg: *const Behaviour,
    /// The answer is a stream: released with its first bytes.
    sse: bool,
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
    Box::into_raw(Box::new(Stream { cfg: config as *const Behaviour, sse: false })) as abi::HttpFilterModulePtr
}

/// # Safety
/// `f` is a pointer `on_http_filter_new` returned, not yet destroyed.
unsafe fn behaviour<'a>(f: abi::HttpFilterModulePtr) -> &'a Behaviour {
    // SAFETY: per the contract; the configuration outlives its filters.
    unsafe { &*(*(f as *const Stream)).cfg }
}

fn set_endpoints(e: abi::HttpFilterEnvoyPtr, b: &Behaviour) {
    if let Some(v) = &b.endpoints {
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
    if !unsafe { behaviour(f) }.hold_response || end_of_stream {
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
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_e: abi::HttpFilterEnvoyPtr, f: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::BodyStatus {
    // SAFETY: ours.
    let (b, sse) = unsafe { (behaviour(f), (*(f as *const Stream)).sse) };
    if b.hold_response && !sse && !end_of_stream { abi::BODY_STOP_ITERATION_AND_BUFFER } else { abi::BODY_CONTINUE }
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
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_e: abi::HttpFilterEnvoyPtr, _f: abi::HttpFilterModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(f: abi::HttpFilterModulePtr) {
    // SAFETY: ours, given back once.
    drop(unsafe { Box::from_raw(f as *mut Stream) });
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
