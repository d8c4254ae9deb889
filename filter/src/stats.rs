//! The filter's counters (Envoy stats `wasmcustom.gpuha.*`), defined once per root context.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::host::warn;

/// Filter counters, defined once per root context; `None` ids (definition failed) are skipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub picks: Option<u32>,
    pub fail_open: Option<u32>,
    pub no_worker: Option<u32>,
    pub probes: Option<u32>,
    pub body_too_large: Option<u32>,
    pub local_replies_rewritten: Option<u32>,
    pub fleet_polls: Option<u32>,
    pub fleet_poll_failures: Option<u32>,
    pub fleet_not_modified: Option<u32>,
    pub guard_released: Option<u32>,
    pub pre_token_retries: Option<u32>,
    pub post_token_truncations: Option<u32>,
    pub post_token_errors: Option<u32>,
    pub breaker_trips: Option<u32>,
    pub failwhale_replies: Option<u32>,
    pub client_cancels: Option<u32>,
    pub guard_overflows: Option<u32>,
    pub guard_passed: Option<u32>,
    pub panic_picks: Option<u32>,
    pub request_failures: Option<u32>,
    pub stall_rescues: Option<u32>,
    pub stall_truncations: Option<u32>,
    pub unseen_charges: Option<u32>,
    pub stalled_fail_open: Option<u32>,
    pub silent_fail_open: Option<u32>,
    /// Answers served by a spill tier (another pool's router).
    pub spilled: Option<u32>,
    /// Answers served by a degraded tier.
    pub degraded: Option<u32>,
    /// Answers served by a provider tier.
    pub provider_served: Option<u32>,
    /// Attempts sent to a provider tier (each one may cost money).
    pub provider_calls: Option<u32>,
    /// Spilled requests this router admitted / refused (its spill budget).
    pub spill_received: Option<u32>,
    pub spill_refused: Option<u32>,
    /// Requests a tier's adapter rewrote / could not rewrite (sent on unchanged).
    pub tier_adapted: Option<u32>,
    pub tier_adapt_failures: Option<u32>,
    /// Picks with an affinity key; of those, first attempts on the key's worker (hits), placed
    /// anew because its worker was over the load bound or the TTFT margin (spills), new keys
    /// placed off their rendezvous first choice for balance (placed).
    pub affinity_keyed: Option<u32>,
    pub affinity_hits: Option<u32>,
    pub affinity_spills: Option<u32>,
    pub affinity_placed: Option<u32>,
    /// Picks for a model some eligible worker holds as a loaded LoRA adapter
    /// (`gpuha_liveness::lora`): first attempts on such a worker (hits), and elsewhere (misses:
    /// the holders were over the margin, their circuits open, or a probe took the slot).
    pub lora_hits: Option<u32>,
    pub lora_misses: Option<u32>,
}

impl Stats {
    pub fn define() -> Stats {
        let c = |n: &str| match hostcalls::define_metric(MetricType::Counter, &format!("gpuha.{n}")) {
            Ok(id) => Some(id),
            Err(e) => {
                warn(&format!("gpuha: define_metric {n}: {e:?}"));
                None
            }
        };
        Stats {
            picks: c("picks"),
            fail_open: c("fail_open"),
            no_worker: c("no_worker"),
            probes: c("breaker_probes"),
            body_too_large: c("body_too_large"),
            local_replies_rewritten: c("local_replies_rewritten"),
            fleet_polls: c("fleet_polls"),
            fleet_poll_failures: c("fleet_poll_failures"),
            fleet_not_modified: c("fleet_not_modified"),
            guard_released: c("guard_released"),
            pre_token_retries: c("pre_token_retries"),
            post_token_truncations: c("post_token_truncations"),
            post_token_errors: c("post_token_errors"),
            breaker_trips: c("breaker_trips"),
            failwhale_replies: c("failwhale_replies"),
            client_cancels: c("client_cancels"),
            guard_overflows: c("guard_overflows"),
            guard_passed: c("guard_passed"),
            panic_picks: c("panic_picks"),
            request_failures: c("request_failures"),
            stall_rescues: c("stall_rescues"),
            stall_truncations: c("stall_truncations"),
            unseen_charges: c("unseen_charges"),
            stalled_fail_open: c("stalled_fail_open"),
            silent_fail_open: c("silent_fail_open"),
            spilled: c("spilled"),
            degraded: c("degraded"),
            provider_served: c("provider_served"),
            provider_calls: c("provider_calls"),
            spill_received: c("spill_received"),
            spill_refused: c("spill_refused"),
            tier_adapted: c("tier_adapted"),
            tier_adapt_failures: c("tier_adapt_failures"),
            affinity_keyed: c("affinity_keyed"),
            affinity_hits: c("affinity_hits"),
            affinity_spills: c("affinity_spills"),
            affinity_placed: c("affinity_placed"),
            lora_hits: c("lora_hits"),
            lora_misses: c("lora_misses"),
        }
    }
}

/// Per-tier counters `gpuha.tier.<name>.<what>` (Envoy's `stats_tags` in pool-router.yaml turn
/// the name into a `tier` label in Prometheus), one id per tier of the chain plus the own tier.
#[derive(Debug, Clone, Default)]
pub struct TierStats {
    ids: Vec<(String, Option<u32>)>,
}

impl TierStats {
    /// Defines `gpuha.tier.<name>.<what>` for each name.
    pub fn define<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> TierStats {
        let ids = names
            .map(|n| {
                let id = match hostcalls::define_metric(MetricType::Counter, &format!("gpuha.tier.{n}.{what}")) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        warn(&format!("gpuha: define_metric tier.{n}.{what}: {e:?}"));
                        None
                    }
                };
                (n.to_string(), id)
            })
            .collect();
        TierStats { ids }
    }

    pub fn inc(&self, name: &str) {
        if let Some((_, id)) = self.ids.iter().find(|(n, _)| n == name) {
            inc(*id);
        }
    }
}

pub fn inc(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}
