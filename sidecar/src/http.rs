//! A minimal, bounded HTTP/1.1 GET for `http://host:port/path`: enough for a Prometheus scrape
//! on the same host, with a hard deadline, a size cap, and chunked or length-framed bodies.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("unsupported URL {0:?}: only http://host:port/path")]
    BadUrl(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("response over {0} bytes")]
    TooLarge(usize),
}

/// Splits `http://host:port/path` into (`host:port`, `/path`).
pub fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| HttpError::BadUrl(url.into()))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if hostport.is_empty() {
        return Err(HttpError::BadUrl(url.into()));
    }
    let hostport = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((hostport, path.to_string()))
}

/// GETs `url`, returning the body as text. Any failure is an error; nothing is retried.
pub fn get(url: &str, timeout: Duration, max_bytes: usize) -> Result<String, HttpError> {
    get_lines(url, timeout, max_bytes, |_| true)
}

/// GETs `url` and returns only the body's lines `keep` accepts (each with its `\n`), read as
/// they arrive: a page of many megabytes is never held whole, only its kept lines and one
/// partial line (bounded: a line over [`MAX_LINE`] bytes is dropped unread). `max_bytes` bounds
/// what is read in all, head and body.
pub fn get_lines(url: &str, timeout: Duration, max_bytes: usize, keep: impl FnMut(&[u8]) -> bool) -> Result<String, HttpError> {
    let deadline = Instant::now() + timeout;
    let (hostport, path) = split_url(url)?;
    let addr = hostport
        .to_socket_addrs()
        .map_err(HttpError::Connect)?
        .next()
        .ok_or_else(|| HttpError::BadUrl(url.into()))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(HttpError::Connect)?;
    let left = |d: Instant| d.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
    s.set_write_timeout(Some(left(deadline).ok_or(HttpError::Timeout(timeout))?))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")?;
    let mut reader = Reader::new(max_bytes);
    let mut lines = Lines::new(keep);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Some(l) = left(deadline) else { return Err(HttpError::Timeout(timeout)) };
        s.set_read_timeout(Some(l))?;
        match s.read(&mut buf) {
            Ok(0) => {
                reader.finish()?;
                break;
            }
            Ok(n) => {
                // A keep-alive server that sent the whole body must not stall us.
                if reader.feed(&buf[..n], &mut |d| lines.push(d))? {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(HttpError::Timeout(timeout))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    String::from_utf8(lines.finish()).map_err(|_| HttpError::Malformed("body is not UTF-8"))
}

/// Parses a whole HTTP/1.x response; returns the body of a 200.
pub fn parse_response(raw: &[u8]) -> Result<String, HttpError> {
    parse_response_lines(raw, |_| true)
}

/// [`parse_response`] keeping only the body's lines `keep` accepts: what [`get_lines`] returns
/// for the same bytes, whatever reads they arrive in.
pub fn parse_response_lines(raw: &[u8], keep: impl FnMut(&[u8]) -> bool) -> Result<String, HttpError> {
    parse_response_reads([raw], keep)
}

/// [`parse_response_lines`] over a response that arrives in `reads`, as [`get_lines`] reads it
/// from its socket (the end of the reads is the end of the connection).
pub fn parse_response_reads<'a>(reads: impl IntoIterator<Item = &'a [u8]>, keep: impl FnMut(&[u8]) -> bool) -> Result<String, HttpError> {
    let mut reader = Reader::new(usize::MAX);
    let mut lines = Lines::new(keep);
    let mut complete = false;
    for read in reads {
        if reader.feed(read, &mut |d| lines.push(d))? {
            complete = true;
            break;
        }
    }
    if !complete {
        reader.finish()?;
    }
    String::from_utf8(lines.finish()).map_err(|_| HttpError::Malformed("body is not UTF-8"))
}

/// Longest line [`Lines`] keeps: a `/metrics` line this long is not one of vLLM's numbers.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest response head, and longest chunk-size or trailer line.
const MAX_HEAD: usize = 64 * 1024;

/// An HTTP/1.x response read incrementally: the head (a 200, else [`HttpError::Status`]), then
/// the body, framed by `content-length`, chunked, or by the end of the connection, passed on
/// de-chunked as it arrives.
struct Reader {
    state: State,
    /// Bytes read so far, head included, against `max_bytes`.
    seen: usize,
    max_bytes: usize,
}

enum State {
    Head(Vec<u8>),
    Length(usize),
    ChunkSize(Vec<u8>),
    ChunkData(usize),
    /// The CRLF after a chunk's data: bytes of it still expected.
    ChunkEnd(usize),
    /// After the last chunk: trailer lines until an empty one (the current line so far).
    Trailers(Vec<u8>),
    UntilClose,
    Done,
}

impl Reader {
    fn new(max_bytes: usize) -> Self {
        Reader { state: State::Head(Vec::new()), seen: 0, max_bytes }
    }

    /// Takes the next bytes; body bytes go to `sink`. `Ok(true)` once the response is complete.
    fn feed(&mut self, mut input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<bool, HttpError> {
        self.seen = self.seen.saturating_add(input.len());
        if self.seen > self.max_bytes {
            return Err(HttpError::TooLarge(self.max_bytes));
        }
        while !input.is_empty() {
            match &mut self.state {
                State::Head(head) => {
                    // The end of the head may straddle two reads: look from 3 bytes back.
                    let from = head.len().saturating_sub(3);
                    head.extend_from_slice(input);
                    let Some(end) = head[from..].windows(4).position(|w| w == b"\r\n\r\n").map(|i| from + i + 4) else {
                        if head.len() > MAX_HEAD {
                            return Err(HttpError::Malformed("response head too long"));
                        }
                        return Ok(false);
                    };
                    let rest = head.split_off(end);
                    self.state = body_state(head)?;
                    input = &[];
                    if !rest.is_empty() {
                        return self.feed_body(&rest, sink);
                    }
                }
                _ => return self.feed_body(input, sink),
            }
        }
        Ok(matches!(self.state, State::Done))
    }

    fn feed_body(&mut self, mut input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<bool, HttpError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Head(_) => unreachable!("the head is read by feed"),
                State::Length(left) => {
                    let n = input.len().min(*left);
                    sink(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.state = State::Done;
                    }
                }
                State::UntilClose => {
                    sink(input);
                    input = &[];
                }
                State::ChunkSize(line) => {
                    let (taken, nl) = take_line(line, input, "bad chunk header")?;
                    input = &input[taken..];
                    if nl {
                        let size = chunk_size(line)?;
                        self.state = if size == 0 { State::Trailers(Vec::new()) } else { State::ChunkData(size) };
                    }
                }
                State::ChunkData(left) => {
                    let n = input.len().min(*left);
                    sink(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(need) => {
                    let want = &b"\r\n"[2 - *need..];
                    let n = input.len().min(*need);
                    if input[..n] != want[..n] {
                        return Err(HttpError::Malformed("truncated chunk"));
                    }
                    *need -= n;
                    input = &input[n..];
                    if *need == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line) => {
                    let (taken, nl) = take_line(line, input, "bad trailer")?;
                    input = &input[taken..];
                    if nl {
                        if line.iter().all(|b| *b == b'\r' || *b == b'\n') {
                            self.state = State::Done;
                        } else {
                            line.clear();
                        }
                    }
                }
                State::Done => return Ok(true),
            }
        }
        Ok(matches!(self.state, State::Done))
    }

    /// The connection ended: fine for a body framed by the close, an error anywhere else.
    fn finish(&mut self) -> Result<(), HttpError> {
        match self.state {
            State::Done | State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            State::Head(_) => Err(HttpError::Malformed("no end of headers")),
            State::Length(_) => Err(HttpError::Malformed("body shorter than content-length")),
            _ => Err(HttpError::Malformed("truncated chunk")),
        }
    }
}

/// Appends `input` up to and including its first `\n` to `line`: (bytes taken, line complete).
fn take_line(line: &mut Vec<u8>, input: &[u8], what: &'static str) -> Result<(usize, bool), HttpError> {
    let (n, nl) = match input.iter().position(|b| *b == b'\n') {
        Some(i) => (i + 1, true),
        None => (input.len(), false),
    };
    line.extend_from_slice(&input[..n]);
    if line.len() > MAX_HEAD {
        return Err(HttpError::Malformed(what));
    }
    Ok((n, nl))
}

fn chunk_size(line: &[u8]) -> Result<usize, HttpError> {
    let s = std::str::from_utf8(line).map_err(|_| HttpError::Malformed("bad chunk size"))?;
    let s = s.split(';').next().unwrap_or("").trim();
    usize::from_str_radix(s, 16).map_err(|_| HttpError::Malformed("bad chunk size"))
}

/// The body's framing, from a complete head (which must be a 200).
fn body_state(head: &[u8]) -> Result<State, HttpError> {
    let head = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("headers are not UTF-8"))?;
    let status_line = head.lines().next().ok_or(HttpError::Malformed("empty response"))?;
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(HttpError::Malformed("not an HTTP/1.x status line"));
    }
    let status: u16 = parts.next().and_then(|c| c.parse().ok()).ok_or(HttpError::Malformed("bad status code"))?;
    if status != 200 {
        return Err(HttpError::Status(status));
    }
    let lower = head.to_ascii_lowercase();
    if lower.contains("transfer-encoding: chunked") {
        return Ok(State::ChunkSize(Vec::new()));
    }
    match lower.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse::<usize>()) {
        Some(Ok(0)) => Ok(State::Done),
        Some(Ok(len)) => Ok(State::Length(len)),
        Some(Err(_)) => Err(HttpError::Malformed("bad content-length")),
        None => Ok(State::UntilClose),
    }
}

/// Splits a body into lines as it arrives and keeps those `keep` accepts.
struct Lines<K: FnMut(&[u8]) -> bool> {
    partial: Vec<u8>,
    /// The current line grew past [`MAX_LINE`]: dropped up to its end.
    skipping: bool,
    out: Vec<u8>,
    keep: K,
}

impl<K: FnMut(&[u8]) -> bool> Lines<K> {
    fn new(keep: K) -> Self {
        Lines { partial: Vec::new(), skipping: false, out: Vec::new(), keep }
    }

    fn push(&mut self, mut data: &[u8]) {
        while let Some(i) = data.iter().position(|b| *b == b'\n') {
            let (piece, rest) = data.split_at(i + 1);
            if !self.skipping {
                if self.partial.is_empty() {
                    self.offer(piece);
                } else {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(piece);
                    self.offer(&line);
                }
            }
            self.partial.clear();
            self.skipping = false;
            data = rest;
        }
        if !self.skipping {
            self.partial.extend_from_slice(data);
            if self.partial.len() > MAX_LINE {
                self.partial = Vec::new();
                self.skipping = true;
            }
        }
    }

    /// A whole line, `\n` included.
    fn offer(&mut self, line: &[u8]) {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if (self.keep)(text) {
            self.out.extend_from_slice(line);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if !self.skipping && !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            if (self.keep)(&last) {
                self.out.extend_from_slice(&last);
            }
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(split_url("http://127.0.0.1:8000/metrics").unwrap(), ("127.0.0.1:8000".into(), "/metrics".into()));
        assert_eq!(split_url("http://localhost/metrics").unwrap(), ("localhost:80".into(), "/metrics".into()));
        assert!(split_url("https://x/metrics").is_err());
        assert!(split_url("http:///metrics").is_err());
    }

    /// The incremental reader gives the same answer however the response is cut into reads.
    #[test]
    fn responses_split_anywhere() {
        let cases: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi\nyo",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhi\n\r\n2;x=1\r\nyo\r\n0\r\nX-T: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nhi\nyo",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ];
        for raw in cases {
            let whole = parse_response(raw).unwrap();
            for cut in 0..=raw.len() {
                let mut r = Reader::new(usize::MAX);
                let mut body = Vec::new();
                let done = r.feed(&raw[..cut], &mut |d| body.extend_from_slice(d)).unwrap() || r.feed(&raw[cut..], &mut |d| body.extend_from_slice(d)).unwrap();
                if !done {
                    r.finish().unwrap();
                }
                assert_eq!(String::from_utf8(body).unwrap(), whole, "cut at {cut}");
            }
            for step in 1..=raw.len().max(1) {
                assert_eq!(parse_response_reads(raw.chunks(step), |_| true).unwrap(), whole, "reads of {step}");
            }
        }
    }

    #[test]
    fn lines_keep_what_is_asked_and_bound_long_lines() {
        let mut l = Lines::new(|t: &[u8]| t.starts_with(b"k"));
        for piece in [&b"ka 1\nx"[..], b"x 2\nk", b"b 3\r\n", b"kc"] {
            l.push(piece);
        }
        assert_eq!(l.finish(), b"ka 1\nkb 3\r\nkc");
        let mut l = Lines::new(|_: &[u8]| true);
        l.push(&vec![b'k'; MAX_LINE + 10]);
        l.push(b"tail\nkeep\n");
        assert_eq!(l.finish(), b"keep\n", "the over-long line is dropped whole");
    }

    #[test]
    fn responses() {
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").unwrap(), "hi");
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n").unwrap(), "hi!");
        assert!(matches!(parse_response(b"HTTP/1.1 500 X\r\n\r\n"), Err(HttpError::Status(500))));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhi").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}
