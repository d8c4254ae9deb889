//! What an OpenAI-API response says about the first-token contract: does this SSE event, or this
//! whole JSON body, carry generated output, an error, or an abort? One predicate, used by the
//! guard for streams and whole bodies alike ([`crate::sse`] owns where an event ends).
//!
//! Two dialects, told apart by the request's path ([`Api::from_path`]):
//!
//! * [`Api::Chat`]: `/v1/chat/completions` and `/v1/completions`. Output is, in any choice: a
//!   non-empty `text` (completions), or a `delta` (stream) / `message` (whole body) with a
//!   non-empty `content`, `reasoning_content` or `reasoning`, or non-empty `tool_calls`; or a
//!   `finish_reason` other than `abort`/`error` (the model finished, possibly with nothing to say).
//!   The role event and the empty `content` events vLLM sends first are not output. A complete
//!   stream carries a `finish_reason` for every choice, then `data: [DONE]`.
//! * [`Api::Responses`]: `/v1/responses` (vLLM 0.32 `serving_responses.py`; the OpenAI SDK's
//!   `ResponseStreamEvent`). Every event is named (`event:` line and the data's `type`); there is
//!   no `[DONE]`. Output is any `response.*.delta` event with a non-empty `delta` (text,
//!   reasoning, refusal, function-call arguments, ...), or the response finishing
//!   (`response.completed`, or `response.incomplete` for `max_output_tokens`/`content_filter`).
//!   `response.failed` and `error` events are errors; `response.incomplete` for any other reason
//!   is an abort.
//!
//! Anything else (usage events, comments, unparseable data, events this module does not know) is
//! [`Signal::Other`]: it never decides an attempt by itself.

use serde_json::Value;

use crate::sse::Event;

mod fast;

/// The API a request speaks, from its path. `None`: a format the guard does not judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Chat completions and (legacy) completions.
    Chat,
    /// The Responses API.
    Responses,
}

impl Api {
    /// The API of a request path (query string ignored). Only the paths whose answers this
    /// module can read are named; embeddings, tokenize, models, audio and anything unknown are
    /// `None`, and pass through unjudged.
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split(['?', '#']).next().unwrap_or_default().trim_end_matches('/');
        match path {
            "/v1/chat/completions" | "/v1/completions" => Some(Api::Chat),
            "/v1/responses" => Some(Api::Responses),
            _ => None,
        }
    }
}

/// What one event or body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Generated output, or the model finished (see the module docs).
    Output,
    /// An error reported in band, with its message.
    Error(String),
    /// The worker gave up on the request (not the model): `finish_reason` `abort`/`error`, or an
    /// incomplete response for another reason than a limit. Carries the reason.
    Aborted(String),
    /// `data: [DONE]`.
    Done,
    /// Nothing that decides the attempt.
    Other,
}

fn non_empty_str(x: Option<&Value>) -> bool {
    x.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

/// Whether a chat `delta` or `message` object carries generated output.
pub fn message_has_output(m: &Value) -> bool {
    non_empty_str(m.get("content"))
        || non_empty_str(m.get("reasoning_content"))
        || non_empty_str(m.get("reasoning"))
        || m.get("tool_calls").and_then(Value::as_array).is_some_and(|a| !a.is_empty())
}

/// What one choice says: `Some(Output)` when it carries output or finished normally,
/// `Some(Aborted)` when the worker gave up on it with nothing generated, `None` otherwise.
fn choice_signal(c: &Value) -> Option<Signal> {
    let has_output = non_empty_str(c.get("text")) || ["delta", "message"].iter().any(|k| c.get(*k).is_some_and(message_has_output));
    if has_output {
        return Some(Signal::Output);
    }
    match c.get("finish_reason") {
        Some(Value::String(r)) if r == "abort" || r == "error" => Some(Signal::Aborted(r.clone())),
        Some(f) if !f.is_null() => Some(Signal::Output),
        _ => None,
    }
}

fn error_message(err: &Value) -> String {
    err.get("message").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| err.to_string())
}

/// A chat/completions payload (a stream event's data, or a whole body): output wins over an
/// abort in another choice (the output must reach the client).
fn chat_signal(v: &Value) -> Signal {
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Signal::Error(error_message(err));
    }
    let Some(choices) = v.get("choices").and_then(Value::as_array) else {
        return Signal::Other;
    };
    let mut aborted = None;
    for s in choices.iter().filter_map(choice_signal) {
        match s {
            Signal::Output => return Signal::Output,
            Signal::Aborted(r) => {
                aborted.get_or_insert(r);
            }
            _ => {}
        }
    }
    aborted.map_or(Signal::Other, Signal::Aborted)
}

/// Reasons a response may end incomplete because the model hit a limit (an answer, not a failure).
const LIMIT_REASONS: [&str; 2] = ["max_output_tokens", "content_filter"];

fn responses_signal(kind: &str, v: &Value) -> Signal {
    match kind {
        "error" => Signal::Error(v.get("message").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_string)),
        "response.failed" => {
            let err = v.get("response").and_then(|r| r.get("error")).filter(|e| !e.is_null());
            Signal::Error(err.map_or_else(|| "response.failed".to_string(), error_message))
        }
        "response.completed" => Signal::Output,
        "response.incomplete" => {
            let reason = v.get("response").and_then(|r| r.get("incomplete_details")).and_then(|d| d.get("reason")).and_then(Value::as_str).unwrap_or("unknown");
            if LIMIT_REASONS.contains(&reason) {
                Signal::Output
            } else {
                Signal::Aborted(format!("incomplete_{reason}"))
            }
        }
        k if k.starts_with("response.") && k.ends_with(".delta") => {
            let d = v.get("delta");
            // Text deltas are strings; some (audio, partial images) carry objects.
            let has = non_empty_str(d) || d.is_some_and(|d| !d.is_string() && !d.is_null());
            if has {
                Signal::Output
            } else {
                Signal::Other
            }
        }
        _ => Signal::Other,
    }
}

/// What one complete SSE event says in `api`'s dialect.
pub fn event_signal(api: Api, ev: &Event) -> Signal {
    let Some(data) = ev.data.as_deref().map(str::trim) else {
        return Signal::Other;
    };
    if data == "[DONE]" {
        return Signal::Done;
    }
    // The common events without a `Value` tree; the rest (errors, surprises) read from one.
    let fast = match api {
        Api::Chat => fast::chat(data),
        Api::Responses => fast::responses(ev.name.as_deref(), data),
    };
    if let Some(s) = fast {
        return s;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return Signal::Other;
    };
    match api {
        Api::Chat => chat_signal(&v),
        Api::Responses => {
            let kind = v.get("type").and_then(Value::as_str).or(ev.name.as_deref()).unwrap_or_default();
            responses_signal(kind, &v)
        }
    }
}

/// What a whole (non-streaming) `2xx` body says. Only an abort decides here: a whole body in
/// which every choice was aborted with nothing generated (chat), or a response whose status is
/// `failed`/`cancelled` with no output (Responses). Only bodies that mention such a word are
/// parsed.
pub fn whole_body_signal(api: Api, body: &[u8]) -> Signal {
    let words: &[&[u8]] = match api {
        Api::Chat => &[b"\"abort\"", b"\"error\""],
        Api::Responses => &[b"\"failed\"", b"\"cancelled\""],
    };
    if !words.iter().any(|w| crate::sse::contains(body, w)) {
        return Signal::Other;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Signal::Other;
    };
    match api {
        Api::Chat => {
            let Some(choices) = v.get("choices").and_then(Value::as_array).filter(|c| !c.is_empty()) else {
                return Signal::Other;
            };
            let mut reason = None;
            for c in choices {
                match choice_signal(c) {
                    Some(Signal::Aborted(r)) => {
                        reason.get_or_insert(r);
                    }
                    _ => return Signal::Other,
                }
            }
            reason.map_or(Signal::Other, Signal::Aborted)
        }
        Api::Responses => {
            let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
            let empty = v.get("output").and_then(Value::as_array).is_none_or(|o| o.is_empty());
            if (status == "failed" || status == "cancelled") && empty {
                Signal::Aborted(format!("response_{status}"))
            } else {
                Signal::Other
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sse::parse_event;

    fn chat(ev: &[u8]) -> Signal {
        event_signal(Api::Chat, &parse_event(ev))
    }

    #[test]
    fn paths() {
        assert_eq!(Api::from_path("/v1/chat/completions"), Some(Api::Chat));
        assert_eq!(Api::from_path("/v1/completions?x=1"), Some(Api::Chat));
        assert_eq!(Api::from_path("/v1/responses"), Some(Api::Responses));
        for p in ["/v1/embeddings", "/tokenize", "/v1/models", "/v1/audio/transcriptions", "/v1/responses/resp_1", "/whatever", ""] {
            assert_eq!(Api::from_path(p), None, "{p}");
        }
    }

    #[test]
    fn chat_output_error_abort() {
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"), Signal::Other);
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{\"reasoning\":\"hm\"}}]}\n\n"), Signal::Output);
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"}}]}\n\n"), Signal::Output);
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{}]}}]}\n\n"), Signal::Output);
        assert_eq!(chat(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"), Signal::Output);
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"), Signal::Output);
        assert_eq!(chat(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"abort\"}]}\n\n"), Signal::Aborted("abort".into()));
        assert_eq!(chat(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"), Signal::Error("boom".into()));
        assert_eq!(chat(b"data: [DONE]\n\n"), Signal::Done);
        assert_eq!(chat(b"data: {\"choices\":[],\"usage\":{}}\n\n"), Signal::Other);
        assert_eq!(chat(b": keepalive\n\n"), Signal::Other);
    }

    /// The one predicate: a whole body and a stream event agree on what counts as output
    /// (`reasoning` counted as output in both; it was not in whole bodies before).
    #[test]
    fn whole_and_stream_agree_on_output() {
        for field in ["content", "reasoning_content", "reasoning"] {
            let ev = format!("data: {{\"choices\":[{{\"delta\":{{\"{field}\":\"x\"}},\"finish_reason\":\"abort\"}}]}}\n\n");
            assert_eq!(chat(ev.as_bytes()), Signal::Output, "{field}");
            let body = format!("{{\"choices\":[{{\"message\":{{\"{field}\":\"x\"}},\"finish_reason\":\"abort\"}}]}}");
            assert_eq!(whole_body_signal(Api::Chat, body.as_bytes()), Signal::Other, "{field}");
        }
        let aborted = br#"{"choices":[{"message":{"content":""},"finish_reason":"abort"}]}"#;
        assert_eq!(whole_body_signal(Api::Chat, aborted), Signal::Aborted("abort".into()));
    }

    #[test]
    fn responses_events() {
        let r = |name: &str, data: &str| event_signal(Api::Responses, &parse_event(format!("event: {name}\ndata: {data}\n\n").as_bytes()));
        assert_eq!(r("response.created", r#"{"type":"response.created","response":{}}"#), Signal::Other);
        assert_eq!(r("response.output_text.delta", r#"{"type":"response.output_text.delta","delta":"hi"}"#), Signal::Output);
        assert_eq!(r("response.output_text.delta", r#"{"type":"response.output_text.delta","delta":""}"#), Signal::Other);
        assert_eq!(r("response.reasoning_text.delta", r#"{"type":"response.reasoning_text.delta","delta":"hm"}"#), Signal::Output);
        assert_eq!(r("response.function_call_arguments.delta", r#"{"type":"response.function_call_arguments.delta","delta":"{"}"#), Signal::Output);
        assert_eq!(r("response.completed", r#"{"type":"response.completed","response":{}}"#), Signal::Output);
        assert_eq!(r("response.failed", r#"{"type":"response.failed","response":{"error":{"message":"engine dead"}}}"#), Signal::Error("engine dead".into()));
        assert_eq!(r("error", r#"{"type":"error","message":"bad","code":"500"}"#), Signal::Error("bad".into()));
        assert_eq!(r("response.incomplete", r#"{"type":"response.incomplete","response":{"incomplete_details":{"reason":"max_output_tokens"}}}"#), Signal::Output);
        assert_eq!(r("response.incomplete", r#"{"type":"response.incomplete","response":{"incomplete_details":{"reason":"aborted"}}}"#), Signal::Aborted("incomplete_aborted".into()));
        // The event name alone is enough when the data has no type.
        assert_eq!(r("response.output_text.delta", r#"{"delta":"x"}"#), Signal::Output);
        // A chat-shaped event means nothing in the Responses dialect.
        assert_eq!(r("message", r#"{"choices":[{"text":"x"}]}"#), Signal::Other);
    }

    #[test]
    fn whole_responses_body() {
        assert_eq!(whole_body_signal(Api::Responses, br#"{"object":"response","status":"failed","output":[]}"#), Signal::Aborted("response_failed".into()));
        assert_eq!(whole_body_signal(Api::Responses, br#"{"object":"response","status":"completed","output":[{"type":"message"}]}"#), Signal::Other);
        assert_eq!(whole_body_signal(Api::Responses, b"not json \"failed\""), Signal::Other);
    }
}
