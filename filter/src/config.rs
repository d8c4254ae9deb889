//! Plugin configuration: one JSON object per filter instance, `role` selecting what this
//! instance of the module does. Parsed once in `on_configure`; a bad config makes Envoy reject
//! the plugin (never a panic).

use gpuha_liveness::attempt::RescueConfig;
use gpuha_liveness::breaker::BreakerConfig;
use gpuha_liveness::guard::DEFAULT_MAX_HELD_BYTES;
use gpuha_liveness::pick::PickConfig;
use gpuha_liveness::tier::{Adaptation, Chain, SpillBudget, TierKind};
use gpuha_liveness::{FRESHNESS_GATE_MS, VIEW_AGE_FLOOR_MS};
use serde::Deserialize;

/// Default request body limit: 32 MiB (long contexts; multimodal requests with base64 images
/// are often several MB; vLLM itself sets no limit).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 << 20;
/// See [`GuardConfig::unseen_after_ms`].
const MIN_UNSEEN_AFTER_MS: u64 = gpuha_liveness::attempt::SHOWS_WITHIN_MS;

/// What to do when the fleet view is fresh but no worker can take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoWorkerPolicy {
    /// Answer 503 with an OpenAI-shaped error and `Retry-After` (default).
    Error,
    /// Send no pick: Envoy's fallback LB spreads the request over the cluster anyway.
    FailOpen,
}

// Parsed once per plugin and kept behind an `Rc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case", deny_unknown_fields)]
pub enum Config {
    Picker(PickerConfig),
    Guard(GuardConfig),
    Failwhale(FailwhaleConfig),
    Tier(TierConfig),
}

/// Downstream filter: fleet polling, picking, OpenAI-shaped local replies.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PickerConfig {
    /// Envoy cluster that reaches dnsd's HTTP port.
    pub fleet_cluster: String,
    pub fleet_authority: String,
    pub fleet_path: String,
    pub poll_interval_ms: u64,
    pub poll_timeout_ms: u64,
    /// Request bodies larger than this get an OpenAI-shaped 413. Envoy buffers every body
    /// whole (to retry it), so its buffer limits must sit above this: `envoy/render.py
    /// --max-body-bytes` sets both.
    pub max_body_bytes: usize,
    pub no_worker: NoWorkerPolicy,
    pub retry_after_s: u32,
    /// HTTP status of SSE-shaped error replies (`"stream": true` requests).
    pub stream_error_status: u16,
    /// Rewrite Envoy's own text/plain error replies (503 "no healthy upstream", resets,
    /// timeouts) into OpenAI-shaped errors.
    pub rewrite_local_replies: bool,
    /// The per-try budget of a request that does not stream (sent as
    /// `x-envoy-upstream-rq-per-try-timeout-ms`); 0: the route's. Envoy's per-try timeout runs
    /// until the answer's headers, and a worker sends those of an answer that does not stream
    /// only with the whole answer: the route's budget, a time to first token, would cut every
    /// generation longer than it and retry it elsewhere (a healthy 8 s answer got a 504 after
    /// two attempts of 5 s). With the Wasm filter a hung worker holds such a request this long
    /// before its retry; the native filter's guard rescues it once the worker shows a stall.
    pub non_stream_timeout_ms: u64,
    pub pick: PickConfig,
    pub breaker: BreakerConfig,
    /// The fallback chain after this router's own workers (`gpuha_liveness::tier`).
    pub tiers: Chain,
    /// How many spilled requests (from other pools' routers) this router's pool takes.
    pub spill_budget: SpillBudget,
}

/// [`PickerConfig::non_stream_timeout_ms`] by default: the HCM's `stream_idle_timeout` that
/// `envoy/render.py` renders by default (an answer that does not stream sends no byte until it
/// is whole, so that timeout bounds it too).
pub const DEFAULT_NON_STREAM_TIMEOUT_MS: u64 = 300_000;

impl Default for PickerConfig {
    fn default() -> Self {
        PickerConfig {
            fleet_cluster: "gpuha_fleet".into(),
            fleet_authority: "dnsd".into(),
            fleet_path: "/v1/fleet".into(),
            poll_interval_ms: 250,
            poll_timeout_ms: 1_000,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            no_worker: NoWorkerPolicy::Error,
            retry_after_s: 1,
            stream_error_status: 503,
            rewrite_local_replies: true,
            non_stream_timeout_ms: DEFAULT_NON_STREAM_TIMEOUT_MS,
            pick: PickConfig::default(),
            breaker: BreakerConfig::default(),
            tiers: Chain::default(),
            spill_budget: SpillBudget::default(),
        }
    }
}

/// Upstream filter on the worker cluster: the first-token guard.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Bytes held before the first token; past it the response is released unguarded.
    pub max_held_bytes: usize,
    /// Status the held headers are rewritten to when an SSE error event arrives before the
    /// first token (must be in the route's `retriable_status_codes`).
    pub retry_status: u16,
    pub breaker: BreakerConfig,
    /// Rescue attempts on workers that stop showing signs of life (hung: stalled, as the
    /// picker's fleet view shows them): a held attempt is retried once the stall has lasted
    /// `rescue_held_after_ms`, a stream past its first token is ended once it has lasted
    /// `end_stalled_streams_after_ms` (past the gate, from the last sign of life the view
    /// dates). Needs the picker in the same `vm_id` (its fleet view); without one nothing is
    /// rescued.
    pub rescue: bool,
    pub end_stalled_streams_after_ms: u64,
    /// A held attempt on a stalled worker is retried once the stall has lasted this long.
    pub rescue_held_after_ms: u64,
    /// A held attempt its worker's engine does not show (fresh frames, taken a scrape after it
    /// arrived, say nothing is running or waiting: an engine hung while idle) is retried, and
    /// charged, once held this long (`gpuha_liveness::attempt::invisible_to_engine`).
    pub unseen_after_ms: u64,
    /// The same for an attempt whose headers have not come (`gpuha_liveness::attempt::RescueConfig::invisible_no_headers_after_ms`),
    /// counted from its start: retried (native filter; Wasm filter, the request's last
    /// attempt only: answered), or else its worker charged. Never below `unseen_after_ms` (a
    /// smaller value counts as that: a config that raised only `unseen_after_ms` stays valid).
    pub unseen_no_headers_after_ms: u64,
    /// How often the guard looks at the attempts it holds.
    pub rescue_tick_ms: u64,
    /// The picker's chain: attempts on tier endpoints are counted per tier, never charged to a
    /// breaker and never rescued (they are not in the fleet view).
    pub tiers: Chain,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig { max_held_bytes: DEFAULT_MAX_HELD_BYTES, retry_status: 503, breaker: BreakerConfig::default(), rescue: true, end_stalled_streams_after_ms: 10_000, rescue_held_after_ms: 2_000, unseen_after_ms: RescueConfig::default().invisible_after_ms, unseen_no_headers_after_ms: RescueConfig::default().invisible_no_headers_after_ms, rescue_tick_ms: 250, tiers: Chain::default() }
    }
}

/// Answers every request with an OpenAI-shaped error.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailwhaleConfig {
    pub status: u16,
    pub message: String,
    pub retry_after_s: u32,
    pub stream_error_status: u16,
    pub max_body_bytes: usize,
}

impl Default for FailwhaleConfig {
    fn default() -> Self {
        FailwhaleConfig {
            status: 503,
            message: "The service is temporarily unavailable: no inference capacity is reachable. Please retry later.".into(),
            retry_after_s: 5,
            stream_error_status: 503,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// A degraded tier's or a provider's adapter listener: adapts each request to the tier
/// (`gpuha_liveness::tier::Adaptation`) and marks the answer with the tier's name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    pub kind: TierKind,
    #[serde(default)]
    pub adapt: Adaptation,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn status_ok(s: u16, key: &str) -> Result<(), String> {
    if (200..600).contains(&s) {
        Ok(())
    } else {
        Err(format!("{key}: {s} is not an HTTP status (200..=599)"))
    }
}

impl Config {
    /// Parses and validates; the error names the key and the reason.
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let cfg: Config = serde_json::from_slice(bytes).map_err(|e| format!("plugin configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            Config::Picker(p) => {
                if p.fleet_cluster.is_empty() {
                    return Err("fleet_cluster: must name the Envoy cluster that reaches dnsd".into());
                }
                if !p.fleet_path.starts_with('/') {
                    return Err("fleet_path: must start with '/'".into());
                }
                if p.poll_interval_ms < 20 {
                    return Err("poll_interval_ms: must be at least 20".into());
                }
                // dnsd's cacheable view reports ages exactly only up to the 3 s gate, and as
                // "under a second" below one second (see `gpuha_liveness::bounded_age_ms`).
                if p.pick.freshness_gate_ms > FRESHNESS_GATE_MS {
                    return Err(format!("pick.freshness_gate_ms: at most {FRESHNESS_GATE_MS} (dnsd's polled view reports ages up to the gate only)"));
                }
                if p.poll_interval_ms.saturating_add(VIEW_AGE_FLOOR_MS) >= p.pick.freshness_gate_ms {
                    return Err(format!(
                        "poll_interval_ms: must be below pick.freshness_gate_ms - {VIEW_AGE_FLOOR_MS} ({} ms): dnsd reports ages under {VIEW_AGE_FLOOR_MS} ms as {VIEW_AGE_FLOOR_MS}, so a slower poll would drop live workers",
                        p.pick.freshness_gate_ms.saturating_sub(VIEW_AGE_FLOOR_MS)
                    ));
                }
                if p.poll_timeout_ms == 0 {
                    return Err("poll_timeout_ms: must be > 0".into());
                }
                if p.max_body_bytes == 0 {
                    return Err("max_body_bytes: must be > 0".into());
                }
                if p.non_stream_timeout_ms != 0 && p.non_stream_timeout_ms < 1_000 {
                    return Err("non_stream_timeout_ms: 0 (the route's per-try timeout) or at least 1000".into());
                }
                status_ok(p.stream_error_status, "stream_error_status")?;
                p.pick.validate()?;
                p.tiers.validate()?;
                p.spill_budget.validate()?;
                p.breaker.validate()
            }
            Config::Guard(g) => {
                if g.max_held_bytes == 0 {
                    return Err("max_held_bytes: must be > 0".into());
                }
                if !(500..600).contains(&g.retry_status) {
                    return Err("retry_status: must be a 5xx status listed in the route's retriable_status_codes".into());
                }
                if g.unseen_after_ms < MIN_UNSEEN_AFTER_MS {
                    return Err(format!("unseen_after_ms: must be at least {MIN_UNSEEN_AFTER_MS} (a request shows in the engine's numbers a scrape after it arrives)"));
                }
                if !(10..=5_000).contains(&g.rescue_tick_ms) {
                    return Err("rescue_tick_ms: must be 10..=5000".into());
                }
                g.tiers.validate()?;
                g.breaker.validate()
            }
            Config::Failwhale(f) => {
                status_ok(f.status, "status")?;
                status_ok(f.stream_error_status, "stream_error_status")
            }
            Config::Tier(t) => {
                if t.kind == TierKind::Spill {
                    return Err("kind: a spill tier is another router, reached directly: it has no adapter".into());
                }
                if t.max_body_bytes == 0 {
                    return Err("max_body_bytes: must be > 0".into());
                }
                Chain { own: t.name.clone(), own_endpoints: vec![], tiers: vec![] }.validate().map_err(|e| e.replace("tiers.own", "name"))?;
                t.adapt.validate()
            }
        }
    }
}
