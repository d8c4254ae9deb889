//! Which LoRA adapters vLLM probably has loaded, from what its `/metrics` shows over time.
//!
//! `vllm:lora_requests_info` names the adapters of the requests running or waiting at the newest
//! engine step ([`crate::scrape::LoraInfo`]); once an adapter's requests end, it is gone from
//! the metric. vLLM itself keeps it: its GPU holds up to `max_loras` adapters in an LRU cache,
//! and one leaves only when another adapter needs its slot (or it is unloaded through the API).
//! `/metrics` does not show that cache, so the sidecar estimates it the same way: the adapters
//! seen active, most recently active first, cut to `max_lora` (never below the adapters active
//! right now), and each forgotten `memory_ms` after it was last seen active (a restarted or
//! reconfigured vLLM starts with an empty cache; the estimate must not outlive that for long).
//!
//! The estimate can be wrong both ways (an adapter active only between two scrapes is never
//! seen; an unloaded one is listed until it expires); it is only a routing preference, and the
//! worker serves the adapter either way.

use crate::scrape::LoraInfo;

/// Recently active adapters, most recent first.
#[derive(Debug, Clone)]
pub struct Resident {
    memory_ms: u64,
    /// (name, last seen active, ms).
    seen: Vec<(String, u64)>,
}

/// Most adapters remembered (the frame carries at most this many).
pub const MAX_REMEMBERED: usize = gpuha_liveness::frame::MAX_ADAPTERS;

impl Resident {
    pub fn new(memory_ms: u64) -> Self {
        Resident { memory_ms, seen: Vec::new() }
    }

    /// Takes one scrape's LoRA info (`None`: the page had no LoRA series, LoRA is off or vLLM
    /// restarted without it: nothing is loaded) and returns the adapters to announce, most
    /// recently active first.
    pub fn update(&mut self, info: Option<&LoraInfo>, now_ms: u64) -> Vec<String> {
        let Some(info) = info else {
            self.seen.clear();
            return Vec::new();
        };
        let active = info.active();
        // Active ones to the front, in vLLM's order.
        self.seen.retain(|(n, _)| !active.contains(n));
        let mut seen: Vec<(String, u64)> = active.iter().map(|n| (n.clone(), now_ms)).collect();
        seen.append(&mut self.seen);
        let memory = self.memory_ms;
        seen.retain(|(_, t)| now_ms.saturating_sub(*t) <= memory);
        // vLLM's LRU holds `max_lora`; the active ones are wanted here whatever the slots.
        let slots = info.max_lora.map_or(active.len(), |m| (m as usize).max(active.len()));
        seen.truncate(slots.min(MAX_REMEMBERED));
        self.seen = seen;
        self.seen.iter().map(|(n, _)| n.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(running: &[&str], waiting: &[&str], max_lora: Option<u32>) -> LoraInfo {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        LoraInfo { running: v(running), waiting: v(waiting), max_lora, dropped: 0 }
    }

    #[test]
    fn an_adapter_stays_listed_after_its_requests_end_until_its_slot_is_needed() {
        let mut r = Resident::new(60_000);
        assert_eq!(r.update(Some(&info(&["a"], &[], Some(2))), 0), vec!["a"]);
        // Idle: vLLM keeps `a` in its LRU; so does the estimate.
        assert_eq!(r.update(Some(&info(&[], &[], Some(2))), 500), vec!["a"]);
        assert_eq!(r.update(Some(&info(&["b"], &[], Some(2))), 1_000), vec!["b", "a"]);
        // A third adapter takes the least recently used slot.
        assert_eq!(r.update(Some(&info(&["c"], &["a"], Some(2))), 1_500), vec!["c", "a"]);
        assert_eq!(r.update(Some(&info(&[], &[], Some(2))), 2_000), vec!["c", "a"]);
        // Forgotten after the memory window.
        assert_eq!(r.update(Some(&info(&[], &[], Some(2))), 61_600), Vec::<String>::new());
    }

    #[test]
    fn more_active_than_slots_lists_the_active_and_no_series_clears() {
        let mut r = Resident::new(60_000);
        assert_eq!(r.update(Some(&info(&["a", "b"], &["c"], Some(1))), 0), vec!["a", "b", "c"]);
        assert_eq!(r.update(Some(&info(&[], &[], Some(1))), 1), vec!["a"]);
        assert_eq!(r.update(None, 2), Vec::<String>::new());
        assert_eq!(r.update(Some(&info(&[], &[], Some(4))), 3), Vec::<String>::new());
        // Unknown max_lora: only what is active now.
        assert_eq!(r.update(Some(&info(&["x"], &[], None)), 4), vec!["x"]);
        assert_eq!(r.update(Some(&info(&[], &[], None)), 5), Vec::<String>::new());
        // Never more than a frame carries.
        let many: Vec<String> = (0..12).map(|i| format!("a{i}")).collect();
        let m: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(r.update(Some(&info(&m, &[], Some(16))), 6).len(), MAX_REMEMBERED);
    }
}
