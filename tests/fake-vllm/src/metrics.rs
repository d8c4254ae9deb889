//! The worker's `/metrics`: a subset of vLLM 0.32.0's metric families with exactly the names,
//! `# HELP`/`# TYPE` lines, label sets, histogram buckets and `_created` gauges of the real
//! server (see `tests/data/vllm-0.32.0-cpu/metrics-idle.txt`), fed by what the fake engine really
//! does. Every family here must exist in the capture with the same type (a test checks it).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bucket bounds copied from the capture.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Shared by e2e latency and queue time in vLLM.
const LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
/// Tokens per engine step (`vllm:iteration_tokens_total`).
const ITERATION_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// vLLM's `finished_reason` label values, in the capture's order.
pub const FINISHED_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

/// Why a request left the engine (the `finished_reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop = 0,
    Length = 1,
    Abort = 2,
    Error = 3,
}

struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket, then one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

struct Histograms {
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    max_tokens: Histogram,
    iteration_tokens: Histogram,
}

/// Live counters of one worker. Gauges and counters are atomics; histograms sit behind one
/// mutex (held for a few nanoseconds per observation).
pub struct Metrics {
    model_name: String,
    start_time: f64,
    kv_capacity_tokens: u64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// Prompt plus generated tokens of running requests: what their KV cache holds.
    pub kv_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    success: [AtomicU64; 5],
    hist: Mutex<Histograms>,
    /// While the engine hangs: the exposition as it was when the hang began.
    frozen: Mutex<Option<String>>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Python's float repr, near enough for Prometheus parsers: integral values keep a `.0`.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v:?}")
    }
}

impl Metrics {
    pub fn new(model_name: &str, kv_capacity_tokens: u64) -> Self {
        Self {
            model_name: model_name.to_owned(),
            start_time: unix_now(),
            kv_capacity_tokens: kv_capacity_tokens.max(1),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefix_queries: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            success: Default::default(),
            hist: Mutex::new(Histograms {
                ttft: Histogram::new(TTFT_BUCKETS),
                itl: Histogram::new(ITL_BUCKETS),
                e2e: Histogram::new(LATENCY_BUCKETS),
                queue: Histogram::new(LATENCY_BUCKETS),
                prompt_tokens: Histogram::new(TOKEN_BUCKETS),
                generation_tokens: Histogram::new(TOKEN_BUCKETS),
                max_tokens: Histogram::new(TOKEN_BUCKETS),
                iteration_tokens: Histogram::new(ITERATION_BUCKETS),
            }),
            frozen: Mutex::new(None),
        }
    }

    /// From now on `render()` answers what it answers now, until `thaw()`.
    pub fn freeze(&self) {
        let snapshot = self.render_live();
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
    }

    pub fn thaw(&self) {
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// One engine step that scheduled `tokens` tokens.
    pub fn engine_step(&self, tokens: u64) {
        self.with_hist(|h| h.iteration_tokens.observe(tokens as f64));
    }

    fn with_hist(&self, f: impl FnOnce(&mut Histograms)) {
        // A poisoned lock only means another thread panicked mid-observation: keep counting.
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut h);
    }

    /// The request left the queue and starts prefill.
    pub fn scheduled(&self, queue_s: f64, prompt_tokens: u64, max_tokens: u64) {
        self.prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.with_hist(|h| {
            h.queue.observe(queue_s);
            h.prompt_tokens.observe(prompt_tokens as f64);
            h.max_tokens.observe(max_tokens as f64);
        });
    }

    /// A prompt of `queried` tokens looked up in the prefix cache, `hits` of them found.
    pub fn prefix_cache(&self, queried: u64, hits: u64) {
        self.prefix_queries.fetch_add(queried, Ordering::Relaxed);
        self.prefix_hits.fetch_add(hits, Ordering::Relaxed);
    }

    pub fn first_token(&self, ttft_s: f64) {
        self.with_hist(|h| h.ttft.observe(ttft_s));
    }

    pub fn next_token(&self, itl_s: f64) {
        self.with_hist(|h| h.itl.observe(itl_s));
    }

    pub fn finished(&self, reason: Finish, e2e_s: f64, generated: u64) {
        self.success[reason as usize].fetch_add(1, Ordering::Relaxed);
        self.with_hist(|h| {
            h.e2e.observe(e2e_s);
            h.generation_tokens.observe(generated as f64);
        });
    }

    pub fn kv_usage(&self) -> f64 {
        let used = self.kv_tokens.load(Ordering::Relaxed) as f64;
        (used / self.kv_capacity_tokens as f64).min(1.0)
    }

    /// The Prometheus text exposition, as vLLM 0.32.0 writes it (frozen while the engine hangs).
    pub fn render(&self) -> String {
        if let Some(frozen) = self.frozen.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return frozen.clone();
        }
        self.render_live()
    }

    fn render_live(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let m = &self.model_name;
        let base = format!("engine=\"0\",model_name=\"{m}\"");
        let created = self.start_time;

        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name}{{{base}}} {}", num(v));
        };

        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            self.running.load(Ordering::Relaxed) as f64,
        );
        let waiting = self.waiting.load(Ordering::Relaxed) as f64;
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            waiting,
        );
        family(
            &mut out,
            "vllm:num_requests_waiting_by_reason",
            "gauge",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
        );
        let _ = writeln!(
            out,
            "vllm:num_requests_waiting_by_reason{{{base},reason=\"capacity\"}} {}",
            num(waiting)
        );
        let _ = writeln!(
            out,
            "vllm:num_requests_waiting_by_reason{{{base},reason=\"deferred\"}} 0.0"
        );
        family(
            &mut out,
            "vllm:engine_sleep_state",
            "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
        );
        for (state, v) in [("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)] {
            let _ = writeln!(
                out,
                "vllm:engine_sleep_state{{{base},sleep_state=\"{state}\"}} {v}.0"
            );
        }
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            self.kv_usage(),
        );

        let counter = |out: &mut String, stem: &str, help: &str, v: f64| {
            family(out, &format!("{stem}_total"), "counter", help);
            let _ = writeln!(out, "{stem}_total{{{base}}} {}", num(v));
            family(out, &format!("{stem}_created"), "gauge", help);
            let _ = writeln!(out, "{stem}_created{{{base}}} {}", num(created));
        };
        counter(
            &mut out,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            self.prefix_queries.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut out,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            self.prefix_hits.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut out,
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            0.0,
        );
        counter(
            &mut out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed) as f64,
        );
        counter(
            &mut out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            self.generation_tokens.load(Ordering::Relaxed) as f64,
        );

        let help = "Count of successfully processed requests.";
        family(&mut out, "vllm:request_success_total", "counter", help);
        for (i, reason) in FINISHED_REASONS.iter().enumerate() {
            let v = self.success[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{m}\"}} {v}.0"
            );
        }
        family(&mut out, "vllm:request_success_created", "gauge", help);
        for reason in FINISHED_REASONS {
            let _ = writeln!(
                out,
                "vllm:request_success_created{{engine=\"0\",finished_reason=\"{reason}\",model_name=\"{m}\"}} {}",
                num(created)
            );
        }

        let h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
            family(out, name, "histogram", help);
            let mut cumulative = 0;
            for (i, bound) in h
                .bounds
                .iter()
                .map(|b| num(*b))
                .chain(["+Inf".to_owned()])
                .enumerate()
            {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "{name}_bucket{{engine=\"0\",le=\"{bound}\",model_name=\"{m}\"}} {cumulative}.0"
                );
            }
            let _ = writeln!(out, "{name}_count{{{base}}} {}.0", h.count);
            let _ = writeln!(out, "{name}_sum{{{base}}} {}", num(h.sum));
            family(out, &format!("{name}_created"), "gauge", help);
            let _ = writeln!(out, "{name}_created{{{base}}} {}", num(created));
        };
        hist(
            &mut out,
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            &h.prompt_tokens,
        );
        hist(
            &mut out,
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            &h.generation_tokens,
        );
        hist(
            &mut out,
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            &h.iteration_tokens,
        );
        hist(
            &mut out,
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            &h.max_tokens,
        );
        hist(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &h.ttft,
        );
        hist(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &h.itl,
        );
        hist(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &h.e2e,
        );
        hist(
            &mut out,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &h.queue,
        );
        drop(h);

        family(
            &mut out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(out, "process_start_time_seconds {}", num(self.start_time));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_look_like_python() {
        assert_eq!(num(0.0), "0.0");
        assert_eq!(num(7.0), "7.0");
        assert_eq!(num(0.25), "0.25");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new("tiny", 100);
        m.first_token(0.003);
        m.first_token(3000.0);
        let text = m.render();
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.001\",model_name=\"tiny\"} 0.0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.005\",model_name=\"tiny\"} 1.0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"tiny\"} 2.0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"tiny\"} 2.0"
        ));
    }
}
