//! Operators' overrides: draining a worker or a pool, forcing a pool out of or into the DNS
//! answer. dnsd keeps them (authenticated, persisted: see dnsd's `admin` module); every decision
//! they change is made here, so the DNS tier, the fleet view and the picker agree.
//!
//! | override | DNS answer | picker (new requests) |
//! |---|---|---|
//! | worker `drain` | unchanged | never picked: not first, not a retry, not a probe, not a last resort |
//! | pool `drain` | left at once | its workers get none once the pool is **safe** |
//! | pool `force_out` | left at once | unchanged |
//! | pool `force_in` | answered even when evicted | unchanged |
//!
//! **Safe.** A pool that left the answer still gets clients for as long as a TTL dnsd handed
//! out with it runs: resolvers cache the answer. dnsd records, per pool, the instant the last
//! answer naming it stops being cacheable ([`DrainProgress`]); from then on no well-behaved client
//! holds its address, and the pool's routers can be stopped. A drained pool's workers are
//! marked drained in the fleet view only from that instant, so clients still arriving with a
//! cached answer are served instead of refused; after it, a router that spans several pools
//! sends the stragglers elsewhere.
//!
//! Requests in flight are never touched: a drain only changes who gets *new* requests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::{FleetView, Liveness};

/// An operator's override of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolOverride {
    /// Leave the answer, then (once safe) stop the pool's workers getting new requests.
    Drain,
    /// Leave the answer whatever its liveness; the picker is unchanged.
    ForceOut,
    /// Stay in the answer whatever its liveness (telemetry lost, an evicted pool known good).
    ForceIn,
}

impl PoolOverride {
    pub const ALL: [PoolOverride; 3] = [PoolOverride::Drain, PoolOverride::ForceOut, PoolOverride::ForceIn];

    pub fn as_str(self) -> &'static str {
        match self {
            PoolOverride::Drain => "drain",
            PoolOverride::ForceOut => "force_out",
            PoolOverride::ForceIn => "force_in",
        }
    }
}

/// When and why an override was set (for the log, the fleet page and the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// A pool's override and its mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMark {
    pub state: PoolOverride,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Every override in force: what dnsd persists (its state file is this, as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Drained workers, by worker id.
    #[serde(default)]
    pub workers: BTreeMap<String, Mark>,
    /// Overridden pools, by pool id.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolMark>,
}

/// What an operator asks for one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerCommand {
    Drain,
    /// No override: the worker is picked by its liveness and load alone.
    Auto,
}

/// What an operator asks for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolCommand {
    Drain,
    ForceOut,
    ForceIn,
    /// No override: the pool is answered by its liveness alone.
    Auto,
}

/// What a command changed, for the log and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `drain`, `force_out`, `force_in` or `auto`.
    pub action: &'static str,
    /// The override before, `auto` for none.
    pub before: &'static str,
    /// False when the command asked for what was already in force (nothing written).
    pub changed: bool,
}

impl Overrides {
    /// Sets `worker`'s override at `now_ms`.
    pub fn set_worker(&mut self, worker: &str, cmd: WorkerCommand, reason: &str, now_ms: u64) -> Change {
        let before = if self.workers.contains_key(worker) { "drain" } else { "auto" };
        match cmd {
            WorkerCommand::Drain => {
                let changed = before != "drain";
                if changed {
                    self.workers.insert(worker.to_string(), Mark { at_ms: now_ms, reason: reason.to_string() });
                }
                Change { action: "drain", before, changed }
            }
            WorkerCommand::Auto => Change { action: "auto", before, changed: self.workers.remove(worker).is_some() },
        }
    }

    /// Sets `pool`'s override at `now_ms`. One override per pool: a new one replaces the old.
    pub fn set_pool(&mut self, pool: &str, cmd: PoolCommand, reason: &str, now_ms: u64) -> Change {
        let before = self.pools.get(pool).map_or("auto", |m| m.state.as_str());
        let state = match cmd {
            PoolCommand::Drain => PoolOverride::Drain,
            PoolCommand::ForceOut => PoolOverride::ForceOut,
            PoolCommand::ForceIn => PoolOverride::ForceIn,
            PoolCommand::Auto => return Change { action: "auto", before, changed: self.pools.remove(pool).is_some() },
        };
        let changed = before != state.as_str();
        if changed {
            self.pools.insert(pool.to_string(), PoolMark { state, at_ms: now_ms, reason: reason.to_string() });
        }
        Change { action: state.as_str(), before, changed }
    }

    pub fn pool(&self, pool: &str) -> Option<PoolOverride> {
        self.pools.get(pool).map(|m| m.state)
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.pools.is_empty()
    }
}

/// Whether the DNS tier answers a pool of `liveness` under `ov`: an override decides, else
/// liveness ([`Liveness::is_answerable`]).
pub fn pool_answered(liveness: Liveness, ov: Option<PoolOverride>) -> bool {
    match ov {
        Some(PoolOverride::Drain | PoolOverride::ForceOut) => false,
        Some(PoolOverride::ForceIn) => true,
        None => liveness.is_answerable(),
    }
}

/// How far a pool out of the answer is from having no client left holding its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DrainProgress {
    /// When the last TTL handed out with the pool runs out.
    pub safe_at_ms: u64,
    /// Out of the answer, and that TTL has run out.
    pub safe: bool,
}

/// A pool's drain progress at `now_ms`: `answered` is whether the pool is in the answer now,
/// `handed_until_ms` the latest instant until which an answer naming it may be cached (the
/// answer's time plus its TTL, over every answer dnsd gave; dnsd's start plus the largest TTL
/// for answers a previous run may have given).
pub fn drain_progress(answered: bool, handed_until_ms: u64, now_ms: u64) -> DrainProgress {
    DrainProgress { safe_at_ms: handed_until_ms, safe: !answered && now_ms >= handed_until_ms }
}

/// Whether the picker must give `worker` of `pool` no new requests at `now_ms`: drained itself,
/// or its pool drained and safe (`pool_safe_at_ms`: when the pool's last TTL runs out, as
/// [`DrainProgress::safe_at_ms`]; `None` when unknown, then the pool's drain does not reach its
/// workers: dnsd without a DNS tier has no TTLs, and drains workers one by one).
pub fn worker_drained(ov: &Overrides, worker: &str, pool: &str, pool_safe_at_ms: Option<u64>, now_ms: u64) -> bool {
    if ov.workers.contains_key(worker) {
        return true;
    }
    ov.pool(pool) == Some(PoolOverride::Drain) && pool_safe_at_ms.is_some_and(|t| now_ms >= t)
}

/// Marks the drained workers of `view` ([`worker_drained`]); `safe_at(pool)` as there.
pub fn mark_drained(view: &mut FleetView, ov: &Overrides, now_ms: u64, mut safe_at: impl FnMut(&str) -> Option<u64>) {
    if ov.is_empty() {
        return;
    }
    for w in &mut view.workers {
        w.drained = worker_drained(ov, &w.id, &w.pool, safe_at(&w.pool), now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_decides_the_answer_else_liveness() {
        for live in [Liveness::Alive, Liveness::ColdStart, Liveness::Dead] {
            assert_eq!(pool_answered(live, None), live.is_answerable());
            assert!(!pool_answered(live, Some(PoolOverride::Drain)), "a drained pool leaves the answer ({live:?})");
            assert!(!pool_answered(live, Some(PoolOverride::ForceOut)), "forced out ({live:?})");
            assert!(pool_answered(live, Some(PoolOverride::ForceIn)), "forced in ({live:?})");
        }
    }

    #[test]
    fn safe_only_out_of_the_answer_and_after_the_last_ttl() {
        let until = 10_000;
        assert_eq!(drain_progress(false, until, 9_999), DrainProgress { safe_at_ms: until, safe: false });
        assert!(drain_progress(false, until, 10_000).safe);
        assert!(!drain_progress(true, until, 20_000).safe, "still answered: never safe");
    }

    #[test]
    fn a_drained_worker_is_drained_whatever_its_pool() {
        let mut ov = Overrides::default();
        assert!(ov.set_worker("w1", WorkerCommand::Drain, "kernel upgrade", 5).changed);
        assert!(worker_drained(&ov, "w1", "p", None, 6));
        assert!(!worker_drained(&ov, "w2", "p", None, 6));
        let again = ov.set_worker("w1", WorkerCommand::Drain, "", 7);
        assert!(!again.changed, "already drained");
        assert_eq!(ov.workers["w1"], Mark { at_ms: 5, reason: "kernel upgrade".into() }, "the first mark is kept");
        let undo = ov.set_worker("w1", WorkerCommand::Auto, "", 8);
        assert_eq!(undo, Change { action: "auto", before: "drain", changed: true });
        assert!(!worker_drained(&ov, "w1", "p", None, 9));
    }

    #[test]
    fn a_drained_pool_reaches_its_workers_once_safe() {
        let mut ov = Overrides::default();
        ov.set_pool("p", PoolCommand::Drain, "", 1_000);
        assert!(!worker_drained(&ov, "w1", "p", Some(6_000), 5_999), "cached answers still bring clients");
        assert!(worker_drained(&ov, "w1", "p", Some(6_000), 6_000));
        assert!(!worker_drained(&ov, "w1", "p", None, 60_000), "no DNS tier: no TTLs, pool drains do not reach workers");
        assert!(!worker_drained(&ov, "w9", "q", Some(0), 6_000), "other pools untouched");
        ov.set_pool("p", PoolCommand::ForceOut, "", 7_000);
        assert!(!worker_drained(&ov, "w1", "p", Some(6_000), 8_000), "forced out: the picker is unchanged");
        assert_eq!(ov.pool("p"), Some(PoolOverride::ForceOut), "one override per pool");
        assert_eq!(ov.set_pool("p", PoolCommand::Auto, "", 9_000).before, "force_out");
        assert!(ov.is_empty());
    }

    #[test]
    fn the_state_file_round_trips_and_refuses_unknown_fields() {
        let mut ov = Overrides::default();
        ov.set_worker("w1", WorkerCommand::Drain, "r", 1);
        ov.set_pool("p", PoolCommand::ForceIn, "", 2);
        let text = serde_json::to_string(&ov).unwrap();
        assert_eq!(serde_json::from_str::<Overrides>(&text).unwrap(), ov);
        assert!(serde_json::from_str::<Overrides>(r#"{"pools":{"p":{"state":"sideways","at_ms":1}}}"#).is_err());
        assert!(serde_json::from_str::<Overrides>(r#"{"wrkers":{}}"#).is_err());
    }
}
