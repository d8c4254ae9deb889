//! Bench fixture (`bench/gpuha_bench/l7_floor.py`): a Proxy-Wasm HTTP filter that returns
//! `Continue` from every callback, so Envoy's cost of a Wasm filter with nothing in it shows
//! (context creation, one VM entry per callback the Rust SDK exports). Its plugin configuration
//! may ask for host calls in `on_http_request_headers`, to price each kind:
//! `{"header_gets": N, "header_maps": N, "shared_gets": N, "shared_sets": N, "metric_incs": N, "property_gets": N,
//! "time_gets": N, "logs": N}` (`logs`: debug-level log calls, below Envoy's level: what a
//! `debug!` costs when nothing is printed). And what the gpuha filters make Envoy do, one at a
//! time: `"pause_request": true` holds the request headers until the body is in (the picker),
//! `"endpoints": "a,b"` writes `x-gpuha-endpoints` and `x-envoy-max-retries` (the picker's list
//! for the `override_host` load balancer), `"hold_response": true` holds the response headers
//! and body until the body is complete and writes it back (the guard on a JSON answer), or a
//! stream (`text/event-stream`) until its first bytes (the guard releases it at its first token;
//! before 2026-12-02 a stream was held whole here).
//! `"calls": "picker"` / `"calls": "guard"` adds, on top of those, the host calls that role of
//! the gpuha filter makes on a request (counted in its native build, `bench/results/2026-12-02-callfloor`),
//! their answers dropped: the request's header map read once (both), the request body read, the
//! fleet version, load, breaker and in-flight slots read and written, the time read and three
//! counters bumped at the pick (picker); `:status` and the upstream address read and a mark set on
//! the answer's headers, with a slot read and a counter (picker) or `content-type` and the time
//! (guard); every chunk of a stream read (guard); the slots and the time at the stream's end
//! (picker). No decision: the floor of the filter's host calls. Not part of the product.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Calls {
    header_gets: u32,
    header_maps: u32,
    shared_gets: u32,
    shared_sets: u32,
    metric_incs: u32,
    property_gets: u32,
    time_gets: u32,
    logs: u32,
    pause_request: bool,
    endpoints: Option<String>,
    hold_response: bool,
    calls: Option<String>,
}

impl Calls {
    fn picker(&self) -> bool {
        self.calls.as_deref() == Some("picker")
    }

    fn guard(&self) -> bool {
        self.calls.as_deref() == Some("guard")
    }
}

fn shared_gets(n: u32) {
    for _ in 0..n {
        let _ = hostcalls::get_shared_data("floor.slot");
    }
}

fn shared_set() {
    let _ = hostcalls::set_shared_data("floor.slot", Some(&[1u8; 64]), None);
}

fn now() {
    let _ = hostcalls::get_current_time();
}

struct Root {
    calls: Calls,
    metric: Option<u32>,
}

struct Stream {
    calls: Calls,
    metric: Option<u32>,
    held: Vec<u8>,
    sse: bool,
}

impl Stream {
    fn bump(&self, n: u32) {
        if let Some(m) = self.metric {
            for _ in 0..n {
                let _ = hostcalls::increment_metric(m, 1);
            }
        }
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        self.calls = serde_json::from_slice(&bytes).unwrap_or_default();
        // A slot to read: a value the size of an in-flight or breaker slot.
        let _ = hostcalls::set_shared_data("floor.slot", Some(&[0u8; 64]), None);
        if self.calls.metric_incs > 0 || self.calls.calls.is_some() {
            self.metric = hostcalls::define_metric(MetricType::Counter, "floor.calls").ok();
        }
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { calls: self.calls.clone(), metric: self.metric, held: Vec::new(), sse: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        if self.calls.picker() {
            shared_gets(2);
            shared_set();
            now();
        } else if self.calls.guard() {
            self.bump(1);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, end: bool) -> Action {
        let c = &self.calls;
        for _ in 0..c.header_gets {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path");
        }
        for _ in 0..c.header_maps {
            let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        }
        for _ in 0..c.shared_gets {
            let _ = hostcalls::get_shared_data("floor.slot");
        }
        for i in 0..c.shared_sets {
            let _ = hostcalls::set_shared_data("floor.slot", Some(&i.to_le_bytes()), None);
        }
        if let Some(m) = self.metric {
            for _ in 0..c.metric_incs {
                let _ = hostcalls::increment_metric(m, 1);
            }
        }
        for _ in 0..c.property_gets {
            let _ = hostcalls::get_property(vec!["request", "path"]);
        }
        for _ in 0..c.time_gets {
            let _ = hostcalls::get_current_time();
        }
        for _ in 0..c.logs {
            let _ = hostcalls::log(LogLevel::Debug, "floor");
        }
        if c.calls.is_some() {
            let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        }
        if c.guard() {
            now();
        }
        if c.pause_request && !end {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end: bool) -> Action {
        if !self.calls.pause_request {
            return Action::Continue;
        }
        if !end {
            return Action::Pause;
        }
        if self.calls.picker() {
            let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size);
            now();
            shared_gets(6);
            shared_set();
            self.bump(3);
        }
        if let Some(e) = &self.calls.endpoints {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-gpuha-endpoints", Some(e));
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-envoy-max-retries", Some("2"));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end: bool) -> Action {
        if self.calls.calls.is_some() {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status");
            let _ = hostcalls::get_property(vec!["upstream", "address"]);
            if self.calls.picker() {
                shared_gets(1);
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "x-gpuha-tier", Some("own"));
                self.bump(1);
            } else {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "x-gpuha-guard", Some("passed"));
                now();
            }
        }
        if self.calls.hold_response && !end {
            // A stream is held until its first bytes (the guard releases it at its first token),
            // any other answer until it is whole.
            let ct = hostcalls::get_map_value(MapType::HttpResponseHeaders, "content-type").ok().flatten();
            self.sse = ct.is_some_and(|c| c.starts_with("text/event-stream"));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end: bool) -> Action {
        if self.sse {
            if self.calls.guard() {
                // Every chunk of a stream read, as the guard reads it.
                let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
            }
            return Action::Continue;
        }
        if !self.calls.hold_response {
            return Action::Continue;
        }
        if let Ok(Some(b)) = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size) {
            self.held.extend_from_slice(&b);
        }
        if !end {
            let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, b"");
            return Action::Pause;
        }
        let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, &self.held);
        Action::Continue
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { calls: Calls::default(), metric: None }) });
}}
