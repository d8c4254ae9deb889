//! Hand-written FFI bindings for the HTTP-filter subset of Envoy's dynamic-modules ABI,
//! as shipped in Envoy 1.40.0 (commit 9e5580933739775e8bce696a57a2e1bc99368f23).
//!
//! Written from the meaning of the upstream C header (`source/extensions/dynamic_modules/abi/abi.h`)
//! and checked against the 1.40.0 binary: every callback declared here is exported by it, and a
//! probe module exercised the ones `gpuha-native` calls (headers, bodies, local replies,
//! attributes, schedulers from other threads, counters, the configuration's HTTP calls), as a
//! downstream and as an upstream filter. `native/tests/envoy_configs.rs` loads the module into
//! the Envoy the project pins and checks that Envoy reports the ABI version as matched.
//!
//! Conventions:
//! * Callbacks (Envoy implements, module calls) are in the `extern "C"` block at the bottom.
//! * Event hooks (module implements and exports with `#[no_mangle] pub unsafe extern "C" fn`)
//!   are given as `pub type Hook... = unsafe extern "C" fn(..)` aliases with the exact signature
//!   and the exported symbol name in the doc line. A mismatch is not checked by the linker, so
//!   implement them by copying these signatures.
//! * C enums are plain `int`-sized values; they are given here as `u32` aliases plus constants
//!   (never a Rust `enum` for values Envoy hands in: an unknown value would be UB).
//! * `bool` is C `_Bool` (Rust `bool` has the same ABI).

#![allow(non_camel_case_types, dead_code, unsafe_code, clippy::missing_safety_doc)]

use core::ffi::{c_char, c_void};

// ---------------------------------------------------------------------------------------------
// ABI version
// ---------------------------------------------------------------------------------------------

/// The string `envoy_dynamic_module_on_program_init` must return (NUL-terminated, static).
/// Envoy 1.40.0 compares it with its own ABI version string: equal logs at info
/// "Dynamic module ABI version v0.2.0 matched."; anything else logs a warning
/// "Dynamic module ABI version {} is deprecated. ..." and loads anyway. Returning NULL
/// makes Envoy reject the module.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

// ---------------------------------------------------------------------------------------------
// Common types
// ---------------------------------------------------------------------------------------------

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy (lifetime: see each callback;
/// in general until the end of the current event hook, or until the module mutates the same
/// header map / body).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const fn null() -> Self {
        Self { ptr: core::ptr::null(), length: 0 }
    }
    /// # Safety
    /// Only while Envoy guarantees the memory (see the callback that filled it).
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            core::slice::from_raw_parts(self.ptr as *const u8, self.length)
        }
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module. Envoy only reads them
/// during the call it is passed to (it copies what it keeps).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    pub const fn null() -> Self {
        Self { ptr: core::ptr::null(), length: 0 }
    }
    pub fn from_bytes(b: &[u8]) -> Self {
        Self { ptr: b.as_ptr() as *const c_char, length: b.len() }
    }
}

/// `envoy_dynamic_module_type_module_http_header`: a header owned by the module.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`: a header owned by Envoy's HeaderMap.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`
pub type HttpHeaderType = u32;
pub const HEADER_REQUEST: HttpHeaderType = 0; // RequestHeader
pub const TRAILER_REQUEST: HttpHeaderType = 1; // RequestTrailer
pub const HEADER_RESPONSE: HttpHeaderType = 2; // ResponseHeader
pub const TRAILER_RESPONSE: HttpHeaderType = 3; // ResponseTrailer

/// `envoy_dynamic_module_type_log_level` (mirrors spdlog levels).
pub type LogLevel = u32;
pub const LOG_TRACE: LogLevel = 0;
pub const LOG_DEBUG: LogLevel = 1;
pub const LOG_INFO: LogLevel = 2;
pub const LOG_WARN: LogLevel = 3;
pub const LOG_ERROR: LogLevel = 4;
pub const LOG_CRITICAL: LogLevel = 5;
pub const LOG_OFF: LogLevel = 6;

/// `envoy_dynamic_module_type_http_callout_init_result`
pub type HttpCalloutInitResult = u32;
pub const CALLOUT_INIT_SUCCESS: HttpCalloutInitResult = 0;
pub const CALLOUT_INIT_MISSING_REQUIRED_HEADERS: HttpCalloutInitResult = 1;
pub const CALLOUT_INIT_CLUSTER_NOT_FOUND: HttpCalloutInitResult = 2;
pub const CALLOUT_INIT_DUPLICATE_CALLOUT_ID: HttpCalloutInitResult = 3;
pub const CALLOUT_INIT_CANNOT_CREATE_REQUEST: HttpCalloutInitResult = 4;

/// `envoy_dynamic_module_type_http_callout_result`
pub type HttpCalloutResult = u32;
pub const CALLOUT_SUCCESS: HttpCalloutResult = 0;
pub const CALLOUT_RESET: HttpCalloutResult = 1;
pub const CALLOUT_EXCEED_RESPONSE_BUFFER_LIMIT: HttpCalloutResult = 2;

/// `envoy_dynamic_module_type_http_stream_reset_reason` (for streamed callouts).
pub type HttpStreamResetReason = u32;

/// `envoy_dynamic_module_type_metrics_result`
pub type MetricsResult = u32;
pub const METRICS_SUCCESS: MetricsResult = 0;
pub const METRICS_NOT_FOUND: MetricsResult = 1;
pub const METRICS_INVALID_LABELS: MetricsResult = 2;
pub const METRICS_FROZEN: MetricsResult = 3;

/// `envoy_dynamic_module_type_attribute_id`: positions in Envoy 1.40's enum (only the ones used
/// here; each was read live from the Envoy the project pins). Envoy answers `false` for an id it
/// does not have in a phase.
pub type AttributeId = u32;
pub const ATTR_REQUEST_ID: AttributeId = 9; // used: string, the x-request-id
pub const ATTR_RESPONSE_CODE: AttributeId = 15; // used: int
pub const ATTR_RESPONSE_CODE_DETAILS: AttributeId = 16; // used: string
pub const ATTR_RESPONSE_FLAGS: AttributeId = 17; // used: int only (bit mask, e.g. 0x20 = UF); as string: unsupported
pub const ATTR_UPSTREAM_ADDRESS: AttributeId = 41; // used: string "ip:port"

// ---------------------------------------------------------------------------------------------
// HTTP filter types
// ---------------------------------------------------------------------------------------------

/// Envoy's DynamicModuleHttpFilterConfig (valid from config_new until config_destroy returns).
pub type HttpFilterConfigEnvoyPtr = *mut c_void;
/// The module's config object (returned from config_new; NULL = reject config).
pub type HttpFilterConfigModulePtr = *const c_void;
/// Envoy's DynamicModuleHttpFilter, one per stream (valid until the filter destroy hook).
pub type HttpFilterEnvoyPtr = *mut c_void;
/// The module's per-stream filter object (returned from filter_new).
pub type HttpFilterModulePtr = *const c_void;
/// Allocated by Envoy, owned by the module: must be freed with the matching *_scheduler_delete.
pub type HttpFilterSchedulerModulePtr = *mut c_void;
pub type HttpFilterConfigSchedulerModulePtr = *mut c_void;

/// `envoy_dynamic_module_type_http_body_type`
pub type HttpBodyType = u32;
/// Bytes of the data frame that triggered the current request_body hook (only inside that hook).
pub const BODY_RECEIVED_REQUEST: HttpBodyType = 0;
/// Bytes buffered so far by Envoy for the request (after a StopIterationAndBuffer etc.).
pub const BODY_BUFFERED_REQUEST: HttpBodyType = 1;
pub const BODY_RECEIVED_RESPONSE: HttpBodyType = 2;
pub const BODY_BUFFERED_RESPONSE: HttpBodyType = 3;

/// Return of request_headers / response_headers hooks (Envoy's FilterHeadersStatus order).
pub type HeadersStatus = u32;
pub const HEADERS_CONTINUE: HeadersStatus = 0;
pub const HEADERS_STOP_ITERATION: HeadersStatus = 1;
pub const HEADERS_CONTINUE_AND_DONT_END_STREAM: HeadersStatus = 2;
pub const HEADERS_STOP_ALL_ITERATION_AND_BUFFER: HeadersStatus = 3;
pub const HEADERS_STOP_ALL_ITERATION_AND_WATERMARK: HeadersStatus = 4;

/// Return of request_body / response_body hooks (Envoy's FilterDataStatus order).
pub type BodyStatus = u32;
pub const BODY_CONTINUE: BodyStatus = 0;
pub const BODY_STOP_ITERATION_AND_BUFFER: BodyStatus = 1;
pub const BODY_STOP_ITERATION_AND_WATERMARK: BodyStatus = 2;
pub const BODY_STOP_ITERATION_NO_BUFFER: BodyStatus = 3;

/// Return of request_trailers / response_trailers hooks.
pub type TrailersStatus = u32;
pub const TRAILERS_CONTINUE: TrailersStatus = 0;
pub const TRAILERS_STOP_ITERATION: TrailersStatus = 1;


/// `envoy_dynamic_module_type_http_filter_stream_reset_reason` (for reset_stream).
pub type HttpFilterStreamResetReason = u32;
pub const FILTER_RESET_LOCAL_RESET: HttpFilterStreamResetReason = 0;
pub const FILTER_RESET_LOCAL_REFUSED_STREAM_RESET: HttpFilterStreamResetReason = 1;

// ---------------------------------------------------------------------------------------------
// Event hooks the module exports (exact signatures; implement with #[no_mangle]).
// REQUIRED = Envoy rejects the filter config ("Failed to create filter config: ...") when the
// symbol is missing. OPTIONAL = looked up, silently skipped when absent.
// ---------------------------------------------------------------------------------------------

/// `envoy_dynamic_module_on_program_init` (REQUIRED for any module). Main thread, once per dlopen.
/// Return a pointer to a static NUL-terminated version string (see ABI_VERSION), NULL = fail.
pub type OnProgramInit = unsafe extern "C" fn() -> *const c_char;

/// `envoy_dynamic_module_on_http_filter_config_new` (REQUIRED). Main thread. `name` is
/// `filter_name` from the proto; `config` is `filter_config` unwrapped (StringValue/BytesValue:
/// raw value; Struct: JSON text). Both only valid during the call: copy them.
/// Return NULL to reject the config.
pub type OnHttpFilterConfigNew = unsafe extern "C" fn(
    filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> HttpFilterConfigModulePtr;

/// `envoy_dynamic_module_on_http_filter_config_destroy` (REQUIRED). Main thread.
pub type OnHttpFilterConfigDestroy = unsafe extern "C" fn(filter_config_ptr: HttpFilterConfigModulePtr);

/// `envoy_dynamic_module_on_http_filter_new` (REQUIRED). Worker thread, per stream.
/// Return NULL to fail the stream.
pub type OnHttpFilterNew = unsafe extern "C" fn(
    filter_config_ptr: HttpFilterConfigModulePtr,
    filter_envoy_ptr: HttpFilterEnvoyPtr,
) -> HttpFilterModulePtr;

/// `envoy_dynamic_module_on_http_filter_request_headers` (REQUIRED).
pub type OnHttpFilterRequestHeaders = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> HeadersStatus;

/// `envoy_dynamic_module_on_http_filter_request_body` (REQUIRED).
pub type OnHttpFilterRequestBody = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> BodyStatus;

/// `envoy_dynamic_module_on_http_filter_request_trailers` (REQUIRED).
pub type OnHttpFilterRequestTrailers = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
) -> TrailersStatus;

/// `envoy_dynamic_module_on_http_filter_response_headers` (REQUIRED).
pub type OnHttpFilterResponseHeaders = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> HeadersStatus;

/// `envoy_dynamic_module_on_http_filter_response_body` (REQUIRED).
pub type OnHttpFilterResponseBody = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    end_of_stream: bool,
) -> BodyStatus;

/// `envoy_dynamic_module_on_http_filter_response_trailers` (REQUIRED).
pub type OnHttpFilterResponseTrailers = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
) -> TrailersStatus;

/// `envoy_dynamic_module_on_http_filter_stream_complete` (REQUIRED). Before destroy and before
/// access logs; response attributes (code, details, flags, upstream address) are final here.
/// NOT called for an instance running as an upstream (cluster) filter in 1.40 (observed): do
/// end-of-stream work there in destroy or at response end_of_stream.
pub type OnHttpFilterStreamComplete =
    unsafe extern "C" fn(filter_envoy_ptr: HttpFilterEnvoyPtr, filter_module_ptr: HttpFilterModulePtr);

/// `envoy_dynamic_module_on_http_filter_destroy` (REQUIRED). Worker thread; in 1.40 it runs
/// from the dispatcher's deferred-delete list, after every other hook for the stream returned
/// (observed). The module does not rely on it where it sends a local reply: a reply can end the
/// stream inside `send_response`, so a hook sends it after its last use of the stream's state.
pub type OnHttpFilterDestroy = unsafe extern "C" fn(filter_module_ptr: HttpFilterModulePtr);

/// `envoy_dynamic_module_on_http_filter_scheduled` (REQUIRED). Worker thread of the stream,
/// after `envoy_dynamic_module_callback_http_filter_scheduler_commit`.
pub type OnHttpFilterScheduled = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    event_id: u64,
);

/// `envoy_dynamic_module_on_http_filter_http_callout_done` (REQUIRED). Worker thread.
/// headers/body_chunks are Envoy-owned, valid during the hook only; NULL/0 on failure.
pub type OnHttpFilterHttpCalloutDone = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    callout_id: u64,
    result: HttpCalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
);

/// `envoy_dynamic_module_on_http_filter_http_stream_headers` (REQUIRED).
pub type OnHttpFilterHttpStreamHeaders = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    stream_id: u64,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    end_stream: bool,
);

/// `envoy_dynamic_module_on_http_filter_http_stream_data` (REQUIRED).
pub type OnHttpFilterHttpStreamData = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    stream_id: u64,
    data: *const EnvoyBuffer,
    data_count: usize,
    end_stream: bool,
);

/// `envoy_dynamic_module_on_http_filter_http_stream_trailers` (REQUIRED).
pub type OnHttpFilterHttpStreamTrailers = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    stream_id: u64,
    trailers: *mut EnvoyHttpHeader,
    trailers_size: usize,
);

/// `envoy_dynamic_module_on_http_filter_http_stream_complete` (REQUIRED).
pub type OnHttpFilterHttpStreamComplete = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    stream_id: u64,
);

/// `envoy_dynamic_module_on_http_filter_http_stream_reset` (REQUIRED).
pub type OnHttpFilterHttpStreamReset = unsafe extern "C" fn(
    filter_envoy_ptr: HttpFilterEnvoyPtr,
    filter_module_ptr: HttpFilterModulePtr,
    stream_id: u64,
    reason: HttpStreamResetReason,
);

/// `envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark` (REQUIRED).
pub type OnHttpFilterDownstreamAboveWriteBufferHighWatermark =
    unsafe extern "C" fn(filter_envoy_ptr: HttpFilterEnvoyPtr, filter_module_ptr: HttpFilterModulePtr);

/// `envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark` (REQUIRED).
pub type OnHttpFilterDownstreamBelowWriteBufferLowWatermark =
    unsafe extern "C" fn(filter_envoy_ptr: HttpFilterEnvoyPtr, filter_module_ptr: HttpFilterModulePtr);

/// `envoy_dynamic_module_on_http_filter_config_scheduled` (OPTIONAL). MAIN thread, after
/// `envoy_dynamic_module_callback_http_filter_config_scheduler_commit`.
pub type OnHttpFilterConfigScheduled = unsafe extern "C" fn(
    filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    filter_config_ptr: HttpFilterConfigModulePtr,
    event_id: u64,
);

/// `envoy_dynamic_module_on_http_filter_config_http_callout_done` (OPTIONAL). Main thread (the
/// callout is sent through the main thread's cluster manager). Same buffer rules as above.
pub type OnHttpFilterConfigHttpCalloutDone = unsafe extern "C" fn(
    filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    filter_config_ptr: HttpFilterConfigModulePtr,
    callout_id: u64,
    result: HttpCalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
);




// ---------------------------------------------------------------------------------------------
// Callbacks Envoy exports (resolved from the envoy binary at dlopen; the .so must not link
// them statically: build as cdylib, undefined symbols are fine with RTLD_LAZY).
// ---------------------------------------------------------------------------------------------

extern "C" {
    // ----- logging / process (any thread unless noted) -----

    /// Deprecated in 1.40 but present: logs under the `dynamic_modules` logger id.
    pub fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);

    // ----- metrics: define on the config (main thread, only inside config_new: after it
    //       returns, stat creation is frozen and define_* returns METRICS_FROZEN) -----

    pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> MetricsResult;

    // ----- metrics: update through a stream filter (worker thread, during hooks) -----
    // label_values_length must equal the number of label names given at definition.


    // ----- metrics: update through the config (no stream needed; Envoy stats are thread-safe) -----

    pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    // ----- headers / trailers (worker thread, inside hooks of the stream) -----

    /// Value number `index` of header `key` in the map `header_type`. `result` gets an
    /// Envoy-owned view (null/0 when absent); `optional_size` (may be null) gets the count of
    /// values for `key`. Returns false when the map is not available in this phase.
    /// View valid until the hook returns or the module mutates that map.
    pub fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HttpHeaderType,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    /// Number of entries in the map (0 when unavailable).
    pub fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HttpHeaderType,
    ) -> usize;
    /// Fill `result_headers` (length >= get_headers_size) with Envoy-owned views.
    pub fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HttpHeaderType,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    /// Replace all values of `key` by `value`. value.ptr == NULL removes the header (this is
    /// the only "remove header" in the ABI). Envoy copies key/value.
    pub fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HttpHeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    /// Append one more value for `key` (keeps existing ones). Envoy copies key/value.
    pub fn envoy_dynamic_module_callback_http_add_header(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        header_type: HttpHeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    // ----- body (worker thread, inside hooks) -----

    pub fn envoy_dynamic_module_callback_http_get_body_size(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: HttpBodyType,
    ) -> usize;
    pub fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: HttpBodyType,
    ) -> usize;
    /// Fill `result_buffer_vector` (length >= get_body_chunks_size) with Envoy-owned slices,
    /// valid until the hook returns or the body is modified.
    pub fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: HttpBodyType,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;
    /// Append (copy) `data` to that body. False when that body is not available now.
    pub fn envoy_dynamic_module_callback_http_append_body(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: HttpBodyType,
        data: ModuleBuffer,
    ) -> bool;
    /// Drain `number_of_bytes` from the front (all if larger).
    pub fn envoy_dynamic_module_callback_http_drain_body(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        body_type: HttpBodyType,
        number_of_bytes: usize,
    ) -> bool;
    /// True when the data the current request_body hook got is in fact Envoy's buffered body
    /// (an earlier filter buffered and resumed).
    pub fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_received_buffered_response_body(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    ) -> bool;

    // ----- local reply / flow control / stream control -----

    /// Local reply (sendLocalReply): status, extra headers, body, details (response code
    /// details; empty = none). All module buffers are copied. Return StopIteration (or
    /// StopAllIteration*) from the hook that calls it.
    pub fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        status_code: u32,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    /// Response headers sent from the filter's place in the chain (`encodeHeaders` of its
    /// decoder callbacks; `:status` among them), ending the stream if `end_stream`. In an
    /// upstream filter they reach the router as the upstream's answer, which its retry policy
    /// judges (a local reply there goes to the client instead).
    pub fn envoy_dynamic_module_callback_http_send_response_headers(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        end_stream: bool,
    );
    /// Resume the request path after a Stop* return (call on the worker thread, e.g. from the
    /// scheduled hook).
    pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter_envoy_ptr: HttpFilterEnvoyPtr);
    /// Resume the response path.
    pub fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter_envoy_ptr: HttpFilterEnvoyPtr);
    /// Reset the downstream stream; no hooks but destroy afterwards. details may be empty.
    pub fn envoy_dynamic_module_callback_http_filter_reset_stream(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        reason: HttpFilterStreamResetReason,
        details: ModuleBuffer,
    );

    // ----- attributes (worker thread, inside hooks) -----

    /// String attribute; `result` is an Envoy-owned view valid until the hook returns.
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        attribute_id: AttributeId,
        result: *mut EnvoyBuffer,
    ) -> bool;
    pub fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
        attribute_id: AttributeId,
        result: *mut u64,
    ) -> bool;

    // ----- schedulers -----

    /// Worker thread (inside a hook). The returned handle is owned by the module.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter_envoy_ptr: HttpFilterEnvoyPtr,
    ) -> HttpFilterSchedulerModulePtr;
    /// Any thread. Posts `event_id` to the stream's worker: the scheduled hook runs there.
    /// A no-op once the filter is gone.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: HttpFilterSchedulerModulePtr,
        event_id: u64,
    );
    /// Any thread; frees the handle.
    pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: HttpFilterSchedulerModulePtr);

    /// Main thread (config_new). The returned handle is owned by the module.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
    ) -> HttpFilterConfigSchedulerModulePtr;
    /// Any thread. The config_scheduled hook runs on the MAIN thread.
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: HttpFilterConfigSchedulerModulePtr,
        event_id: u64,
    );
    pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler: HttpFilterConfigSchedulerModulePtr,
    );

    // ----- misc -----


    // ----- HTTP callouts -----

    /// From the config: call on the MAIN thread (e.g. in the config_scheduled hook); uses the
    /// main thread's cluster manager; the config http_callout_done hook runs on the main thread.
    /// Caveat (observed): if the target cluster has a dynamic-module upstream filter, that filter
    /// is instantiated on the main thread and Envoy logs an ENVOY_BUG "failed to parse worker
    /// index from name" (worker index then reads 0); harmless in release builds.
    pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: HttpFilterConfigEnvoyPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> HttpCalloutInitResult;
}

/// Defines, as no-ops, the HTTP-filter hooks Envoy requires of every module that a filter which
/// makes no per-stream HTTP calls or streams and ignores watermarks has no use for (Envoy
/// refuses a filter config when one is missing: "Failed to resolve symbol").
#[macro_export]
macro_rules! unused_http_hooks {
    () => {
        #[no_mangle]
        #[allow(clippy::too_many_arguments)]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64, _r: $crate::HttpCalloutResult, _h: *mut $crate::EnvoyHttpHeader, _nh: usize, _b: *mut $crate::EnvoyBuffer, _nb: usize) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64, _h: *mut $crate::EnvoyHttpHeader, _n: usize, _end: bool) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64, _d: *const $crate::EnvoyBuffer, _n: usize, _end: bool) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64, _t: *mut $crate::EnvoyHttpHeader, _n: usize) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr, _id: u64, _r: $crate::HttpStreamResetReason) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr) {}

        #[no_mangle]
        pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(_e: $crate::HttpFilterEnvoyPtr, _f: $crate::HttpFilterModulePtr) {}

        // Each has the signature the ABI declares.
        const _: $crate::OnHttpFilterHttpCalloutDone = envoy_dynamic_module_on_http_filter_http_callout_done;
        const _: $crate::OnHttpFilterHttpStreamHeaders = envoy_dynamic_module_on_http_filter_http_stream_headers;
        const _: $crate::OnHttpFilterHttpStreamData = envoy_dynamic_module_on_http_filter_http_stream_data;
        const _: $crate::OnHttpFilterHttpStreamTrailers = envoy_dynamic_module_on_http_filter_http_stream_trailers;
        const _: $crate::OnHttpFilterHttpStreamComplete = envoy_dynamic_module_on_http_filter_http_stream_complete;
        const _: $crate::OnHttpFilterHttpStreamReset = envoy_dynamic_module_on_http_filter_http_stream_reset;
        const _: $crate::OnHttpFilterDownstreamAboveWriteBufferHighWatermark = envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark;
        const _: $crate::OnHttpFilterDownstreamBelowWriteBufferLowWatermark = envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark;
    };
}
