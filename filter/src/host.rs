//! Thin, panic-free wrappers over the Proxy-Wasm host calls the filter uses. The SDK's `Context`
//! trait methods `unwrap()` host errors; a panic kills the plugin, so every call here returns an
//! `Option`/`Result`, logs failures, and the callers fail open.

use std::cell::Cell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use gpuha_liveness::named_headers;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

pub fn warn(msg: &str) {
    log(LogLevel::Warn, msg);
}

pub fn debug(msg: &str) {
    log(LogLevel::Debug, msg);
}

/// Wall-clock milliseconds of this host (only ever compared with itself).
pub fn now_ms() -> u64 {
    // `hostcalls::get_current_time` panics on a host error; the raw call cannot be reached
    // without `unsafe`, and Envoy's implementation cannot fail, so this is the one place that
    // relies on the SDK.
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// A header of `map` as text. Read as bytes: the SDK's string getter panics on a value that is
/// not UTF-8 (a worker's or a client's bytes); such a value is read lossily here. Only call it
/// where Envoy has the map: the SDK also panics on a map the host does not have at that point
/// (an upstream filter's request headers in its response phase).
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name).ok().flatten().map(|b| String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// The headers a hook reads from one map, asked for by their place in a constant list of
/// names. On Envoy's Wasm host the map is read whole with one host call ([`Headers::read`]): there
/// each single-header read is a host call and, when the header is there, a second VM entry for
/// the copy's allocation. On the native build (where a host call is a plain function call) the
/// listed headers are read in one call ([`named_headers`]): one walk of Envoy's map, where each
/// single read builds a lower-cased key and searches the map, and a whole map costs an encoding
/// and two allocations per header.
pub struct Headers {
    map: MapType,
    names: &'static [&'static str],
    got: Got,
}

enum Got {
    Whole(Vec<(String, Vec<u8>)>),
    /// [`named_headers`]'s answer for the names, and where each value lies in it.
    Named(Vec<u8>, Spans),
    /// Each read when asked.
    Single,
}

impl Headers {
    /// `map`'s headers `names`. Only call it where Envoy has the map (see [`header`]).
    pub fn read(map: MapType, names: &'static [&'static str]) -> Headers {
        let got = if single_header_reads() {
            read_named(map, names).map_or(Got::Single, |(answer, at)| Got::Named(answer, at))
        } else {
            // The SDK decodes names as UTF-8: Envoy's codecs only accept token characters in names.
            Got::Whole(hostcalls::get_map_bytes(map).unwrap_or_default())
        };
        Headers { map, names, got }
    }

    /// The first value of the `i`th name, when it was read with the map (`None` when read alone).
    fn value(&self, i: usize) -> Option<Option<&[u8]>> {
        match &self.got {
            Got::Whole(h) => Some(h.iter().find(|(k, _)| k.eq_ignore_ascii_case(self.names[i])).map(|(_, v)| v.as_slice())),
            Got::Named(answer, at) => Some(at[i].map(|(s, e)| &answer[s as usize..e as usize])),
            Got::Single => None,
        }
    }

    /// The first value of the `i`th name (ASCII case-insensitive), read lossily as [`header`] does.
    pub fn get(&self, i: usize) -> Option<String> {
        match self.value(i) {
            Some(v) => v.map(|v| gpuha_liveness::text(v).into_owned()),
            None => header(self.map, self.names[i]),
        }
    }

    /// The first value of `name`, a header not in the list: found in a whole map, else read alone.
    pub fn get_other(&self, name: &str) -> Option<String> {
        match &self.got {
            Got::Whole(h) => h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| gpuha_liveness::text(v).into_owned()),
            _ => header(self.map, name),
        }
    }

    pub fn has(&self, i: usize) -> bool {
        match self.value(i) {
            Some(v) => v.is_some(),
            None => hostcalls::get_map_value_bytes(self.map, self.names[i]).ok().flatten().is_some(),
        }
    }
}

/// A list of names a hook asked for in a map, and its encoding.
type Asked = (MapType, *const [&'static str], Option<Rc<[u8]>>);

/// Where each value of a [`named_headers`] answer lies.
type Spans = [Option<(u32, u32)>; named_headers::MAX_NAMES];

thread_local! {
    /// [`named_headers::encode_ask`] of each (map, list of names) a hook asked with (`None`: a
    /// list too long to ask for): the lists are constants, a handful of them.
    static ASKS: std::cell::RefCell<Vec<Asked>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `names`' first values in `map`, in one call of the native host (`None` on any other host, or
/// when its answer does not decode: the caller reads them one by one).
fn read_named(map: MapType, names: &'static [&'static str]) -> Option<(Vec<u8>, Spans)> {
    let key: *const [&'static str] = names;
    let ask = ASKS.with(|a| {
        let mut a = a.borrow_mut();
        if let Some((_, _, ask)) = a.iter().find(|(m, k, _)| *m == map && std::ptr::eq(*k, key)) {
            return ask.clone();
        }
        let ask: Option<Rc<[u8]>> = named_headers::encode_ask(map as u8, names).map(Rc::from);
        a.push((map, key, ask.clone()));
        ask
    })?;
    let answer = hostcalls::call_foreign_function(READ_HEADERS, Some(&ask)).ok()??;
    let at = named_headers::spans(&answer, names.len())?;
    Some((answer, at))
}

pub fn request_header(name: &str) -> Option<String> {
    header(MapType::HttpRequestHeaders, name)
}

pub fn set_request_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
        warn(&format!("gpuha: set request header {name}: {e:?}"));
    }
}

/// Adds a request header this filter knows is absent (it removed any the client sent, and writes
/// it once): unlike a set, Envoy does not look for an existing one first.
pub fn add_request_header(name: &str, value: &str) {
    if let Err(e) = hostcalls::add_map_value(MapType::HttpRequestHeaders, name, value) {
        warn(&format!("gpuha: add request header {name}: {e:?}"));
    }
}

pub fn response_header(name: &str) -> Option<String> {
    header(MapType::HttpResponseHeaders, name)
}

pub fn set_response_header(name: &str, value: Option<&str>) {
    if let Err(e) = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value) {
        warn(&format!("gpuha: set response header {name}: {e:?}"));
    }
}

pub fn status() -> Option<u16> {
    response_header(":status").and_then(|s| s.parse().ok())
}

pub fn body(kind: BufferType, size: usize) -> Vec<u8> {
    if size == 0 {
        return Vec::new();
    }
    hostcalls::get_buffer(kind, 0, size).ok().flatten().unwrap_or_default()
}

/// `len` bytes of the buffer from `offset` (a window of a large body: the copy into the VM is
/// bounded). `None` on a host error.
pub fn body_window(kind: BufferType, offset: usize, len: usize) -> Option<Vec<u8>> {
    match hostcalls::get_buffer(kind, offset, len) {
        Ok(b) => Some(b.unwrap_or_default()),
        Err(e) => {
            warn(&format!("gpuha: get_buffer {offset}+{len}: {e:?}"));
            None
        }
    }
}

/// Replaces the first `size` bytes of the buffer (all of it) with `value`.
pub fn set_body(kind: BufferType, size: usize, value: &[u8]) -> bool {
    match hostcalls::set_buffer(kind, 0, size, value) {
        Ok(()) => true,
        Err(e) => {
            warn(&format!("gpuha: set body: {e:?}"));
            false
        }
    }
}

pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

pub fn property_string(path: &[&str]) -> Option<String> {
    property(path).and_then(|b| String::from_utf8(b).ok())
}

pub fn send_response(status: u16, headers: &[(String, String)], body: &[u8]) -> bool {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    match hostcalls::send_http_response(u32::from(status), h, Some(body)) {
        Ok(()) => true,
        Err(e) => {
            warn(&format!("gpuha: send_http_response: {e:?}"));
            false
        }
    }
}

/// The host call that ends a stream's response-body hooks for the calling context. The native
/// build (`native/`) defines it; Envoy's Wasm host has no such foreign function (`NotFound`).
const SKIP_RESPONSE_BODY: &str = "gpuha.skip_response_body";

/// The host call that lets a host pass the calling context's next response-body chunks itself
/// while each is clean (`gpuha_liveness::sse::clean_tail`) and does not end the stream, until it
/// hands the filter a chunk again. The native build defines it; Envoy's Wasm host answers
/// `NotFound`.
const PASS_CLEAN_RESPONSE_CHUNKS: &str = "gpuha.pass_clean_response_chunks";

/// The host call that answers the calling context's attempt as its upstream would, with a status
/// and a mark and no body (the native build defines it; Envoy's Wasm host answers `NotFound`).
const ANSWER_AS_UPSTREAM: &str = "gpuha.answer_as_upstream";

/// The host call that says a single header read is a plain function call on this host (the
/// native build defines it; Envoy's Wasm host answers `NotFound`).
const SINGLE_HEADER_READS: &str = "gpuha.single_header_reads";

/// The host call that reads named headers of a map in one call
/// ([`named_headers`]); the native build defines it.
const READ_HEADERS: &str = "gpuha.read_headers";

thread_local! {
    /// Whether this host skips response-body hooks on request (`None`: not asked yet).
    static SKIPS_BODY: Cell<Option<bool>> = const { Cell::new(None) };
    /// Whether this host passes clean response-body chunks on request (`None`: not asked yet).
    static PASSES_CLEAN: Cell<Option<bool>> = const { Cell::new(None) };
    /// Whether single header reads are cheap on this host (`None`: not asked yet).
    static SINGLE_READS: Cell<Option<bool>> = const { Cell::new(None) };
    /// Whether this host answers an attempt as its upstream would (`None`: not asked yet).
    static ANSWERS: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether this host reads one header with a plain function call ([`Headers`]); asked once per
/// thread.
fn single_header_reads() -> bool {
    asked_once(&SINGLE_READS, || hostcalls::call_foreign_function(SINGLE_HEADER_READS, None).is_ok())
}

/// What this thread's host answered to `ask`, asked the first time only; `known` keeps it.
fn asked_once(known: &'static std::thread::LocalKey<Cell<Option<bool>>>, ask: impl FnOnce() -> bool) -> bool {
    if let Some(answer) = known.with(Cell::get) {
        return answer;
    }
    let answer = ask();
    known.with(|k| k.set(Some(answer)));
    answer
}

/// Tells the host that this context has nothing more to do with the stream's response body, so
/// that a host that can skip its remaining body hooks does (each costs a call per streamed
/// chunk). Only a hint: a host without it (Envoy's Wasm host) goes on calling them, and the
/// filter must still answer them. Asked of a host once per thread; after a `NotFound`, never again.
pub fn skip_response_body() {
    hint(SKIP_RESPONSE_BODY, &SKIPS_BODY);
}

/// Tells the host that, until it hands this context a response-body chunk again, it may pass
/// the chunks that do not end the stream and whose last bytes are clean
/// (`gpuha_liveness::sse::clean_tail`) without calling the filter: the guard would pass them
/// untouched and stay as it is (`Attempt::passes_clean_chunks`). Only a hint, like
/// [`skip_response_body`].
pub fn pass_clean_response_chunks() {
    hint(PASS_CLEAN_RESPONSE_CHUNKS, &PASSES_CLEAN);
}

/// Answers the calling context's attempt (the guard's, an upstream filter's) with `status`, no
/// body and `mark` in [`crate::GUARD_HEADER`], as if its worker had sent them: the router's retry
/// policy then judges it as the worker's own answer. Whether the host did: only the native build
/// can (Envoy's Wasm host has no such call, and a local reply of an upstream filter goes to the
/// client, not through the router's retries).
pub fn answer_as_upstream(status: u16, mark: &str) -> bool {
    let mut args = status.to_le_bytes().to_vec();
    args.extend_from_slice(mark.as_bytes());
    hostcalls::call_foreign_function(ANSWER_AS_UPSTREAM, Some(&args)).is_ok()
}

/// Whether this host can [`answer_as_upstream`]; asked once per thread (an empty ask is refused
/// as a bad argument by a host that has the call, `NotFound` by one that has not).
pub fn can_answer_as_upstream() -> bool {
    asked_once(&ANSWERS, || !matches!(hostcalls::call_foreign_function(ANSWER_AS_UPSTREAM, None), Err(Status::NotFound)))
}

/// Calls the foreign function `name` (no argument, no answer) unless this thread's host already
/// said it has none; `known` keeps the answer.
fn hint(name: &str, known: &'static std::thread::LocalKey<Cell<Option<bool>>>) {
    if known.with(Cell::get) == Some(false) {
        return;
    }
    let supported = !matches!(hostcalls::call_foreign_function(name, None), Err(Status::NotFound));
    known.with(|s| s.set(Some(supported)));
}

pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Read-modify-write of one shared-data key with compare-and-swap, retried a few times under
/// contention. `f` gets the current bytes and returns the new value and a result for the
/// caller, or `None` to leave the key alone.
pub fn shared_update<T>(key: &str, mut f: impl FnMut(Option<&[u8]>) -> Option<(Vec<u8>, T)>) -> Option<T> {
    for _ in 0..8 {
        let (cur, cas) = shared_get(key);
        let (new, out) = f(cur.as_deref())?;
        match hostcalls::set_shared_data(key, Some(&new), cas) {
            Ok(()) => return Some(out),
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                warn(&format!("gpuha: set_shared_data {key}: {e:?}"));
                return None;
            }
        }
    }
    warn(&format!("gpuha: set_shared_data {key}: gave up under contention"));
    None
}

/// Writes `value` to `key` if `cond` holds for the key's current bytes, with compare-and-swap
/// retried a few times under contention (no copy of `value` per try); whether it was written.
pub fn shared_set_if(key: &str, value: &[u8], cond: impl Fn(Option<&[u8]>) -> bool) -> bool {
    for _ in 0..8 {
        let (cur, cas) = shared_get(key);
        if !cond(cur.as_deref()) {
            return false;
        }
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => return true,
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                warn(&format!("gpuha: set_shared_data {key}: {e:?}"));
                return false;
            }
        }
    }
    warn(&format!("gpuha: set_shared_data {key}: gave up under contention"));
    false
}

/// Envoy's response flags and code details of the stream (seen from an upstream filter too:
/// the `response.*` attributes are the downstream stream's).
pub fn response_flags() -> (u64, Option<String>) {
    let flags = property(&["response", "flags"]).and_then(|b| b.get(..8).and_then(|p| p.try_into().ok())).map_or(0, u64::from_le_bytes);
    (flags, property_string(&["response", "code_details"]))
}
