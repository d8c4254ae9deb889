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
//! moves only the keys it wins or held. The picker combines it with the load score
//! ([`crate::pick::pick_ranked`]): the key's worker is taken only while its predicted time to
//! first token is within [`AffinityConfig::spill_ratio`]/[`AffinityConfig::spill_ms`] of the
//! best; otherwise the request spills to the next worker in the key's rendezvous order that is.
//! Freshness, drains, the breaker and the first-token retry order are decided before: affinity
//! only chooses the first attempt among the workers already eligible for it.

use serde::{Deserialize, Serialize};

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
}

/// Block size of a completions prompt's fingerprint.
pub const PROMPT_BLOCK_BYTES: usize = 256;

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            enabled: true,
            session_header: "x-session-id".into(),
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
    /// The key's worker was over the margin: the first attempt is the next one in its order.
    Spill,
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

/// The margin over the best predicted TTFT within which a key's worker is taken.
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
        PrefixHasher { message_bytes: cfg.message_bytes, max_messages: cfg.max_messages, prompt_bytes: cfg.prompt_bytes, h: 0, messages: 0, cur: Vec::new(), cur_len: 0, done: false, any: false }
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
mod tests {
    use super::*;

    fn msgs(h: &mut PrefixHasher, raw: &[&str]) -> Option<u64> {
        for m in raw {
            h.push(m.as_bytes(), false);
            h.end_message();
        }
        h.end_messages();
        h.finish()
    }

    #[test]
    fn a_conversation_keeps_its_key_and_conversations_differ() {
        let cfg = AffinityConfig::default();
        let sys = r#"{"role": "system", "content": "You are terse."}"#;
        let u1 = r#"{"role": "user", "content": "hello"}"#;
        let a1 = r#"{"role": "assistant", "content": "hi"}"#;
        let u2 = r#"{"role": "user", "content": "more"}"#;
        let t1 = msgs(&mut PrefixHasher::new(&cfg), &[sys, u1]);
        let t2 = msgs(&mut PrefixHasher::new(&cfg), &[sys, u1, a1, u2]);
        assert!(t1.is_some());
        assert_eq!(t1, t2);
        let other = msgs(&mut PrefixHasher::new(&cfg), &[sys, r#"{"role": "user", "content": "bye"}"#]);
        assert_ne!(t1, other);
        // No system prompt: the first message is the key.
        assert_eq!(msgs(&mut PrefixHasher::new(&cfg), &[u1]), msgs(&mut PrefixHasher::new(&cfg), &[u1, a1, u2]));
        assert_eq!(msgs(&mut PrefixHasher::new(&cfg), &[]), None);
    }

    #[test]
    fn bounded_bytes_per_message() {
        let cfg = AffinityConfig { message_bytes: 8, ..AffinityConfig::default() };
        let mut h = PrefixHasher::new(&cfg);
        h.push(&[b'x'; 100_000], false);
        assert!(h.cur.len() <= 8);
        h.end_message();
        assert!(!h.wants_more());
    }

    #[test]
    fn a_growing_prompt_keeps_its_key_once_a_block_long() {
        let cfg = AffinityConfig::default();
        let key = |p: &str| {
            let mut h = PrefixHasher::new(&cfg);
            h.push(p.as_bytes(), true);
            h.end_prompt();
            h.finish()
        };
        let base = "a".repeat(300);
        assert_eq!(key(&base), key(&format!("{base}{}", "b".repeat(200))));
        assert_ne!(key("short one"), key("short two"));
        let long = "c".repeat(5_000);
        assert_eq!(key(&long), key(&format!("{long} and more")));
    }

    #[test]
    fn instruction_roles() {
        assert!(is_instruction(br#"{"role" : "system","content":"x"}"#));
        assert!(is_instruction(br#"{"content":"x","role":"developer"}"#));
        assert!(!is_instruction(br#"{"role":"user","content":"system"}"#));
        assert!(!is_instruction(br#"{"content":"x"}"#));
    }

    #[test]
    fn key_sources_in_order() {
        let cfg = AffinityConfig::default();
        assert_eq!(Key::choose(&cfg, Some("s1"), Some("u"), Some(7)).map(|k| k.source), Some(KeySource::Session));
        assert_eq!(Key::choose(&cfg, Some(""), Some("u"), Some(7)).map(|k| k.source), Some(KeySource::User));
        assert_eq!(Key::choose(&cfg, None, None, Some(7)), Some(Key { hash: 7, source: KeySource::Prefix }));
        let no_user = AffinityConfig { user_field: false, ..cfg.clone() };
        assert_eq!(Key::choose(&no_user, None, Some("u"), None), None);
        let off = AffinityConfig { enabled: false, ..cfg };
        assert_eq!(Key::choose(&off, Some("s"), Some("u"), Some(7)), None);
    }

    #[test]
    fn rendezvous_spreads_keys_evenly_and_moves_few_on_a_departure() {
        let addrs: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:8000")).collect();
        let winner = |k: u64, set: &[String]| set.iter().max_by_key(|a| weight(k, a)).cloned();
        let mut counts = std::collections::HashMap::new();
        let mut moved = 0;
        for k in 0..10_000u64 {
            let key = Key::session(&format!("s{k}"), KeySource::Session).hash;
            let w = winner(key, &addrs);
            *counts.entry(w.clone()).or_insert(0) += 1;
            let w4 = winner(key, &addrs[..4]);
            if w != w4 {
                moved += 1;
                assert_eq!(w.as_deref(), Some(addrs[4].as_str()), "only the departed worker's keys move");
            }
        }
        for c in counts.values() {
            assert!((1_800..=2_200).contains(c), "uneven: {counts:?}");
        }
        assert!((1_800..=2_200).contains(&moved), "{moved}");
    }
}
