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
//! and body until the body is complete and writes it back (the guard on a JSON answer). Not part
//! of the product.

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
}

struct Root {
    calls: Calls,
    metric: Option<u32>,
}

struct Stream {
    calls: Calls,
    metric: Option<u32>,
    held: Vec<u8>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size).ok().flatten().unwrap_or_default();
        self.calls = serde_json::from_slice(&bytes).unwrap_or_default();
        // A slot to read: a value the size of an in-flight or breaker slot.
        let _ = hostcalls::set_shared_data("floor.slot", Some(&[0u8; 64]), None);
        if self.calls.metric_incs > 0 {
            self.metric = hostcalls::define_metric(MetricType::Counter, "floor.calls").ok();
        }
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { calls: self.calls.clone(), metric: self.metric, held: Vec::new() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Context for Stream {}

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
        if c.pause_request && !end {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, _size: usize, end: bool) -> Action {
        if !self.calls.pause_request {
            return Action::Continue;
        }
        if !end {
            return Action::Pause;
        }
        if let Some(e) = &self.calls.endpoints {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-gpuha-endpoints", Some(e));
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-envoy-max-retries", Some("2"));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end: bool) -> Action {
        if self.calls.hold_response && !end {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end: bool) -> Action {
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
