//! LoRA adapters as vLLM serves them (`--lora-modules name=path`): each adapter is a model name
//! of its own (`/v1/models` lists it with its base model as `parent`), the engine holds at most
//! `max_loras` of them in (GPU) memory in an LRU, and a request for an adapter that is not
//! loaded waits for it to load first (`--lora-load-ms`, added to its time to first token),
//! evicting the least recently used one that no running request uses.
//!
//! `/metrics` reports them as vLLM does: the info gauge `vllm:lora_requests_info` with the labels
//! `max_lora`, `running_lora_adapters` and `waiting_lora_adapters` (adapter names joined by
//! commas), one series per distinct label set, each set to the current Unix time whenever that
//! is the engine's state (vLLM: `set_to_current_time()` at each engine step), older series left
//! on the page. So, as in vLLM, the newest series is the current state, and an adapter that has
//! finished its requests disappears from it although it stays loaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Distinct label sets kept on the page (vLLM keeps every one; this bounds a long run).
const MAX_SERIES: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct LoraConfig {
    /// Adapters (name, path), in the order given.
    pub adapters: Vec<(String, String)>,
    /// Adapters held loaded at once (vLLM's `--max-loras`, default 1).
    pub max_loras: usize,
    /// Time to load an adapter that is not loaded.
    pub load: Duration,
}

#[derive(Default)]
struct State {
    /// Loaded adapters, most recently used first.
    loaded: Vec<String>,
    running: BTreeMap<String, usize>,
    waiting: BTreeMap<String, usize>,
    /// (running label, waiting label, Unix time last set), oldest first.
    series: Vec<(String, String, f64)>,
    loads_total: u64,
}

pub struct Loras {
    pub cfg: LoraConfig,
    state: Mutex<State>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl Loras {
    pub fn new(cfg: LoraConfig) -> Self {
        let l = Loras { cfg, state: Mutex::new(State::default()) };
        if !l.cfg.adapters.is_empty() {
            // vLLM's first engine step sets the idle series.
            l.with(|_| ());
        }
        l
    }

    pub fn is_adapter(&self, model: &str) -> bool {
        self.path_of(model).is_some()
    }

    /// The path an adapter was given with (`/v1/models` shows it as `root`).
    pub fn path_of(&self, model: &str) -> Option<&str> {
        self.cfg.adapters.iter().find(|(a, _)| a == model).map(|(_, p)| p.as_str())
    }

    /// Runs `f` on the state and records the resulting label set as the current one.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut s);
        let join = |m: &BTreeMap<String, usize>| m.iter().filter(|(_, n)| **n > 0).map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
        let (r, w) = (join(&s.running), join(&s.waiting));
        let now = unix_now();
        s.series.retain(|(sr, sw, _)| !(*sr == r && *sw == w));
        s.series.push((r, w, now));
        if s.series.len() > MAX_SERIES {
            s.series.remove(0);
        }
        out
    }

    /// A request for `adapter` arrives: it waits until [`Loras::schedule`].
    pub fn arrive(self: &Arc<Self>, adapter: &str) -> AdapterGuard {
        self.with(|s| *s.waiting.entry(adapter.to_owned()).or_default() += 1);
        AdapterGuard { loras: Arc::clone(self), adapter: adapter.to_owned(), running: false }
    }

    /// The request got a slot: it runs now. Returns the time to load its adapter first (zero
    /// when loaded).
    pub fn schedule(&self, g: &mut AdapterGuard) -> Duration {
        if g.running {
            return Duration::ZERO;
        }
        g.running = true;
        let max = self.cfg.max_loras.max(1);
        let load = self.cfg.load;
        self.with(|s| {
            dec(&mut s.waiting, &g.adapter);
            *s.running.entry(g.adapter.clone()).or_default() += 1;
            if let Some(i) = s.loaded.iter().position(|a| *a == g.adapter) {
                let a = s.loaded.remove(i);
                s.loaded.insert(0, a);
                return Duration::ZERO;
            }
            s.loaded.insert(0, g.adapter.clone());
            s.loads_total += 1;
            // Evict the least recently used adapters no running request uses.
            while s.loaded.len() > max {
                let Some(i) = s.loaded.iter().rposition(|a| s.running.get(a).copied().unwrap_or(0) == 0) else { break };
                s.loaded.remove(i);
            }
            load
        })
    }

    /// Loaded adapters, most recently used first.
    pub fn loaded(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).loaded.clone()
    }

    /// Adapter loads so far.
    pub fn loads_total(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).loads_total
    }

    /// The `vllm:lora_requests_info` family; empty without adapters (vLLM: LoRA disabled).
    pub fn render(&self) -> String {
        if self.cfg.adapters.is_empty() {
            return String::new();
        }
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from("# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n");
        for (r, w, t) in &s.series {
            let _ = writeln!(out, "vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{r}\",waiting_lora_adapters=\"{w}\"}} {t:e}", self.cfg.max_loras.max(1));
        }
        out
    }
}

fn dec(m: &mut BTreeMap<String, usize>, k: &str) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// One request's hold on its adapter: waiting, then running; dropped when the request ends.
pub struct AdapterGuard {
    loras: Arc<Loras>,
    adapter: String,
    running: bool,
}

impl Drop for AdapterGuard {
    fn drop(&mut self) {
        let running = self.running;
        let a = std::mem::take(&mut self.adapter);
        self.loras.with(|s| dec(if running { &mut s.running } else { &mut s.waiting }, &a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loras(max: usize) -> Arc<Loras> {
        Arc::new(Loras::new(LoraConfig { adapters: ["a", "b", "c"].iter().map(|a| (a.to_string(), format!("/adapters/{a}"))).collect(), max_loras: max, load: Duration::from_millis(300) }))
    }

    /// The newest series of the page, as a reader of vLLM's metric takes it.
    fn current(l: &Loras) -> (String, String) {
        let text = l.render();
        let mut best = (String::new(), String::new(), f64::MIN);
        for line in text.lines().filter(|l| l.starts_with("vllm:lora_requests_info{")) {
            let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            let label = |k: &str| line.split(&format!("{k}=\"")).nth(1).unwrap().split('"').next().unwrap().to_string();
            if v >= best.2 {
                best = (label("running_lora_adapters"), label("waiting_lora_adapters"), v);
            }
        }
        (best.0, best.1)
    }

    #[test]
    fn lru_of_max_loras_and_load_delay() {
        let l = loras(2);
        let mut g = l.arrive("a");
        assert_eq!(current(&l), ("".into(), "a".into()));
        assert_eq!(l.schedule(&mut g), Duration::from_millis(300));
        assert_eq!(current(&l), ("a".into(), "".into()));
        drop(g);
        assert_eq!(current(&l), ("".into(), "".into()));
        let mut g = l.arrive("a");
        assert_eq!(l.schedule(&mut g), Duration::ZERO, "still loaded after its request ended");
        drop(g);
        let mut g = l.arrive("b");
        l.schedule(&mut g);
        drop(g);
        assert_eq!(l.loaded(), vec!["b", "a"]);
        let mut running_a = l.arrive("a");
        l.schedule(&mut running_a);
        let mut g = l.arrive("c");
        assert_eq!(l.schedule(&mut g), Duration::from_millis(300));
        assert_eq!(l.loaded(), vec!["c", "a"], "b, the least recently used, is evicted");
        assert_eq!(current(&l), ("a,c".into(), "".into()));
        assert_eq!(l.loads_total(), 3);
        assert!(l.render().starts_with("# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n"));
        assert!(l.render().contains("max_lora=\"2\""));
    }

    #[test]
    fn no_adapters_no_family() {
        let l = Loras::new(LoraConfig::default());
        assert_eq!(l.render(), "");
    }
}
