//! Reading a buffered request body for the picker and the fail-whale: the body stays in Envoy
//! (it must, to be retried) and is copied into the VM a window at a time, only until
//! `gpuha_liveness::request`'s scanner has its answer.

use gpuha_liveness::affinity::AffinityConfig;
use gpuha_liveness::request::{BodyKind, RequestScanner, Scan};
use proxy_wasm::types::BufferType;

use crate::host;

/// Bytes copied from Envoy per host call. The fields usually sit in the first window; a body
/// whose `model` comes after megabytes of `messages` (the OpenAI SDKs' order) is walked window
/// by window, never held whole.
pub const WINDOW: usize = 64 * 1024;

pub struct BodyScan {
    scanner: RequestScanner,
    /// Body bytes fed to the scanner so far.
    fed: usize,
    scan: Scan,
}

impl BodyScan {
    /// A scanner for the request's `content-type`.
    pub fn for_request() -> BodyScan {
        let kind = BodyKind::from_content_type(host::request_header("content-type").as_deref());
        BodyScan { scanner: RequestScanner::new(&kind), fed: 0, scan: Scan::Incomplete }
    }

    /// A scanner that also reads what affinity keys on (`user`, the prompt's fingerprint), for
    /// a request of `content_type` (the picker read it with the other request headers).
    pub fn for_picker(affinity: &AffinityConfig, content_type: Option<&str>) -> BodyScan {
        let kind = BodyKind::from_content_type(content_type);
        BodyScan { scanner: RequestScanner::with_affinity(&kind, affinity), fed: 0, scan: Scan::Incomplete }
    }

    /// Feeds what Envoy has buffered beyond what was fed (`size`: the buffered body's length,
    /// as `on_http_request_body` reports it) until the scanner answers; at the end of the body
    /// an `Incomplete` answer becomes `Invalid`.
    pub fn advance(&mut self, size: usize, end_of_stream: bool) -> &Scan {
        while self.scan == Scan::Incomplete && self.fed < size {
            let len = WINDOW.min(size - self.fed);
            let Some(window) = host::body_window(BufferType::HttpRequestBody, self.fed, len).filter(|w| !w.is_empty()) else {
                self.scan = Scan::Invalid("request body not readable from the host");
                break;
            };
            self.fed += window.len();
            self.scan = self.scanner.feed(&window);
        }
        if end_of_stream && self.scan == Scan::Incomplete {
            self.scan = self.scanner.finish();
        }
        &self.scan
    }
}
