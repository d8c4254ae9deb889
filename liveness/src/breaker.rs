//! Per-worker circuit breaker: closed → (N failures in a row) → open for a cool-down →
//! half-open, where exactly one probe request goes through → closed on success, or open again
//! with a doubled cool-down on failure. The reason for the last trip is kept.
//!
//! The state is small and serialisable because the Envoy filter keeps it in Proxy-Wasm shared
//! data (one key per worker address), updated with compare-and-swap from every worker thread:
//! the picker claims the probe ([`Breaker::try_claim_probe`]) and the first-token guard reports
//! outcomes ([`Breaker::on_success`], [`Breaker::on_failure`]). Time is passed in (`now_ms`).

use serde::{Deserialize, Serialize};

/// Breaker tuning. Picker and guard must use the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// First cool-down; doubled on each trip in a row.
    pub cooldown_ms: u64,
    /// Upper bound of the cool-down.
    pub max_cooldown_ms: u64,
    /// A claimed probe that never reported back (its request vanished) is given up after this
    /// long, and another probe may go.
    pub probe_timeout_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failure_threshold: 3, cooldown_ms: 5_000, max_cooldown_ms: 60_000, probe_timeout_ms: 30_000 }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("breaker.failure_threshold: must be at least 1".into());
        }
        if self.cooldown_ms == 0 || self.max_cooldown_ms < self.cooldown_ms {
            return Err("breaker.cooldown_ms: must be > 0 and <= breaker.max_cooldown_ms".into());
        }
        Ok(())
    }

    /// Cool-down after the `trips`-th trip in a row (1-based).
    pub fn cooldown_for(&self, trips: u32) -> u64 {
        let shift = trips.saturating_sub(1).min(20);
        self.cooldown_ms.saturating_mul(1u64 << shift).min(self.max_cooldown_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
pub enum State {
    Closed { failures: u32 },
    Open { until_ms: u64 },
    HalfOpen { probe_since_ms: u64 },
}

/// What the picker may do with a worker right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: normal traffic.
    Allow,
    /// Cool-down over: one probe may go, if the caller claims it.
    Probe,
    /// Open, or a probe is already out.
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    pub state: State,
    /// Trips in a row (reset by a successful probe); drives the exponential back-off.
    pub trips: u32,
    /// Why it tripped last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { state: State::Closed { failures: 0 }, trips: 0, reason: None }
    }
}

/// What an outcome did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Tripped,
    Closed,
}

impl Breaker {
    pub fn admission(&self, now_ms: u64, cfg: &BreakerConfig) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allow,
            State::Open { until_ms } if now_ms >= until_ms => Admission::Probe,
            State::Open { .. } => Admission::Deny,
            State::HalfOpen { probe_since_ms } if now_ms.saturating_sub(probe_since_ms) >= cfg.probe_timeout_ms => {
                Admission::Probe
            }
            State::HalfOpen { .. } => Admission::Deny,
        }
    }

    /// Moves to half-open if a probe may go now; the caller that gets `true` owns the probe.
    pub fn try_claim_probe(&mut self, now_ms: u64, cfg: &BreakerConfig) -> bool {
        if self.admission(now_ms, cfg) == Admission::Probe {
            self.state = State::HalfOpen { probe_since_ms: now_ms };
            true
        } else {
            false
        }
    }

    /// A request reached its first token (or completed). `probe` says whether it was the probe.
    pub fn on_success(&mut self, probe: bool) -> Transition {
        match self.state {
            State::Closed { .. } => {
                self.state = State::Closed { failures: 0 };
                Transition::None
            }
            State::HalfOpen { .. } if probe => {
                self.state = State::Closed { failures: 0 };
                self.trips = 0;
                Transition::Closed
            }
            // Late results of requests sent before the trip say nothing about the probe.
            _ => Transition::None,
        }
    }

    /// A request failed before its first token (or the worker died mid-stream).
    pub fn on_failure(&mut self, now_ms: u64, probe: bool, reason: &str, cfg: &BreakerConfig) -> Transition {
        self.on_failure_of_weight(now_ms, probe, reason, 1, cfg)
    }

    /// A failure that says the worker is broken, not that one request went wrong
    /// (`FailReason::opens_circuit_at_once`): a closed circuit opens now.
    pub fn on_conclusive_failure(&mut self, now_ms: u64, probe: bool, reason: &str, cfg: &BreakerConfig) -> Transition {
        self.on_failure_of_weight(now_ms, probe, reason, cfg.failure_threshold, cfg)
    }

    fn on_failure_of_weight(&mut self, now_ms: u64, probe: bool, reason: &str, weight: u32, cfg: &BreakerConfig) -> Transition {
        match self.state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(weight);
                if failures >= cfg.failure_threshold {
                    self.trip(now_ms, reason, cfg)
                } else {
                    self.state = State::Closed { failures };
                    Transition::None
                }
            }
            State::HalfOpen { .. } if probe => self.trip(now_ms, reason, cfg),
            _ => Transition::None,
        }
    }

    fn trip(&mut self, now_ms: u64, reason: &str, cfg: &BreakerConfig) -> Transition {
        self.trips = self.trips.saturating_add(1);
        self.state = State::Open { until_ms: now_ms.saturating_add(cfg.cooldown_for(self.trips)) };
        self.reason = Some(reason.chars().take(120).collect());
        Transition::Tripped
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Missing or unreadable state is a closed breaker: no data is not a failure.
    pub fn decode(bytes: Option<&[u8]>) -> Breaker {
        bytes.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: BreakerConfig = BreakerConfig { failure_threshold: 3, cooldown_ms: 5_000, max_cooldown_ms: 60_000, probe_timeout_ms: 30_000 };

    #[test]
    fn trips_after_threshold_then_one_probe() {
        let mut b = Breaker::default();
        assert_eq!(b.on_failure(0, false, "reset", &C), Transition::None);
        assert_eq!(b.on_failure(1, false, "reset", &C), Transition::None);
        assert_eq!(b.on_failure(2, false, "status_503", &C), Transition::Tripped);
        assert_eq!(b.reason.as_deref(), Some("status_503"));
        assert_eq!(b.admission(4_999, &C), Admission::Deny);
        assert_eq!(b.admission(5_002, &C), Admission::Probe);
        assert!(b.try_claim_probe(5_002, &C));
        // Exactly one probe.
        assert!(!b.try_claim_probe(5_003, &C));
        assert_eq!(b.admission(5_003, &C), Admission::Deny);
        // A late non-probe success does not close it.
        assert_eq!(b.on_success(false), Transition::None);
        assert_eq!(b.on_success(true), Transition::Closed);
        assert_eq!(b.admission(5_004, &C), Admission::Allow);
        assert_eq!(b.trips, 0);
    }

    #[test]
    fn failed_probe_doubles_cooldown_up_to_max() {
        let mut b = Breaker::default();
        for t in 0..3 {
            b.on_failure(t, false, "x", &C);
        }
        let mut now = 2;
        let mut expect = 5_000;
        for _ in 0..6 {
            let State::Open { until_ms } = b.state else { panic!() };
            assert_eq!(until_ms - now, expect);
            now = until_ms;
            assert!(b.try_claim_probe(now, &C));
            assert_eq!(b.on_failure(now, true, "probe failed", &C), Transition::Tripped);
            expect = (expect * 2).min(60_000);
        }
    }

    #[test]
    fn a_conclusive_failure_opens_at_once_and_a_late_one_extends_nothing() {
        let mut b = Breaker::default();
        assert_eq!(b.on_conclusive_failure(10, false, "unseen_by_engine", &C), Transition::Tripped);
        assert_eq!(b.state, State::Open { until_ms: 5_010 });
        // Another one while open (a request sent before the trip): no second trip.
        assert_eq!(b.on_conclusive_failure(20, false, "unseen_by_engine", &C), Transition::None);
        assert_eq!(b.trips, 1);
        // Its probe fails the same way: open again for twice as long.
        assert!(b.try_claim_probe(5_010, &C));
        assert_eq!(b.on_conclusive_failure(6_500, true, "unseen_by_engine", &C), Transition::Tripped);
        assert_eq!(b.state, State::Open { until_ms: 16_500 });
    }

    #[test]
    fn success_resets_the_count() {
        let mut b = Breaker::default();
        b.on_failure(0, false, "x", &C);
        b.on_failure(0, false, "x", &C);
        b.on_success(false);
        b.on_failure(0, false, "x", &C);
        assert_eq!(b.state, State::Closed { failures: 1 });
    }

    #[test]
    fn lost_probe_times_out() {
        let mut b = Breaker { state: State::HalfOpen { probe_since_ms: 100 }, trips: 1, reason: None };
        assert_eq!(b.admission(30_099, &C), Admission::Deny);
        assert!(b.try_claim_probe(30_100, &C));
    }

    #[test]
    fn encode_decode_and_garbage_is_closed() {
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.on_failure(7, false, "sse_error: boom", &C);
        }
        assert_eq!(Breaker::decode(Some(&b.encode())), b);
        assert_eq!(Breaker::decode(Some(b"nonsense")), Breaker::default());
        assert_eq!(Breaker::decode(None), Breaker::default());
    }

    proptest! {
        /// Whatever happens, at most one probe is claimed per half-open period, and an open
        /// breaker never admits normal traffic.
        #[test]
        fn never_two_probes(ops in proptest::collection::vec((0u8..4, 0u64..2_000), 1..200)) {
            let mut b = Breaker::default();
            let mut now = 0u64;
            let mut outstanding = false;
            for (op, dt) in ops {
                now += dt;
                match op {
                    0 => { b.on_failure(now, false, "f", &C); }
                    1 => { b.on_success(false); }
                    2 => {
                        let before = b.state.clone();
                        if b.try_claim_probe(now, &C) {
                            // A second probe only after the first one was given up.
                            if let State::HalfOpen { probe_since_ms } = before {
                                prop_assert!(now - probe_since_ms >= C.probe_timeout_ms);
                            } else {
                                let was_due = matches!(before, State::Open { until_ms } if now >= until_ms);
                                prop_assert!(was_due);
                            }
                            outstanding = true;
                        }
                    }
                    _ => {
                        if outstanding {
                            b.on_failure(now, true, "p", &C);
                            outstanding = false;
                        }
                    }
                }
                if let State::Open { until_ms } = b.state {
                    prop_assert!(until_ms > now || b.admission(now, &C) == Admission::Probe);
                    prop_assert!(b.admission(now, &C) != Admission::Allow);
                }
                if matches!(b.state, State::Closed { .. }) { outstanding = false; }
            }
        }
    }
}
