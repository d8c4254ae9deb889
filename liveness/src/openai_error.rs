//! OpenAI-shaped error responses, so that a client SDK always gets something it can parse: JSON
//! `{"error":{"message","type","param","code"}}` (the shape vLLM itself uses, `code` being the
//! HTTP status), or for a `"stream": true` request a well-formed SSE stream carrying that error
//! event followed by `data: [DONE]`.
//!
//! Used by the picker (no worker, body too large, Envoy's own text/plain local replies) and by
//! the fail-whale, which answers every request this way.

use serde_json::json;

/// One error response, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub status: u16,
    /// Headers besides `:status` (content type, `retry-after`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// vLLM's error `type` for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 | 504 => "TimeoutError",
        413 => "RequestTooLargeError",
        429 => "RateLimitError",
        503 => "ServiceUnavailableError",
        s if s >= 500 => "InternalServerError",
        _ => "APIError",
    }
}

/// The JSON error object, one line.
pub fn error_json(status: u16, message: &str) -> String {
    json!({"error": {"message": message, "type": error_type(status), "param": null, "code": status}}).to_string()
}

/// An SSE stream with one error event and `[DONE]`.
pub fn error_sse(status: u16, message: &str) -> String {
    format!("data: {}\n\ndata: [DONE]\n\n", error_json(status, message))
}

/// Builds the response. `stream` selects the SSE form; `sse_status` is the HTTP status used for
/// it (503 lets SDKs apply their retry-with-`Retry-After` logic; 200 makes the error arrive
/// as an in-stream event, like a mid-stream failure). `retry_after_s` adds `Retry-After`.
pub fn error_response(status: u16, message: &str, stream: bool, sse_status: Option<u16>, retry_after_s: Option<u32>) -> ErrorResponse {
    let mut headers = Vec::new();
    let (status, body) = if stream {
        headers.push(("content-type".to_string(), "text/event-stream; charset=utf-8".to_string()));
        headers.push(("cache-control".to_string(), "no-cache".to_string()));
        (sse_status.unwrap_or(status), error_sse(status, message))
    } else {
        headers.push(("content-type".to_string(), "application/json".to_string()));
        (status, error_json(status, message))
    };
    if let Some(s) = retry_after_s {
        headers.push(("retry-after".to_string(), s.to_string()));
    }
    ErrorResponse { status, headers, body: body.into_bytes() }
}

/// Whether the request body asks for streaming (`"stream": true`). Unparseable → `false`.
pub fn wants_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        stream: Option<bool>,
    }
    serde_json::from_slice::<Probe>(body).ok().and_then(|p| p.stream).unwrap_or(false)
}

/// Whether a response with this content type is already in an OpenAI-compatible shape (JSON
/// or SSE), as opposed to Envoy's `text/plain` local replies.
pub fn is_api_shaped(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| {
        let c = c.trim().to_ascii_lowercase();
        c.starts_with("application/json") || c.starts_with("text/event-stream")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn json_shape() {
        let r = error_response(503, "no worker can serve model \"tiny\"", false, None, Some(1));
        assert_eq!(r.status, 503);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "ServiceUnavailableError");
        assert_eq!(v["error"]["code"], 503);
        assert_eq!(v["error"]["message"], "no worker can serve model \"tiny\"");
        assert!(r.headers.contains(&("retry-after".into(), "1".into())));
        assert!(r.headers.contains(&("content-type".into(), "application/json".into())));
    }

    #[test]
    fn sse_shape_is_well_formed() {
        let r = error_response(503, "down", true, Some(200), None);
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.len(), 2);
        let first: Value = serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(first["error"]["code"], 503);
        assert_eq!(events[1], "data: [DONE]");
        assert!(text.ends_with("\n\n"));
        assert_eq!(crate::output::event_signal(crate::output::Api::Chat, &crate::sse::parse_event(format!("{}\n\n", events[0]).as_bytes())), crate::output::Signal::Error("down".into()));
    }

    #[test]
    fn stream_flag() {
        assert!(wants_stream(br#"{"model":"tiny","stream":true}"#));
        assert!(!wants_stream(br#"{"model":"tiny"}"#));
        assert!(!wants_stream(b"not json"));
        assert!(!wants_stream(br#"{"stream":"yes"}"#));
    }

    #[test]
    fn shaped() {
        assert!(is_api_shaped(Some("application/json; charset=utf-8")));
        assert!(is_api_shaped(Some("text/event-stream")));
        assert!(!is_api_shaped(Some("text/plain")));
        assert!(!is_api_shaped(None));
    }
}
