//! The telemetry frame: one UDP datagram of at most [`MAX_FRAME_LEN`] bytes that a sidecar
//! sends after each scrape of vLLM's `/metrics`.
//!
//! (Over 500 lines on purpose: the three wire versions' encoding and total decoding stay side by
//! side, so that a change to one is made against the others, with the borrowed form decoding
//! yields ([`FrameRef`]); its tests are in `frame/tests.rs`.)
//!
//! It carries identity (worker, pool, serving address, models, boot id), ordering (sequence,
//! send time) and raw numbers copied from vLLM. It carries no health flag: a worker never says
//! it is healthy, it only stops sending when it dies. It never carries prompts or tokens.
//!
//! Wire layout (version 3, all integers big-endian; version 2 is the same without the adapter
//! list, version 1 also with 8 metrics; both are read too, so that sidecars can be upgraded
//! after the receivers):
//!
//! ```text
//! 0   "GH"          magic
//! 2   u8            version (2)
//! 3   u16           key id (which HMAC key signed it; lets keys rotate)
//! 5   u64           boot id (random per sidecar start)
//! 13  u64           sequence (starts at 1 for each boot id)
//! 21  u64           send time, ms since the Unix epoch
//! 29  str8          worker id     (str8 = u8 length + UTF-8 bytes, 1..=64 bytes)
//!     str8          pool id
//!     u8 + bytes    serving address: 4 (IPv4, 4 bytes) or 6 (IPv6, 16 bytes), then u16 port
//!     u8            model count (0..=8), then that many str8
//!     u8            adapter count (0..=8), then that many str8 (version 3): LoRA adapters
//!                   loaded on the worker, most recently active first (see `crate::lora`)
//!     u16           presence bits, one per metric below (absent metrics are sent as 0)
//!     f64 x 9       running, waiting, kv-cache usage (0..1), TTFT histogram sum (s),
//!                   TTFT histogram count, prompt tokens total, generation tokens total,
//!                   preemptions total, engine steps total (version 2)
//!     [u8; 32]      HMAC-SHA256 over every byte before it
//! ```
//!
//! Decoding is total: any byte string yields a [`Frame`] or a typed [`FrameError`].
//!
//! Size: everything above must fit in [`MAX_FRAME_LEN`]. Identity and models are refused at
//! encode when they do not fit (a configuration error); the adapter list is a hint, so the
//! sender trims it instead ([`Frame::fit_adapters`]: the least recently active go first, and the
//! sender counts them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Largest frame, in bytes: one UDP datagram that never fragments.
pub const MAX_FRAME_LEN: usize = 512;
/// Wire version written by [`Frame::encode`].
pub const VERSION: u8 = 3;
/// Metrics a frame of each readable version carries.
const METRICS_V1: usize = 8;
const METRICS_V2: usize = 9;

fn metric_count(version: u8) -> Option<usize> {
    match version {
        1 => Some(METRICS_V1),
        2 | 3 => Some(METRICS_V2),
        _ => None,
    }
}

/// Whether frames of this (readable) version carry the adapter list.
fn has_adapters(version: u8) -> bool {
    version >= 3
}
const MAGIC: [u8; 2] = *b"GH";
const TAG_LEN: usize = 32;
/// Longest worker id, pool id or model name a frame carries (bytes).
pub const MAX_STR: usize = 64;
const MAX_MODELS: usize = 8;
/// Most adapters a frame carries.
pub const MAX_ADAPTERS: usize = 8;
const HEADER_LEN: usize = 29;
// [`Names`] holds either list.
const _: () = assert!(MAX_MODELS <= MAX_ADAPTERS);

type HmacSha256 = Hmac<Sha256>;

/// Why a byte string is not an accepted frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is {0} bytes, over the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("frame is truncated: needed {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("not a GPU HA frame (bad magic)")]
    BadMagic,
    #[error("frame version {0} is not supported (this build reads versions 1 to {VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame signed with key id {0}, which this receiver does not have")]
    UnknownKey(u16),
    #[error("frame authentication failed (wrong key or altered bytes)")]
    BadMac,
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("cannot encode frame: {0}")]
    Encode(&'static str),
}

/// Raw numbers scraped from vLLM. `None` means the metric was not on the page.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    /// `vllm:num_requests_running`
    pub running: Option<f64>,
    /// `vllm:num_requests_waiting`
    pub waiting: Option<f64>,
    /// `vllm:kv_cache_usage_perc` (older: `vllm:gpu_cache_usage_perc`), a 0..1 fraction.
    pub kv_usage: Option<f64>,
    /// `vllm:time_to_first_token_seconds_sum`
    pub ttft_sum_s: Option<f64>,
    /// `vllm:time_to_first_token_seconds_count`
    pub ttft_count: Option<f64>,
    /// `vllm:prompt_tokens_total`
    pub prompt_tokens: Option<f64>,
    /// `vllm:generation_tokens_total`
    pub generation_tokens: Option<f64>,
    /// `vllm:num_preemptions_total`
    pub preemptions: Option<f64>,
    /// `vllm:iteration_tokens_total_count`: engine steps that emitted a token. With the other
    /// engine numbers, what tells a busy engine from a hung one (see `fleet::evidence`).
    pub engine_steps: Option<f64>,
}

impl Metrics {
    fn fields(&self) -> [Option<f64>; METRICS_V2] {
        [
            self.running,
            self.waiting,
            self.kv_usage,
            self.ttft_sum_s,
            self.ttft_count,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.engine_steps,
        ]
    }

    fn from_fields(f: [Option<f64>; METRICS_V2]) -> Self {
        Metrics {
            running: f[0],
            waiting: f[1],
            kv_usage: f[2],
            ttft_sum_s: f[3],
            ttft_count: f[4],
            prompt_tokens: f[5],
            generation_tokens: f[6],
            preemptions: f[7],
            engine_steps: f[8],
        }
    }
}

/// One decoded, authenticated frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub key_id: u16,
    pub boot_id: u64,
    pub seq: u64,
    pub sent_ms: u64,
    pub worker_id: String,
    pub pool_id: String,
    pub addr: SocketAddr,
    pub models: Vec<String>,
    /// LoRA adapters loaded on the worker (served under their own model names), most recently
    /// active first, at most [`MAX_ADAPTERS`]; empty in version 1 and 2 frames.
    pub adapters: Vec<String>,
    pub metrics: Metrics,
}

/// HMAC keys by key id. A receiver holds every key that is still valid during a rotation.
///
/// Each key is kept with its keyed HMAC state (the inner and outer pads already hashed), cloned
/// per frame: deriving it again costs 2 of the 6 SHA-256 compressions of a ~200-byte frame.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Vec<(u16, Vec<u8>, HmacSha256)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (nor the keyed HMAC state, which is as good as the key).
        let ids: Vec<u16> = self.keys.iter().map(|(id, _, _)| *id).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// Shortest HMAC key a key file may hold.
pub const MIN_KEY_LEN: usize = 16;

/// A key file's bytes → the key: trailing newlines stripped (keys are often written with
/// `echo`), at least [`MIN_KEY_LEN`] bytes left. The error is the length found.
pub fn key_from_file_bytes(mut key: Vec<u8>) -> Result<Vec<u8>, usize> {
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    if key.len() < MIN_KEY_LEN {
        return Err(key.len());
    }
    Ok(key)
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ring with one key, the common case.
    pub fn single(id: u16, key: impl Into<Vec<u8>>) -> Self {
        let mut ring = Self::new();
        ring.insert(id, key);
        ring
    }

    /// Adds or replaces the key with this id.
    pub fn insert(&mut self, id: u16, key: impl Into<Vec<u8>>) {
        let key = key.into();
        let mac = mac_for(&key);
        match self.keys.iter_mut().find(|(k, _, _)| *k == id) {
            Some(slot) => *slot = (id, key, mac),
            None => self.keys.push((id, key, mac)),
        }
    }

    pub fn get(&self, id: u16) -> Option<&[u8]> {
        self.keys.iter().find(|(k, _, _)| *k == id).map(|(_, v, _)| v.as_slice())
    }

    /// A fresh HMAC keyed with key `id`, ready for the message.
    fn mac(&self, id: u16) -> Option<HmacSha256> {
        self.keys.iter().find(|(k, _, _)| *k == id).map(|(_, _, m)| m.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn mac_for(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), FrameError> {
    if s.is_empty() || s.len() > MAX_STR {
        return Err(FrameError::Encode(what));
    }
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

impl Frame {
    /// Serialises and signs the frame with `key` under `self.key_id`.
    pub fn encode(&self, key: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&self.boot_id.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.sent_ms.to_be_bytes());
        put_str(&mut out, &self.worker_id, "worker id must be 1..=64 bytes")?;
        put_str(&mut out, &self.pool_id, "pool id must be 1..=64 bytes")?;
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        if self.models.len() > MAX_MODELS {
            return Err(FrameError::Encode("at most 8 models per frame"));
        }
        out.push(self.models.len() as u8);
        for m in &self.models {
            put_str(&mut out, m, "model name must be 1..=64 bytes")?;
        }
        if self.adapters.len() > MAX_ADAPTERS {
            return Err(FrameError::Encode("at most 8 adapters per frame"));
        }
        out.push(self.adapters.len() as u8);
        for a in &self.adapters {
            put_str(&mut out, a, "adapter name must be 1..=64 bytes")?;
        }
        let fields = self.metrics.fields();
        let mut present: u16 = 0;
        for (i, f) in fields.iter().enumerate() {
            if f.is_some() {
                present |= 1 << i;
            }
        }
        out.extend_from_slice(&present.to_be_bytes());
        for f in fields {
            // Decode rejects these: a frame signed with one would be dropped by every receiver.
            if f.is_some_and(|v| !v.is_finite()) {
                return Err(FrameError::Encode("metric is not a finite number"));
            }
            out.extend_from_slice(&f.unwrap_or(0.0).to_be_bytes());
        }
        let mut mac = mac_for(key);
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        if out.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(out.len()));
        }
        Ok(out)
    }

    /// Authenticates and decodes a datagram. Never panics, whatever the bytes.
    /// ([`FrameRef::decode`], then its strings copied.)
    pub fn decode(bytes: &[u8], keys: &KeyRing) -> Result<Frame, FrameError> {
        FrameRef::decode(bytes, keys).map(|f| f.to_frame())
    }

    /// Bytes [`Frame::encode`] produces for this frame (when it encodes at all).
    pub fn encoded_len(&self) -> usize {
        let strs = |v: &[String]| v.iter().map(|s| 1 + s.len()).sum::<usize>();
        let addr = if self.addr.is_ipv4() { 1 + 4 } else { 1 + 16 };
        HEADER_LEN + 1 + self.worker_id.len() + 1 + self.pool_id.len() + addr + 2 + 1 + strs(&self.models) + 1 + strs(&self.adapters) + 2 + 8 * METRICS_V2 + TAG_LEN
    }

    /// Trims the adapter list so that the frame can be encoded: names that are empty or over
    /// [`MAX_STR`] bytes go, then the list is cut to [`MAX_ADAPTERS`], then the last (least
    /// recently active) ones go while the frame is over [`MAX_FRAME_LEN`]. Returns how many
    /// were dropped (the sender counts them: the worker still serves them, the picker just
    /// does not know they are loaded there).
    pub fn fit_adapters(&mut self) -> usize {
        let before = self.adapters.len();
        self.adapters.retain(|a| !a.is_empty() && a.len() <= MAX_STR);
        self.adapters.truncate(MAX_ADAPTERS);
        while !self.adapters.is_empty() && self.encoded_len() > MAX_FRAME_LEN {
            self.adapters.pop();
        }
        before - self.adapters.len()
    }
}

/// Model or adapter names borrowed from a datagram: at most 8 ([`MAX_ADAPTERS`], the models'
/// limit too), kept inline so that decoding allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names<'a> {
    items: [&'a str; MAX_ADAPTERS],
    len: usize,
}

impl<'a> Names<'a> {
    /// Callers check the count against the limit first.
    fn push(&mut self, name: &'a str) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = name;
            self.len += 1;
        }
    }

    pub fn as_slice(&self) -> &[&'a str] {
        &self.items[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn to_vec(self) -> Vec<String> {
        self.as_slice().iter().map(|s| (*s).to_owned()).collect()
    }

    /// Makes `dst` equal to these names, keeping the allocations of the names that did not
    /// change (a worker sends the same ones frame after frame).
    fn assign_to(self, dst: &mut Vec<String>) {
        dst.truncate(self.len);
        for (i, name) in self.as_slice().iter().enumerate() {
            match dst.get_mut(i) {
                Some(d) if d == name => {}
                Some(d) => {
                    d.clear();
                    d.push_str(name);
                }
                None => dst.push((*name).to_owned()),
            }
        }
    }
}

/// One decoded, authenticated frame whose strings point into the datagram: what a receiver
/// checks and records without allocating ([`crate::Ingest::accept_ref`],
/// [`crate::FleetState::observe_ref`]). [`Frame::decode`] is this, copied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameRef<'a> {
    pub key_id: u16,
    pub boot_id: u64,
    pub seq: u64,
    pub sent_ms: u64,
    pub worker_id: &'a str,
    pub pool_id: &'a str,
    pub addr: SocketAddr,
    pub models: Names<'a>,
    pub adapters: Names<'a>,
    pub metrics: Metrics,
}

impl<'a> FrameRef<'a> {
    /// Authenticates and decodes a datagram, borrowing its strings. Never panics, whatever
    /// the bytes.
    pub fn decode(bytes: &'a [u8], keys: &KeyRing) -> Result<FrameRef<'a>, FrameError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        if bytes.len() < 2 || bytes[..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if bytes.len() < HEADER_LEN + TAG_LEN {
            return Err(FrameError::Truncated { needed: HEADER_LEN + TAG_LEN, have: bytes.len() });
        }
        let Some(n_metrics) = metric_count(bytes[2]) else {
            return Err(FrameError::UnsupportedVersion(bytes[2]));
        };
        let version = bytes[2];
        if let Some(needed) = declared_len(bytes, n_metrics, has_adapters(version)).filter(|n| *n > bytes.len()) {
            return Err(FrameError::Truncated { needed, have: bytes.len() });
        }
        let key_id = u16::from_be_bytes([bytes[3], bytes[4]]);
        let mut mac = keys.mac(key_id).ok_or(FrameError::UnknownKey(key_id))?;
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        mac.update(body);
        // Constant-time comparison.
        mac.verify_slice(tag).map_err(|_| FrameError::BadMac)?;
        // Authenticated from here on; still parsed defensively.
        let mut r = Reader { buf: body, pos: 5 };
        let boot_id = r.u64()?;
        let seq = r.u64()?;
        let sent_ms = r.u64()?;
        let worker_id = r.str8("worker id")?;
        let pool_id = r.str8("pool id")?;
        let ip = match r.u8()? {
            4 => {
                let b = r.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let b = r.take(16)?;
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(FrameError::Malformed("address family must be 4 or 6")),
        };
        let port = r.u16()?;
        let n = r.u8()? as usize;
        if n > MAX_MODELS {
            return Err(FrameError::Malformed("more than 8 models"));
        }
        let mut models = Names::default();
        for _ in 0..n {
            models.push(r.str8("model name")?);
        }
        let mut adapters = Names::default();
        if has_adapters(version) {
            let n = r.u8()? as usize;
            if n > MAX_ADAPTERS {
                return Err(FrameError::Malformed("more than 8 adapters"));
            }
            for _ in 0..n {
                adapters.push(r.str8("adapter name")?);
            }
        }
        let present = r.u16()?;
        let mut fields = [None; METRICS_V2];
        for (i, slot) in fields.iter_mut().enumerate().take(n_metrics) {
            let v = f64::from_be_bytes(r.array8()?);
            if present & (1 << i) != 0 {
                if !v.is_finite() {
                    return Err(FrameError::Malformed("metric is not a finite number"));
                }
                *slot = Some(v);
            }
        }
        if r.pos != body.len() {
            return Err(FrameError::Malformed("trailing bytes after the metrics"));
        }
        Ok(FrameRef {
            key_id,
            boot_id,
            seq,
            sent_ms,
            worker_id,
            pool_id,
            addr: SocketAddr::new(ip, port),
            models,
            adapters,
            metrics: Metrics::from_fields(fields),
        })
    }

    /// The owned frame.
    pub fn to_frame(&self) -> Frame {
        Frame {
            key_id: self.key_id,
            boot_id: self.boot_id,
            seq: self.seq,
            sent_ms: self.sent_ms,
            worker_id: self.worker_id.to_owned(),
            pool_id: self.pool_id.to_owned(),
            addr: self.addr,
            models: self.models.to_vec(),
            adapters: self.adapters.to_vec(),
            metrics: self.metrics,
        }
    }

    /// Makes `dst` equal to [`Self::to_frame`], keeping `dst`'s allocations for the strings
    /// that did not change.
    pub fn assign_to(&self, dst: &mut Frame) {
        assign_str(&mut dst.worker_id, self.worker_id);
        self.assign_to_same_worker(dst);
    }

    /// [`Self::assign_to`] a frame of the same worker id (not compared again: the fleet found
    /// `dst` under this id).
    pub(crate) fn assign_to_same_worker(&self, dst: &mut Frame) {
        debug_assert_eq!(dst.worker_id, self.worker_id);
        dst.key_id = self.key_id;
        dst.boot_id = self.boot_id;
        dst.seq = self.seq;
        dst.sent_ms = self.sent_ms;
        assign_str(&mut dst.pool_id, self.pool_id);
        dst.addr = self.addr;
        self.models.assign_to(&mut dst.models);
        self.adapters.assign_to(&mut dst.adapters);
        dst.metrics = self.metrics;
    }
}

fn assign_str(dst: &mut String, s: &str) {
    if dst != s {
        dst.clear();
        dst.push_str(s);
    }
}

/// The length a datagram's own length fields call for, read before it is authenticated and
/// trusted for nothing else: a frame cut short would otherwise reach the MAC check, fail it,
/// and be counted as forged. Truncation only removes bytes from the end, so the fields it does
/// reach are the sender's. When a length byte itself is missing, the result is a lower bound
/// past the end. `None` when the fields are out of range: that is for the MAC (tampering) or
/// the parser to say.
fn declared_len(b: &[u8], n_metrics: usize, adapters: bool) -> Option<usize> {
    let mut pos = HEADER_LEN;
    // A length byte at `pos`, or the shortest frame that would have one.
    let len_at = |pos: usize| b.get(pos).map(|n| usize::from(*n)).ok_or(pos + 1 + TAG_LEN);
    let str8 = |pos: &mut usize| -> Result<Option<()>, usize> {
        let n = len_at(*pos)?;
        if n == 0 || n > MAX_STR {
            return Ok(None);
        }
        *pos += 1 + n;
        Ok(Some(()))
    };
    let walk = |pos: &mut usize| -> Result<Option<()>, usize> {
        for _ in 0..2 {
            if str8(pos)?.is_none() {
                return Ok(None);
            }
        }
        *pos += match len_at(*pos)? {
            4 => 1 + 4,
            6 => 1 + 16,
            _ => return Ok(None),
        } + 2;
        for (present, max) in [(true, MAX_MODELS), (adapters, MAX_ADAPTERS)] {
            if !present {
                continue;
            }
            let count = len_at(*pos)?;
            if count > max {
                return Ok(None);
            }
            *pos += 1;
            for _ in 0..count {
                if str8(pos)?.is_none() {
                    return Ok(None);
                }
            }
        }
        *pos += 2 + 8 * n_metrics + TAG_LEN;
        Ok(Some(()))
    };
    match walk(&mut pos) {
        Ok(Some(())) => Some(pos),
        Ok(None) => None,
        Err(lower_bound) => Some(lower_bound),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).ok_or(FrameError::Malformed("length overflow"))?;
        if end > self.buf.len() {
            return Err(FrameError::Truncated { needed: end + TAG_LEN, have: self.buf.len() + TAG_LEN });
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn array8(&mut self) -> Result<[u8; 8], FrameError> {
        let b = self.take(8)?;
        let mut o = [0u8; 8];
        o.copy_from_slice(b);
        Ok(o)
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array8()?))
    }
    fn str8(&mut self, what: &'static str) -> Result<&'a str, FrameError> {
        let n = self.u8()? as usize;
        if n == 0 || n > MAX_STR {
            return Err(FrameError::Malformed(match what {
                "worker id" => "worker id length out of 1..=64",
                "pool id" => "pool id length out of 1..=64",
                "adapter name" => "adapter name length out of 1..=64",
                _ => "model name length out of 1..=64",
            }));
        }
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| FrameError::Malformed("string is not UTF-8"))
    }
}

#[cfg(test)]
pub(crate) mod tests;
