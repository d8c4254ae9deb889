//! Test helpers: start the real `fake-vllm` binary, a raw HTTP/1.1 client that shows exactly
//! what went over the wire (including a truncated chunked body), and a Prometheus text parser
//! that accepts `:` in metric names (the `prometheus-parse` crate's `\w+` does not).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/vllm-0.32.0-cpu/");

pub fn capture(name: &str) -> String {
    let path = format!("{DATA}{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// A running `fake-vllm` process, killed (by PID) when dropped.
pub struct Worker {
    child: Child,
    pub addr: String,
    /// Its stderr lines, when started with [`Worker::start_logged`].
    log: Option<mpsc::Receiver<String>>,
}

impl Worker {
    /// Starts the binary on port 0 and waits for its `LISTENING <ip>:<port>` line.
    pub fn start(args: &[&str]) -> Worker {
        Self::spawn(args, false)
    }

    /// Like [`Worker::start`], with its stderr read line by line for [`Worker::wait_log`].
    pub fn start_logged(args: &[&str]) -> Worker {
        Self::spawn(args, true)
    }

    fn spawn(args: &[&str], logged: bool) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake-vllm"))
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(if logged { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .expect("spawn fake-vllm");
        let log = child.stderr.take().map(|stderr| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("{line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addr = match (read, line.strip_prefix("LISTENING ")) {
            (Ok(_), Some(addr)) => addr.trim().to_owned(),
            (r, _) => {
                let _ = child.kill();
                panic!("no LISTENING line from fake-vllm: {r:?} {line:?}");
            }
        };
        Worker { child, addr, log }
    }

    /// Waits (at most `within`) for a stderr line containing `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) {
        let rx = self.log.as_ref().expect("started with start_logged");
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?} within {within:?}: {e}"),
            }
        }
    }

    /// Collects stderr lines containing `needle` until there are `n` of them (at most `within`).
    pub fn log_lines(&self, needle: &str, n: usize, within: Duration) -> Vec<String> {
        let rx = self.log.as_ref().expect("started with start_logged");
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => out.push(line),
                Ok(_) => {}
                Err(e) => panic!("{} of {n} log lines with {needle:?} within {within:?}: {e}", out.len()),
            }
        }
        out
    }

    /// Sends a signal (`USR1`, `USR2`, ...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// A POST with any content type and a binary body.
    pub fn post_bytes(&self, path: &str, content_type: &str, body: &[u8]) -> Response {
        Exchange::open_bytes(&self.addr, "POST", path, content_type, body)
            .expect("request")
            .finish()
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(&self.addr, "POST", path, Some(body))
    }

    pub fn metrics(&self) -> Exposition {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        Exposition::parse(&r.text())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 exchange read incrementally from a plain TCP socket.
pub struct Exchange {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Exchange {
    /// Sends the request and reads the status line and headers.
    pub fn open(addr: &str, method: &str, path: &str, body: Option<&str>) -> io::Result<Exchange> {
        let body = body.unwrap_or("");
        Self::open_bytes(addr, method, path, "application/json", body.as_bytes())
    }

    pub fn open_bytes(
        addr: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> io::Result<Exchange> {
        let mut sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        // A server may answer (413) and close before taking a big body: read the answer anyway.
        let _ = sock.write_all(&req);
        let mut reader = BufReader::new(sock);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("no status line: {line:?}"),
                )
            })?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        Ok(Exchange {
            reader,
            status,
            headers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// How long a read may wait before it fails with `WouldBlock`/`TimedOut`.
    pub fn set_read_timeout(&self, d: Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(d))
            .expect("set_read_timeout");
    }

    /// `true` when nothing at all arrives within `d` (and the connection stays open).
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.set_read_timeout(d);
        let silent = match self.reader.fill_buf() {
            // Bytes, or the close (an empty read): either way not silent.
            Ok(_) => false,
            Err(e) => matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        };
        self.set_read_timeout(Duration::from_secs(20));
        silent
    }

    /// The next chunk of a chunked body: `Ok(None)` at the terminating zero-size chunk, an
    /// error when the connection ends first.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = usize::from_str_radix(line.trim(), 16).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad chunk size {line:?}"),
            )
        })?;
        let mut data = vec![0; size + 2];
        self.reader.read_exact(&mut data)?;
        if &data[size..] != b"\r\n" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk without CRLF",
            ));
        }
        data.truncate(size);
        Ok(if size == 0 { None } else { Some(data) })
    }

    /// Reads the rest of the body.
    pub fn finish(mut self) -> Response {
        let mut body = Vec::new();
        let mut chunks = Vec::new();
        let mut error = None;
        if self.header("transfer-encoding") == Some("chunked") {
            loop {
                match self.next_chunk() {
                    Ok(Some(c)) => {
                        body.extend_from_slice(&c);
                        chunks.push(c);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
        } else if let Some(len) = self.header("content-length").and_then(|v| v.parse().ok()) {
            body = vec![0; len];
            if let Err(e) = self.reader.read_exact(&mut body) {
                error = Some(e);
            }
        } else if let Err(e) = self.reader.read_to_end(&mut body) {
            error = Some(e);
        }
        Response {
            status: self.status,
            headers: self.headers,
            body,
            chunks,
            error,
        }
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Chunks of a chunked body, as framed by the server.
    pub chunks: Vec<Vec<u8>>,
    /// Set when the body did not end cleanly (connection closed or reset mid-body).
    pub error: Option<io::Error>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Response {
    Exchange::open(addr, method, path, body)
        .expect("request")
        .finish()
}

/// SSE `data:` payloads of a body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// Typed SSE events of a body (`event: <type>` + `data: <json>`), as the Responses API sends.
pub fn sse_typed_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (event, data) = e
                .strip_prefix("event: ")
                .and_then(|r| r.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an `event:` + `data:` pair: {e:?}"));
            let data = serde_json::from_str(data)
                .unwrap_or_else(|err| panic!("data is not JSON ({err}): {data}"));
            (event.to_owned(), data)
        })
        .collect()
}

/// One parsed Prometheus text exposition.
pub struct Exposition {
    /// `# TYPE` lines: family name → type.
    pub types: BTreeMap<String, String>,
    /// Samples: (name, labels, value).
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
                types.insert(name.to_owned(), kind.trim().to_owned());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels end with }");
                    let labels = inner
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label is k=\"v\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Exposition { types, samples }
    }

    /// The family a sample belongs to (`x_bucket` → `x` for histograms).
    pub fn family_of(&self, sample: &str) -> Option<String> {
        if self.types.contains_key(sample) {
            return Some(sample.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            matches!(
                self.types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
            .then(|| base.to_owned())
        })
    }

    /// Label names of each sample name, `le` left out.
    pub fn label_names(&self) -> BTreeMap<String, BTreeSet<BTreeSet<String>>> {
        let mut out: BTreeMap<String, BTreeSet<BTreeSet<String>>> = BTreeMap::new();
        for (name, labels, _) in &self.samples {
            let keys = labels.keys().filter(|k| *k != "le").cloned().collect();
            out.entry(name.clone()).or_default().insert(keys);
        }
        out
    }

    /// The value of the one sample `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let hits: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "expected one sample {name} {labels:?}, got {hits:?}"
        );
        hits[0]
    }
}
