//! The fail-whale role: every request gets an OpenAI-shaped 503 (an SSE error event and
//! `[DONE]` when the request asked for a stream), so that clients of a fleet with no live pool
//! get a protocol-correct answer instead of a connection error.

use std::rc::Rc;

use gpuha_liveness::openai_error::error_response;
use gpuha_liveness::request::Scan;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::body::BodyScan;

use crate::config::FailwhaleConfig;
use crate::host;
use crate::stats::{inc, Stats};

pub struct Failwhale {
    cfg: Rc<FailwhaleConfig>,
    stats: Stats,
    replied: bool,
    body: Option<BodyScan>,
}

impl Failwhale {
    pub fn new(cfg: Rc<FailwhaleConfig>, stats: Stats) -> Self {
        Failwhale { cfg, stats, replied: false, body: None }
    }

    fn reply(&mut self, stream: bool) -> Action {
        if !self.replied {
            self.replied = true;
            inc(self.stats.failwhale_replies);
            let r = error_response(self.cfg.status, &self.cfg.message, stream, Some(self.cfg.stream_error_status), Some(self.cfg.retry_after_s));
            host::send_response(r.status, &r.headers, &r.body);
        }
        Action::Pause
    }
}

impl Context for Failwhale {}

impl HttpContext for Failwhale {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return self.reply(false);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if size > self.cfg.max_body_bytes {
            return self.reply(false);
        }
        // Only `stream` matters here (SSE or JSON error); reply once the body is complete.
        let scan = self.body.get_or_insert_with(BodyScan::for_request).advance(size, end_of_stream).clone();
        if !end_of_stream {
            return Action::Pause;
        }
        self.reply(matches!(scan, Scan::Done(f) if f.stream))
    }
}
