//! The tier adapter (downstream filter on a degraded tier's or a provider's own listener in the
//! router's Envoy): rewrites each request for the tier (`gpuha_liveness::tier::Adaptation`:
//! model name, `max_tokens` cap, sampling) and marks the answer with the tier's name.
//!
//! It sits on its own listener because Envoy's retries replay the router's buffered body: a
//! rewrite there would reach every later attempt. Here the main router's body stays the
//! client's, and each attempt that reaches this tier is adapted once, on its way in.

use std::rc::Rc;

use gpuha_liveness::openai_error::error_response;
use gpuha_liveness::output::Api;
use gpuha_liveness::tier::{AdaptError, TIER_HEADER};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};

use crate::config::TierConfig;
use crate::host;
use crate::picker::too_large_message;
use crate::stats::{inc, Stats};

pub struct Adapter {
    cfg: Rc<TierConfig>,
    stats: Stats,
    path: String,
}

impl Adapter {
    pub fn new(cfg: Rc<TierConfig>, stats: Stats) -> Self {
        Adapter { cfg, stats, path: String::new() }
    }
}

impl Context for Adapter {}

impl HttpContext for Adapter {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.path = host::request_header(":path").unwrap_or_default();
        if end_of_stream || Api::from_path(&self.path).is_none() {
            // Nothing to adapt (the router sends only generation requests to this tier).
            return Action::Continue;
        }
        // Hold the headers: `content-length` changes with the body.
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if Api::from_path(&self.path).is_none() {
            return Action::Continue;
        }
        if size > self.cfg.max_body_bytes {
            let r = error_response(413, &too_large_message(self.cfg.max_body_bytes), false, None, None);
            host::send_response(r.status, &r.headers, &r.body);
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::body(BufferType::HttpRequestBody, size);
        match self.cfg.adapt.apply(&self.path, &body) {
            Ok(new) => {
                if host::set_body(BufferType::HttpRequestBody, size, &new) {
                    host::set_request_header("content-length", Some(&new.len().to_string()));
                    inc(self.stats.tier_adapted);
                }
            }
            Err(AdaptError::NotJson) => {
                // Fail open: the tier's worker answers the malformed request itself.
                inc(self.stats.tier_adapt_failures);
                host::debug(&format!("gpuha tier {}: request body is not a JSON object: sent unadapted", self.cfg.name));
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        host::set_response_header(TIER_HEADER, Some(&self.cfg.name));
        Action::Continue
    }
}
