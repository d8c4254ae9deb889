//! The fleet view in a compact binary form (`application/x-gpuha-fleet`): what dnsd serves on
//! `/v1/fleet` to a client that asks for it in `Accept` (the Envoy filter), and what the filter
//! keeps in shared data for its threads. JSON stays the default for people and older filters;
//! both forms carry the same [`FleetView`] ([`decode`] of [`encode`] equals the JSON round
//! trip, non-finite numbers included: JSON writes them as `null`, read back as absent).
//!
//! Why: a 10 k-worker view is ~3 MB of JSON that every poll and every Envoy thread parsed in
//! Wasm (one `String` per field, one allocation each), although between two polls of a busy
//! fleet only the numbers move. So the body is split in two sections:
//!
//! * **identity**: the string table (pools, models) and per worker its id, address,
//!   pool, boot id and models; it changes only when a worker comes, goes, restarts or moves;
//! * **numbers**: per worker its age, flags, metrics and loaded LoRA adapters (they come and
//!   go with traffic), and the per-pool counts.
//!
//! A reader that holds a view decoded from the same identity bytes ([`identity`] compares
//! equal) replaces only the numbers ([`update`]): no allocation per worker.
//!
//! Layout (integers little-endian; `varint` is unsigned LEB128, at most 10 bytes):
//!
//! | field | bytes |
//! |---|---|
//! | magic `GHFV`, format version 1, flags 0, reserved 0 | 4 + 1 + 1 + 2 |
//! | `now_ms` | u64 |
//! | identity section length, number of workers | u32 + u32 |
//! | identity: string count, then each string | varint; varint length + UTF-8 |
//! | identity, per worker: id, address, pool, boot, models | varint length + UTF-8 (twice); varint string index; u64; varint count + string indices |
//! | numbers, per worker: age, flags, presence, metrics, adapters | varint; u8 (1 fresh, 2 stalled, 4 drained); u16 (bit i: metric i present); f64 per present metric in [`METRICS`] order; varint count + (varint length + UTF-8) each |
//! | numbers: pools | varint count; per pool: string index, workers, fresh, in_window (varints) |
//!
//! Decoding rejects anything else with a [`WireError`] (never a panic, never an allocation
//! larger than the input justifies): short input, bad magic or version, an index past the
//! string table, invalid UTF-8, an overlong varint, bytes left over.

use std::collections::HashMap;

use crate::fleet::{FleetView, PoolView, WorkerView};

/// The media type dnsd serves this form under.
pub const MEDIA_TYPE: &str = "application/x-gpuha-fleet";
/// First bytes of every encoded view.
pub const MAGIC: [u8; 4] = *b"GHFV";
/// The layout version this code writes and reads.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 24;

/// The optional metrics of a worker, in wire order (bit `i` of the presence mask).
pub const METRICS: [&str; 9] = ["running", "waiting", "kv", "ttft_ms", "gen_tps", "prompt_tps", "preemptions", "pace", "slow"];

const FRESH: u8 = 1;
const STALLED: u8 = 2;
const DRAINED: u8 = 4;

/// Why bytes are not an encoded fleet view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a binary fleet view (no GHFV magic)")]
    Magic,
    #[error("binary fleet view format {0}, this build reads {FORMAT_VERSION}")]
    Version(u8),
    #[error("binary fleet view truncated at byte {0}")]
    Truncated(usize),
    #[error("binary fleet view: bad varint at byte {0}")]
    Varint(usize),
    #[error("binary fleet view: string index {0} past the table")]
    Index(u64),
    #[error("binary fleet view: invalid UTF-8 at byte {0}")]
    Utf8(usize),
    #[error("binary fleet view: {0} bytes left over")]
    Trailing(usize),
    #[error("binary fleet view: {0}")]
    Shape(&'static str),
}

/// Whether `b` starts like an encoded view (the filter's shared slot may hold JSON too).
pub fn is_binary(b: &[u8]) -> bool {
    b.starts_with(&MAGIC)
}

// ------------------------------------------------------------------------------------------
// encoding

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn metrics_of(w: &WorkerView) -> [Option<f64>; 9] {
    [w.running, w.waiting, w.kv, w.ttft_ms, w.gen_tps, w.prompt_tps, w.preemptions, w.pace, w.slow]
}

/// The string table: every pool, model and adapter name once, in order of first use.
struct Table<'a> {
    index: HashMap<&'a str, u64>,
    strings: Vec<&'a str>,
}

impl<'a> Table<'a> {
    fn of(s: &'a str, t: &mut Table<'a>) -> u64 {
        if let Some(i) = t.index.get(s) {
            return *i;
        }
        let i = t.strings.len() as u64;
        t.index.insert(s, i);
        t.strings.push(s);
        i
    }
}

/// The binary form of `view`.
pub fn encode(view: &FleetView) -> Vec<u8> {
    let mut t = Table { index: HashMap::new(), strings: Vec::new() };
    for w in &view.workers {
        Table::of(&w.pool, &mut t);
        for m in &w.models {
            Table::of(m, &mut t);
        }
    }
    for p in &view.pools {
        Table::of(&p.pool, &mut t);
    }
    let idx = |s: &str| t.index.get(s).copied().unwrap_or(0);
    let mut id = Vec::with_capacity(view.workers.len() * 56);
    put_varint(&mut id, t.strings.len() as u64);
    for s in &t.strings {
        put_str(&mut id, s);
    }
    for w in &view.workers {
        put_str(&mut id, &w.id);
        put_str(&mut id, &w.addr);
        put_varint(&mut id, idx(&w.pool));
        id.extend_from_slice(&w.boot.to_le_bytes());
        put_varint(&mut id, w.models.len() as u64);
        for m in &w.models {
            put_varint(&mut id, idx(m));
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + id.len() + view.workers.len() * 80 + view.pools.len() * 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
    out.extend_from_slice(&view.now_ms.to_le_bytes());
    // A view whose identity or worker count passes 4 GiB cannot be served anyway (the cap of
    // `ingest.max_workers` is far below); saturating keeps this total, and decoding refuses it.
    out.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&u32::try_from(view.workers.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&id);
    for w in &view.workers {
        put_varint(&mut out, w.age_ms);
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        out.push(flag(w.fresh, FRESH) | flag(w.stalled, STALLED) | flag(w.drained, DRAINED));
        let m = metrics_of(w);
        // Non-finite numbers are absent, as in JSON (`null`).
        let mask = m.iter().enumerate().fold(0u16, |acc, (i, v)| acc | (u16::from(v.is_some_and(f64::is_finite)) << i));
        out.extend_from_slice(&mask.to_le_bytes());
        for v in m.iter().flatten().filter(|v| v.is_finite()) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_varint(&mut out, w.adapters.len() as u64);
        for a in &w.adapters {
            put_str(&mut out, a);
        }
    }
    put_varint(&mut out, view.pools.len() as u64);
    for p in &view.pools {
        put_varint(&mut out, idx(&p.pool));
        for n in [p.workers, p.fresh, p.in_window] {
            put_varint(&mut out, n as u64);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// decoding

/// A bounds-checked cursor; `base` is the offset of `b` in the whole input (for errors).
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len()).ok_or(WireError::Truncated(self.base + self.b.len()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let start = self.base + self.at;
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte may only hold the top bit of a u64.
            if i == 9 && bits > 1 {
                return Err(WireError::Varint(start));
            }
            v |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Varint(start))
    }

    /// A count of items that take at least `min_bytes` each: never more than the bytes left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, WireError> {
        let n = self.varint()?;
        let left = (self.b.len() - self.at) / min_bytes.max(1);
        usize::try_from(n).ok().filter(|n| *n <= left).ok_or(WireError::Truncated(self.base + self.b.len()))
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let n = self.count(1)?;
        let at = self.base + self.at;
        std::str::from_utf8(self.take(n)?).map_err(|_| WireError::Utf8(at))
    }

    fn index(&mut self, table: &[&'a str]) -> Result<&'a str, WireError> {
        let i = self.varint()?;
        usize::try_from(i).ok().and_then(|i| table.get(i)).copied().ok_or(WireError::Index(i))
    }

    fn size(&mut self) -> Result<usize, WireError> {
        usize::try_from(self.varint()?).map_err(|_| WireError::Shape("count past usize"))
    }

    fn done(&self) -> Result<(), WireError> {
        match self.b.len() - self.at {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// The sections of an encoded view.
struct Parts<'a> {
    now_ms: u64,
    workers: usize,
    identity: &'a [u8],
    numbers: &'a [u8],
}

fn parts(b: &[u8]) -> Result<Parts<'_>, WireError> {
    if !is_binary(b) {
        return Err(WireError::Magic);
    }
    let mut r = Reader { b, at: 4, base: 0 };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(WireError::Version(version));
    }
    r.take(3)?;
    let now_ms = r.u64()?;
    let id_len = r.take(4)?;
    let id_len = u32::from_le_bytes([id_len[0], id_len[1], id_len[2], id_len[3]]) as usize;
    let n = r.take(4)?;
    let workers = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
    let identity = r.take(id_len)?;
    // Each worker takes at least 12 bytes of identity (3 varints, u64, varint) and 4 of numbers.
    if workers > identity.len() / 12 || workers > (b.len() - r.at) / 4 {
        return Err(WireError::Shape("more workers than bytes"));
    }
    Ok(Parts { now_ms, workers, identity, numbers: &b[r.at..] })
}

/// The identity section of an encoded view (see the module docs): two views with equal
/// identity sections list the same workers in the same order with the same strings.
pub fn identity(b: &[u8]) -> Result<&[u8], WireError> {
    parts(b).map(|p| p.identity)
}

fn string_table<'a>(r: &mut Reader<'a>) -> Result<Vec<&'a str>, WireError> {
    let n = r.count(1)?;
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        t.push(r.str()?);
    }
    Ok(t)
}

/// One worker's numbers, read before any is applied (an update is all or nothing).
struct Numbers<'a> {
    age_ms: u64,
    flags: u8,
    metrics: [Option<f64>; 9],
    adapters: Vec<&'a str>,
}

fn read_numbers<'a>(r: &mut Reader<'a>, table: &[&'a str], workers: usize) -> Result<(Vec<Numbers<'a>>, Vec<PoolView>), WireError> {
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let age_ms = r.varint()?;
        let flags = r.u8()?;
        if flags & !(FRESH | STALLED | DRAINED) != 0 {
            return Err(WireError::Shape("unknown worker flags"));
        }
        let mask = r.u16()?;
        if mask >> METRICS.len() != 0 {
            return Err(WireError::Shape("unknown metric bits"));
        }
        let mut metrics = [None; 9];
        for (i, m) in metrics.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                let v = f64::from_bits(r.u64()?);
                // As JSON reads them: a non-finite number is absent.
                *m = v.is_finite().then_some(v);
            }
        }
        let n = r.count(1)?;
        let mut adapters = Vec::with_capacity(n);
        for _ in 0..n {
            adapters.push(r.str()?);
        }
        out.push(Numbers { age_ms, flags, metrics, adapters });
    }
    let n = r.count(4)?;
    let mut pools = Vec::with_capacity(n);
    for _ in 0..n {
        let pool = r.index(table)?.to_string();
        pools.push(PoolView { pool, workers: r.size()?, fresh: r.size()?, in_window: r.size()? });
    }
    r.done()?;
    Ok((out, pools))
}

fn apply(w: &mut WorkerView, n: &Numbers<'_>) {
    w.age_ms = n.age_ms;
    w.fresh = n.flags & FRESH != 0;
    w.stalled = n.flags & STALLED != 0;
    w.drained = n.flags & DRAINED != 0;
    let [running, waiting, kv, ttft_ms, gen_tps, prompt_tps, preemptions, pace, slow] = n.metrics;
    (w.running, w.waiting, w.kv, w.ttft_ms, w.gen_tps, w.prompt_tps, w.preemptions, w.pace, w.slow) = (running, waiting, kv, ttft_ms, gen_tps, prompt_tps, preemptions, pace, slow);
    // Adapters change seldom: reallocated only when they do.
    if w.adapters.len() != n.adapters.len() || w.adapters.iter().zip(&n.adapters).any(|(a, b)| a != b) {
        w.adapters = n.adapters.iter().map(|a| a.to_string()).collect();
    }
}

/// The view encoded in `b`.
pub fn decode(b: &[u8]) -> Result<FleetView, WireError> {
    let p = parts(b)?;
    let base = HEADER_LEN;
    let mut r = Reader { b: p.identity, at: 0, base };
    let table = string_table(&mut r)?;
    let mut workers = Vec::with_capacity(p.workers);
    for _ in 0..p.workers {
        let id = r.str()?.to_string();
        let addr = r.str()?.to_string();
        let pool = r.index(&table)?.to_string();
        let boot = r.u64()?;
        let n = r.count(1)?;
        let mut models = Vec::with_capacity(n);
        for _ in 0..n {
            models.push(r.index(&table)?.to_string());
        }
        workers.push(WorkerView {
            id,
            pool,
            models,
            adapters: Vec::new(),
            addr,
            age_ms: 0,
            fresh: false,
            stalled: false,
            boot,
            running: None,
            waiting: None,
            kv: None,
            ttft_ms: None,
            gen_tps: None,
            prompt_tps: None,
            preemptions: None,
            pace: None,
            slow: None,
            drained: false,
        });
    }
    r.done()?;
    let mut r = Reader { b: p.numbers, at: 0, base: base + p.identity.len() };
    let (numbers, pools) = read_numbers(&mut r, &table, p.workers)?;
    for (w, n) in workers.iter_mut().zip(&numbers) {
        apply(w, n);
    }
    Ok(FleetView { now_ms: p.now_ms, workers, pools })
}

/// Replaces the numbers of `view` (ages, flags, metrics, adapters, pool counts, `now_ms`) with
/// those in `b`, whose identity section must be that of the bytes `view` was decoded from (the
/// caller compares [`identity`]). All or nothing: on an error `view` is unchanged.
pub fn update(view: &mut FleetView, b: &[u8]) -> Result<(), WireError> {
    let p = parts(b)?;
    if p.workers != view.workers.len() {
        return Err(WireError::Shape("worker count differs from the view updated"));
    }
    let table = string_table(&mut Reader { b: p.identity, at: 0, base: HEADER_LEN })?;
    let mut r = Reader { b: p.numbers, at: 0, base: HEADER_LEN + p.identity.len() };
    let (numbers, pools) = read_numbers(&mut r, &table, p.workers)?;
    for (w, n) in view.workers.iter_mut().zip(&numbers) {
        apply(w, n);
    }
    view.pools = pools;
    view.now_ms = p.now_ms;
    Ok(())
}

#[cfg(test)]
mod tests;
