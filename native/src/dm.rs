//! Thin wrappers over Envoy's dynamic-modules callbacks ([`crate::abi`]): a stream's filter
//! ([`Filter`]), a filter configuration ([`ConfigHandle`]) and their schedulers. Each wrapper
//! copies what Envoy lends out (a view is only valid inside the hook that got it) and turns
//! Envoy's `false` into `None` or `false`.
#![allow(unsafe_code)]

use std::cell::Cell;

use gpuha_liveness::guard::TAIL_PEEK_BYTES;

use crate::abi;

/// Body slices read into a stack array when a body has at most this many (a chunk of a stream
/// is one or two).
const STACK_CHUNKS: usize = 8;

/// Header views read into a stack array when a map has at most this many.
const STACK_HEADERS: usize = 32;

#[derive(Debug, Clone, Copy)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

pub fn log(level: Level, msg: &[u8]) {
    let level = match level {
        Level::Trace => abi::LOG_TRACE,
        Level::Debug => abi::LOG_DEBUG,
        Level::Info => abi::LOG_INFO,
        Level::Warn => abi::LOG_WARN,
        Level::Error => abi::LOG_ERROR,
        Level::Critical => abi::LOG_CRITICAL,
    };
    // SAFETY: Envoy copies the message during the call; it checks the level itself.
    unsafe { abi::envoy_dynamic_module_callback_log(level, abi::ModuleBuffer::from_bytes(msg)) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMap {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
}

impl HeaderMap {
    fn abi(self) -> abi::HttpHeaderType {
        match self {
            HeaderMap::RequestHeaders => abi::HEADER_REQUEST,
            HeaderMap::RequestTrailers => abi::TRAILER_REQUEST,
            HeaderMap::ResponseHeaders => abi::HEADER_RESPONSE,
            HeaderMap::ResponseTrailers => abi::TRAILER_RESPONSE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Request,
    Response,
}

impl Dir {
    /// (buffered, received) body types of the direction.
    fn bodies(self) -> [abi::HttpBodyType; 2] {
        match self {
            Dir::Request => [abi::BODY_BUFFERED_REQUEST, abi::BODY_RECEIVED_REQUEST],
            Dir::Response => [abi::BODY_BUFFERED_RESPONSE, abi::BODY_RECEIVED_RESPONSE],
        }
    }

    fn received_is_buffered(self, f: abi::HttpFilterEnvoyPtr) -> bool {
        // SAFETY: `f` is the live filter of the current hook.
        unsafe {
            match self {
                Dir::Request => abi::envoy_dynamic_module_callback_http_received_buffered_request_body(f),
                Dir::Response => abi::envoy_dynamic_module_callback_http_received_buffered_response_body(f),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Attr {
    UpstreamAddress,
    ResponseCodeDetails,
    ResponseFlags,
    ResponseCode,
    RequestId,
}

/// The bodies a filter sees in a hook, each with its size (see [`Filter::body_parts`]).
type BodyParts = [(abi::HttpBodyType, usize); 2];

thread_local! {
    /// The body sizes of the body hook running on this thread (see [`Filter::body_parts`]).
    static PARTS: Cell<Option<(Filter, Dir, BodyParts)>> = const { Cell::new(None) };
}

/// Drops the body sizes noted for the running hook (it ended, or the body changed).
pub fn forget_body_sizes() {
    PARTS.with(|p| p.set(None));
}

/// One header of a map as Envoy lends it: valid only inside the hook that read it, and handed
/// out only by reference inside it ([`Filter::with_header_views`]).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct HeaderView(abi::EnvoyHttpHeader);

impl HeaderView {
    /// The header's name and value.
    pub fn bytes(&self) -> (&[u8], &[u8]) {
        let h = &self.0;
        // SAFETY: a view Envoy filled in this hook ([`Filter::with_header_views`] lends `self`
        // only while its map cannot change); its pointers are null only with a zero length.
        unsafe { (abi::EnvoyBuffer { ptr: h.key_ptr, length: h.key_length }.as_bytes(), abi::EnvoyBuffer { ptr: h.value_ptr, length: h.value_length }.as_bytes()) }
    }
}

/// Envoy's filter of one stream; valid from `on_http_filter_new` until its destroy hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter(pub abi::HttpFilterEnvoyPtr);

fn copy(b: abi::EnvoyBuffer) -> Vec<u8> {
    // SAFETY: a view Envoy just filled, valid for this hook; copied at once.
    unsafe { b.as_bytes().to_vec() }
}

impl Filter {
    pub fn header(self, map: HeaderMap, name: &[u8]) -> Option<Vec<u8>> {
        let mut out = abi::EnvoyBuffer::null();
        // SAFETY: live filter; `name` is read during the call; `out` is ours.
        let ok = unsafe { abi::envoy_dynamic_module_callback_http_get_header(self.0, map.abi(), abi::ModuleBuffer::from_bytes(name), &mut out, 0, std::ptr::null_mut()) };
        (ok && !out.ptr.is_null()).then(|| copy(out))
    }

    pub fn header_count(self, map: HeaderMap) -> usize {
        // SAFETY: live filter.
        unsafe { abi::envoy_dynamic_module_callback_http_get_headers_size(self.0, map.abi()) }
    }

    /// `f` of the map's headers as Envoy's views (nothing copied; valid only during `f`).
    pub fn with_headers<T>(self, map: HeaderMap, f: impl FnOnce(&[(&[u8], &[u8])]) -> T) -> T {
        self.with_header_views(map, |views| f(&views.iter().map(|h| h.bytes()).collect::<Vec<_>>()))
    }

    /// `f` of the map's headers as Envoy lends them ([`HeaderView::bytes`] reads one), on the
    /// stack when the map has at most [`STACK_HEADERS`] (a request's or a response's nearly
    /// always has).
    pub fn with_header_views<T>(self, map: HeaderMap, f: impl FnOnce(&[HeaderView]) -> T) -> T {
        let n = self.header_count(map);
        if n == 0 {
            return f(&[]);
        }
        let mut on_stack = [const { std::mem::MaybeUninit::<HeaderView>::uninit() }; STACK_HEADERS];
        let mut on_heap = Vec::new();
        let views: *mut HeaderView = if n <= STACK_HEADERS {
            on_stack.as_mut_ptr().cast()
        } else {
            on_heap.reserve_exact(n);
            on_heap.as_mut_ptr()
        };
        // SAFETY: room for the `n` entries Envoy reported for this map (`HeaderView` is a
        // transparent wrapper of Envoy's header type); Envoy writes every one of them when it
        // answers `true`, and only then are they read.
        if !unsafe { abi::envoy_dynamic_module_callback_http_get_headers(self.0, map.abi(), views.cast()) } {
            return f(&[]);
        }
        // SAFETY: the `n` entries Envoy just wrote (above).
        f(unsafe { std::slice::from_raw_parts(views, n) })
    }

    pub fn set_header(self, map: HeaderMap, name: &[u8], value: &[u8]) -> bool {
        // A zero-length value must still be a value: a NULL pointer removes the header.
        let value = abi::ModuleBuffer { ptr: value.as_ptr().cast(), length: value.len() };
        // SAFETY: live filter; Envoy copies both.
        unsafe { abi::envoy_dynamic_module_callback_http_set_header(self.0, map.abi(), abi::ModuleBuffer::from_bytes(name), value) }
    }

    pub fn remove_header(self, map: HeaderMap, name: &[u8]) -> bool {
        // SAFETY: live filter; a NULL value removes the header.
        unsafe { abi::envoy_dynamic_module_callback_http_set_header(self.0, map.abi(), abi::ModuleBuffer::from_bytes(name), abi::ModuleBuffer::null()) }
    }

    pub fn add_header(self, map: HeaderMap, name: &[u8], value: &[u8]) -> bool {
        let value = abi::ModuleBuffer { ptr: value.as_ptr().cast(), length: value.len() };
        // SAFETY: live filter; Envoy copies both.
        unsafe { abi::envoy_dynamic_module_callback_http_add_header(self.0, map.abi(), abi::ModuleBuffer::from_bytes(name), value) }
    }

    fn size(self, t: abi::HttpBodyType) -> usize {
        // SAFETY: live filter.
        unsafe { abi::envoy_dynamic_module_callback_http_get_body_size(self.0, t) }
    }

    /// The bodies that make up what the filter sees, with their sizes: what Envoy buffered (if
    /// anything), then what this hook got. Asked of Envoy once per body hook ([`Self::body_len`]
    /// at its start), then taken from [`PARTS`] until the body changes or the hook ends.
    fn body_parts(self, dir: Dir) -> BodyParts {
        if let Some((f, d, parts)) = PARTS.with(Cell::get) {
            if f == self && d == dir {
                return parts;
            }
        }
        let [buffered, received] = dir.bodies();
        let b = self.size(buffered);
        // When what the hook received is Envoy's buffer itself, reading both would read it
        // twice (asked only when something is buffered: one call fewer per chunk of a stream).
        let parts = if b > 0 && dir.received_is_buffered(self.0) { [(buffered, b), (received, 0)] } else { [(buffered, b), (received, self.size(received))] };
        PARTS.with(|p| p.set(Some((self, dir, parts))));
        parts
    }

    /// `max` bytes from `start` of the body as the Proxy-Wasm filter sees it: what Envoy
    /// buffered, then what this hook got. Only the window is copied (the guard reads the last
    /// bytes of each streamed chunk). `None` when `start` is past the end.
    pub fn body_window(self, dir: Dir, start: usize, max: usize) -> Option<Vec<u8>> {
        let total: usize = self.body_parts(dir).iter().map(|(_, n)| n).sum();
        // Exactly the window's size: the host hands the vector to the SDK without a copy.
        let mut out = Vec::with_capacity(total.saturating_sub(start).min(max));
        self.visit_window(dir, start, max, |bytes| out.extend_from_slice(bytes)).then_some(out)
    }

    /// Whether the response body of the running hook has a clean tail
    /// (`gpuha_liveness::sse::clean_tail` of its last `TAIL_PEEK_BYTES`, or all of it when
    /// shorter). Runs on every chunk of a released stream, so its usual case is kept short: nothing
    /// buffered, a few slices received, the tail in the last one, read in place (three Envoy
    /// calls). Anything else is gathered by [`Self::gathered_tail_is_clean`]. Leaves no body sizes
    /// noted ([`forget_body_sizes`]).
    pub fn response_tail_is_clean(self) -> bool {
        let [buffered, received] = Dir::Response.bodies();
        if self.size(buffered) == 0 {
            // SAFETY: live filter.
            let n = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, received) };
            let mut views = [abi::EnvoyBuffer::null(); STACK_CHUNKS];
            // SAFETY: `views` has room for the `n` slices Envoy reported; read at once.
            if (1..=STACK_CHUNKS).contains(&n) && unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks(self.0, received, views.as_mut_ptr()) } {
                let total: usize = views[..n].iter().map(|v| v.length).sum();
                // SAFETY: as above.
                let last = unsafe { views[n - 1].as_bytes() };
                let want = total.min(TAIL_PEEK_BYTES);
                if let Some(tail) = last.len().checked_sub(want).map(|from| &last[from..]) {
                    return gpuha_liveness::sse::clean_tail(tail);
                }
            }
        }
        self.gathered_tail_is_clean()
    }

    /// [`Self::response_tail_is_clean`] for any body: its tail gathered across Envoy's slices
    /// (on the stack) when it does not lie in one.
    #[cold]
    #[inline(never)]
    fn gathered_tail_is_clean(self) -> bool {
        let len = self.body_len(Dir::Response);
        let want = len.min(TAIL_PEEK_BYTES);
        let mut whole = None;
        let mut tail: Option<[u8; TAIL_PEEK_BYTES]> = None;
        let mut n = 0;
        self.visit_window(Dir::Response, len - want, TAIL_PEEK_BYTES, |bytes| {
            if n == 0 && bytes.len() == want {
                whole = Some(gpuha_liveness::sse::clean_tail(bytes));
                return;
            }
            let take = bytes.len().min(TAIL_PEEK_BYTES - n);
            tail.get_or_insert([0; TAIL_PEEK_BYTES])[n..n + take].copy_from_slice(&bytes[..take]);
            n += take;
        });
        forget_body_sizes();
        whole.unwrap_or_else(|| gpuha_liveness::sse::clean_tail(tail.as_ref().map_or(&[][..], |t| &t[..n])))
    }

    /// Hands `f` the pieces, in order, of `max` bytes from `start` of the body as the filter sees
    /// it (see [`Self::body_window`]). `false` when `start` is past the end.
    fn visit_window(self, dir: Dir, start: usize, max: usize, mut f: impl FnMut(&[u8])) -> bool {
        let mut at = 0usize;
        for (t, len) in self.body_parts(dir) {
            if len == 0 || start >= at + len {
                at += len;
                continue;
            }
            // SAFETY: live filter.
            let n = unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks_size(self.0, t) };
            if n == 0 {
                continue;
            }
            // A body is a few slices: their views go on the stack unless there are many.
            let mut on_stack = [abi::EnvoyBuffer::null(); STACK_CHUNKS];
            let mut on_heap = Vec::new();
            let chunks: &mut [abi::EnvoyBuffer] = if n <= STACK_CHUNKS {
                &mut on_stack[..n]
            } else {
                on_heap.resize(n, abi::EnvoyBuffer::null());
                &mut on_heap
            };
            // SAFETY: `chunks` holds the `n` slices Envoy reported; read at once.
            if !unsafe { abi::envoy_dynamic_module_callback_http_get_body_chunks(self.0, t, chunks.as_mut_ptr()) } {
                continue;
            }
            for c in chunks.iter() {
                // SAFETY: as above.
                let bytes = unsafe { c.as_bytes() };
                let (lo, hi) = (start.max(at), (start.saturating_add(max)).min(at + bytes.len()));
                if lo < hi {
                    f(&bytes[lo - at..hi - at]);
                }
                at += bytes.len();
            }
        }
        start <= at
    }

    /// The body's size, asked of Envoy afresh: call it at the start of a body hook.
    pub fn body_len(self, dir: Dir) -> usize {
        forget_body_sizes();
        self.body_parts(dir).iter().map(|(_, n)| n).sum()
    }

    /// Replaces the whole body (buffered and received) with `bytes`.
    pub fn replace_body(self, dir: Dir, bytes: &[u8]) -> bool {
        let parts = self.body_parts(dir);
        forget_body_sizes();
        for (t, n) in parts {
            if n > 0 {
                // SAFETY: live filter; drains everything of that body.
                unsafe { abi::envoy_dynamic_module_callback_http_drain_body(self.0, t, n) };
            }
        }
        if bytes.is_empty() {
            return true;
        }
        // The new bytes go where this hook's data is (sent on when the hook continues), or to
        // the buffer when the hook's data is Envoy's buffer.
        let received_is_buffer = parts[0].1 > 0 && parts[1].1 == 0 && dir.received_is_buffered(self.0);
        let target = if received_is_buffer { parts[0].0 } else { parts[1].0 };
        // SAFETY: live filter; Envoy copies the bytes.
        unsafe { abi::envoy_dynamic_module_callback_http_append_body(self.0, target, abi::ModuleBuffer::from_bytes(bytes)) }
    }

    pub fn send_response(self, status: u32, headers: &[(&[u8], &[u8])], body: &[u8], details: &[u8]) {
        let mut hs: Vec<abi::ModuleHttpHeader> = headers.iter().map(|(k, v)| abi::ModuleHttpHeader { key_ptr: k.as_ptr().cast(), key_length: k.len(), value_ptr: v.as_ptr().cast(), value_length: v.len() }).collect();
        // SAFETY: live filter; Envoy copies headers, body and details during the call.
        unsafe { abi::envoy_dynamic_module_callback_http_send_response(self.0, status, hs.as_mut_ptr(), hs.len(), abi::ModuleBuffer::from_bytes(body), abi::ModuleBuffer::from_bytes(details)) }
    }

    /// An answer with no body (`status` and `headers`), sent from the filter's place as if it
    /// came from upstream: in an upstream filter the router takes it as the worker's own (its
    /// retry policy applies), where a local reply would go to the client.
    pub fn send_upstream_answer(self, status: u32, headers: &[(&[u8], &[u8])]) {
        let status = status.to_string();
        let mut hs: Vec<abi::ModuleHttpHeader> = std::iter::once((&b":status"[..], status.as_bytes()))
            .chain(headers.iter().copied())
            .map(|(k, v)| abi::ModuleHttpHeader { key_ptr: k.as_ptr().cast(), key_length: k.len(), value_ptr: v.as_ptr().cast(), value_length: v.len() })
            .collect();
        // SAFETY: live filter, on its worker thread; Envoy copies the headers during the call,
        // which runs the response path and ends the stream (nothing of the filter is used after).
        unsafe { abi::envoy_dynamic_module_callback_http_send_response_headers(self.0, hs.as_mut_ptr(), hs.len(), true) }
    }

    pub fn continue_decoding(self) {
        // SAFETY: live filter, on its worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) }
    }

    pub fn continue_encoding(self) {
        // SAFETY: live filter, on its worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_continue_encoding(self.0) }
    }

    pub fn reset(self) {
        // SAFETY: live filter, on its worker thread.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_reset_stream(self.0, abi::FILTER_RESET_LOCAL_RESET, abi::ModuleBuffer::from_bytes(b"gpuha_reset")) }
    }

    fn attr_id(a: Attr) -> abi::AttributeId {
        match a {
            Attr::UpstreamAddress => abi::ATTR_UPSTREAM_ADDRESS,
            Attr::ResponseCodeDetails => abi::ATTR_RESPONSE_CODE_DETAILS,
            Attr::ResponseFlags => abi::ATTR_RESPONSE_FLAGS,
            Attr::ResponseCode => abi::ATTR_RESPONSE_CODE,
            Attr::RequestId => abi::ATTR_REQUEST_ID,
        }
    }

    pub fn attr_string(self, a: Attr) -> Option<Vec<u8>> {
        let mut out = abi::EnvoyBuffer::null();
        // SAFETY: live filter; `out` is ours.
        let ok = unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_string(self.0, Self::attr_id(a), &mut out) };
        ok.then(|| copy(out))
    }

    pub fn attr_int(self, a: Attr) -> Option<u64> {
        let mut out = 0u64;
        // SAFETY: live filter; `out` is ours.
        let ok = unsafe { abi::envoy_dynamic_module_callback_http_filter_get_attribute_int(self.0, Self::attr_id(a), &mut out) };
        ok.then_some(out)
    }

    /// A scheduler whose events run this filter's scheduled hook on its worker thread.
    pub fn scheduler(self) -> Option<Scheduler> {
        // SAFETY: live filter, inside one of its hooks.
        let p = unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_new(self.0) };
        (!p.is_null()).then_some(Scheduler(p))
    }
}

/// A filter's scheduler; any thread may commit to it, and Envoy ignores commits once the
/// filter is gone. Owned: deleted on drop.
pub struct Scheduler(abi::HttpFilterSchedulerModulePtr);

// SAFETY: Envoy's scheduler handles are made to be committed from other threads.
unsafe impl Send for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event: u64) {
        // SAFETY: a live handle (deleted only on drop).
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, event) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: ours, deleted once.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0) }
    }
}

/// A configuration's scheduler: its events run the config's scheduled hook on the main thread.
pub struct ConfigScheduler(abi::HttpFilterConfigSchedulerModulePtr);

// SAFETY: as [`Scheduler`].
unsafe impl Send for ConfigScheduler {}
// SAFETY: commit takes `&self` and Envoy's handle is thread-safe.
unsafe impl Sync for ConfigScheduler {}

impl ConfigScheduler {
    pub fn commit(&self, event: u64) {
        // SAFETY: a live handle (deleted only on drop).
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event) }
    }
}

impl Drop for ConfigScheduler {
    fn drop(&mut self) {
        // SAFETY: ours, deleted once.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// Envoy's side of a filter configuration; valid from config_new until its destroy hook.
#[derive(Debug, Clone, Copy)]
pub struct ConfigHandle(pub abi::HttpFilterConfigEnvoyPtr);

// SAFETY: only used for calls Envoy documents as thread-safe (counter increments, scheduler
// commits) off the main thread.
unsafe impl Send for ConfigHandle {}
// SAFETY: as above.
unsafe impl Sync for ConfigHandle {}

impl ConfigHandle {
    /// Defines a counter (only while Envoy creates the configuration: stats freeze after).
    pub fn define_counter(self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: live config inside config_new; Envoy copies the name.
        let r = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_define_counter(self.0, abi::ModuleBuffer::from_bytes(name.as_bytes()), std::ptr::null_mut(), 0, &mut id) };
        (r == abi::METRICS_SUCCESS).then_some(id)
    }

    pub fn increment_counter(self, id: usize, n: u64) -> bool {
        // SAFETY: live config; Envoy's counters are thread-safe.
        unsafe { abi::envoy_dynamic_module_callback_http_filter_config_increment_counter(self.0, id, std::ptr::null_mut(), 0, n) == abi::METRICS_SUCCESS }
    }

    pub fn scheduler(self) -> Option<ConfigScheduler> {
        // SAFETY: live config, on the main thread.
        let p = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0) };
        (!p.is_null()).then_some(ConfigScheduler(p))
    }

    /// An HTTP call from the main thread; its answer comes to the config's callout-done hook.
    pub fn callout(self, cluster: &str, headers: &[(&[u8], &[u8])], body: &[u8], timeout_ms: u32) -> Option<u64> {
        let mut hs: Vec<abi::ModuleHttpHeader> = headers.iter().map(|(k, v)| abi::ModuleHttpHeader { key_ptr: k.as_ptr().cast(), key_length: k.len(), value_ptr: v.as_ptr().cast(), value_length: v.len() }).collect();
        let mut id = 0u64;
        // SAFETY: live config, main thread; Envoy copies everything it keeps.
        let r = unsafe { abi::envoy_dynamic_module_callback_http_filter_config_http_callout(self.0, &mut id, abi::ModuleBuffer::from_bytes(cluster.as_bytes()), hs.as_mut_ptr(), hs.len(), abi::ModuleBuffer::from_bytes(body), u64::from(timeout_ms)) };
        if r == abi::CALLOUT_INIT_SUCCESS {
            Some(id)
        } else {
            log(Level::Warn, format!("gpuha native: HTTP call to cluster {cluster} not started (code {r})").as_bytes());
            None
        }
    }
}
