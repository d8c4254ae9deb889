//! Which LoRA adapters vLLM has loaded, as far as its `/metrics` tells.
//!
//! vLLM holds up to `max_loras` adapters in GPU memory, in an LRU cache: an adapter is moved to
//! the front when a step uses it, and the least recently used one leaves only when another
//! adapter needs its slot. `/metrics` does not show that cache. It shows
//! `vllm:lora_requests_info` ([`crate::scrape::LoraInfo`]): one series per distinct set of
//! running and waiting adapters, each holding the last time (Unix seconds) it was the engine's
//! state. So the page still tells, after their requests ended, when each adapter was last in an
//! engine step — the LRU's own order. The adapters announced as loaded are: those active now
//! (running, then waiting: they are, or are about to be, in the cache), then the most recently
//! named others, up to `max_lora` in all.
//!
//! Where that is wrong: adapters loaded or unloaded through vLLM's API without a request
//! (`/v1/load_lora_adapter`), a restarted vLLM until its first step (its page starts empty,
//! and then so does the list), and vLLM's CPU-side cache (`max_cpu_loras`), which makes a
//! reload cheaper but is not counted here. It only steers a preference: any worker serving the
//! adapter still serves it.

use crate::scrape::LoraInfo;

/// Most adapters announced (the frame carries at most this many).
pub const MAX_ANNOUNCED: usize = gpuha_liveness::frame::MAX_ADAPTERS;

/// The adapters to announce as loaded, most recently active first (`None`: the page has no
/// LoRA series: LoRA is off, nothing is loaded).
pub fn loaded(info: Option<&LoraInfo>) -> Vec<String> {
    let Some(info) = info else { return Vec::new() };
    let mut out = info.active();
    // Without `max_lora` (not vLLM's page as we know it), only what is active now.
    let slots = info.max_lora.map_or(out.len(), |m| (m as usize).max(out.len()));
    for n in &info.recent {
        if out.len() >= slots {
            break;
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    out.truncate(MAX_ANNOUNCED);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(running: &[&str], waiting: &[&str], recent: &[&str], max_lora: Option<u32>) -> LoraInfo {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        LoraInfo { running: v(running), waiting: v(waiting), max_lora, dropped: 0, recent: v(recent) }
    }

    #[test]
    fn active_first_then_the_lru_order_up_to_max_lora() {
        assert_eq!(loaded(Some(&info(&[], &[], &["a", "b", "c"], Some(2)))), vec!["a", "b"]);
        assert_eq!(loaded(Some(&info(&["c"], &[], &["c", "a", "b"], Some(2)))), vec!["c", "a"]);
        assert_eq!(loaded(Some(&info(&["a"], &["b", "c"], &["a", "b", "c"], Some(1)))), vec!["a", "b", "c"], "active ones even beyond the slots");
        assert_eq!(loaded(Some(&info(&[], &[], &["a"], None))), Vec::<String>::new());
        assert_eq!(loaded(None), Vec::<String>::new());
        let many: Vec<String> = (0..12).map(|i| format!("a{i}")).collect();
        let m: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(loaded(Some(&info(&m, &[], &m, Some(16)))).len(), MAX_ANNOUNCED);
    }

    /// The real capture: `adapter-a` ran, then the engine went idle; with `max_lora` 2 it is
    /// still loaded.
    #[test]
    fn the_capture_announces_the_adapter_after_its_request_ended() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/vllm-0.32.0-cpu/");
        let text = std::fs::read_to_string(format!("{dir}metrics-lora.txt")).unwrap();
        let s = crate::scrape::parse(&text).unwrap();
        assert!(s.lora.as_ref().unwrap().active().is_empty());
        assert_eq!(loaded(s.lora.as_ref()), vec!["adapter-a"]);
    }
}
