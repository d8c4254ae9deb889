//! The fake engine: admits requests into at most `max_num_seqs` slots (the rest really wait),
//! paces tokens by TTFT and inter-token delay, marks every token with the worker id, injects
//! the configured failures, and keeps the metrics honest about all of it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Finish, Metrics};

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
    /// Failure injection: abort the request (finish reason `abort`) in place of the first token.
    pub abort_before_token: bool,
    /// Failure injection: answer every valid request with this HTTP status (no generation).
    pub fail_status: Option<u16>,
}

pub struct Engine {
    pub cfg: EngineConfig,
    pub metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
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
}

impl Engine {
    pub fn new(cfg: EngineConfig, model_name: &str) -> Self {
        let metrics = Arc::new(Metrics::new(model_name, cfg.kv_capacity_tokens));
        let slots = Arc::new(Semaphore::new(cfg.max_num_seqs.max(1)));
        Self {
            cfg,
            metrics,
            slots,
        }
    }

    /// A generation that starts waiting for a slot on its first `next()`.
    pub fn generate(self: &Arc<Self>, prompt_tokens: u64, max_tokens: u32) -> Generation {
        Generation {
            engine: Arc::clone(self),
            prompt_tokens,
            max_tokens,
            arrival: Instant::now(),
            scheduled: None,
            last_token_at: None,
            sent: 0,
            slot: None,
            done: false,
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
    prompt_tokens: u64,
    max_tokens: u32,
    arrival: Instant,
    scheduled: Option<Instant>,
    last_token_at: Option<Instant>,
    sent: u32,
    slot: Option<Slot>,
    done: bool,
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

    fn finish(&mut self, reason: Finish) {
        self.done = true;
        self.slot = None;
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
        let scheduled = match self.scheduled {
            Some(t) => t,
            None => {
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
                now
            }
        };

        let n = self.sent;
        wait_until(scheduled + cfg.ttft + cfg.inter_token * n).await;
        if n == 0 && cfg.error_before_token {
            self.finish(Finish::Error);
            return Some(Event::EngineDead);
        }
        if n == 0 && cfg.abort_before_token {
            self.finish(Finish::Abort);
            return Some(Event::Aborted);
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
        self.sent += 1;
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
mod tests {
    use super::*;

    fn cfg() -> EngineConfig {
        EngineConfig {
            worker_id: "w7".into(),
            ttft: Duration::ZERO,
            inter_token: Duration::ZERO,
            max_num_seqs: 1,
            kv_capacity_tokens: 100,
            reset_after_tokens: None,
            error_before_token: false,
            abort_before_token: false,
            fail_status: None,
        }
    }

    #[tokio::test]
    async fn tokens_mark_the_worker_and_the_last_one_is_flagged() {
        let engine = Arc::new(Engine::new(cfg(), "tiny"));
        let mut g = engine.generate(3, 2);
        assert_eq!(
            g.next().await,
            Some(Event::Token {
                index: 0,
                text: " w7:0".into(),
                last: false
            })
        );
        assert_eq!(engine.metrics.running.load(Ordering::Relaxed), 1);
        assert_eq!(
            g.next().await,
            Some(Event::Token {
                index: 1,
                text: " w7:1".into(),
                last: true
            })
        );
        assert_eq!(g.next().await, None);
        assert_eq!(engine.metrics.running.load(Ordering::Relaxed), 0);
        assert_eq!(engine.metrics.kv_tokens.load(Ordering::Relaxed), 0);
        assert_eq!(engine.metrics.generation_tokens.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn reset_comes_after_n_tokens() {
        let engine = Arc::new(Engine::new(
            EngineConfig {
                reset_after_tokens: Some(1),
                ..cfg()
            },
            "tiny",
        ));
        let mut g = engine.generate(3, 5);
        assert!(matches!(
            g.next().await,
            Some(Event::Token { index: 0, .. })
        ));
        assert_eq!(g.next().await, Some(Event::Reset));
        assert_eq!(g.next().await, None);
    }

    #[tokio::test]
    async fn second_request_waits_for_the_slot() {
        let engine = Arc::new(Engine::new(cfg(), "tiny"));
        let mut a = engine.generate(1, 3);
        assert!(a.next().await.is_some());
        let mut b = engine.generate(1, 3);
        let waiter = tokio::spawn(async move { b.next().await });
        while engine.metrics.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        drop(a);
        assert!(waiter.await.ok().flatten().is_some());
        assert_eq!(engine.metrics.waiting.load(Ordering::Relaxed), 0);
    }
}
