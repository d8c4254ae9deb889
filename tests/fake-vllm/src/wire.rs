//! vLLM 0.32.0's OpenAI wire format: requests as vLLM reads them, SSE events byte for byte as
//! in `tests/data/vllm-0.32.0-cpu/sse-*.txt`, non-streaming bodies and error bodies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The exact event vLLM streams when its EngineCore dies (see `kill-enginecore_stream_tail.txt`).
pub const ENGINE_DEAD_EVENT: &str = "data: {\"error\": {\"message\": \"EngineCore encountered an issue. See stack trace (above) for the root cause.\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\n";
pub const ENGINE_DEAD_MESSAGE: &str =
    "EngineCore encountered an issue. See stack trace (above) for the root cause.";
pub const DONE_EVENT: &str = "data: [DONE]\n\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields of a chat or completion request the fake cares about; the rest is ignored.
#[derive(Deserialize)]
pub struct Request {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    /// Choices to generate (vLLM samples them as `n` sequences of one request).
    pub n: Option<i64>,
    pub messages: Option<Vec<Value>>,
    pub prompt: Option<Value>,
}

/// Words of a prompt, message or content list: the fake's token count.
pub fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(words).sum(),
        Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map(words)
            .unwrap_or(0),
        _ => 0,
    }
}

impl Request {
    /// The prompt's token ids for the prefix cache ([`crate::prefix`]); as many as
    /// [`Request::prompt_tokens`] counts.
    pub fn prompt_token_ids(&self, kind: Kind) -> Vec<u64> {
        match kind {
            Kind::Chat => crate::prefix::chat_tokens(self.messages.as_deref().unwrap_or(&[])),
            Kind::Completion => {
                let mut out = Vec::new();
                if let Some(p) = &self.prompt {
                    crate::prefix::push_tokens(p, &mut out);
                }
                if out.is_empty() {
                    out.push(0);
                }
                out
            }
        }
    }

    /// A rough prompt length: one token per word plus the chat template's overhead.
    pub fn prompt_tokens(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Chat => {
                self.messages
                    .iter()
                    .flatten()
                    .map(|m| 5 + words(m))
                    .sum::<u64>()
                    + 2
            }
            Kind::Completion => self.prompt.as_ref().map(words).unwrap_or(0).max(1),
        }
    }
}

/// A vLLM error body: `{"error":{"message":..,"type":..,"param":..,"code":..}}`, keys in
/// vLLM's order.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: u16) -> String {
    let param = param.map(js).unwrap_or_else(|| "null".to_owned());
    format!(
        "{{\"error\":{{\"message\":{},\"type\":{},\"param\":{param},\"code\":{code}}}}}",
        js(message),
        js(kind)
    )
}

fn js(s: &str) -> String {
    Value::from(s).to_string()
}

/// Formats the SSE events of one stream. The constant head of every event is built once.
pub struct SseFormat {
    kind: Kind,
    /// `data: {"id":..,"object":..,"created":..,"model":..,`
    head: String,
    fingerprint: String,
}

impl SseFormat {
    pub fn new(kind: Kind, id: &str, created: u64, model: &str, fingerprint: &str) -> Self {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let head = format!(
            "data: {{\"id\":{},\"object\":\"{object}\",\"created\":{created},\"model\":{},",
            js(id),
            js(model)
        );
        Self {
            kind,
            head,
            fingerprint: js(fingerprint),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Chat only: the first event of choice `index`, before the first content delta.
    pub fn role(&self, index: u32) -> Bytes {
        Bytes::from(format!(
            "{}\"choices\":[{{\"index\":{index},\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"prompt_token_ids\":null,\"prompt_text\":null}}\n\n",
            self.head
        ))
    }

    /// A token of choice `index`.
    pub fn token(&self, index: u32, text: &str, last: bool) -> Bytes {
        let text = js(text);
        let (finish, tail) = if last {
            (
                "\"length\",\"stop_reason\":null",
                format!(",\"system_fingerprint\":{}", self.fingerprint),
            )
        } else {
            ("null", String::new())
        };
        let s = match self.kind {
            Kind::Chat => format!(
                "{}\"choices\":[{{\"index\":{index},\"delta\":{{\"content\":{text}}},\"logprobs\":null,\"finish_reason\":{finish},\"token_ids\":null}}]{tail}}}\n\n",
                self.head
            ),
            Kind::Completion => {
                let finish = if last { "\"length\"" } else { "null" };
                format!(
                    "{}\"choices\":[{{\"index\":{index},\"text\":{text},\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}}]{tail}}}\n\n",
                    self.head
                )
            }
        };
        Bytes::from(s)
    }

    /// vLLM's event for a choice it aborted (no output, `finish_reason: "abort"`).
    pub fn aborted(&self, index: u32) -> Bytes {
        let s = match self.kind {
            Kind::Chat => format!(
                "{}\"choices\":[{{\"index\":{index},\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"abort\",\"stop_reason\":null}}]}}\n\n",
                self.head
            ),
            Kind::Completion => format!(
                "{}\"choices\":[{{\"index\":{index},\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"abort\",\"stop_reason\":null}}]}}\n\n",
                self.head
            ),
        };
        Bytes::from(s)
    }

    /// The `stream_options.include_usage` event, with no choices.
    pub fn usage(&self, prompt: u64, completion: u64) -> Bytes {
        Bytes::from(format!(
            "{}\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion}}}}}\n\n",
            self.head,
            prompt + completion
        ))
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
    completion_tokens: u64,
    prompt_tokens_details: Option<()>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    tool_calls: [(); 0],
    reasoning_content: Option<()>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: &'a str,
    stop_reason: Option<()>,
    token_ids: Option<()>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'a str,
    stop_reason: Option<()>,
    prompt_logprobs: Option<()>,
    prompt_token_ids: Option<()>,
    token_ids: Option<()>,
}

/// Field order as vLLM's pydantic models serialize them.
#[derive(Serialize)]
struct Full<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    service_tier: Option<()>,
    system_fingerprint: &'a str,
    usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<Option<()>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Option<()>>,
    kv_transfer_params: Option<()>,
}

/// What a non-streaming request produced.
pub struct Output<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub fingerprint: &'a str,
    pub text: &'a str,
    pub finish: &'a str,
    /// Choices: each carries `text` (the fake's sequences are all the same).
    pub n: u32,
    pub prompt_tokens: u64,
    /// Tokens of one choice.
    pub completion_tokens: u64,
}

/// The non-streaming response body.
pub fn full_response(kind: Kind, o: &Output<'_>) -> String {
    let completion_tokens = o.completion_tokens * u64::from(o.n);
    let usage = Usage {
        prompt_tokens: o.prompt_tokens,
        total_tokens: o.prompt_tokens + completion_tokens,
        completion_tokens,
        prompt_tokens_details: None,
    };
    let result = match kind {
        Kind::Chat => serde_json::to_string(&Full {
            id: o.id,
            object: "chat.completion",
            created: o.created,
            model: o.model,
            choices: (0..o.n).map(|index| ChatChoice {
                index,
                message: Message {
                    role: "assistant",
                    content: o.text,
                    refusal: None,
                    annotations: None,
                    audio: None,
                    function_call: None,
                    tool_calls: [],
                    reasoning_content: None,
                },
                logprobs: None,
                finish_reason: o.finish,
                stop_reason: None,
                token_ids: None,
            }).collect(),
            service_tier: None,
            system_fingerprint: o.fingerprint,
            usage,
            prompt_logprobs: Some(None),
            prompt_token_ids: Some(None),
            kv_transfer_params: None,
        }),
        Kind::Completion => serde_json::to_string(&Full {
            id: o.id,
            object: "text_completion",
            created: o.created,
            model: o.model,
            choices: (0..o.n).map(|index| TextChoice {
                index,
                text: o.text,
                logprobs: None,
                finish_reason: o.finish,
                stop_reason: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                token_ids: None,
            }).collect(),
            service_tier: None,
            system_fingerprint: o.fingerprint,
            usage,
            prompt_logprobs: None,
            prompt_token_ids: None,
            kv_transfer_params: None,
        }),
    };
    // Serializing these plain structs cannot fail; keep a valid body regardless.
    result.unwrap_or_else(|e| error_body(&e.to_string(), "InternalServerError", None, 500))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_json(b: &Bytes) -> Value {
        let s = std::str::from_utf8(b).unwrap_or_default();
        let body = s
            .strip_prefix("data: ")
            .and_then(|s| s.strip_suffix("\n\n"))
            .unwrap_or_default();
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    #[test]
    fn events_are_valid_json_with_vllm_keys() {
        let f = SseFormat::new(
            Kind::Chat,
            "chatcmpl-0123456789abcdef",
            1,
            "ti\"ny",
            "vllm-0.32.0-00000000",
        );
        let role = event_json(&f.role(0));
        assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(role["model"], "ti\"ny");
        let last = event_json(&f.token(0, " w0:1", true));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["system_fingerprint"], "vllm-0.32.0-00000000");
        let usage = event_json(&f.usage(3, 2));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        assert_eq!(usage["choices"], serde_json::json!([]));
        let dead: Value =
            serde_json::from_str(ENGINE_DEAD_EVENT.trim_start_matches("data: ").trim_end())
                .unwrap_or_default();
        assert_eq!(dead["error"]["code"], 500);
    }
}
