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
    let mut raw = Vec::with_capacity(64 * 1024);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let Some(l) = left(deadline) else { return Err(HttpError::Timeout(timeout)) };
        s.set_read_timeout(Some(l))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > max_bytes {
                    return Err(HttpError::TooLarge(max_bytes));
                }
                if response_complete(&raw) {
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
    parse_response(&raw)
}

fn header_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// True once a length-framed or chunked body is complete (so keep-alive servers don't stall us).
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = header_end(raw) else { return false };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok()) {
        return raw.len() >= end + len;
    }
    head.contains("transfer-encoding: chunked") && raw.ends_with(b"0\r\n\r\n")
}

/// Parses a whole HTTP/1.x response; returns the body of a 200.
pub fn parse_response(raw: &[u8]) -> Result<String, HttpError> {
    let end = header_end(raw).ok_or(HttpError::Malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| HttpError::Malformed("headers are not UTF-8"))?;
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
    let body = &raw[end..];
    let body = if lower.contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else if let Some(len) = lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok()) {
        if body.len() < len {
            return Err(HttpError::Malformed("body shorter than content-length"));
        }
        body[..len].to_vec()
    } else {
        body.to_vec()
    };
    String::from_utf8(body).map_err(|_| HttpError::Malformed("body is not UTF-8"))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::with_capacity(b.len());
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or(HttpError::Malformed("bad chunk header"))?;
        let size_str = std::str::from_utf8(&b[..nl]).map_err(|_| HttpError::Malformed("bad chunk size"))?;
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| HttpError::Malformed("bad chunk size"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(HttpError::Malformed("truncated chunk"));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
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
