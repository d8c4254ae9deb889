//! The JSON body scanner: the top-level keys of one object, every other value skipped without
//! being built.

use super::*;
use crate::affinity::{AffinityConfig, PrefixHasher};

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
        // Room for a key and a short value from the start: grown a byte run at a time, these
        // were most of the scan's allocations.
        JsonScanner { state: J::Start, esc: false, in_str: false, depth: 0, key: Vec::with_capacity(MAX_KEY_BYTES), key_long: false, target: None, val: Vec::with_capacity(32), val_is_str: false, found: Found::default(), fp: None }
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

    /// Bytes of the current value (a string's raw bytes, or a number's): kept for the wanted
    /// field, and for the fingerprint when the value is `prompt`.
    fn keep(&mut self, bytes: &[u8]) {
        if self.fp == Some(Field::Prompt) {
            if let Some(h) = self.found.prefix.as_mut() {
                h.push(bytes, true);
            }
        }
        if self.target.is_some() {
            // `stream` only matters when it is `true`: a few bytes tell.
            let cap = match self.target {
                Some(Field::Stream) => 8,
                Some(Field::User) => MAX_USER_BYTES + 1,
                _ => MAX_MODEL_BYTES,
            };
            let room = cap.saturating_sub(self.val.len());
            self.val.extend_from_slice(&bytes[..bytes.len().min(room)]);
            if bytes.len() > room && self.target == Some(Field::Model) {
                self.state = J::Invalid("model name too long");
            }
            // A `stream` value longer than the cap is not `true`: the rest need not be kept.
        }
    }

    /// A key's bytes: kept up to `MAX_KEY_BYTES`.
    fn keep_key(&mut self, bytes: &[u8]) {
        let room = MAX_KEY_BYTES.saturating_sub(self.key.len());
        self.key.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if bytes.len() > room {
            self.key_long = true;
        }
    }

    /// Inside a string (a key, a value, or a string in a nested value) with no escape pending:
    /// the bytes before the next quote or backslash, taken as one run. They end nothing and
    /// start nothing; they are only kept (a prompt is mostly such runs, read here with one
    /// search instead of a step per byte).
    fn string_run(&mut self, run: &[u8]) {
        match self.state {
            J::Key => self.keep_key(run),
            J::Str => self.keep(run),
            // Within a string the depth does not change and no message opens.
            J::Nested if self.fp == Some(Field::Prompt) || (self.fp.is_some() && self.depth >= 2) => self.fingerprint(run),
            _ => {}
        }
    }

    /// Bytes of a nested `messages` message or `prompt` array for the fingerprint.
    fn fingerprint(&mut self, bytes: &[u8]) {
        let prompt = self.fp == Some(Field::Prompt);
        if let Some(h) = self.found.prefix.as_mut() {
            h.push(bytes, prompt);
        }
    }

    /// Feeds the next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        while i < chunk.len() {
            let in_string = match self.state {
                J::Key | J::Str => !self.esc,
                J::Nested => self.in_str && !self.esc,
                _ => false,
            };
            if in_string {
                let end = crate::json_string_stop(chunk, i, false).unwrap_or(chunk.len());
                if end > i {
                    self.string_run(&chunk[i..end]);
                    i = end;
                    continue;
                }
            }
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
                    self.keep_key(&[b]);
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
                            Some(Field::Prompt) => self.fingerprint(&[b]),
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
                    self.keep(&[b]);
                }
                J::Scalar => {
                    if is_ws(b) || b == b',' || b == b'}' || b == b']' {
                        self.end_value();
                        continue; // the delimiter is read by AfterValue
                    }
                    self.keep(&[b]);
                }
                J::Nested => {
                    if self.fp.is_some() {
                        // A message's bytes run from its opening bracket to its closing one.
                        let opens_message = !self.in_str && self.depth == 1 && (b == b'{' || b == b'[');
                        if self.fp == Some(Field::Prompt) || self.depth >= 2 || opens_message {
                            self.fingerprint(&[b]);
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
