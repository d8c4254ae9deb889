//! The common events read without building a `serde_json::Value`: one pass over the event's data
//! that keeps only what [`super::event_signal`] looks at (a few flags per choice), where the
//! `Value` tree costs a map and a string per key. It runs on the first events of every stream.
//!
//! It answers only where it reads exactly what the `Value` path would: any surprise (a key twice,
//! a field of another type than the events vLLM sends, an error to quote) answers `None`, and the
//! caller reads the event the `Value` way. The property test below holds the two to the same
//! answer.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::Signal;

/// What a JSON string said (`None` where the caller takes it as null).
#[derive(Default)]
struct Text {
    non_empty: bool,
    /// The `finish_reason` values that mean the worker gave up.
    abort: Option<&'static str>,
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<Text, E> {
                let abort = ["abort", "error"].into_iter().find(|a| *a == s);
                Ok(Text { non_empty: !s.is_empty(), abort })
            }
        }
        d.deserialize_str(V)
    }
}

/// A non-null value that counts as a delta: a non-empty string, or any object, array, number or
/// boolean (the Responses API's audio and image deltas are objects). Null is the caller's `None`.
struct AnyDelta(bool);

impl<'de> Deserialize<'de> for AnyDelta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyDelta;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: Error>(self, s: &str) -> Result<AnyDelta, E> {
                Ok(AnyDelta(!s.is_empty()))
            }
            fn visit_bool<E: Error>(self, _: bool) -> Result<AnyDelta, E> {
                Ok(AnyDelta(true))
            }
            fn visit_i64<E: Error>(self, _: i64) -> Result<AnyDelta, E> {
                Ok(AnyDelta(true))
            }
            fn visit_u64<E: Error>(self, _: u64) -> Result<AnyDelta, E> {
                Ok(AnyDelta(true))
            }
            fn visit_f64<E: Error>(self, _: f64) -> Result<AnyDelta, E> {
                Ok(AnyDelta(true))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<AnyDelta, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyDelta(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<AnyDelta, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AnyDelta(true))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of a JSON object that a reader keeps.
trait Fields<'de>: Default {
    /// The keys read; every other key is skipped, whatever it holds. At most 32.
    const KEYS: &'static [&'static str];
    /// Reads the value of `key`, one of [`Self::KEYS`].
    fn field<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<(), A::Error>;
}

/// `T` read from a JSON object, and only from one. One of `T`'s keys twice is an error (the
/// `Value` path keeps the last one). Keys are borrowed from the data: a key with an escape in it
/// is an error too.
struct Object<T>(T);

impl<'de, T: Fields<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Fields<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Object<T>, A::Error> {
                let (mut out, mut seen) = (T::default(), 0u32);
                while let Some(k) = m.next_key::<&'de str>()? {
                    match T::KEYS.iter().position(|x| *x == k) {
                        Some(i) if seen & (1 << i) != 0 => return Err(A::Error::custom("duplicate key")),
                        Some(i) => {
                            seen |= 1 << i;
                            out.field(k, &mut m)?;
                        }
                        None => {
                            m.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Object(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A chat `delta` or `message`: whether it carries output (`message_has_output`).
#[derive(Default)]
struct Message(bool);

impl<'de> Fields<'de> for Message {
    const KEYS: &'static [&'static str] = &["content", "reasoning_content", "reasoning", "tool_calls"];
    fn field<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<(), A::Error> {
        self.0 |= match key {
            "tool_calls" => m.next_value::<Option<Count>>()?.is_some_and(|c| c.0 > 0),
            _ => m.next_value::<Option<Text>>()?.is_some_and(|t| t.non_empty),
        };
        Ok(())
    }
}

/// The length of a JSON array (only an array).
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while s.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What one chat choice says (`choice_signal`): its output, and its finish reason.
#[derive(Default)]
struct Choice {
    output: bool,
    finish: Option<Text>,
}

impl<'de> Fields<'de> for Choice {
    const KEYS: &'static [&'static str] = &["text", "delta", "message", "finish_reason"];
    fn field<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<(), A::Error> {
        match key {
            "text" => self.output |= m.next_value::<Option<Text>>()?.is_some_and(|t| t.non_empty),
            "finish_reason" => self.finish = m.next_value::<Option<Text>>()?,
            _ => self.output |= m.next_value::<Option<Object<Message>>>()?.is_some_and(|x| x.0 .0),
        }
        Ok(())
    }
}

impl Choice {
    fn signal(self) -> Option<Signal> {
        if self.output {
            return Some(Signal::Output);
        }
        self.finish.map(|f| f.abort.map_or(Signal::Output, |r| Signal::Aborted(r.to_string())))
    }
}

/// A chat payload with no error in it: its choices (`None`: no `choices`, or null).
#[derive(Default)]
struct Chat(Option<Vec<Object<Choice>>>);

impl<'de> Fields<'de> for Chat {
    const KEYS: &'static [&'static str] = &["error", "choices"];
    fn field<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<(), A::Error> {
        match key {
            // An error is quoted from the `Value`.
            "error" if m.next_value::<Option<IgnoredAny>>()?.is_some() => Err(A::Error::custom("an error event")),
            "error" => Ok(()),
            _ => {
                self.0 = m.next_value()?;
                Ok(())
            }
        }
    }
}

/// A Responses event's `type` (`None`: absent or null) and whether its `delta` counts.
#[derive(Default)]
struct Responses<'a>(Option<&'a str>, bool);

impl<'de> Fields<'de> for Responses<'de> {
    const KEYS: &'static [&'static str] = &["type", "delta"];
    fn field<A: MapAccess<'de>>(&mut self, key: &str, m: &mut A) -> Result<(), A::Error> {
        match key {
            "type" => self.0 = m.next_value()?,
            _ => self.1 = m.next_value::<Option<AnyDelta>>()?.is_some_and(|x| x.0),
        }
        Ok(())
    }
}

/// `chat_signal` of `data`, or `None` where the `Value` path must answer.
pub(super) fn chat(data: &str) -> Option<Signal> {
    let Object(Chat(choices)) = serde_json::from_str(data).ok()?;
    let Some(choices) = choices else { return Some(Signal::Other) };
    let mut aborted = None;
    for s in choices.into_iter().filter_map(|c| c.0.signal()) {
        match s {
            Signal::Output => return Some(Signal::Output),
            Signal::Aborted(r) => {
                aborted.get_or_insert(r);
            }
            _ => {}
        }
    }
    Some(aborted.map_or(Signal::Other, Signal::Aborted))
}

/// `responses_signal` of `data` (an event named `name`), or `None` where the `Value` path must
/// answer (errors, failures and incomplete responses are quoted or read further from it).
pub(super) fn responses(name: Option<&str>, data: &str) -> Option<Signal> {
    let Object(Responses(kind, delta)) = serde_json::from_str(data).ok()?;
    let kind = kind.or(name).unwrap_or_default();
    match kind {
        "error" | "response.failed" | "response.incomplete" => None,
        "response.completed" => Some(Signal::Output),
        k if k.starts_with("response.") && k.ends_with(".delta") => Some(if delta { Signal::Output } else { Signal::Other }),
        _ => Some(Signal::Other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::super::{chat_signal, responses_signal};
    use super::*;

    /// The `Value` path's answer for the same data.
    fn slow_chat(data: &str) -> Signal {
        serde_json::from_str::<Value>(data).map_or(Signal::Other, |v| chat_signal(&v))
    }

    fn slow_responses(name: Option<&str>, data: &str) -> Signal {
        serde_json::from_str::<Value>(data).map_or(Signal::Other, |v| {
            let kind = v.get("type").and_then(Value::as_str).or(name).unwrap_or_default().to_string();
            responses_signal(&kind, &v)
        })
    }

    const WORDS: [&str; 9] = ["", "abort", "error", "stop", "hi", "response.output_text.delta", "response.completed", "response.failed", "response.created"];

    /// A value of any JSON kind, biased to the words the rules look for.
    fn leaf() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            prop::sample::select(WORDS.to_vec()).prop_map(|w| json!(w)),
            Just(json!([])),
            Just(json!([{}])),
            Just(json!({})),
        ]
        .boxed()
    }

    /// An object with some of `keys`, each holding what `val` makes.
    fn object(keys: &'static [&'static str], val: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
        prop::collection::vec((prop::sample::select(keys), val), 0..5).prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())).boxed()
    }

    /// A string or null, now and then any other value.
    fn text() -> BoxedStrategy<Value> {
        prop_oneof![4 => prop::sample::select(WORDS.to_vec()).prop_map(|w| json!(w)), 2 => Just(Value::Null), 1 => leaf()].boxed()
    }

    /// Payloads shaped like chat events and Responses events, every field now and then of
    /// another kind than vLLM sends.
    fn payload() -> impl Strategy<Value = Value> {
        let calls = prop_oneof![Just(json!([])), Just(json!([{"id": "t"}])), Just(Value::Null), leaf()];
        let message = prop_oneof![4 => object(&["content", "reasoning", "reasoning_content", "role"], text()), 2 => object(&["tool_calls", "role"], calls), 1 => leaf()];
        let choice = prop_oneof![
            6 => object(&["text", "finish_reason", "index"], text()),
            6 => object(&["delta", "message", "finish_reason", "index"], prop_oneof![message, text()]),
            1 => leaf(),
        ];
        let choices = prop_oneof![6 => prop::collection::vec(choice, 0..3).prop_map(Value::Array), 1 => leaf()];
        let error = prop_oneof![leaf(), Just(json!({"message": "boom"}))];
        prop_oneof![
            1 => leaf(),
            6 => object(&["choices", "choices", "choices", "id"], choices),
            1 => object(&["choices", "error"], error),
            4 => object(&["type", "delta"], text()),
            2 => object(&["type", "delta", "response", "message"], prop_oneof![text(), leaf(), object(&["error", "incomplete_details", "status"], leaf())]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn answers_as_the_value_path_does(v in payload(), name in prop::option::of(prop::sample::select(WORDS.to_vec()))) {
            let data = v.to_string();
            if let Some(s) = chat(&data) {
                prop_assert_eq!(s, slow_chat(&data), "chat {}", data);
            }
            if let Some(s) = responses(name, &data) {
                prop_assert_eq!(s, slow_responses(name, &data), "responses {}", data);
            }
        }
    }

    #[test]
    fn vllm_events_are_read_here() {
        let role = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#;
        let token = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"\u00e9 \"q\""},"finish_reason":null}]}"#;
        let abort = r#"{"choices":[{"index":0,"text":"","finish_reason":"abort"}]}"#;
        assert_eq!(chat(role), Some(Signal::Other));
        assert_eq!(chat(token), Some(Signal::Output));
        assert_eq!(chat(abort), Some(Signal::Aborted("abort".into())));
        assert_eq!(responses(Some("response.output_text.delta"), r#"{"type":"response.output_text.delta","delta":"x"}"#), Some(Signal::Output));
        assert_eq!(responses(None, r#"{"type":"response.created","response":{}}"#), Some(Signal::Other));
    }

    #[test]
    fn surprises_go_to_the_value_path() {
        // A key twice (the `Value` keeps the last), an error to quote, a field of another type.
        for data in [r#"{"choices":[],"choices":[{"text":"a"}]}"#, r#"{"error":{"message":"boom"}}"#, r#"{"choices":[{"text":5}]}"#, r#"{"choices":[["a"]]}"#, "[1]", "not json"] {
            assert_eq!(chat(data), None, "{data}");
        }
        assert_eq!(responses(None, r#"{"type":"response.failed","response":{"error":null}}"#), None);
        assert_eq!(responses(None, r#"{"type":7}"#), None);
    }
}
