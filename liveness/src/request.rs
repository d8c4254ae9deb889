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

use crate::affinity::{AffinityConfig, PrefixHasher};

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

mod json;
mod multipart;

pub use json::JsonScanner;
pub use multipart::MultipartScanner;

#[cfg(test)]
mod tests;
