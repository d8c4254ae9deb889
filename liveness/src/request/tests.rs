#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use serde_json::Value;

fn done(model: Option<&str>, stream: bool) -> Scan {
    Scan::Done(RequestFields { model: model.map(str::to_string), stream, ..RequestFields::default() })
}

#[test]
fn json_basics() {
    assert_eq!(scan_json(br#"{"model":"tiny","stream":true}"#), done(Some("tiny"), true));
    assert_eq!(scan_json(br#"{"model":"tiny"}"#), done(Some("tiny"), false));
    assert_eq!(scan_json(br#"{}"#), done(None, false));
    assert_eq!(scan_json(b" \n{ } trailing"), done(None, false));
    assert_eq!(scan_json(br#"{"stream":false,"model":7}"#), done(None, false));
    assert_eq!(scan_json(br#"{"stream":"true","model":"a"}"#), done(Some("a"), false));
    assert_eq!(scan_json(br#"{"stream":1,"model":null}"#), done(None, false));
    // Fields after a large nested value, with brackets and quotes inside strings.
    let body = br#"{"messages":[{"role":"user","content":"a \"}]\" {[ b"}],"x":{"y":[1,{"z":"}"}]},"model":"m\u00e9","stream":true}"#;
    assert_eq!(scan_json(body), done(Some("m\u{e9}"), true));
    // An escaped key still names the field.
    assert_eq!(scan_json(br#"{"mod\u0065l":"x","str\u0065am":true}"#), done(Some("x"), true));
    // First occurrence wins, and the scan stops once both are known.
    assert_eq!(scan_json(br#"{"model":"a","stream":true,"model":"b"}"#), done(Some("a"), true));
    assert_eq!(scan_json(br#"{"model":"a","stream":true,  garbage"#), done(Some("a"), true));
}

#[test]
fn affinity_fields() {
    let cfg = AffinityConfig::default();
    let scan = |b: &str| match JsonScanner::with_affinity(&cfg).feed(b.as_bytes()) {
        Scan::Done(f) => f,
        other => panic!("{b}: {other:?}"),
    };
    let f = scan(r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"user":"alice"}"#);
    assert_eq!((f.model.as_deref(), f.stream, f.user.as_deref()), (Some("m"), true, Some("alice")));
    assert!(f.prefix.is_some());
    // The SDK's order; `user` absent: the whole object is walked, nothing found.
    let g = scan(r#"{"messages":[{"role":"user","content":"hi"}],"model":"m","stream":true}"#);
    assert_eq!((g.user, g.prefix), (None, f.prefix), "same messages, same key, whatever the key order");
    // Not fingerprinted: no prompt, or `messages` that is not an array.
    assert_eq!(scan(r#"{"model":"m","stream":true}"#).prefix, None);
    assert_eq!(scan(r#"{"model":"m","stream":true,"messages":"x"}"#).prefix, None);
    assert_eq!(scan(r#"{"model":"m","stream":true,"messages":[]}"#).prefix, None);
    // A completions prompt, string or token ids.
    assert!(scan(r#"{"model":"m","prompt":"once upon"}"#).prefix.is_some());
    assert_ne!(scan(r#"{"prompt":[1,2,3]}"#).prefix, scan(r#"{"prompt":[1,2,4]}"#).prefix);
    // `user` that is not a short string names no session.
    assert_eq!(scan(r#"{"user":7}"#).user, None);
    assert_eq!(scan(&format!(r#"{{"user":"{}"}}"#, "u".repeat(MAX_USER_BYTES + 1))).user, None);
    // Without affinity none of it is read, and the scan stops at model and stream.
    let plain = scan_json(br#"{"model":"m","stream":true,"user":"alice","messages":[{"role":"user"}]}"#);
    assert_eq!(plain, done(Some("m"), true));
}

#[test]
fn json_incomplete_and_invalid() {
    assert_eq!(scan_json(b""), Scan::Incomplete);
    assert_eq!(scan_json(br#"{"model":"tin"#), Scan::Incomplete);
    assert_eq!(scan_json(br#"{"stream":true"#), Scan::Incomplete, "`true` is only known at its delimiter");
    assert_eq!(scan_json(br#"{"model":"tiny","messages":[{"content":"#), Scan::Incomplete);
    assert!(matches!(scan_json(b"not json"), Scan::Invalid(_)));
    assert!(matches!(scan_json(b"[1,2]"), Scan::Invalid(_)));
    assert!(matches!(scan_json(br#"{"model" "x"}"#), Scan::Invalid(_)));
    assert!(matches!(scan_json(br#"{"a":1 "b":2}"#), Scan::Invalid(_)));
    let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_BYTES + 1));
    assert!(matches!(scan_json(long.as_bytes()), Scan::Invalid(_)));
    let mut s = JsonScanner::new();
    assert_eq!(s.feed(br#"{"model":"x""#), Scan::Incomplete);
    assert!(matches!(s.finish(), Scan::Invalid(_)));
}

#[test]
fn content_types() {
    assert_eq!(BodyKind::from_content_type(None), BodyKind::Json);
    assert_eq!(BodyKind::from_content_type(Some("application/json")), BodyKind::Json);
    assert_eq!(BodyKind::from_content_type(Some("multipart/form-data; boundary=abc")), BodyKind::Multipart { boundary: "abc".into() });
    assert_eq!(BodyKind::from_content_type(Some("Multipart/Form-Data; charset=x; Boundary=\"a b\"")), BodyKind::Multipart { boundary: "a b".into() });
    assert_eq!(BodyKind::from_content_type(Some("multipart/form-data")), BodyKind::Json);
}

fn form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in parts {
        b.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if *name == "file" {
            b.extend_from_slice(b"; filename=\"a.wav\"\r\nContent-Type: audio/wav");
        }
        b.extend_from_slice(b"\r\n\r\n");
        b.extend_from_slice(value);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    b
}

#[test]
fn multipart_basics() {
    let body = form("XyZ", &[("file", b"RIFF\r\n--Xy-not-quite\r\n--Xy"), ("model", b"whisper"), ("stream", b"true")]);
    assert_eq!(scan_multipart("XyZ", &body), done(Some("whisper"), true));
    let body = form("b", &[("model", b"w"), ("language", b"en"), ("file", b"\x00\x01")]);
    assert_eq!(scan_multipart("b", &body), done(Some("w"), false));
    let body = form("b", &[("stream", b"False"), ("model", b"")]);
    assert_eq!(scan_multipart("b", &body), done(Some(""), false));
    assert_eq!(scan_multipart("b", b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhi"), Scan::Incomplete);
    assert!(matches!(scan_multipart("b", b"--bX"), Scan::Invalid(_)));
    let mut s = MultipartScanner::new("b");
    assert_eq!(s.feed(b"--b\r\n"), Scan::Incomplete);
    assert!(matches!(s.finish(), Scan::Invalid(_)));
}

/// What a full parse says: the oracle the scanner must agree with.
fn oracle(body: &[u8]) -> RequestFields {
    let v: Value = serde_json::from_slice(body).unwrap();
    RequestFields { model: v.get("model").and_then(Value::as_str).map(str::to_string), stream: v.get("stream") == Some(&Value::Bool(true)), ..RequestFields::default() }
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "(?s).{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["}", "]", "\"", "\\", "{\"model\":\"x\"}", "\u{1f600}", "\n"]).prop_map(|s| Value::String(s.to_string())),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z\"]{0,6}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A JSON object text with unique keys in a chosen order, maybe `model` and `stream` among
/// them (with any value), pretty-printed or not.
fn arb_object() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![Just("model".to_string()), Just("stream".to_string()), Just("messages".to_string()), Just("user".to_string()), Just("prompt".to_string()), "[a-z\\\\\"]{0,7}"];
    (prop::collection::vec((key, arb_value()), 0..6), any::<bool>()).prop_map(|(kvs, pretty)| {
        let mut seen = std::collections::HashSet::new();
        let parts: Vec<String> = kvs
            .into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .map(|(k, v)| {
                let v = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { serde_json::to_string(&v).unwrap() };
                format!("{}:{}{v}", serde_json::to_string(&k).unwrap(), if pretty { " " } else { "" })
            })
            .collect();
        let sep = if pretty { ",\n  " } else { "," };
        format!("{}{}{}", if pretty { "{\n  " } else { "{" }, parts.join(sep), if pretty { "\n}" } else { "}" }).into_bytes()
    })
}

fn arb_form() -> impl Strategy<Value = (String, Vec<u8>, RequestFields)> {
    let name = prop::sample::select(vec!["model", "stream", "file", "language", "prompt"]);
    let value = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..24),
        prop::sample::select(vec!["true", "false", "1", "tiny", "\r\n--", "\r\n--bnd"]).prop_map(|s| s.as_bytes().to_vec()),
    ];
    (prop::sample::select(vec!["bnd", "----WebKitFormBoundaryABC", "a-a"]), prop::collection::vec((name, value), 0..5)).prop_map(|(boundary, parts)| {
        let delim = format!("\r\n--{boundary}");
        let mut want = Found::default();
        let mut kept = Vec::new();
        for (n, v) in parts {
            // A value must not contain the delimiter (a real encoder picks a boundary so).
            let mut framed = b"\r\n".to_vec();
            framed.extend_from_slice(&v);
            framed.extend_from_slice(b"\r\n--");
            if framed.windows(delim.len()).any(|w| w == delim.as_bytes()) || (n != "file" && std::str::from_utf8(&v).is_err()) {
                continue;
            }
            if let Some(f) = want.wants(n.as_bytes()) {
                let s = String::from_utf8_lossy(&v).to_string();
                let t = matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "1" | "t" | "yes" | "y" | "on");
                want.set(f, Some(s), t);
            }
            kept.push((n, v));
        }
        let refs: Vec<(&str, &[u8])> = kept.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        (boundary.to_string(), form(boundary, &refs), want.fields)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The scanner agrees with serde_json on the whole body, never claims a wrong value for
    /// any prefix, and any split into chunks gives the same answer as one piece.
    #[test]
    fn json_scanner_agrees_with_serde(body in arb_object(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let want = oracle(&body);
        prop_assert_eq!(scan_json(&body), Scan::Done(want.clone()));
        for n in 0..body.len() {
            let got = scan_json(&body[..n]);
            prop_assert!(got == Scan::Incomplete || got == Scan::Done(want.clone()), "prefix {} of {:?}: {:?}", n, String::from_utf8_lossy(&body), got);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut s = JsonScanner::new();
        let mut last = 0;
        let mut got = Scan::Incomplete;
        for c in cuts.into_iter().chain([body.len()]) {
            got = s.feed(&body[last..c]);
            last = c;
        }
        prop_assert_eq!(got, Scan::Done(want));
    }

    #[test]
    fn multipart_scanner_agrees_with_the_form((boundary, body, want) in arb_form(), cut in any::<prop::sample::Index>()) {
        prop_assert_eq!(scan_multipart(&boundary, &body), Scan::Done(want.clone()));
        for n in 0..body.len() {
            let got = scan_multipart(&boundary, &body[..n]);
            prop_assert!(got == Scan::Incomplete || got == Scan::Done(want.clone()), "prefix {}: {:?}", n, got);
        }
        let c = cut.index(body.len() + 1);
        let mut s = MultipartScanner::new(&boundary);
        let _ = s.feed(&body[..c]);
        prop_assert_eq!(s.feed(&body[c..]), Scan::Done(want));
    }

    /// With affinity the scanner still agrees with serde_json on `model`, `stream` and
    /// `user`, reads a fingerprint only where there is a prompt, and any split into chunks
    /// gives the answer of one piece.
    #[test]
    fn affinity_scan_agrees_and_is_split_invariant(body in arb_object(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4)) {
        let cfg = AffinityConfig::default();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let whole = JsonScanner::with_affinity(&cfg).feed(&body);
        let Scan::Done(got) = whole.clone() else { return Err(TestCaseError::fail(format!("{whole:?}"))) };
        let want = oracle(&body);
        prop_assert_eq!(&got.model, &want.model);
        prop_assert_eq!(got.stream, want.stream);
        prop_assert_eq!(got.user.as_deref(), v.get("user").and_then(Value::as_str));
        if v.get("messages").is_none() && v.get("prompt").is_none() {
            prop_assert_eq!(got.prefix, None);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut s = JsonScanner::with_affinity(&cfg);
        let mut last = 0;
        let mut split = Scan::Incomplete;
        for c in cuts.into_iter().chain([body.len()]) {
            split = s.feed(&body[last..c]);
            last = c;
        }
        prop_assert_eq!(split, whole);
    }

    /// Every turn of a conversation (the same leading instructions and opening message,
    /// any history after them, any key order around `messages`) has the opening turn's key;
    /// another opening message gives another key.
    #[test]
    fn turns_share_the_opening_turns_key(
        system in prop::collection::vec("[ -~]{0,40}", 0..3), opening in "[ -~]{1,40}", other in "[ -~]{1,40}",
        history in prop::collection::vec(("(user|assistant|tool)", "(?s).{0,60}"), 0..6), model_first in any::<bool>(),
    ) {
        let msg = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
        let body = |opening: &str, history: &[(String, String)]| {
            let mut ms: Vec<Value> = system.iter().map(|c| msg("system", c)).collect();
            ms.push(msg("user", opening));
            ms.extend(history.iter().map(|(r, c)| msg(r, c)));
            let ms = serde_json::to_string(&ms).unwrap();
            if model_first { format!(r#"{{"model":"m","messages":{ms},"stream":true}}"#) } else { format!(r#"{{"messages":{ms},"model":"m","stream":true}}"#) }
        };
        let key = |b: String| match JsonScanner::with_affinity(&AffinityConfig::default()).feed(b.as_bytes()) {
            Scan::Done(f) => f.prefix,
            other => panic!("{other:?}"),
        };
        let first = key(body(&opening, &[]));
        prop_assert!(first.is_some());
        prop_assert_eq!(first, key(body(&opening, &history)));
        if other != opening {
            prop_assert_ne!(first, key(body(&other, &history)));
        }
    }

    /// Garbage never panics, in one piece or byte by byte.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), brace in any::<bool>()) {
        let mut body = if brace { b"{\"".to_vec() } else { Vec::new() };
        body.extend_from_slice(&bytes);
        let _ = scan_json(&body);
        let _ = scan_multipart("b", &body);
        let mut j = JsonScanner::new();
        let mut m = MultipartScanner::new("b");
        for b in &body {
            let _ = j.feed(std::slice::from_ref(b));
            let _ = m.feed(std::slice::from_ref(b));
        }
        let _ = j.finish();
        let _ = m.finish();
    }
}
