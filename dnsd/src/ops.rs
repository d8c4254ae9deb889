//! What operators see: per-pool and per-worker gauges on `/metrics` (what the alert rules in
//! `deploy/prometheus/` and the dashboard in `deploy/grafana/` read), `GET /v1/dns` (what DNS
//! answers right now, pool states, recent transitions) and the fleet page at `GET /` and
//! `GET /fleet`, which polls `/v1/fleet` and `/v1/dns`.
//!
//! The decisions (a worker's condition, a pool's state, a service's answer) are made in
//! `gpuha_liveness` and [`crate::dns::answer`]; this module only reports them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use gpuha_liveness::fleet::WorkerState;
use gpuha_liveness::Condition;
use serde::Serialize;

use crate::dns::answer::service_addresses;
use crate::dns::config::Policy;
use crate::prom::esc;
use crate::dns::{DnsService, TransitionRecord};

/// Per-worker series exported at most. A fleet of thousands would otherwise be thousands of
/// series per scrape (times three states); past the cap the workers that need attention come
/// first (silent, then stalled, then alive; by pool and id within each), the rest are counted
/// in `gpuha_dnsd_workers_unexported`, and the per-pool gauges still count every worker.
pub const MAX_EXPORTED_WORKERS: usize = 1000;

/// The fleet page: one HTML file, inline CSS and JS, no external assets.
pub const FLEET_PAGE: &str = include_str!("fleet.html");

struct WorkerRow {
    pool: String,
    id: String,
    since_frame_ms: u64,
    since_life_ms: u64,
    condition: Condition,
}

#[derive(Default)]
struct PoolRow {
    counts: [usize; 3],
    since_frame_ms: Option<u64>,
    since_life_ms: Option<u64>,
}

fn condition_rank(c: Condition) -> usize {
    match c {
        Condition::Silent => 0,
        Condition::Stalled => 1,
        Condition::Alive => 2,
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Renders the per-pool and per-worker gauges for `fleet` at `now_ms`. `configured` pools (the
/// DNS tier's) are listed even before any of their workers is heard from.
pub fn render_fleet_metrics<'a>(out: &mut String, workers: impl Iterator<Item = &'a WorkerState>, configured: &[String], now_ms: u64) {
    let mut rows: Vec<WorkerRow> = workers
        .map(|w| WorkerRow {
            pool: w.frame.pool_id.clone(),
            id: w.frame.worker_id.clone(),
            since_frame_ms: w.since_frame_ms(now_ms),
            since_life_ms: w.age_ms(now_ms),
            condition: w.condition(now_ms),
        })
        .collect();
    let mut pools: BTreeMap<&str, PoolRow> = configured.iter().map(|p| (p.as_str(), PoolRow::default())).collect();
    for r in &rows {
        let p = pools.entry(r.pool.as_str()).or_default();
        p.counts[condition_rank(r.condition)] += 1;
        p.since_frame_ms = Some(p.since_frame_ms.map_or(r.since_frame_ms, |m| m.min(r.since_frame_ms)));
        p.since_life_ms = Some(p.since_life_ms.map_or(r.since_life_ms, |m| m.min(r.since_life_ms)));
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_pool_workers Workers of the pool by condition (alive: fresh; stalled: frames without progress, no sign of life since; silent: no frame, or no sure one, within the gate), every known worker.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_workers gauge");
    for (pool, p) in &pools {
        for c in Condition::ALL {
            let _ = writeln!(out, "gpuha_dnsd_pool_workers{{pool=\"{}\",state=\"{}\"}} {}", esc(pool), c.as_str(), p.counts[condition_rank(c)]);
        }
    }
    for (name, help, pick) in [
        ("gpuha_dnsd_pool_seconds_since_frame", "Seconds since the pool's newest frame (any worker); absent while none was heard.", (|p: &PoolRow| p.since_frame_ms) as fn(&PoolRow) -> Option<u64>),
        ("gpuha_dnsd_pool_seconds_since_life", "Seconds since the pool's newest evidence of life (a frame showing progress or an idle engine).", |p: &PoolRow| p.since_life_ms),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (pool, p) in &pools {
            if let Some(ms) = pick(p) {
                let _ = writeln!(out, "{name}{{pool=\"{}\"}} {:.3}", esc(pool), secs(ms));
            }
        }
    }
    // Past the cap, the workers that need attention first (see MAX_EXPORTED_WORKERS).
    rows.sort_by(|a, b| (condition_rank(a.condition), &a.pool, &a.id).cmp(&(condition_rank(b.condition), &b.pool, &b.id)));
    let unexported = rows.len().saturating_sub(MAX_EXPORTED_WORKERS);
    rows.truncate(MAX_EXPORTED_WORKERS);
    let _ = writeln!(out, "# HELP gpuha_dnsd_workers_unexported Workers left out of the per-worker series (at most {MAX_EXPORTED_WORKERS} are exported).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_workers_unexported gauge");
    let _ = writeln!(out, "gpuha_dnsd_workers_unexported {unexported}");
    let _ = writeln!(out, "# HELP gpuha_dnsd_worker_state The worker's condition (1 for the one it is in): alive, stalled or silent.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_worker_state gauge");
    for r in &rows {
        for c in Condition::ALL {
            let _ = writeln!(out, "gpuha_dnsd_worker_state{{pool=\"{}\",worker=\"{}\",state=\"{}\"}} {}", esc(&r.pool), esc(&r.id), c.as_str(), u8::from(r.condition == c));
        }
    }
    for (name, help, pick) in [
        ("gpuha_dnsd_worker_seconds_since_frame", "Seconds since the worker's newest accepted frame.", (|r: &WorkerRow| r.since_frame_ms) as fn(&WorkerRow) -> u64),
        ("gpuha_dnsd_worker_seconds_since_life", "Seconds since the worker's newest evidence of life: its age (over 3 s: no new requests).", |r: &WorkerRow| r.since_life_ms),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for r in &rows {
            let _ = writeln!(out, "{name}{{pool=\"{}\",worker=\"{}\"}} {:.3}", esc(&r.pool), esc(&r.id), secs(pick(r)));
        }
    }
}

/// `GET /v1/dns`: what the DNS tier answers right now.
#[derive(Debug, Serialize)]
pub struct DnsStatus {
    pub now_ms: u64,
    pub started_ms: u64,
    /// False when dnsd runs without a `[dns]` section (then the lists are empty).
    pub dns: bool,
    pub pools: Vec<PoolStatus>,
    pub services: Vec<ServiceStatus>,
    /// The latest pool transitions, oldest first (at most [`crate::dns::RECENT_TRANSITIONS`]).
    pub transitions: Vec<TransitionRecord>,
}

#[derive(Debug, Serialize)]
pub struct PoolStatus {
    pub pool: String,
    pub region: String,
    pub cloud: String,
    /// `alive`, `cold_start` or `dead`.
    pub state: &'static str,
    /// In the answer now: answerable by liveness, unless an operator's override says otherwise.
    pub answerable: bool,
    /// The operator's override: `drain`, `force_out` or `force_in`; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<&'static str>,
    /// For a pool out of the answer: when the last TTL handed out with it runs out, and whether
    /// it has (`safe`: no client should still hold its routers' addresses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safe: Option<bool>,
    pub min_workers: usize,
    pub routers: Vec<String>,
    /// When it last left or rejoined the answer; absent if it has not since dnsd started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub policy: &'static str,
    pub ttl: u32,
    /// The addresses an A/AAAA query gets now.
    pub addresses: Vec<String>,
    /// Pools whose routers are in that answer.
    pub pools: Vec<String>,
    /// True when the answer is the fail-whale set.
    pub fail_whale: bool,
}

pub fn dns_status(dns: Option<&DnsService>, started_ms: u64, now_ms: u64) -> DnsStatus {
    let Some(dns) = dns else {
        return DnsStatus { now_ms, started_ms, dns: false, pools: vec![], services: vec![], transitions: vec![] };
    };
    let snap = dns.pool_states(now_ms);
    let (zones, states) = (&*snap.zones, &*snap.states);
    let pools = zones
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let drain = (!states.answered(i)).then(|| dns.drain_progress(&snap, i, now_ms)).flatten();
            PoolStatus {
                pool: p.id.clone(),
                region: p.region.clone(),
                cloud: p.cloud.clone(),
                state: states.get(i).as_str(),
                answerable: states.answered(i),
                admin: states.override_of(i).map(|o| o.as_str()),
                safe_at_ms: drain.map(|d| d.safe_at_ms),
                safe: drain.map(|d| d.safe),
                min_workers: p.min_workers,
                routers: p.routers.iter().map(|a| a.to_string()).collect(),
                changed_ms: dns.changed_ms(&p.id),
            }
        })
        .collect();
    let services = zones
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (addrs, served) = service_addresses(zones, states, i);
            ServiceStatus {
                name: s.label.clone(),
                policy: match s.policy {
                    Policy::All => "all",
                    Policy::Priority => "priority",
                },
                ttl: s.ttl,
                addresses: addrs.iter().map(|a| a.to_string()).collect(),
                pools: served.pools.iter().map(|(p, _)| zones.pools[*p].id.clone()).collect(),
                fail_whale: served.fail_whale,
            }
        })
        .collect();
    DnsStatus { now_ms, started_ms, dns: true, pools, services, transitions: dns.recent_transitions() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuha_liveness::{Frame, Metrics};

    fn frame(id: &str, pool: &str, seq: u64) -> Frame {
        Frame {
            key_id: 1,
            worker_id: id.into(),
            pool_id: pool.into(),
            boot_id: 1,
            seq,
            sent_ms: 1_000 + seq,
            addr: "127.0.0.1:8000".parse().unwrap(),
            models: vec![],
            adapters: vec![],
            metrics: Metrics { running: Some(0.0), waiting: Some(0.0), ..Metrics::default() },
        }
    }

    fn lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{')).collect()
    }

    #[test]
    fn pool_and_worker_gauges() {
        let mut fleet = gpuha_liveness::FleetState::new(0);
        fleet.observe(frame("w1", "p1", 1), 10_000);
        fleet.observe(frame("w2", "p1", 1), 14_000);
        let mut out = String::new();
        render_fleet_metrics(&mut out, fleet.workers(), &["p0".into(), "p1".into()], 15_000);
        assert!(out.contains("gpuha_dnsd_pool_workers{pool=\"p1\",state=\"alive\"} 1\n"), "{out}");
        assert!(out.contains("gpuha_dnsd_pool_workers{pool=\"p1\",state=\"silent\"} 1\n"), "{out}");
        assert!(out.contains("gpuha_dnsd_pool_workers{pool=\"p0\",state=\"alive\"} 0\n"), "a configured pool with no worker is listed");
        assert!(out.contains("gpuha_dnsd_pool_seconds_since_frame{pool=\"p1\"} 1.000\n"), "{out}");
        assert!(lines(&out, "gpuha_dnsd_pool_seconds_since_frame").iter().all(|l| !l.contains("p0")), "no data: no value");
        assert!(out.contains("gpuha_dnsd_worker_state{pool=\"p1\",worker=\"w1\",state=\"silent\"} 1\n"), "{out}");
        assert!(out.contains("gpuha_dnsd_worker_seconds_since_life{pool=\"p1\",worker=\"w1\"} 5.000\n"), "{out}");
        assert!(out.contains("gpuha_dnsd_workers_unexported 0\n"));
    }

    #[test]
    fn worker_series_are_capped_with_the_silent_first() {
        let mut fleet = gpuha_liveness::FleetState::new(0);
        for i in 0..MAX_EXPORTED_WORKERS + 5 {
            fleet.observe(frame(&format!("w{i:05}"), "p", 1), 20_000);
        }
        fleet.observe(frame("zz-silent", "p", 1), 1_000);
        let mut out = String::new();
        render_fleet_metrics(&mut out, fleet.workers(), &[], 21_000);
        assert_eq!(lines(&out, "gpuha_dnsd_worker_seconds_since_frame").len(), MAX_EXPORTED_WORKERS);
        assert_eq!(lines(&out, "gpuha_dnsd_worker_state").len(), 3 * MAX_EXPORTED_WORKERS);
        assert!(out.contains("gpuha_dnsd_workers_unexported 6\n"));
        assert!(out.contains("worker=\"zz-silent\",state=\"silent\"} 1"), "the silent worker is exported first");
        assert!(out.contains(&format!("gpuha_dnsd_pool_workers{{pool=\"p\",state=\"alive\"}} {}\n", MAX_EXPORTED_WORKERS + 5)), "pool counts are not capped");
    }
}
