//! The `multipart/form-data` body scanner: the `model` and `stream` parts, file parts skipped.

use super::*;

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
