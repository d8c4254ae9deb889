//! The workers' circuit breakers in shared data: admission and probe claims for the picker,
//! charges from the guard. The state machine is `gpuha_liveness::breaker`; the slot layouts
//! `gpuha_liveness::slots`.

use gpuha_liveness::attempt::Charge;
use gpuha_liveness::breaker::{Admission, Breaker, BreakerConfig, Transition};
use gpuha_liveness::slots::{breaker_key, not_closed_list, not_closed_update, NOT_CLOSED_KEY};
use proxy_wasm::types::LogLevel;

use crate::host;
use crate::stats::{inc, Stats};

/// The addresses whose circuit is not closed (every other one is admitted unread).
pub fn not_closed() -> Vec<String> {
    let bytes = host::shared_get(NOT_CLOSED_KEY).0.unwrap_or_default();
    not_closed_list(&bytes).into_iter().map(str::to_string).collect()
}

pub fn admission(addr: &str, now: u64, cfg: &BreakerConfig) -> Admission {
    let (bytes, _) = host::shared_get(&breaker_key(addr));
    Breaker::decode(bytes.as_deref()).admission(now, cfg)
}

/// `Some(trips in a row)` while `addr`'s breaker denies it (for the panic threshold).
pub fn denied_trips(addr: &str, now: u64, cfg: &BreakerConfig) -> Option<u32> {
    let (bytes, _) = host::shared_get(&breaker_key(addr));
    let b = Breaker::decode(bytes.as_deref());
    (b.admission(now, cfg) == Admission::Deny).then_some(b.trips)
}

/// Takes `addr`'s half-open probe, if still free (compare-and-swap).
pub fn claim_probe(addr: &str, now: u64, cfg: &BreakerConfig) -> bool {
    host::shared_update(&breaker_key(addr), |cur| {
        let mut b = Breaker::decode(cur);
        b.try_claim_probe(now, cfg).then(|| (b.encode(), ()))
    })
    .is_some()
}

fn set_not_closed(addr: &str, not_closed: bool) {
    host::shared_update(NOT_CLOSED_KEY, |cur| Some((not_closed_update(cur, addr, not_closed), ())));
}

/// Tells `addr`'s breaker how an attempt went (`probe`: the attempt carried its probe).
pub fn charge(addr: &str, probe: bool, charge: &Charge, now: u64, cfg: &BreakerConfig, stats: &Stats) {
    match charge {
        Charge::Nothing => {}
        Charge::Success => record(addr, probe, None, now, cfg, stats),
        Charge::Failure(r) => record(addr, probe, Some((&r.label(), r.opens_circuit_at_once())), now, cfg, stats),
    }
}

/// Records a success (`failure: None`) or a failure with its reason (and whether it opens the
/// circuit at once) in `addr`'s breaker.
pub fn record(addr: &str, probe: bool, failure: Option<(&str, bool)>, now: u64, cfg: &BreakerConfig, stats: &Stats) {
    let t = host::shared_update(&breaker_key(addr), |cur| {
        let mut b = Breaker::decode(cur);
        let before = b.clone();
        let t = match failure {
            Some((reason, true)) => b.on_conclusive_failure(now, probe, reason, cfg),
            Some((reason, false)) => b.on_failure(now, probe, reason, cfg),
            None => b.on_success(probe),
        };
        // Skip the write when nothing changed (the common success case).
        (b != before).then(|| (b.encode(), t))
    });
    match t {
        Some(Transition::Tripped) => {
            set_not_closed(addr, true);
            inc(stats.breaker_trips);
            host::warn(&format!("gpuha: circuit opened for {addr}: {}", failure.map_or("", |f| f.0)));
        }
        Some(Transition::Closed) => {
            set_not_closed(addr, false);
            host::log(LogLevel::Info, &format!("gpuha: circuit closed for {addr} (probe succeeded)"));
        }
        _ => {}
    }
}
