//! The common events read without building a `serde_json::Value`: one pass over the event's data
//! by a JSON walker that keeps only what [`super::event_signal`] looks at (a few flags per
//! choice), where the `Value` tree costs a map and a string per key. It runs on the first events
//! of every stream, until the first token.
//!
//! It answers only where it reads exactly what the `Value` path would: the whole data must be
//! one valid JSON object, and any surprise answers `None` and the caller reads the event the
//! `Value` way. Surprises: a key twice among those read (the `Value` keeps the last one), a
//! field of another type than the events vLLM sends, an error to quote, an escape in a key or in
//! a `finish_reason` or `type`, a `\u` escape of a surrogate, a number that a `Value` could not
//! hold, nesting deeper than [`MAX_DEPTH`]. The property tests below hold the two to the same
//! answer.

use super::Signal;

/// Deeper than this answers `None` (`serde_json` refuses past 128).
const MAX_DEPTH: u32 = 100;

/// A position in the data. Every method answers `None` on invalid JSON or a surprise.
struct Walk<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

/// What a JSON string held: its raw bytes between the quotes, and whether it had an escape.
#[derive(Clone, Copy)]
struct Str<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl Str<'_> {
    /// Whether the decoded string is non-empty (every escape decodes to a character).
    fn non_empty(self) -> bool {
        !self.raw.is_empty()
    }
}

impl<'a> Walk<'a> {
    fn new(data: &'a str) -> Walk<'a> {
        Walk { b: data.as_bytes(), i: 0, depth: 0 }
    }

    /// The next byte after JSON whitespace, not taken.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Takes `c`, the next byte after whitespace.
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Whether only whitespace is left.
    fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// A string, the next value.
    fn string(&mut self) -> Option<Str<'a>> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = crate::json_string_stop(self.b, self.i, true)?;
            match self.b[self.i] {
                b'"' => {
                    let raw = &self.b[start..self.i];
                    self.i += 1;
                    return Some(Str { raw, escaped });
                }
                b'\\' => {
                    escaped = true;
                    self.i += 1;
                    match *self.b.get(self.i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.b.get(self.i + 1..self.i + 5)?;
                            let unit = hex.iter().try_fold(0u32, |u, &h| Some(u << 4 | char::from(h).to_digit(16)?))?;
                            if (0xD800..=0xDFFF).contains(&unit) {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// A number, the next value, that a `Value` holds (a finite one).
    fn number(&mut self) -> Option<()> {
        self.peek()?;
        let start = self.i;
        let digits = |w: &mut Self| {
            let s = w.i;
            while w.b.get(w.i).is_some_and(u8::is_ascii_digit) {
                w.i += 1;
            }
            w.i - s
        };
        if self.b[self.i] == b'-' {
            self.i += 1;
        }
        match digits(self) {
            0 => return None,
            n if n > 1 && self.b[self.i - n] == b'0' => return None,
            _ => {}
        }
        let mut plain = true;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            plain = false;
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return None;
            }
        }
        let text = &self.b[start..self.i];
        if plain && text.len() <= 18 {
            return Some(());
        }
        // Long or with an exponent: a `Value` refuses what overflows an f64.
        std::str::from_utf8(text).ok()?.parse::<f64>().ok().filter(|f| f.is_finite()).map(|_| ())
    }

    /// One of `true`, `false`, `null`.
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.peek()?;
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    /// Takes `null` if it is the next value.
    fn null(&mut self) -> Option<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(true);
        }
        Some(false)
    }

    /// Any value, skipped.
    fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.object(|_, w| w.skip()),
            b'[' => self.array(|w| w.skip()).map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    /// An object, the next value: `member` reads each value, given its key (one without an
    /// escape: a key with one answers `None`).
    fn object(&mut self, mut member: impl FnMut(&'a [u8], &mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.enter()?;
        if self.peek()? == b'}' {
            self.i += 1;
            self.depth -= 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            if key.escaped {
                return None;
            }
            self.eat(b':')?;
            member(key.raw, self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, the next value: `element` reads each element. Answers how many there were.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<usize> {
        self.eat(b'[')?;
        self.enter()?;
        if self.peek()? == b']' {
            self.i += 1;
            self.depth -= 1;
            return Some(0);
        }
        let mut n = 0;
        loop {
            element(self)?;
            n += 1;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(n);
                }
                _ => return None,
            }
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// A string or null (`None` inside: null).
    fn text(&mut self) -> Option<Option<Str<'a>>> {
        if self.null()? {
            return Some(None);
        }
        (self.peek()? == b'"').then(|| self.string())?.map(Some)
    }
}

/// The keys a reader reads, each once: a second time is a surprise (at most 32 keys).
struct Seen {
    keys: &'static [&'static [u8]],
    seen: u32,
}

impl Seen {
    fn of(keys: &'static [&'static [u8]]) -> Seen {
        Seen { keys, seen: 0 }
    }

    /// Notes `key`, one of the keys read; `None` when it was seen before.
    fn first(&mut self, key: &[u8]) -> Option<()> {
        let bit = 1 << self.keys.iter().position(|k| *k == key)?;
        let fresh = self.seen & bit == 0;
        self.seen |= bit;
        fresh.then_some(())
    }
}

/// A chat `delta` or `message`, the next value: whether it carries output
/// (`message_has_output`). Null is no output.
fn message(w: &mut Walk) -> Option<bool> {
    if w.null()? {
        return Some(false);
    }
    let (mut out, mut seen) = (false, Seen::of(&[b"content", b"reasoning_content", b"reasoning", b"tool_calls"]));
    w.object(|k, w| {
        match k {
            b"content" | b"reasoning_content" | b"reasoning" => {
                seen.first(k)?;
                out |= w.text()?.is_some_and(Str::non_empty);
            }
            b"tool_calls" => {
                seen.first(k)?;
                if !w.null()? {
                    out |= w.array(Walk::skip)? > 0;
                }
            }
            _ => w.skip()?,
        }
        Some(())
    })?;
    Some(out)
}

/// One chat choice, the next value: what it says (`choice_signal`), `None` inside for nothing.
fn choice(w: &mut Walk) -> Option<Option<Signal>> {
    let (mut output, mut finish, mut seen) = (false, None, Seen::of(&[b"text", b"delta", b"message", b"finish_reason"]));
    w.object(|k, w| {
        match k {
            b"text" => {
                seen.first(k)?;
                output |= w.text()?.is_some_and(Str::non_empty);
            }
            b"delta" | b"message" => {
                seen.first(k)?;
                output |= message(w)?;
            }
            b"finish_reason" => {
                seen.first(k)?;
                finish = match w.text()? {
                    // An escape could spell `abort`.
                    Some(s) if s.escaped => return None,
                    Some(s) => Some(s.raw),
                    None => None,
                };
            }
            _ => w.skip()?,
        }
        Some(())
    })?;
    if output {
        return Some(Some(Signal::Output));
    }
    Some(finish.map(|f| match f {
        b"abort" => Signal::Aborted("abort".into()),
        b"error" => Signal::Aborted("error".into()),
        _ => Signal::Output,
    }))
}

/// `chat_signal` of `data`, or `None` where the `Value` path must answer.
pub(super) fn chat(data: &str) -> Option<Signal> {
    let mut w = Walk::new(data);
    // `None`: no choices (absent or null); else whether one has output, and the first abort.
    let (mut choices, mut seen) = (None::<(bool, Option<Signal>)>, Seen::of(&[b"error", b"choices"]));
    w.object(|k, w| {
        match k {
            b"error" => {
                seen.first(k)?;
                // An error is quoted from the `Value`.
                w.null()?.then_some(())?;
            }
            b"choices" => {
                seen.first(k)?;
                if w.null()? {
                    return Some(());
                }
                let (mut output, mut aborted) = (false, None);
                w.array(|w| {
                    match choice(w)? {
                        Some(Signal::Output) => output = true,
                        Some(s) => {
                            aborted.get_or_insert(s);
                        }
                        None => {}
                    }
                    Some(())
                })?;
                choices = Some((output, aborted));
            }
            _ => w.skip()?,
        }
        Some(())
    })?;
    if !w.at_end() {
        return None;
    }
    Some(match choices {
        Some((true, _)) => Signal::Output,
        Some((false, Some(aborted))) => aborted,
        _ => Signal::Other,
    })
}

/// `responses_signal` of `data` (an event named `name`), or `None` where the `Value` path must
/// answer (errors, failures and incomplete responses are quoted or read further from it).
pub(super) fn responses(name: Option<&str>, data: &str) -> Option<Signal> {
    let mut w = Walk::new(data);
    let (mut kind, mut delta, mut seen) = (None::<&[u8]>, false, Seen::of(&[b"type", b"delta"]));
    w.object(|k, w| {
        match k {
            b"type" => {
                seen.first(k)?;
                kind = match w.text()? {
                    Some(s) if s.escaped => return None,
                    s => s.map(|s| s.raw),
                };
            }
            b"delta" => {
                seen.first(k)?;
                // A non-null value that counts as a delta: a non-empty string, or any object,
                // array, number or boolean (the Responses API's audio and image deltas are
                // objects).
                delta = match w.peek()? {
                    b'n' => !w.null()?,
                    b'"' => w.string()?.non_empty(),
                    _ => w.skip().map(|()| true)?,
                };
            }
            _ => w.skip()?,
        }
        Some(())
    })?;
    if !w.at_end() {
        return None;
    }
    let kind = kind.or(name.map(str::as_bytes)).unwrap_or_default();
    match kind {
        b"error" | b"response.failed" | b"response.incomplete" => None,
        b"response.completed" => Some(Signal::Output),
        k if k.starts_with(b"response.") && k.ends_with(b".delta") => Some(if delta { Signal::Output } else { Signal::Other }),
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

    /// Raw JSON text the `Value` printer never writes: escapes, whitespace, numbers of every
    /// form, control characters, and bytes cut, doubled or swapped in.
    const ODD: [&str; 20] = [
        " ", "\n\t", "\"\\u00e9\"", "\"\\u0061bort\"", "\"\\ud800\"", "\"a\\nb\"", "\"\\/\"", "\"\u{1}\"", "\"\\x\"", "1e400", "-0.5e-7",
        "1.5E+3", "01", "123456789012345678901234", "-", "[[[[]]]]", "{\"a\":1}", "\"\\\"\"", "tru", "\"abort\"",
    ];

    /// `data` with one of [`ODD`] put in at `at` (a char boundary at or before it), or with the
    /// bytes from there to `to` taken out.
    fn mutate(data: &str, at: usize, to: usize, odd: Option<&str>) -> String {
        let floor = |n: usize| (0..=n.min(data.len())).rev().find(|&k| data.is_char_boundary(k)).unwrap_or(0);
        let (a, b) = (floor(at), floor(to.max(at)));
        match odd {
            Some(o) => format!("{}{o}{}", &data[..a], &data[a..]),
            None => format!("{}{}", &data[..a], &data[b..]),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn stops_where_a_byte_loop_does(b in prop::collection::vec(prop::sample::select(vec![b'a', b'"', b'\\', 0, 0x1f, 0x20, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xa2, 0xdc, 0xff]), 0..100), i in 0usize..100, controls in any::<bool>(), plain in 0usize..90) {
            // Long plain runs too, past the eight-a-step part.
            let mut b = b;
            let at = plain.min(b.len());
            b.splice(at..at, std::iter::repeat_n(b'a', plain));
            let naive = b.iter().enumerate().skip(i).find(|(_, &c)| c == b'"' || c == b'\\' || (controls && c < 0x20)).map(|(k, _)| k);
            prop_assert_eq!(crate::json_string_stop(&b, i, controls), naive);
        }

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

        /// The same on text that is not what the `Value` printer writes: odd but valid JSON,
        /// and broken JSON (which the `Value` path reads as no signal).
        #[test]
        fn answers_as_the_value_path_does_on_odd_text(v in payload(), at in 0usize..400, len in 0usize..4, odd in prop::option::of(prop::sample::select(ODD.to_vec())), name in prop::option::of(prop::sample::select(WORDS.to_vec()))) {
            let data = mutate(&v.to_string(), at, at + len, odd);
            if let Some(s) = chat(&data) {
                prop_assert_eq!(s, slow_chat(&data), "chat {}", data);
            }
            if let Some(s) = responses(name, &data) {
                prop_assert_eq!(s, slow_responses(name, &data), "responses {}", data);
            }
        }
    }

    /// Every event of vLLM's recorded streams is read here, not from a `Value`, but for the
    /// errors it must quote: the fast path is the one real streams take.
    #[test]
    fn vllm_recorded_events_are_read_here() {
        for (file, api) in [("sse-chat.txt", "chat"), ("sse-chat-usage.txt", "chat"), ("sse-completions.txt", "chat"), ("sse-responses.txt", "responses")] {
            let raw = std::fs::read(format!("{}/../tests/data/vllm-0.32.0-cpu/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            let mut n = 0;
            for (a, b) in crate::sse::events(&raw, 0) {
                let ev = crate::sse::parse_event(&raw[a..b]);
                let Some(data) = ev.data.as_deref().map(str::trim).filter(|d| *d != "[DONE]") else { continue };
                let fast = if api == "chat" { chat(data) } else { responses(ev.name.as_deref(), data) };
                let slow = if api == "chat" { slow_chat(data) } else { slow_responses(ev.name.as_deref(), data) };
                assert_eq!(fast, Some(slow), "{file}: {data}");
                n += 1;
            }
            assert!(n >= 3, "{file}: {n} events");
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
        // And what the walker does not decode: an escape in a key or a finish reason (it could
        // spell `abort`), a surrogate, a number a `Value` cannot hold; and broken JSON.
        for data in [
            r#"{"choices":[],"choices":[{"text":"a"}]}"#,
            r#"{"error":{"message":"boom"}}"#,
            r#"{"choices":[{"text":5}]}"#,
            r#"{"choices":[["a"]]}"#,
            "[1]",
            "not json",
            r#"{"ch\u006fices":[{"text":"a"}]}"#,
            r#"{"choices":[{"finish_reason":"\u0061bort"}]}"#,
            r#"{"choices":[{"text":"\ud83d\ude00"}]}"#,
            r#"{"n":1e400,"choices":[{"text":"a"}]}"#,
            r#"{"choices":[{"text":"a"}]} x"#,
            r#"{"choices":[{"text":"a"}],}"#,
            "{\"choices\":[{\"text\":\"a\u{1}\"}]}",
            "{\"id\":\"\u{1f}\",\"choices\":[{\"text\":\"a\"}]}",
        ] {
            assert_eq!(chat(data), None, "{data}");
        }
        assert_eq!(responses(None, r#"{"type":"response.failed","response":{"error":null}}"#), None);
        assert_eq!(responses(None, r#"{"type":7}"#), None);
    }
}
