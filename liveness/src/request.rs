//! What the picker needs from a request body — the `model` and `stream` fields — read without
//! parsing, and without copying, more of the body than it takes to find them.
//!
//! Request bodies can be tens of MB (long contexts, base64 images in multimodal chat), and the
//! OpenAI SDKs put `messages` *before* `model`, so the fields are often at the end. The scanners
//! here are streaming state machines: the picker feeds them the buffered body in windows (a
//! bounded copy at a time) and stops as soon as they answer. They keep only a few small buffers
//! (a key, a model name), never the body.
//!
//! * [`JsonScanner`]: walks the top-level keys of a JSON object and skips every other value
//!   (strings with escapes, nested arrays and objects) without building it.
//! * [`MultipartScanner`]: reads the `model` and `stream` parts of a `multipart/form-data`
//!   body (audio transcriptions and translations), skipping the file parts.
//!
//! Like mini-redis's frame codec, "not enough bytes yet" ([`Scan::Incomplete`]) is kept apart
//! from "this is not a body we can read" ([`Scan::Invalid`]); the picker fails open on the
//! latter (no pick: Envoy's fallback load balancing serves, the worker answers any 400).
//!
//! Agreement with a full parse (property-tested against `serde_json`): for a JSON object
//! `model` is the value when it is a string (else none) and `stream` is true only for the JSON
//! literal `true`. One deliberate difference: with a duplicated key the first occurrence wins
//! (finding the last would need the whole body; a full parser rejects or takes the last one, and
//! no SDK sends duplicates — the worst case is a pick for the other model's workers).

/// The request fields the picker routes on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFields {
    /// `model`, when it is a string.
    pub model: Option<String>,
    /// `"stream": true` (JSON), or a true-ish `stream` form field (multipart).
    pub stream: bool,
    /// `user`, when it is a string of at most [`MAX_USER_BYTES`] (read only when asked for:
    /// [`JsonScanner::with_affinity`]).
    pub user: Option<String>,
    /// The fingerprint of the prompt's leading blocks ([`crate::affinity::PrefixHasher`]), when
    /// asked for and the body has `messages` or `prompt`.
    pub prefix: Option<u64>,
}

/// A scanner's answer so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Both fields found, or the body (object / form) ended: the answer is final.
    Done(RequestFields),
    /// The bytes so far end before the answer: feed more.
    Incomplete,
    /// Not a body this scanner can read (the reason, for a debug log).
    Invalid(&'static str),
}

/// Longest model name read (raw bytes, escapes included); a longer one makes the body invalid
/// for picking (fail open) rather than be truncated into a wrong name.
pub const MAX_MODEL_BYTES: usize = 1024;
/// Longest `user` read; a longer one is ignored (no session from it), never truncated.
pub const MAX_USER_BYTES: usize = 256;
/// Longest object key kept: enough for `"stream"` with every character `\u`-escaped.
const MAX_KEY_BYTES: usize = 64;
/// Longest part header block read in a multipart body.
const MAX_PART_HEADERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    Stream,
    /// Only with affinity: `user`, and the values the prefix fingerprint reads.
    User,
    Messages,
    Prompt,
}

#[derive(Debug, Default)]
struct Found {
    fields: RequestFields,
    model: bool,
    stream: bool,
    /// Affinity wants `user` (until the first one is read) and a fingerprint.
    want_user: bool,
    prefix: Option<PrefixHasher>,
}

impl Found {
    /// The field a key names, unless already found (first occurrence wins).
    fn wants(&self, name: &[u8]) -> Option<Field> {
        match name {
            b"model" if !self.model => Some(Field::Model),
            b"stream" if !self.stream => Some(Field::Stream),
            b"user" if self.want_user => Some(Field::User),
            b"messages" if self.prefix.as_ref().is_some_and(PrefixHasher::wants_more) => Some(Field::Messages),
            b"prompt" if self.prefix.as_ref().is_some_and(PrefixHasher::wants_more) => Some(Field::Prompt),
            _ => None,
        }
    }

    /// Everything asked for is known: the scan may stop.
    fn complete(&self) -> bool {
        self.model && self.stream && !self.want_user && !self.prefix.as_ref().is_some_and(PrefixHasher::wants_more)
    }

    fn set(&mut self, f: Field, model: Option<String>, stream: bool) {
        match f {
            Field::Model => {
                self.model = true;
                self.fields.model = model;
            }
            Field::Stream => {
                self.stream = true;
                self.fields.stream = stream;
            }
            Field::User => {
                self.want_user = false;
                self.fields.user = model;
            }
            Field::Messages | Field::Prompt => {}
        }
    }

    /// The answer: the fields, with the fingerprint if one was taken.
    fn answer(&self) -> RequestFields {
        let mut f = self.fields.clone();
        f.prefix = self.prefix.as_ref().and_then(PrefixHasher::finish);
        f
    }

    fn both(&self) -> bool {
        self.model && self.stream
    }
}

/// How to read a body, from its `content-type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Multipart { boundary: String },
}

impl BodyKind {
    /// `multipart/form-data` with a boundary is read as a form; anything else as JSON (vLLM
    /// reads JSON whatever the content type says).
    pub fn from_content_type(content_type: Option<&str>) -> BodyKind {
        let Some(ct) = content_type else { return BodyKind::Json };
        let mut params = ct.split(';');
        let mime = params.next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("multipart/form-data") {
            return BodyKind::Json;
        }
        for p in params {
            let Some((k, v)) = p.split_once('=') else { continue };
            if k.trim().eq_ignore_ascii_case("boundary") {
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                if !v.is_empty() && v.len() <= 200 {
                    return BodyKind::Multipart { boundary: v.to_string() };
                }
            }
        }
        BodyKind::Json
    }
}

/// Either scanner, chosen by content type.
#[derive(Debug)]
pub enum RequestScanner {
    Json(JsonScanner),
    Multipart(MultipartScanner),
}

impl RequestScanner {
    pub fn new(kind: &BodyKind) -> RequestScanner {
        match kind {
            BodyKind::Json => RequestScanner::Json(JsonScanner::new()),
            BodyKind::Multipart { boundary } => RequestScanner::Multipart(MultipartScanner::new(boundary)),
        }
    }

    /// Also reads what affinity keys on (JSON bodies; a form has no prompt to fingerprint).
    pub fn with_affinity(kind: &BodyKind, cfg: &AffinityConfig) -> RequestScanner {
        match kind {
            BodyKind::Json => RequestScanner::Json(JsonScanner::with_affinity(cfg)),
            BodyKind::Multipart { .. } => RequestScanner::new(kind),
        }
    }

    /// Feeds the next bytes of the body (in order, each byte once).
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        match self {
            RequestScanner::Json(s) => s.feed(chunk),
            RequestScanner::Multipart(s) => s.feed(chunk),
        }
    }

    /// The body has ended: `Incomplete` becomes `Invalid`.
    pub fn finish(&mut self) -> Scan {
        match self {
            RequestScanner::Json(s) => s.finish(),
            RequestScanner::Multipart(s) => s.finish(),
        }
    }
}

/// Scans a JSON body prefix in one go.
pub fn scan_json(prefix: &[u8]) -> Scan {
    JsonScanner::new().feed(prefix)
}

/// Scans a multipart body prefix in one go.
pub fn scan_multipart(boundary: &str, prefix: &[u8]) -> Scan {
    MultipartScanner::new(boundary).feed(prefix)
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

use crate::affinity::{AffinityConfig, PrefixHasher};

/// Decodes the raw bytes between a JSON string's quotes.
fn json_string(raw: &[u8]) -> Option<String> {
    if raw.contains(&b'\\') {
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted).ok()
    } else {
        std::str::from_utf8(raw).ok().filter(|s| !s.chars().any(|c| c < ' ')).map(str::to_string)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum J {
    /// Before the opening `{`.
    Start,
    /// After `{` (`first`) or `,`: a key or (`first`) the closing `}`.
    BeforeKey { first: bool },
    Key,
    AfterKey,
    BeforeValue,
    /// Inside a string value.
    Str,
    /// Inside a literal or number.
    Scalar,
    /// Inside a nested array/object (`depth` > 0), possibly inside a string in it.
    Nested,
    AfterValue,
    Done,
    Invalid(&'static str),
}

/// Streaming reader of the top-level `model` and `stream` keys of a JSON object (and, for
/// affinity, `user` and the fingerprint of `messages` / `prompt`).
#[derive(Debug)]
pub struct JsonScanner {
    state: J,
    /// Inside a string: the previous byte was an unconsumed backslash.
    esc: bool,
    /// In `Nested`: inside a string.
    in_str: bool,
    depth: u32,
    /// The current key's raw bytes (up to `MAX_KEY_BYTES`), and whether it was longer.
    key: Vec<u8>,
    key_long: bool,
    /// The field the current value is read into, if any, and its raw bytes so far.
    target: Option<Field>,
    val: Vec<u8>,
    /// Whether the current value is a string (for `model`).
    val_is_str: bool,
    found: Found,
    /// The current value feeds the prefix fingerprint (`messages` or `prompt`).
    fp: Option<Field>,
}

impl Default for JsonScanner {
    fn default() -> Self {
        JsonScanner::new()
    }
}

impl JsonScanner {
    pub fn new() -> JsonScanner {
        JsonScanner { state: J::Start, esc: false, in_str: false, depth: 0, key: Vec::new(), key_long: false, target: None, val: Vec::new(), val_is_str: false, found: Found::default(), fp: None }
    }

    /// Also reads `user` (if `cfg.user_field`) and fingerprints the prompt's leading blocks
    /// (if `cfg.enabled`): the scan then walks on until it has them or the object ends.
    pub fn with_affinity(cfg: &AffinityConfig) -> JsonScanner {
        let mut s = JsonScanner::new();
        if cfg.enabled {
            s.found.want_user = cfg.user_field;
            s.found.prefix = Some(PrefixHasher::new(cfg));
        }
        s
    }

    fn answer(&self) -> Scan {
        match self.state {
            J::Done => Scan::Done(self.found.answer()),
            J::Invalid(why) => Scan::Invalid(why),
            _ => Scan::Incomplete,
        }
    }

    pub fn finish(&mut self) -> Scan {
        match self.answer() {
            Scan::Incomplete => {
                self.state = J::Invalid("body ended inside the JSON object");
                self.answer()
            }
            a => a,
        }
    }

    /// A value ended: store it if it was a wanted field.
    fn end_value(&mut self) {
        if let Some(f) = self.target.take() {
            match f {
                Field::Model => {
                    if self.val_is_str {
                        match json_string(&self.val) {
                            Some(m) => self.found.set(f, Some(m), false),
                            None => {
                                self.state = J::Invalid("model is not a valid JSON string");
                                return;
                            }
                        }
                    } else {
                        self.found.set(f, None, false);
                    }
                }
                Field::Stream => {
                    let t = !self.val_is_str && self.val == b"true";
                    self.found.set(f, None, t);
                }
                Field::User => {
                    // Not a string, too long or badly escaped: no session from it.
                    let u = if self.val_is_str && self.val.len() <= MAX_USER_BYTES { json_string(&self.val) } else { None };
                    self.found.set(f, u, false);
                }
                Field::Messages | Field::Prompt => {}
            }
            self.val.clear();
        }
        if let Some(f) = self.fp.take() {
            if let Some(h) = self.found.prefix.as_mut() {
                if f == Field::Prompt {
                    h.end_prompt();
                } else {
                    h.end_messages();
                }
            }
        }
        self.state = if self.found.complete() { J::Done } else { J::AfterValue };
    }

    /// A byte of the `prompt` value (a string's raw bytes, or a number's) for the fingerprint.
    fn keep(&mut self, b: u8) {
        if self.fp == Some(Field::Prompt) {
            if let Some(h) = self.found.prefix.as_mut() {
                h.push(&[b], true);
            }
        }
        if self.target.is_some() {
            // `stream` only matters when it is `true`: a few bytes tell.
            let cap = match self.target {
                Some(Field::Stream) => 8,
                Some(Field::User) => MAX_USER_BYTES + 1,
                _ => MAX_MODEL_BYTES,
            };
            if self.val.len() < cap {
                self.val.push(b);
            } else if self.target == Some(Field::Model) {
                self.state = J::Invalid("model name too long");
            }
            // A `stream` value longer than the cap is not `true`: the rest need not be kept.
        }
    }

    /// A byte of a nested `messages` message or `prompt` array for the fingerprint.
    fn fingerprint(&mut self, b: u8) {
        let prompt = self.fp == Some(Field::Prompt);
        if let Some(h) = self.found.prefix.as_mut() {
            h.push(&[b], prompt);
        }
    }

    /// Feeds the next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.state {
                J::Done | J::Invalid(_) => break,
                J::Start => {
                    if b == b'{' {
                        self.state = J::BeforeKey { first: true };
                    } else if !is_ws(b) {
                        self.state = J::Invalid("not a JSON object");
                    }
                }
                J::BeforeKey { first } => {
                    if b == b'"' {
                        self.key.clear();
                        self.key_long = false;
                        self.esc = false;
                        self.state = J::Key;
                    } else if b == b'}' && first {
                        self.state = J::Done;
                    } else if !is_ws(b) {
                        self.state = J::Invalid("expected an object key");
                    }
                }
                J::Key => {
                    if self.esc {
                        self.esc = false;
                    } else if b == b'\\' {
                        self.esc = true;
                    } else if b == b'"' {
                        self.state = J::AfterKey;
                        i += 1;
                        continue;
                    }
                    if self.key.len() < MAX_KEY_BYTES {
                        self.key.push(b);
                    } else {
                        self.key_long = true;
                    }
                }
                J::AfterKey => {
                    if b == b':' {
                        self.target = if self.key_long {
                            None
                        } else if self.key.contains(&b'\\') {
                            match json_string(&self.key) {
                                Some(k) => self.found.wants(k.as_bytes()),
                                None => {
                                    self.state = J::Invalid("bad escape in an object key");
                                    continue;
                                }
                            }
                        } else {
                            self.found.wants(&self.key)
                        };
                        if matches!(self.target, Some(Field::Messages | Field::Prompt)) {
                            self.fp = self.target.take();
                        }
                        self.val.clear();
                        self.state = J::BeforeValue;
                    } else if !is_ws(b) {
                        self.state = J::Invalid("expected ':' after an object key");
                    }
                }
                J::BeforeValue => {
                    if is_ws(b) {
                    } else if b == b'"' {
                        self.val_is_str = true;
                        self.esc = false;
                        self.state = J::Str;
                    } else if b == b'{' || b == b'[' {
                        self.val_is_str = false;
                        self.depth = 1;
                        self.in_str = false;
                        self.esc = false;
                        self.state = J::Nested;
                        match self.fp {
                            // `messages` must be an array of messages to say anything.
                            Some(Field::Messages) if b != b'[' => self.fp = None,
                            Some(Field::Prompt) => self.fingerprint(b),
                            _ => {}
                        }
                    } else if b == b',' || b == b'}' || b == b']' || b == b':' {
                        self.state = J::Invalid("expected a value");
                    } else {
                        self.val_is_str = false;
                        if self.fp == Some(Field::Messages) {
                            self.fp = None;
                        }
                        self.state = J::Scalar;
                        continue; // the byte is the scalar's first
                    }
                }
                J::Str => {
                    if self.esc {
                        self.esc = false;
                    } else if b == b'\\' {
                        self.esc = true;
                    } else if b == b'"' {
                        self.end_value();
                        i += 1;
                        continue;
                    }
                    self.keep(b);
                }
                J::Scalar => {
                    if is_ws(b) || b == b',' || b == b'}' || b == b']' {
                        self.end_value();
                        continue; // the delimiter is read by AfterValue
                    }
                    self.keep(b);
                }
                J::Nested => {
                    if self.fp.is_some() {
                        // A message's bytes run from its opening bracket to its closing one.
                        let opens_message = !self.in_str && self.depth == 1 && (b == b'{' || b == b'[');
                        if self.fp == Some(Field::Prompt) || self.depth >= 2 || opens_message {
                            self.fingerprint(b);
                        }
                    }
                    if self.in_str {
                        if self.esc {
                            self.esc = false;
                        } else if b == b'\\' {
                            self.esc = true;
                        } else if b == b'"' {
                            self.in_str = false;
                        }
                    } else {
                        match b {
                            b'"' => self.in_str = true,
                            b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 1 && self.fp == Some(Field::Messages) {
                                    if let Some(h) = self.found.prefix.as_mut() {
                                        h.end_message();
                                    }
                                }
                                if self.depth == 0 {
                                    self.end_value();
                                }
                            }
                            _ => {}
                        }
                    }
                }
                J::AfterValue => {
                    if b == b',' {
                        self.state = J::BeforeKey { first: false };
                    } else if b == b'}' {
                        self.state = J::Done;
                    } else if !is_ws(b) {
                        self.state = J::Invalid("expected ',' or '}' after a value");
                    }
                }
            }
            i += 1;
        }
        self.answer()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    /// Looking for the first delimiter.
    Preamble,
    /// Just after a delimiter: `--` (the end), or optional blanks and CRLF (a part follows).
    AfterDelim,
    AfterDash,
    AfterCr,
    Headers,
    Body,
    Done,
    Invalid(&'static str),
}

/// Streaming reader of the `model` and `stream` fields of a `multipart/form-data` body.
#[derive(Debug)]
pub struct MultipartScanner {
    /// `\r\n--` + boundary, and its KMP failure table.
    delim: Vec<u8>,
    fail: Vec<usize>,
    matched: usize,
    state: M,
    headers: Vec<u8>,
    target: Option<Field>,
    val: Vec<u8>,
    found: Found,
}

impl MultipartScanner {
    pub fn new(boundary: &str) -> MultipartScanner {
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        let mut fail = vec![0; delim.len()];
        let mut k = 0;
        for q in 1..delim.len() {
            while k > 0 && delim[k] != delim[q] {
                k = fail[k - 1];
            }
            if delim[k] == delim[q] {
                k += 1;
            }
            fail[q] = k;
        }
        // The first delimiter may start the body: begin as if a CRLF had been seen.
        MultipartScanner { delim, fail, matched: 2, state: M::Preamble, headers: Vec::new(), target: None, val: Vec::new(), found: Found::default() }
    }

    /// Advances the delimiter matcher by one byte; true when a whole delimiter just ended.
    fn step(&mut self, b: u8) -> bool {
        while self.matched > 0 && self.delim[self.matched] != b {
            self.matched = self.fail[self.matched - 1];
        }
        if self.delim[self.matched] == b {
            self.matched += 1;
        }
        if self.matched == self.delim.len() {
            self.matched = 0;
            return true;
        }
        false
    }

    fn answer(&self) -> Scan {
        match self.state {
            M::Done => Scan::Done(self.found.fields.clone()),
            M::Invalid(why) => Scan::Invalid(why),
            _ => Scan::Incomplete,
        }
    }

    pub fn finish(&mut self) -> Scan {
        match self.answer() {
            Scan::Incomplete => {
                self.state = M::Invalid("body ended before the closing multipart delimiter");
                self.answer()
            }
            a => a,
        }
    }

    /// The `name` of a part, from its header block.
    fn part_name(headers: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(headers);
        for line in text.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else { continue };
            if !k.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for p in v.split(';').skip(1) {
                let Some((pk, pv)) = p.split_once('=') else { continue };
                if pk.trim().eq_ignore_ascii_case("name") {
                    let pv = pv.trim();
                    return Some(pv.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(pv).to_string());
                }
            }
        }
        None
    }

    fn end_part(&mut self) {
        if let Some(f) = self.target.take() {
            let len = self.val.len().saturating_sub(self.delim.len());
            self.val.truncate(len);
            match f {
                Field::Model => match String::from_utf8(std::mem::take(&mut self.val)) {
                    Ok(m) => self.found.set(f, Some(m), false),
                    Err(_) => {
                        self.state = M::Invalid("model form field is not UTF-8");
                        return;
                    }
                },
                Field::Stream => {
                    // As a form-to-bool coercion (pydantic, which vLLM uses) reads it.
                    let v = String::from_utf8_lossy(&self.val).trim().to_ascii_lowercase();
                    self.found.set(f, None, matches!(v.as_str(), "true" | "1" | "t" | "yes" | "y" | "on"));
                }
                // A form scanner never asks for them.
                Field::User | Field::Messages | Field::Prompt => {}
            }
            self.val.clear();
        }
        self.state = if self.found.both() { M::Done } else { M::AfterDelim };
    }

    /// Feeds the next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.state {
                M::Done | M::Invalid(_) => break,
                M::Preamble => {
                    if self.step(b) {
                        self.state = M::AfterDelim;
                    }
                }
                M::AfterDelim => match b {
                    b'-' => self.state = M::AfterDash,
                    b'\r' => self.state = M::AfterCr,
                    b' ' | b'\t' => {}
                    _ => self.state = M::Invalid("bad multipart delimiter line"),
                },
                M::AfterDash => {
                    // The closing delimiter: the form has ended.
                    self.state = if b == b'-' { M::Done } else { M::Invalid("bad multipart delimiter line") };
                }
                M::AfterCr => {
                    if b == b'\n' {
                        self.headers.clear();
                        self.state = M::Headers;
                    } else {
                        self.state = M::Invalid("bad multipart delimiter line");
                    }
                }
                M::Headers => {
                    self.headers.push(b);
                    if self.headers == b"\r\n" || self.headers.ends_with(b"\r\n\r\n") {
                        let name = Self::part_name(&self.headers);
                        self.target = name.and_then(|n| self.found.wants(n.as_bytes()));
                        self.val.clear();
                        self.matched = 0;
                        self.state = M::Body;
                    } else if self.headers.len() > MAX_PART_HEADERS {
                        self.state = M::Invalid("multipart part headers too long");
                    }
                }
                M::Body => {
                    if self.target.is_some() {
                        if self.val.len() > MAX_MODEL_BYTES + self.delim.len() {
                            self.state = M::Invalid("model/stream form field too long");
                            continue;
                        }
                        self.val.push(b);
                    }
                    if self.step(b) {
                        self.end_part();
                    }
                }
            }
            i += 1;
        }
        self.answer()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
}
