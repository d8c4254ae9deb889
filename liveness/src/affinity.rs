//! Prefix-cache and session affinity: which worker a request *prefers*, so that requests sharing
//! a prompt prefix (the turns of one chat, one session's requests) meet the KV cache blocks the
//! previous ones left on a worker.
//!
//! A request's affinity key is, in order: the session named by a request header
//! ([`AffinityConfig::session_header`]), the OpenAI `user` field ([`AffinityConfig::user_field`]),
//! or a fingerprint of the prompt's leading blocks ([`PrefixHasher`], fed by the body scanner of
//! [`crate::request`]: no tokenizer, no parse, bounded bytes). A body the fingerprint cannot read
//! gives no key: the normal pick.
//!
//! The key is mapped to workers by rendezvous (highest random weight) hashing over the workers
//! eligible right now ([`weight`]): every router and every Envoy thread computes the same
//! preference from the same fleet view with no shared state, and a worker joining or leaving
//! moves only the keys it wins or held.
//!
//! Balance (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam 2018,
//! applied per request): rendezvous alone puts `k` keys on `n` workers binomially (48 chat
//! sessions on 4 workers: max/min requests 2.1 in the bench), and a key stays where it was
//! placed, so the router also remembers where each key went ([`Placement`], a bounded table in
//! shared data) and decides in [`choose`], among the workers within the TTFT spill margin:
//! * a key with a placement keeps its worker while that worker's load (this router's requests
//!   in flight to it, [`crate::inflight`]; see `pick::own_load` for why not the frame's) stays within [`AffinityConfig::keep_epsilon`] /
//!   [`AffinityConfig::keep_slack`] of the mean: a **hit**; above, the key is placed anew: a
//!   **spill** (one cache miss, then it sticks to its new worker);
//! * a new key goes to the first worker in its rendezvous order whose load is within
//!   [`AffinityConfig::balance_epsilon`] of the mean (the bounded-loads rule), else to the least
//!   loaded: a hit when that is its rendezvous first choice, else **placed**.
//!
//! Taken from the peers: vllm-router's `cache_aware` counts the router's own requests in flight
//! per worker, falls back to the shortest queue when the fleet is imbalanced (absolute and
//! relative thresholds) and sends a prompt with no cached prefix to the worker with the most
//! room; llm-d's scheduler adds a prefix-cache scorer (an LRU index of where prefixes went) to a
//! queue scorer. Here new keys are placed by load (their cache is nowhere yet), known keys stick
//! with a per-key bound instead of a fleet-wide imbalance switch (a hot worker sheds only the keys
//! that would overfill it), and the first choice stays a rendezvous hash, so routers and threads
//! that do not share the table still agree while the fleet is balanced.
//! Freshness, drains, the breaker and the first-token retry order are decided before: affinity
//! only chooses the first attempt among the workers already eligible for it.

use serde::{Deserialize, Serialize};

/// [`AffinityConfig::session_header`] unless configured otherwise.
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffinityConfig {
    /// `false`: no key is read and every pick is the load-only pick.
    pub enabled: bool,
    /// Request header naming a session (lower case); empty: none is read.
    pub session_header: String,
    /// The OpenAI `user` field names the session when no header does.
    pub user_field: bool,
    /// Bytes of each leading chat message (its serialized JSON) that enter the fingerprint.
    pub message_bytes: usize,
    /// Leading messages fingerprinted at most: the system/developer ones and the first other.
    pub max_messages: usize,
    /// Bytes of a completions `prompt` fingerprinted at most, cut down to whole
    /// [`PROMPT_BLOCK_BYTES`] blocks so that a prompt growing turn by turn keeps its key.
    pub prompt_bytes: usize,
    /// The key's worker is taken while its predicted TTFT is at most
    /// `best * (1 + spill_ratio) + spill_ms`; above that the request spills.
    pub spill_ratio: f64,
    pub spill_ms: f64,
    /// A new key's worker: the first in its rendezvous order with `load + 1 <=
    /// max(1, (1 + balance_epsilon) * (total + 1) / n)` over the `n` workers within the margin.
    pub balance_epsilon: f64,
    /// A placed key keeps its worker while `load + 1 <= max(1, (1 + keep_epsilon) * (total + 1)
    /// / n) + keep_slack`.
    pub keep_epsilon: f64,
    pub keep_slack: f64,
    /// Slots of the placement table (shared data, one key each; collisions overwrite).
    pub placement_slots: u64,
    /// A placement unused this long is forgotten (its KV blocks are likely evicted by then).
    pub placement_ttl_ms: u64,
}

/// Block size of a completions prompt's fingerprint.
pub const PROMPT_BLOCK_BYTES: usize = 256;

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            enabled: true,
            session_header: DEFAULT_SESSION_HEADER.into(),
            user_field: true,
            message_bytes: 1024,
            max_messages: 4,
            prompt_bytes: 2048,
            // A hit saves the prefill of the whole cached history; the local load counted on top
            // of a frame overstates a busy worker's queue (requests finished since the frame
            // still count), so the margin is wide: 1.0 + 50 ms spilled 7 of 97 turns of a
            // 6-client multi-turn drill on idle workers.
            spill_ratio: 3.0,
            spill_ms: 100.0,
            balance_epsilon: 0.1,
            keep_epsilon: 0.5,
            keep_slack: 1.0,
            placement_slots: 16_384,
            placement_ttl_ms: 600_000,
        }
    }
}

impl AffinityConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=65_536).contains(&self.message_bytes) {
            return Err("pick.affinity.message_bytes: must be 1..=65536".into());
        }
        if !(1..=64).contains(&self.max_messages) {
            return Err("pick.affinity.max_messages: must be 1..=64".into());
        }
        if !(1..=65_536).contains(&self.prompt_bytes) {
            return Err("pick.affinity.prompt_bytes: must be 1..=65536".into());
        }
        if ![self.spill_ratio, self.spill_ms].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err("pick.affinity.spill_ratio / spill_ms: must be finite and >= 0".into());
        }
        if ![self.balance_epsilon, self.keep_epsilon, self.keep_slack].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err("pick.affinity.balance_epsilon / keep_epsilon / keep_slack: must be finite and >= 0".into());
        }
        if !(1..=1 << 20).contains(&self.placement_slots) || self.placement_ttl_ms == 0 {
            return Err("pick.affinity.placement_slots: must be 1..=1048576; placement_ttl_ms: > 0".into());
        }
        if self.session_header.bytes().any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace() || b == b':') {
            return Err("pick.affinity.session_header: a lower-case header name".into());
        }
        Ok(())
    }
}

/// What a request's affinity key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Session,
    User,
    Prefix,
}

/// A request's affinity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub hash: u64,
    pub source: KeySource,
}

impl Key {
    /// The key of a session id (header or `user`): the id's bytes, hashed apart from prefixes.
    pub fn session(id: &str, source: KeySource) -> Key {
        Key { hash: mix(fnv1a(0x5e55_1017, id.as_bytes())), source }
    }

    /// A request's key: its session header, else its `user`, else its prefix fingerprint.
    pub fn choose(cfg: &AffinityConfig, header: Option<&str>, user: Option<&str>, prefix: Option<u64>) -> Option<Key> {
        if !cfg.enabled {
            return None;
        }
        if let Some(h) = header.filter(|h| !h.is_empty()) {
            return Some(Key::session(h, KeySource::Session));
        }
        if let Some(u) = user.filter(|u| cfg.user_field && !u.is_empty()) {
            return Some(Key::session(u, KeySource::User));
        }
        prefix.map(|hash| Key { hash, source: KeySource::Prefix })
    }
}

/// How affinity shaped one pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No key, or affinity did not choose the first attempt (a breaker probe did, or nobody is
    /// admitted).
    None,
    /// The first attempt is the key's worker: its rendezvous winner among the eligible workers.
    Hit,
    /// The key's worker (its placement, else its rendezvous first choice) was over the load
    /// bound or the TTFT margin: the key was placed anew.
    Spill,
    /// A key with no placement went to another worker than its rendezvous first choice (that
    /// one was over the balance bound).
    Placed,
}

/// What the picker gets for a keyed request: the key's hash and the address hash of its
/// placement ([`Placement`]), if one is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub key: u64,
    pub placed: Option<u64>,
}

impl Want {
    /// A key with no known placement.
    pub fn new(key: u64) -> Want {
        Want { key, placed: None }
    }
}

/// One worker within the spill margin, as [`choose`] sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cand {
    /// Rendezvous weight for the key ([`weight`]).
    pub weight: u64,
    /// This router's requests in flight to the worker (`pick::own_load`).
    pub load: f64,
    pub addr_hash: u64,
}

/// `max(1, (1 + eps) * (total + 1) / n)`: the load bound of the bounded-loads rule.
fn bound(eps: f64, total: f64, n: usize) -> f64 {
    ((1.0 + eps) * (total + 1.0) / n.max(1) as f64).max(1.0)
}

/// The key's worker among `within` (the admitted fresh workers within the TTFT margin, in
/// score order; not empty): its index and the outcome. `placed`: the address hash of the
/// key's placement, if one is known; `placed_admitted`: that worker is admitted and fresh (so
/// if it is not `within`, it is over the margin: a spill, not a move); `winner`: the highest
/// rendezvous weight among all admitted fresh workers.
pub fn choose(within: &[Cand], placed: Option<u64>, placed_admitted: bool, winner: Option<u64>, cfg: &AffinityConfig) -> (usize, Outcome) {
    let n = within.len();
    let total: f64 = within.iter().map(|c| c.load).sum();
    let mut spilled = false;
    if let Some(p) = placed {
        match within.iter().position(|c| c.addr_hash == p) {
            Some(i) if within[i].load + 1.0 <= bound(cfg.keep_epsilon, total, n) + cfg.keep_slack => return (i, Outcome::Hit),
            Some(_) => spilled = true,
            None => spilled = placed_admitted,
        }
    }
    let cap = bound(cfg.balance_epsilon, total, n);
    // The first of the highest weight under the bound (the first of equals: shared addresses).
    let mut pick: Option<usize> = None;
    for (i, c) in within.iter().enumerate() {
        if c.load + 1.0 <= cap && pick.is_none_or(|p| c.weight > within[p].weight) {
            pick = Some(i);
        }
    }
    // Nobody under the bound (loads even to the last request): the least loaded, by weight.
    let i = pick.unwrap_or_else(|| {
        let mut best = 0;
        for (i, c) in within.iter().enumerate() {
            let b = &within[best];
            if c.load < b.load || (c.load == b.load && c.weight > b.weight) {
                best = i;
            }
        }
        best
    });
    let outcome = if spilled {
        Outcome::Spill
    } else if Some(within[i].weight) == winner {
        Outcome::Hit
    } else if placed.is_some() {
        // Its placement is gone (drained, open circuit): moved, like a rendezvous move.
        Outcome::Hit
    } else {
        Outcome::Placed
    };
    (i, outcome)
}

/// Where a key went: one slot of a bounded table in shared data (`gpuha.aff.<n>`), 24 bytes:
/// the key, the address hash of its worker, when it was last placed or refreshed (u64 LE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub key: u64,
    pub addr_hash: u64,
    pub at_ms: u64,
}

impl Placement {
    /// The slot of `key` in a table of `slots` slots.
    pub fn slot(key: u64, slots: u64) -> String {
        crate::slots::numbered_key("gpuha.aff.", mix(key ^ 0x51a7) % slots.max(1))
    }

    pub fn encode(&self) -> Vec<u8> {
        [self.key, self.addr_hash, self.at_ms].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The placement of `key` in a slot's bytes, if the slot holds it and it is younger than
    /// `ttl_ms` (another key's, short or unreadable bytes: none).
    pub fn decode(b: &[u8], key: u64, now_ms: u64, ttl_ms: u64) -> Option<Placement> {
        let at = |i: usize| b.get(i * 8..i * 8 + 8).and_then(|x| x.try_into().ok()).map(u64::from_le_bytes);
        let p = Placement { key: at(0)?, addr_hash: at(1)?, at_ms: at(2)? };
        (p.key == key && now_ms.saturating_sub(p.at_ms) < ttl_ms).then_some(p)
    }

    /// Whether the slot needs writing after a pick that sent `key` to `addr_hash`: a new or
    /// moved placement, or one not refreshed for a quarter of the TTL.
    pub fn needs_write(cur: Option<Placement>, addr_hash: u64, now_ms: u64, ttl_ms: u64) -> bool {
        cur.is_none_or(|p| p.addr_hash != addr_hash || now_ms.saturating_sub(p.at_ms) >= ttl_ms / 4)
    }
}

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325;
    }
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finalizer: FNV alone spreads its low bits poorly.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Rendezvous weight of worker `addr` for key `key`: the key prefers the eligible worker with
/// the highest weight, then the next highest, and so on. Same answer on every platform.
pub fn weight(key: u64, addr: &str) -> u64 {
    weight_of(key, addr_hash(addr))
}

/// The part of [`weight`] that depends on the address only (kept per worker in a ranking).
pub fn addr_hash(addr: &str) -> u64 {
    mix(fnv1a(0, addr.as_bytes()))
}

/// [`weight`] from the address's [`addr_hash`].
pub fn weight_of(key: u64, addr_hash: u64) -> u64 {
    mix(key ^ addr_hash)
}

/// The margin over the best predicted TTFT within which a key's worker is taken. The picker
/// passes `best` floored at `pick.default_ttft_ms`: a worker's reported TTFT swings with its
/// cache hits (a cached prompt's first token in a few ms, an uncached one's after its whole
/// prefill), and a margin of a few cached TTFTs would shut out every worker that just served an
/// uncached prompt.
pub fn spill_limit(best_ms: f64, cfg: &AffinityConfig) -> f64 {
    best_ms * (1.0 + cfg.spill_ratio) + cfg.spill_ms
}

/// Why a message ends the fingerprint or not: system and developer messages are shared
/// instructions; the first other message is what tells one conversation from another.
fn is_instruction(raw: &[u8]) -> bool {
    // The role's value as the SDKs serialize it: `"role": "system"` (no escapes in a role).
    let Some(at) = find(raw, b"\"role\"") else { return false };
    let mut rest = &raw[at + 6..];
    let skip_ws = |r: &mut &[u8]| {
        while let Some((b, tail)) = r.split_first() {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            *r = tail;
        }
    };
    skip_ws(&mut rest);
    let Some(tail) = rest.strip_prefix(b":") else { return false };
    rest = tail;
    skip_ws(&mut rest);
    rest.starts_with(b"\"system\"") || rest.starts_with(b"\"developer\"")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The fingerprint of a prompt's leading blocks, fed by the body scanner with the raw bytes of
/// the `messages` array's elements or of the `prompt` value.
///
/// * Chat: the first [`AffinityConfig::message_bytes`] bytes of each leading message, up to
///   and including the first that is not a system/developer instruction (at most
///   [`AffinityConfig::max_messages`]). So every turn of one conversation (same instructions,
///   same opening message, history growing after them) has one key, and conversations that
///   share only a system prompt have different keys: each is sticky to its worker and they
///   spread over the fleet (every worker soon holds the shared system prompt anyway).
/// * Completions: the first [`AffinityConfig::prompt_bytes`] bytes of the prompt, cut down to
///   whole [`PROMPT_BLOCK_BYTES`] blocks (whole prompt when shorter than one block).
///
/// Work is bounded: at most `message_bytes` per message are kept, `max_messages` messages.
#[derive(Debug, Clone)]
pub struct PrefixHasher {
    message_bytes: usize,
    max_messages: usize,
    prompt_bytes: usize,
    h: u64,
    messages: usize,
    /// The current element's (or prompt's) kept bytes, and how many bytes it had in all.
    cur: Vec<u8>,
    cur_len: usize,
    done: bool,
    any: bool,
}

impl PrefixHasher {
    pub fn new(cfg: &AffinityConfig) -> PrefixHasher {
        // A message arrives a few bytes at a time: room for a short one from the start.
        let cur = Vec::with_capacity(cfg.message_bytes.max(cfg.prompt_bytes).min(256));
        PrefixHasher { message_bytes: cfg.message_bytes, max_messages: cfg.max_messages, prompt_bytes: cfg.prompt_bytes, h: 0, messages: 0, cur, cur_len: 0, done: false, any: false }
    }

    /// Whether more bytes can change the fingerprint.
    pub fn wants_more(&self) -> bool {
        !self.done
    }

    /// Bytes of the current message (or prompt value).
    pub fn push(&mut self, bytes: &[u8], prompt: bool) {
        if self.done {
            return;
        }
        let cap = if prompt { self.prompt_bytes } else { self.message_bytes };
        let room = cap.saturating_sub(self.cur.len());
        self.cur.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.cur_len += bytes.len();
    }

    /// One message of the `messages` array ended.
    pub fn end_message(&mut self) {
        if self.done {
            return;
        }
        self.h = fnv1a(fnv1a(self.h, &(self.cur.len() as u64).to_le_bytes()), &self.cur);
        self.any = true;
        self.messages += 1;
        if !is_instruction(&self.cur) || self.messages >= self.max_messages {
            self.done = true;
        }
        self.cur.clear();
        self.cur_len = 0;
    }

    /// The `prompt` value ended.
    pub fn end_prompt(&mut self) {
        if self.done {
            return;
        }
        let cut = if self.cur_len < PROMPT_BLOCK_BYTES { self.cur.len() } else { self.cur.len() / PROMPT_BLOCK_BYTES * PROMPT_BLOCK_BYTES };
        self.h = fnv1a(fnv1a(self.h, b"prompt"), &self.cur[..cut]);
        self.any = true;
        self.done = true;
        self.cur.clear();
    }

    /// The `messages` array ended (fewer messages than the fingerprint could take).
    pub fn end_messages(&mut self) {
        self.done = true;
    }

    /// The fingerprint, once at least one message or a prompt was seen.
    pub fn finish(&self) -> Option<u64> {
        self.any.then(|| mix(self.h))
    }
}

#[cfg(test)]
mod tests;
