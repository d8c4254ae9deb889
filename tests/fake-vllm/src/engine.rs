//! The fake engine: admits requests into at most `max_num_seqs` slots (the rest really wait),
//! paces tokens by TTFT and inter-token delay, marks every token with the worker id, injects
//! the configured failures, and keeps the metrics honest about all of it.
//!
//! Two failure shapes can be switched on and off while the process runs (see [`Engine::set_hung`]
//! and [`Engine::set_slow`]): a *hang*, what a stopped EngineCore looks like from outside (no
//! token leaves, nothing is admitted, `/metrics` answers with the numbers it had), and a
//! *slow-down* (every delay multiplied by `slow_factor`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::flaky::Flaky;
use crate::lora::{AdapterGuard, LoraConfig, Loras};
use crate::metrics::{Finish, Metrics};
use crate::prefix::PrefixCache;

/// The longest prefill step (one chunk of a long prompt).
const PREFILL_STEP: Duration = Duration::from_millis(100);

/// How the engine behaves; fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Marks every generated token (` <id>:<n>`), so a splice of two workers is visible.
    pub worker_id: String,
    /// Time from admission to the first token.
    pub ttft: Duration,
    /// Delay between tokens; zero means none.
    pub inter_token: Duration,
    /// Concurrent generations; requests beyond it queue.
    pub max_num_seqs: usize,
    /// KV cache size in tokens, the denominator of `vllm:kv_cache_usage_perc`.
    pub kv_capacity_tokens: u64,
    /// Failure injection: drop the connection once this many tokens of a stream are out.
    pub reset_after_tokens: Option<u32>,
    /// Failure injection: report an EngineCore death in place of the first token.
    pub error_before_token: bool,
    /// Failure injection: report an EngineCore death once this many tokens of a stream are out
    /// (vLLM's in-band error event, then `[DONE]`: what a stream gets when the engine dies
    /// mid-generation).
    pub error_after_tokens: Option<u32>,
    /// Failure injection: abort the request (finish reason `abort`) in place of the first token.
    pub abort_before_token: bool,
    /// Failure injection: answer every valid request with this HTTP status (no generation).
    pub fail_status: Option<u16>,
    /// While slowed down, TTFT and inter-token delays are multiplied by this.
    pub slow_factor: f64,
    /// Failure injection: each generation request fails before its first token with this
    /// probability, in a shape drawn per request (see [`crate::flaky`]).
    pub flaky: f64,
    /// Seed of the `flaky` draws; `None`: random.
    pub flaky_seed: Option<u64>,
    /// Prefill time per prompt token not found in the prefix cache (on top of `ttft`).
    pub prefill_per_token: Duration,
    /// Prefix cache capacity in tokens (0: no prefix caching).
    pub prefix_cache_tokens: u64,
    /// LoRA adapters served ([`crate::lora`]).
    pub lora: LoraConfig,
}

pub struct Engine {
    pub cfg: EngineConfig,
    pub metrics: Arc<Metrics>,
    pub flaky: Flaky,
    pub prefix: PrefixCache,
    pub loras: Arc<Loras>,
    slots: Arc<Semaphore>,
    /// `true` while the engine hangs. A watch channel so every paused generation wakes on resume.
    hung: watch::Sender<bool>,
    /// Held (shared) by a token from its hang check to its counters, and (exclusive) by a hang
    /// toggle: the frozen `/metrics` counts exactly the tokens that reached the clients.
    step: RwLock<()>,
    slow: AtomicBool,
}

/// What a generation produces next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Token `index`; `last` when it is the final one (finish reason `length`).
    Token {
        index: u32,
        text: String,
        last: bool,
    },
    /// The engine "died" before the first token (vLLM's in-stream error event).
    EngineDead,
    /// The engine aborted the request before the first token (finish reason `abort`).
    Aborted,
    /// The connection must be dropped now, without a clean end.
    Reset,
    /// The connection must be dropped in the middle of the event that was due (before the
    /// first token; `--flaky`).
    Cut,
}

/// A failure one generation meets in place of its first token (drawn by `--flaky`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// [`Event::EngineDead`].
    EngineDead,
    /// [`Event::Aborted`].
    Aborted,
    /// [`Event::Cut`].
    Cut,
}

impl Engine {
    pub fn new(cfg: EngineConfig, model_name: &str) -> Self {
        let metrics = Arc::new(Metrics::new(model_name, cfg.kv_capacity_tokens));
        let slots = Arc::new(Semaphore::new(cfg.max_num_seqs.max(1)));
        let flaky = Flaky::new(cfg.flaky, cfg.flaky_seed);
        let prefix = PrefixCache::new(cfg.prefix_cache_tokens);
        let loras = Arc::new(Loras::new(cfg.lora.clone()));
        Self {
            cfg,
            metrics,
            flaky,
            prefix,
            loras,
            slots,
            hung: watch::Sender::new(false),
            step: RwLock::new(()),
            slow: AtomicBool::new(false),
        }
    }

    pub fn is_hung(&self) -> bool {
        *self.hung.borrow()
    }

    /// Hangs or resumes the engine. While hung no token is produced and no request is admitted,
    /// but the HTTP side keeps working, and `/metrics` shows the numbers frozen at the moment the
    /// hang began: vLLM's API server keeps exporting the last stats its EngineCore sent.
    pub fn set_hung(&self, hung: bool) {
        // A poisoned lock only means a panic elsewhere; the unit inside cannot be corrupt.
        let _steps = self.step.write().unwrap_or_else(|e| e.into_inner());
        self.hung.send_if_modified(|h| {
            if *h == hung {
                return false;
            }
            // Freeze before anyone can observe the hang, thaw after the resume is visible.
            if hung {
                self.metrics.freeze();
            }
            *h = hung;
            if !hung {
                self.metrics.thaw();
            }
            true
        });
    }

    /// Flips the hang; returns the new state.
    pub fn toggle_hang(&self) -> bool {
        let hung = !self.is_hung();
        self.set_hung(hung);
        hung
    }

    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    pub fn set_slow(&self, slow: bool) {
        self.slow.store(slow, Ordering::Relaxed);
    }

    /// Flips the slow-down; returns the new state.
    pub fn toggle_slow(&self) -> bool {
        !self.slow.fetch_xor(true, Ordering::Relaxed)
    }

    /// Returns at once unless the engine hangs; then when it resumes.
    pub async fn wait_running(&self) {
        let mut rx = self.hung.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we are borrowed.
        let _ = rx.wait_for(|hung| !*hung).await;
    }

    /// A delay as paced right now (stretched while slowed down).
    fn paced(&self, d: Duration) -> Duration {
        let f = self.cfg.slow_factor;
        if self.is_slow() && f.is_finite() && f > 0.0 {
            d.mul_f64(f)
        } else {
            d
        }
    }

    /// One engine step outside a generation (an embedding's prefill): waits while hung, counts
    /// the prompt tokens, and is paced like a first token.
    pub async fn prefill(&self, prompt_tokens: u64) {
        self.wait_running().await;
        loop {
            tokio::time::sleep(self.paced(self.cfg.ttft)).await;
            if !self.is_hung() {
                break;
            }
            self.wait_running().await;
        }
        let m = &self.metrics;
        m.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        m.engine_step(prompt_tokens);
    }

    /// A generation whose prompt is these token ids: looked up in the prefix cache when it is
    /// scheduled, and only its uncached part costs prefill time.
    pub fn generate_prompt(self: &Arc<Self>, prompt: Vec<u64>, max_tokens: u32) -> Generation {
        let mut g = self.generate(prompt.len() as u64, max_tokens);
        g.prompt = Some(prompt);
        g
    }

    /// A generation that starts waiting for a slot on its first `next()`.
    pub fn generate(self: &Arc<Self>, prompt_tokens: u64, max_tokens: u32) -> Generation {
        Generation {
            engine: Arc::clone(self),
            prompt: None,
            prompt_tokens,
            max_tokens,
            arrival: Instant::now(),
            scheduled: None,
            due: None,
            last_token_at: None,
            sent: 0,
            slot: None,
            done: false,
            fault: None,
            ttft: self.cfg.ttft,
            adapter_name: None,
            adapter: None,
        }
    }
}

/// A scheduled request: holds a slot and counts as running while it lives.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    kv_tokens: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.running.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .kv_tokens
            .fetch_sub(self.kv_tokens, Ordering::Relaxed);
    }
}

/// Counts as waiting while it lives.
struct Waiting<'a>(&'a Metrics);

impl<'a> Waiting<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.waiting.fetch_add(1, Ordering::Relaxed);
        Self(m)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request's life in the engine. Dropping it early (client gone, connection reset) counts
/// as an abort and frees its slot.
pub struct Generation {
    engine: Arc<Engine>,
    /// The prompt's token ids, when known (chat and completions): prefix-cached.
    prompt: Option<Vec<u64>>,
    prompt_tokens: u64,
    max_tokens: u32,
    arrival: Instant,
    scheduled: Option<Instant>,
    /// When the next token is due: a timeline, so sleep jitter does not accumulate.
    due: Option<Instant>,
    last_token_at: Option<Instant>,
    sent: u32,
    slot: Option<Slot>,
    done: bool,
    /// Met in place of the first token.
    fault: Option<Fault>,
    /// This generation's time to first token (with the prefill of its uncached prompt).
    ttft: Duration,
    /// The LoRA adapter the request names, until it arrives in the engine.
    adapter_name: Option<String>,
    /// Its hold on that adapter (waiting, then running), from its arrival to its end.
    adapter: Option<AdapterGuard>,
}

async fn wait_until(deadline: Instant) {
    if deadline > Instant::now() {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

impl Generation {
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }

    /// Tokens produced so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// This generation runs with the LoRA adapter `name` (`None`: the base model).
    pub fn with_adapter(mut self, name: Option<String>) -> Self {
        self.adapter_name = name;
        self
    }

    /// This generation meets `fault` (if any) in place of its first token.
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    fn finish(&mut self, reason: Finish) {
        self.done = true;
        self.slot = None;
        self.adapter = None;
        let m = &self.engine.metrics;
        m.finished(
            reason,
            self.arrival.elapsed().as_secs_f64(),
            u64::from(self.sent),
        );
    }

    /// The next event, paced in real time; `None` once the generation is over.
    pub async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let engine = Arc::clone(&self.engine);
        let cfg = &engine.cfg;
        let m = &engine.metrics;
        if self.scheduled.is_none() {
            // A hung EngineCore never sees new requests: they are not even counted as waiting.
            engine.wait_running().await;
            if let Some(name) = self.adapter_name.take() {
                self.adapter = Some(engine.loras.arrive(&name));
            }
            {
                let permit = {
                    let _waiting = Waiting::new(m);
                    Arc::clone(&engine.slots).acquire_owned().await.ok()?
                };
                let now = Instant::now();
                m.running.fetch_add(1, Ordering::Relaxed);
                m.kv_tokens.fetch_add(self.prompt_tokens, Ordering::Relaxed);
                self.slot = Some(Slot {
                    _permit: permit,
                    metrics: Arc::clone(m),
                    kv_tokens: self.prompt_tokens,
                });
                m.scheduled(
                    (now - self.arrival).as_secs_f64(),
                    self.prompt_tokens,
                    u64::from(self.max_tokens),
                );
                self.scheduled = Some(now);
                let mut ttft = cfg.ttft;
                if let Some(prompt) = self.prompt.take() {
                    let hits = engine.prefix.lookup_and_insert(&prompt);
                    m.prefix_cache(prompt.len() as u64, hits);
                    let uncached = u32::try_from(prompt.len() as u64 - hits).unwrap_or(u32::MAX);
                    ttft += cfg.prefill_per_token.saturating_mul(uncached);
                }
                if let Some(g) = self.adapter.as_mut() {
                    // An adapter not loaded is read in first (vLLM: before the step that uses it).
                    ttft += engine.loras.schedule(g);
                }
                self.ttft = ttft;
                self.due = Some(now + engine.paced(ttft));
            }
        }

        let n = self.sent;
        let step = if n == 0 { self.ttft } else { cfg.inter_token };
        let _step = loop {
            let due = self.due.unwrap_or_else(Instant::now);
            if n == 0 {
                // A chunked prefill: vLLM takes one engine step per chunk of a long prompt, so
                // its step counter advances all through a long time to first token (the frames'
                // evidence of progress); its prompt and generation tokens do not.
                while Instant::now() + PREFILL_STEP < due {
                    tokio::time::sleep(PREFILL_STEP).await;
                    let _g = engine.step.read().unwrap_or_else(|e| e.into_inner());
                    if !engine.is_hung() {
                        m.engine_step(0);
                    }
                }
            }
            wait_until(due).await;
            {
                let guard = engine.step.read().unwrap_or_else(|e| e.into_inner());
                if !engine.is_hung() {
                    break guard;
                }
            }
            // The step in flight when the engine hung never finishes; after the resume the
            // token takes a whole step again instead of bursting out with the ones overdue.
            engine.wait_running().await;
            self.due = Some(Instant::now() + engine.paced(step));
        };
        if let Some(fault) = self.fault.filter(|_| n == 0) {
            self.finish(if fault == Fault::EngineDead { Finish::Error } else { Finish::Abort });
            return Some(match fault {
                Fault::EngineDead => Event::EngineDead,
                Fault::Aborted => Event::Aborted,
                Fault::Cut => Event::Cut,
            });
        }
        if n == 0 && cfg.error_before_token {
            self.finish(Finish::Error);
            return Some(Event::EngineDead);
        }
        if n == 0 && cfg.abort_before_token {
            self.finish(Finish::Abort);
            return Some(Event::Aborted);
        }
        if cfg.error_after_tokens == Some(n) {
            self.finish(Finish::Error);
            return Some(Event::EngineDead);
        }
        if cfg.reset_after_tokens == Some(n) {
            self.finish(Finish::Abort);
            return Some(Event::Reset);
        }

        let now = Instant::now();
        match self.last_token_at {
            None => m.first_token((now - self.arrival).as_secs_f64()),
            Some(t) => m.next_token((now - t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.due = self.due.map(|d| d + engine.paced(cfg.inter_token));
        self.sent += 1;
        // The fake does not batch: each token is one engine step, the first one also carrying
        // the prefill (vLLM's `iteration_tokens_total` counts tokens scheduled per step).
        m.engine_step(if n == 0 { self.prompt_tokens.max(1) } else { 1 });
        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
        m.kv_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slot.as_mut() {
            slot.kv_tokens += 1;
        }
        let last = self.sent >= self.max_tokens;
        if last {
            self.finish(Finish::Length);
        }
        Some(Event::Token {
            index: n,
            text: format!(" {}:{n}", cfg.worker_id),
            last,
        })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Finish::Abort);
        }
    }
}

#[cfg(test)]
mod tests;
