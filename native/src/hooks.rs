//! Envoy's dynamic-module event hooks for the HTTP filter, each turned into the Proxy-Wasm
//! SDK's entry point for the same event (`proxy_on_request_headers`, ...), with the thread's
//! current call ([`crate::host::Cur`]) set for the host functions the filter calls back.
//!
//! Contexts are per thread, as Envoy's Wasm VMs are ([`crate::contexts`]). A root context is
//! made for the main thread when Envoy creates the configuration (its counters are defined
//! then; Envoy freezes stats creation after) and for each worker thread on its first request.
//!
//! A local reply the filter sends from inside one of its own hooks is sent when the SDK has
//! returned from that hook, as Envoy's Wasm host defers it: sent at once, Envoy would run the
//! filter's response hooks inside the SDK's request hook.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::c_char;
use std::sync::Arc;

use crate::abi;
use crate::contexts::Contexts;
use crate::dm::{ConfigHandle, Filter, HeaderMap, Level};
use crate::host::{with_cur, Cur};
use crate::plugin::{Callout, Plugin, Ticks, TICK};

// The Proxy-Wasm SDK's exports (its dispatcher) and the filter's start (`proxy_wasm::main!`).
extern "C" {
    fn _initialize();
    fn proxy_on_context_create(context_id: u32, root_context_id: u32);
    fn proxy_on_vm_start(context_id: u32, vm_configuration_size: usize) -> bool;
    fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool;
    fn proxy_on_tick(context_id: u32);
    fn proxy_on_request_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> u32;
    fn proxy_on_request_body(context_id: u32, body_size: usize, end_of_stream: bool) -> u32;
    fn proxy_on_request_trailers(context_id: u32, num_trailers: usize) -> u32;
    fn proxy_on_response_headers(context_id: u32, num_headers: usize, end_of_stream: bool) -> u32;
    fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> u32;
    fn proxy_on_response_trailers(context_id: u32, num_trailers: usize) -> u32;
    fn proxy_on_done(context_id: u32) -> bool;
    fn proxy_on_log(context_id: u32);
    fn proxy_on_delete(context_id: u32);
    fn proxy_on_http_call_response(context_id: u32, token: u32, num_headers: usize, body_size: usize, num_trailers: usize);
}

/// The SDK's `Action::Pause`.
const PAUSE: u32 = 1;

/// A local reply held until the SDK returns from the hook that sent it.
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub details: Vec<u8>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts<Filter>> = RefCell::new(Contexts::default());
    static STARTED: Cell<bool> = const { Cell::new(false) };
    /// The filter whose hook the SDK is in, and a reply it sent from there.
    static IN_HOOK: Cell<Option<Filter>> = const { Cell::new(None) };
    static HELD_REPLY: RefCell<Option<Reply>> = const { RefCell::new(None) };
    /// What the running hook's context said of its filter's response body, if anything.
    static BODY_HINT: Cell<Option<(Filter, Body)>> = const { Cell::new(None) };
    /// [`crate::plugin::destroyed`] when this thread last retired its roots.
    static RETIRED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Deletes this thread's root contexts of configurations Envoy destroyed since the thread last
/// looked (one atomic read when none was): the SDK's done and delete on each, as Envoy's Wasm
/// host does for a removed plugin, so that a reload leaves no root (and what it holds: the
/// fleet ranking, the rescue registry) behind.
fn retire_roots() {
    let now = crate::plugin::destroyed();
    if RETIRED_AT.with(|r| r.replace(now)) == now {
        return;
    }
    let gone = CONTEXTS.with(|c| c.borrow_mut().retire(crate::plugin::is_live));
    for &id in &gone {
        with_cur(Cur::Idle, || {
            // SAFETY: the SDK's entry points, on this thread's dispatcher, for a root it created.
            unsafe {
                proxy_on_done(id);
                proxy_on_delete(id);
            }
        });
    }
    if !gone.is_empty() {
        crate::dm::log(Level::Info, format!("gpuha native: {} root context(s) of removed filter configurations deleted on this thread", gone.len()).as_bytes());
    }
}

/// Which of a stream's response-body hooks enter the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Every one.
    Filter,
    /// Not the next chunks that are clean (`gpuha_liveness::sse::clean_tail`) and do not end the
    /// stream: the filter would pass them untouched (`gpuha_filter::host::pass_clean_response_chunks`).
    /// The first other chunk enters it and ends this.
    PassClean,
    /// None: the filter is done with the body (`gpuha_filter::host::skip_response_body`).
    Skip,
}

/// The running hook's context said `b` of `f`'s response body (`proxy_call_foreign_function`);
/// it holds from when the hook returns until the next response headers.
pub fn body_hint(f: Filter, b: Body) {
    BODY_HINT.with(|h| h.set(Some((f, b))));
}

/// The Envoy filter of a live HTTP context of this thread (`proxy_set_effective_context`).
pub fn filter_of(context_id: u32) -> Option<Filter> {
    CONTEXTS.with(|c| c.borrow().filter(context_id))
}

/// How a downstream stream ended (its flags and details), for the upstream filters of the same
/// request that end after it: Envoy's Wasm host shows an upstream filter the downstream
/// stream's `response.*` attributes; a dynamic module's upstream filter sees its own attempt's.
#[derive(Debug, Clone)]
pub struct Ending {
    pub flags: u64,
    pub details: Option<Vec<u8>>,
}

/// Endings kept per thread, the oldest pushed out first: the attempts that end after their
/// request's downstream stream (Envoy destroys them right after it) look theirs up long before.
const ENDINGS_KEPT: usize = 1024;

/// What a stream's attributes said while Envoy still showed them, for the filter's end (the
/// SDK's done and log run at destroy, where a dynamic module sees no attributes): the upstream
/// address (an upstream filter's, read when its request starts; a downstream filter's, at
/// stream_complete) and how a downstream stream ended.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    /// The stream's request key (`gpuha_filter::REQUEST_KEY_HEADER`), as the filter set or read it.
    pub request_id: Option<Vec<u8>>,
    pub upstream_address: Option<Vec<u8>>,
    pub ending: Option<Ending>,
}

thread_local! {
    static ENDINGS: RefCell<VecDeque<(Vec<u8>, Ending)>> = const { RefCell::new(VecDeque::new()) };
    static KEPT: RefCell<foldhash::HashMap<Filter, Kept>> = RefCell::new(foldhash::HashMap::default());
}

/// What was kept of `f`'s attributes.
pub fn kept(f: Filter) -> Option<Kept> {
    KEPT.with(|k| k.borrow().get(&f).cloned())
}

fn keep(f: Filter, update: impl FnOnce(&mut Kept)) {
    KEPT.with(|k| update(k.borrow_mut().entry(f).or_default()));
}

/// How the downstream stream of `f`'s request ended, if it has.
pub fn downstream_ending(f: Filter) -> Option<Ending> {
    let id = kept(f)?.request_id?;
    ENDINGS.with(|e| e.borrow().iter().rev().find(|(k, _)| *k == id).map(|(_, v)| v.clone()))
}

/// Notes a stream's request key as the filter sets it (the picker) or reads it (the guard): it
/// keys their shared-data slots and pairs an upstream attempt with its downstream stream's
/// ending, so that noting it costs Envoy no extra lookup.
pub fn saw_request_header(f: Filter, name: &[u8], value: &[u8]) {
    if name.eq_ignore_ascii_case(gpuha_filter::REQUEST_KEY_HEADER.as_bytes()) {
        keep(f, |k| {
            k.request_id.get_or_insert_with(|| value.to_vec());
        });
    }
}

/// Keeps how a downstream stream ended (only downstream filters get stream_complete), for its
/// own end and for its request's upstream attempts that end after it.
fn note_ending(f: Filter) {
    let ending = Ending { flags: f.attr_int(crate::dm::Attr::ResponseFlags).unwrap_or(0), details: f.attr_string(crate::dm::Attr::ResponseCodeDetails) };
    let upstream_address = f.attr_string(crate::dm::Attr::UpstreamAddress);
    let mut id = None;
    keep(f, |k| {
        k.ending = Some(ending.clone());
        k.upstream_address = upstream_address;
        id.clone_from(&k.request_id);
    });
    let Some(id) = id else { return };
    ENDINGS.with(|e| {
        let mut e = e.borrow_mut();
        if e.len() >= ENDINGS_KEPT {
            e.pop_front();
        }
        e.push_back((id, ending));
    });
}

/// Whether `context_id` is a root context of this thread.
pub fn is_root(context_id: u32) -> bool {
    CONTEXTS.with(|c| c.borrow().is_root(context_id))
}

/// Holds `reply` when `f` is inside one of its hooks (sent when the hook returns); `Err` gives
/// it back to be sent now.
pub fn hold_reply(f: Filter, reply: Reply) -> Result<(), Reply> {
    if IN_HOOK.with(Cell::get) == Some(f) {
        HELD_REPLY.with(|r| *r.borrow_mut() = Some(reply));
        Ok(())
    } else {
        Err(reply)
    }
}

pub fn send(f: Filter, r: &Reply) {
    let headers: Vec<(&[u8], &[u8])> = r.headers.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
    f.send_response(r.status, &headers, &r.body, &r.details);
}

fn start_thread() {
    if !STARTED.with(|s| s.replace(true)) {
        // SAFETY: the filter's start: registers its root context factory in this thread's SDK
        // dispatcher (the dispatcher is thread-local, like a Wasm VM).
        unsafe { _initialize() };
    }
}

/// This thread's root context of `p`, made and configured on first use; `None` when the
/// configuration fails there (the request then passes untouched).
fn root_of(p: &Arc<Plugin>) -> Option<u32> {
    start_thread();
    let (id, new) = CONTEXTS.with(|c| c.borrow_mut().root(p.serial));
    if !new {
        return Some(id);
    }
    let ok = with_cur(Cur::Root(p.clone()), || {
        // SAFETY: the SDK's entry points, on this thread's dispatcher.
        unsafe {
            proxy_on_context_create(id, 0);
            proxy_on_vm_start(id, 0) && proxy_on_configure(id, p.configuration.len())
        }
    });
    if !ok {
        CONTEXTS.with(|c| c.borrow_mut().drop_root(p.serial));
        crate::dm::log(Level::Error, b"gpuha native: the filter refused its configuration on this thread; requests pass untouched");
        return None;
    }
    Some(id)
}

/// The module's side of a stream's filter.
struct Stream {
    plugin: Arc<Plugin>,
    /// `None`: the configuration failed on this thread; everything passes.
    id: Option<u32>,
    envoy: Filter,
    done: bool,
    /// Which response-body hooks enter the SDK ([`body_hint`]).
    body: Cell<Body>,
}

/// What an SDK hook answered, and the local reply it held.
#[must_use = "a held reply is sent by `Ran::send`"]
struct Ran {
    answer: u32,
    reply: Option<(Filter, Reply)>,
}

impl Ran {
    /// Sends the held reply; `(answer, replied)`. Called once the hook is done with its `Stream`:
    /// a local reply can end the stream, and Envoy may then destroy the filter, which frees the
    /// `Stream`, inside the call.
    fn send(self) -> (u32, bool) {
        match self.reply {
            Some((f, r)) => {
                send(f, &r);
                (self.answer, true)
            }
            None => (self.answer, false),
        }
    }
}

/// Runs an SDK hook of `s` with the current call set to its filter; the reply it held is sent
/// by the caller ([`Ran::send`]), after its last use of `s`.
fn in_hook(s: &Stream, f: impl FnOnce(u32) -> u32) -> Ran {
    let Some(id) = s.id else { return Ran { answer: 0, reply: None } };
    let prev = IN_HOOK.with(|h| h.replace(Some(s.envoy)));
    let answer = with_cur(Cur::Http(s.plugin.clone(), s.envoy, id), || f(id));
    IN_HOOK.with(|h| h.set(prev));
    if let Some((f, b)) = BODY_HINT.with(Cell::take) {
        if f == s.envoy {
            s.body.set(b);
        }
    }
    Ran { answer, reply: HELD_REPLY.with(|r| r.borrow_mut().take()).map(|r| (s.envoy, r)) }
}

/// # Safety
/// `ptr` is a module filter pointer this module returned from `on_http_filter_new`.
unsafe fn stream<'a>(ptr: abi::HttpFilterModulePtr) -> &'a mut Stream {
    // SAFETY: per the contract above; Envoy calls a stream's hooks on one thread, one at a time.
    unsafe { &mut *(ptr as *mut Stream) }
}

/// # Safety
/// `ptr` is a module config pointer this module returned from config_new, not yet destroyed.
unsafe fn plugin_of(ptr: abi::HttpFilterConfigModulePtr) -> Arc<Plugin> {
    // SAFETY: the pointer is `Arc::into_raw` of a live plugin; this adds one owner.
    unsafe {
        Arc::increment_strong_count(ptr as *const Plugin);
        Arc::from_raw(ptr as *const Plugin)
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(envoy: abi::HttpFilterConfigEnvoyPtr, _name: abi::EnvoyBuffer, config: abi::EnvoyBuffer) -> abi::HttpFilterConfigModulePtr {
    // SAFETY: Envoy's view of `filter_config`, valid during this call (copied by `Plugin::new`).
    let bytes = unsafe { config.as_bytes() };
    let plugin = match Plugin::new(ConfigHandle(envoy), bytes) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            crate::dm::log(Level::Error, format!("gpuha native: bad filter configuration: {e}").as_bytes());
            return std::ptr::null();
        }
    };
    // The main thread's root: defines the counters while Envoy allows it, and ticks the picker.
    let Some(root) = root_of(&plugin) else { return std::ptr::null() };
    plugin.main_root.store(root, std::sync::atomic::Ordering::Relaxed);
    plugin.defined();
    crate::plugin::hold(plugin.serial);
    Arc::into_raw(plugin).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: abi::HttpFilterConfigModulePtr) {
    // SAFETY: the owner `config_new` handed out, given back once.
    let plugin = unsafe { Arc::from_raw(config as *const Plugin) };
    plugin.stop();
    crate::plugin::release(plugin.serial);
    // The main thread's roots go now; each worker thread's at its next filter.
    retire_roots();
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(config: abi::HttpFilterConfigModulePtr, envoy: abi::HttpFilterEnvoyPtr) -> abi::HttpFilterModulePtr {
    // SAFETY: a live configuration (Envoy destroys it only after its filters).
    let plugin = unsafe { plugin_of(config) };
    let envoy = Filter(envoy);
    retire_roots();
    let id = root_of(&plugin).map(|root| {
        let (id, seat) = CONTEXTS.with(|c| c.borrow_mut().open(plugin.serial, envoy));
        with_cur(Cur::Root(plugin.clone()), || {
            // SAFETY: the SDK's entry point, on this thread's dispatcher.
            unsafe { proxy_on_context_create(id, root) }
        });
        if seat && plugin.ticks == Ticks::WorkerThreads {
            plugin.seat(std::thread::current().id(), envoy.scheduler());
        }
        id
    });
    Box::into_raw(Box::new(Stream { plugin, id, envoy, done: false, body: Cell::new(Body::Filter) })) as abi::HttpFilterModulePtr
}

fn headers_status(answer: u32, replied: bool) -> abi::HeadersStatus {
    if answer == PAUSE || replied { abi::HEADERS_STOP_ITERATION } else { abi::HEADERS_CONTINUE }
}

fn body_status(answer: u32, replied: bool) -> abi::BodyStatus {
    if replied {
        abi::BODY_STOP_ITERATION_NO_BUFFER
    } else if answer == PAUSE {
        abi::BODY_STOP_ITERATION_AND_BUFFER
    } else {
        abi::BODY_CONTINUE
    }
}

fn trailers_status(answer: u32, replied: bool) -> abi::TrailersStatus {
    if answer == PAUSE || replied { abi::TRAILERS_STOP_ITERATION } else { abi::TRAILERS_CONTINUE }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::HeadersStatus {
    // SAFETY: ours, from `on_http_filter_new`.
    let s = unsafe { stream(filter) };
    if s.plugin.upstream {
        // An upstream filter's attempt is known from its start; at its destroy, nothing is shown.
        let addr = s.envoy.attr_string(crate::dm::Attr::UpstreamAddress);
        keep(s.envoy, |k| k.upstream_address = addr);
    }
    let n = s.envoy.header_count(HeaderMap::RequestHeaders);
    // SAFETY: the SDK's entry point for a context of this thread.
    let (a, r) = in_hook(s, |id| unsafe { proxy_on_request_headers(id, n, end_of_stream) }).send();
    headers_status(a, r)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::BodyStatus {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    let n = s.envoy.body_len(crate::dm::Dir::Request);
    // SAFETY: as above.
    let (a, r) = in_hook(s, |id| unsafe { proxy_on_request_body(id, n, end_of_stream) }).send();
    crate::dm::forget_body_sizes();
    body_status(a, r)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr) -> abi::TrailersStatus {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    let n = s.envoy.header_count(HeaderMap::RequestTrailers);
    // SAFETY: as above.
    let (a, r) = in_hook(s, |id| unsafe { proxy_on_request_trailers(id, n) }).send();
    trailers_status(a, r)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::HeadersStatus {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    s.body.set(Body::Filter);
    let n = s.envoy.header_count(HeaderMap::ResponseHeaders);
    // SAFETY: as above.
    let (a, r) = in_hook(s, |id| unsafe { proxy_on_response_headers(id, n, end_of_stream) }).send();
    headers_status(a, r)
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr, end_of_stream: bool) -> abi::BodyStatus {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    match s.body.get() {
        Body::Skip => return abi::BODY_CONTINUE,
        Body::PassClean if !end_of_stream && s.envoy.response_tail_is_clean() => {
            // What the filter would do with it (`Attempt::passes_clean_chunks`), without it.
            return abi::BODY_CONTINUE;
        }
        Body::PassClean => s.body.set(Body::Filter),
        Body::Filter => {}
    }
    let (a, r) = response_body_to_filter(s, end_of_stream).send();
    body_status(a, r)
}

/// The response body hook's way into the filter: out of line, so that the path every chunk of a
/// released stream takes (above) stays a few cache lines.
#[inline(never)]
fn response_body_to_filter(s: &Stream, end_of_stream: bool) -> Ran {
    let n = s.envoy.body_len(crate::dm::Dir::Response);
    // SAFETY: as above.
    let ran = in_hook(s, |id| unsafe { proxy_on_response_body(id, n, end_of_stream) });
    crate::dm::forget_body_sizes();
    ran
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr) -> abi::TrailersStatus {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    let n = s.envoy.header_count(HeaderMap::ResponseTrailers);
    // SAFETY: as above.
    let (a, r) = in_hook(s, |id| unsafe { proxy_on_response_trailers(id, n) }).send();
    trailers_status(a, r)
}

/// The stream is over: the SDK's done and log, at destroy. Envoy destroys a request's upstream
/// filters before its downstream ones, so the guard's done (which notes an attempt's failure in
/// the request's slot) runs before the picker's (which judges the request's notes), in the order
/// Envoy's Wasm host runs them.
fn finish(s: &mut Stream) {
    if std::mem::replace(&mut s.done, true) {
        return;
    }
    // SAFETY: the SDK's entry points for a context of this thread.
    in_hook(s, |id| unsafe {
        proxy_on_done(id);
        proxy_on_log(id);
        0
    })
    .send();
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr) {
    // SAFETY: ours.
    note_ending(unsafe { stream(filter) }.envoy);
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: abi::HttpFilterModulePtr) {
    // SAFETY: ours, given back once: Envoy calls no hook of it after this.
    let mut s = unsafe { Box::from_raw(filter as *mut Stream) };
    finish(&mut s);
    KEPT.with(|k| k.borrow_mut().remove(&s.envoy));
    let Some(id) = s.id else { return };
    with_cur(Cur::Root(s.plugin.clone()), || {
        // SAFETY: the SDK's entry point for a context of this thread.
        unsafe { proxy_on_delete(id) }
    });
    let moved = CONTEXTS.with(|c| c.borrow_mut().close(id));
    if let (Some(next), Ticks::WorkerThreads) = (moved, s.plugin.ticks) {
        // The tick seat passes to another live filter of this thread, or lapses.
        s.plugin.seat(std::thread::current().id(), next.and_then(|(_, f)| f.scheduler()));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_envoy: abi::HttpFilterEnvoyPtr, filter: abi::HttpFilterModulePtr, event: u64) {
    // SAFETY: ours.
    let s = unsafe { stream(filter) };
    if event != TICK {
        return;
    }
    let Some(root) = root_of(&s.plugin) else { return };
    with_cur(Cur::Root(s.plugin.clone()), || {
        // SAFETY: the SDK's entry point for this thread's root.
        unsafe { proxy_on_tick(root) }
    });
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(_envoy: abi::HttpFilterConfigEnvoyPtr, config: abi::HttpFilterConfigModulePtr, event: u64) {
    // SAFETY: a live configuration.
    let plugin = unsafe { plugin_of(config) };
    let root = plugin.main_root.load(std::sync::atomic::Ordering::Relaxed);
    if event != TICK || root == 0 {
        return;
    }
    with_cur(Cur::Root(plugin.clone()), || {
        // SAFETY: the SDK's entry point for the main thread's root (this hook runs there).
        unsafe { proxy_on_tick(root) }
    });
}

/// Copies Envoy's views of a finished HTTP call.
///
/// # Safety
/// The pointers and counts Envoy passed to a callout-done hook, during that hook.
unsafe fn callout_answer(headers: *mut abi::EnvoyHttpHeader, n_headers: usize, chunks: *mut abi::EnvoyBuffer, n_chunks: usize) -> Callout {
    let mut out = Callout { headers: Vec::new(), body: Vec::new() };
    if !headers.is_null() {
        // SAFETY: per the contract.
        for h in unsafe { std::slice::from_raw_parts(headers, n_headers) } {
            // SAFETY: views valid during the hook.
            let (k, v) = unsafe { (abi::EnvoyBuffer { ptr: h.key_ptr, length: h.key_length }.as_bytes(), abi::EnvoyBuffer { ptr: h.value_ptr, length: h.value_length }.as_bytes()) };
            out.headers.push((k.to_vec(), v.to_vec()));
        }
    }
    if !chunks.is_null() {
        // SAFETY: per the contract.
        for c in unsafe { std::slice::from_raw_parts(chunks, n_chunks) } {
            // SAFETY: views valid during the hook.
            out.body.extend_from_slice(unsafe { c.as_bytes() });
        }
    }
    out
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(_envoy: abi::HttpFilterConfigEnvoyPtr, config: abi::HttpFilterConfigModulePtr, callout_id: u64, result: abi::HttpCalloutResult, headers: *mut abi::EnvoyHttpHeader, n_headers: usize, chunks: *mut abi::EnvoyBuffer, n_chunks: usize) {
    // SAFETY: a live configuration.
    let plugin = unsafe { plugin_of(config) };
    let root = plugin.main_root.load(std::sync::atomic::Ordering::Relaxed);
    let Some(token) = plugin.callout_done(callout_id) else { return };
    // A failed call reaches the SDK with no headers and no body, as from Envoy's Wasm host.
    let answer = if result == abi::CALLOUT_SUCCESS {
        // SAFETY: this hook's arguments.
        unsafe { callout_answer(headers, n_headers, chunks, n_chunks) }
    } else {
        Callout { headers: Vec::new(), body: Vec::new() }
    };
    let (nh, nb) = (answer.headers.len(), answer.body.len());
    with_cur(Cur::Callout(plugin.clone(), Arc::new(answer)), || {
        // SAFETY: the SDK's entry point for the main thread's root.
        unsafe { proxy_on_http_call_response(root, token, nh, nb, 0) }
    });
}

// Each hook has the signature the ABI declares (a mismatch would be undefined behaviour that no
// linker sees: Envoy looks the hooks up by name).
const _: abi::OnProgramInit = envoy_dynamic_module_on_program_init;
const _: abi::OnHttpFilterConfigNew = envoy_dynamic_module_on_http_filter_config_new;
const _: abi::OnHttpFilterConfigDestroy = envoy_dynamic_module_on_http_filter_config_destroy;
const _: abi::OnHttpFilterNew = envoy_dynamic_module_on_http_filter_new;
const _: abi::OnHttpFilterRequestHeaders = envoy_dynamic_module_on_http_filter_request_headers;
const _: abi::OnHttpFilterRequestBody = envoy_dynamic_module_on_http_filter_request_body;
const _: abi::OnHttpFilterRequestTrailers = envoy_dynamic_module_on_http_filter_request_trailers;
const _: abi::OnHttpFilterResponseHeaders = envoy_dynamic_module_on_http_filter_response_headers;
const _: abi::OnHttpFilterResponseBody = envoy_dynamic_module_on_http_filter_response_body;
const _: abi::OnHttpFilterResponseTrailers = envoy_dynamic_module_on_http_filter_response_trailers;
const _: abi::OnHttpFilterStreamComplete = envoy_dynamic_module_on_http_filter_stream_complete;
const _: abi::OnHttpFilterDestroy = envoy_dynamic_module_on_http_filter_destroy;
const _: abi::OnHttpFilterScheduled = envoy_dynamic_module_on_http_filter_scheduled;
const _: abi::OnHttpFilterConfigScheduled = envoy_dynamic_module_on_http_filter_config_scheduled;
const _: abi::OnHttpFilterConfigHttpCalloutDone = envoy_dynamic_module_on_http_filter_config_http_callout_done;

crate::abi::unused_http_hooks!();
