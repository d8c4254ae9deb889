//! The fake's automatic prefix cache, shaped like vLLM's: the prompt's tokens in blocks of
//! [`BLOCK_TOKENS`], each full block named by a hash chained over the blocks before it, so a
//! block is reused only when everything before it matches too. A new request counts all its
//! prompt tokens as queried and its leading cached blocks as hits
//! (`vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total`), and its blocks are then
//! kept, least recently used evicted beyond the capacity. Only the uncached part of a prompt
//! costs prefill time (`--prefill-us-per-token`).
//!
//! Tokens: the fake's tokenizer is words ([`crate::wire::words`]); a chat message adds five
//! template tokens named by its role, and the prompt two more (the generation prompt), so the
//! token count is the one `usage.prompt_tokens` reports.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use serde_json::Value;

/// vLLM's default block size.
pub const BLOCK_TOKENS: usize = 16;

fn h<T: Hash>(v: T) -> u64 {
    let mut s = DefaultHasher::new();
    v.hash(&mut s);
    s.finish()
}

/// The token ids of a value, as [`crate::wire::words`] counts them.
pub fn push_tokens(v: &Value, out: &mut Vec<u64>) {
    match v {
        Value::String(s) => out.extend(s.split_whitespace().map(h)),
        Value::Array(a) => a.iter().for_each(|x| push_tokens(x, out)),
        Value::Object(o) => {
            if let Some(x) = o.get("text").or_else(|| o.get("content")) {
                push_tokens(x, out);
            }
        }
        _ => {}
    }
}

/// The token ids of a chat prompt (template tokens per message, then the generation prompt).
pub fn chat_tokens(messages: &[Value]) -> Vec<u64> {
    let mut out = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        out.extend((0..5u8).map(|i| h(("<template>", role, i))));
        push_tokens(m, &mut out);
    }
    out.extend([h("<gen>"), h("<gen/>")]);
    out
}

struct State {
    /// Block hash → last use.
    blocks: HashMap<u64, u64>,
    tick: u64,
}

pub struct PrefixCache {
    capacity_blocks: usize,
    state: Mutex<State>,
}

impl PrefixCache {
    pub fn new(capacity_tokens: u64) -> Self {
        let capacity_blocks = usize::try_from(capacity_tokens).unwrap_or(usize::MAX) / BLOCK_TOKENS;
        Self { capacity_blocks, state: Mutex::new(State { blocks: HashMap::new(), tick: 0 }) }
    }

    /// Looks `tokens` up (the number of leading tokens found cached) and caches its full blocks.
    /// As in vLLM the last prompt token is always computed, so at most `len - 1` tokens hit.
    pub fn lookup_and_insert(&self, tokens: &[u64]) -> u64 {
        if self.capacity_blocks == 0 {
            return 0;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.tick += 1;
        let tick = st.tick;
        let mut parent = 0u64;
        let mut hit_blocks = 0;
        let mut missed = false;
        for block in tokens.chunks_exact(BLOCK_TOKENS) {
            parent = h((parent, block));
            match st.blocks.get_mut(&parent) {
                Some(t) if !missed => {
                    *t = tick;
                    hit_blocks += 1;
                }
                _ => {
                    missed = true;
                    st.blocks.insert(parent, tick);
                }
            }
        }
        if st.blocks.len() > self.capacity_blocks {
            // Evict the least recently used tenth at once (a sort per eviction, not per block).
            let mut ticks: Vec<u64> = st.blocks.values().copied().collect();
            ticks.sort_unstable();
            let drop = st.blocks.len() - self.capacity_blocks * 9 / 10;
            let cutoff = ticks[drop.min(ticks.len()) - 1];
            st.blocks.retain(|_, t| *t > cutoff || *t == tick);
        }
        ((hit_blocks * BLOCK_TOKENS) as u64).min(tokens.len().saturating_sub(1) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_growing_conversation_hits_its_earlier_blocks() {
        let c = PrefixCache::new(1 << 20);
        let m1 = vec![json!({"role": "system", "content": "be brief ".repeat(20)}), json!({"role": "user", "content": "hello there"})];
        let t1 = chat_tokens(&m1);
        assert_eq!(t1.len(), 5 + 40 + 5 + 2 + 2);
        assert_eq!(c.lookup_and_insert(&t1), 0);
        let mut m2 = m1.clone();
        m2.push(json!({"role": "assistant", "content": "w1:0 w1:1"}));
        m2.push(json!({"role": "user", "content": "and more"}));
        let t2 = chat_tokens(&m2);
        // Every full block of turn 1 except the one holding its generation prompt.
        let hit = c.lookup_and_insert(&t2);
        assert_eq!(hit, (t1.len() - 2) as u64 / BLOCK_TOKENS as u64 * BLOCK_TOKENS as u64);
        // Another conversation with the same system prompt shares its leading blocks only.
        let other = chat_tokens(&[m1[0].clone(), json!({"role": "user", "content": "bye"})]);
        assert_eq!(c.lookup_and_insert(&other), 48, "the first 50 tokens match: three whole blocks");
    }

    #[test]
    fn least_recently_used_blocks_are_evicted() {
        let c = PrefixCache::new(64); // four blocks
        let a: Vec<u64> = (0..64).collect();
        let b: Vec<u64> = (100..164).collect();
        c.lookup_and_insert(&a);
        c.lookup_and_insert(&b);
        assert_eq!(c.lookup_and_insert(&a), 0, "evicted by b");
        assert_eq!(c.lookup_and_insert(&a), 63);
    }
}
