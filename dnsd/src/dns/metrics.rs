//! Counters of the DNS tier, rendered in Prometheus text format after dnsd's own metrics.
//!
//! Keyed by pool and service names, not indexes: a reload renumbers them, and a counter must
//! follow its pool across reloads.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use gpuha_liveness::Liveness;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::answer::{service_addresses, PoolStates, Served};
use super::config::Zones;
use crate::prom::esc;

/// A bounded set of labels: unknown query types are folded into `other` so a client sending
/// every type number cannot grow the metrics without limit.
pub fn qtype_label(t: Option<RecordType>) -> &'static str {
    use RecordType::*;
    match t {
        None => "none",
        Some(A) => "A",
        Some(AAAA) => "AAAA",
        Some(NS) => "NS",
        Some(SOA) => "SOA",
        Some(TXT) => "TXT",
        Some(CNAME) => "CNAME",
        Some(MX) => "MX",
        Some(SRV) => "SRV",
        Some(PTR) => "PTR",
        Some(CAA) => "CAA",
        Some(HTTPS) => "HTTPS",
        Some(SVCB) => "SVCB",
        Some(ANY) => "ANY",
        Some(AXFR) => "AXFR",
        Some(IXFR) => "IXFR",
        Some(DS) => "DS",
        Some(DNSKEY) => "DNSKEY",
        Some(_) => "other",
    }
}

pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

const LIVENESS: [Liveness; 3] = [Liveness::Alive, Liveness::ColdStart, Liveness::Dead];

fn liveness_index(l: Liveness) -> usize {
    match l {
        Liveness::Alive => 0,
        Liveness::ColdStart => 1,
        Liveness::Dead => 2,
    }
}

/// Adds one to `map[key]`, allocating the key only the first time.
fn bump(map: &mut HashMap<String, u64>, key: &str, by: u64) {
    match map.get_mut(key) {
        Some(n) => *n += by,
        None => {
            map.insert(key.to_string(), by);
        }
    }
}

#[derive(Debug, Default)]
pub struct DnsMetrics {
    queries: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// service -> pool -> answers that included the pool, by the pool's liveness ([`LIVENESS`]).
    answers: Mutex<HashMap<String, HashMap<String, [u64; 3]>>>,
    failwhale: Mutex<HashMap<String, u64>>,
    evictions: Mutex<HashMap<String, u64>>,
    failbacks: Mutex<HashMap<String, u64>>,
    /// pool -> until when (ms) the latest answer naming it may be cached: its time plus its TTL.
    handed: Mutex<HashMap<String, u64>>,
    pub malformed: AtomicU64,
    pub truncated: AtomicU64,
    pub tcp_rejected: AtomicU64,
}


fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DnsMetrics {
    pub fn query(&self, qtype: &'static str, rcode: &'static str) {
        self.queries_n(qtype, rcode, 1);
    }

    /// Counts `n` queries of one type and response code (the fast path counts a batch at once).
    pub fn queries_n(&self, qtype: &'static str, rcode: &'static str, n: u64) {
        *lock(&self.queries).entry((qtype, rcode)).or_default() += n;
    }

    /// Counts one service answer given at `now_ms`, and remembers until when each pool in it
    /// may be cached (see [`Self::handed_until`]).
    pub fn served(&self, zones: &Zones, s: &Served, now_ms: u64) {
        self.served_n(zones, s, now_ms, 1);
    }

    /// [`Self::served`] for `n` equal answers given at `now_ms` (a batch of the fast path).
    pub fn served_n(&self, zones: &Zones, s: &Served, now_ms: u64, n: u64) {
        let Some(svc) = zones.services.get(s.service) else { return };
        if s.fail_whale {
            bump(&mut lock(&self.failwhale), &svc.label, n);
        }
        if s.pools.is_empty() {
            return;
        }
        {
            let mut a = lock(&self.answers);
            let per_pool = match a.get_mut(svc.label.as_str()) {
                Some(m) => m,
                None => a.entry(svc.label.clone()).or_default(),
            };
            for (pool, state) in &s.pools {
                let Some(p) = zones.pools.get(*pool) else { continue };
                let counts = match per_pool.get_mut(p.id.as_str()) {
                    Some(c) => c,
                    None => per_pool.entry(p.id.clone()).or_default(),
                };
                counts[liveness_index(*state)] += n;
            }
        }
        let until = now_ms.saturating_add(u64::from(svc.ttl) * 1000);
        let mut h = lock(&self.handed);
        for (pool, _) in &s.pools {
            let Some(p) = zones.pools.get(*pool) else { continue };
            match h.get_mut(p.id.as_str()) {
                Some(t) => *t = (*t).max(until),
                None => {
                    h.insert(p.id.clone(), until);
                }
            }
        }
    }

    /// Until when an answer this dnsd gave naming `pool` may still be cached; at least
    /// `floor_ms` (dnsd's start plus the largest TTL: a previous run may have answered it).
    pub fn handed_until(&self, pool: &str, floor_ms: u64) -> u64 {
        lock(&self.handed).get(pool).copied().unwrap_or(0).max(floor_ms)
    }

    pub fn eviction(&self, pool: &str) {
        bump(&mut lock(&self.evictions), pool, 1);
    }

    pub fn failback(&self, pool: &str) {
        bump(&mut lock(&self.failbacks), pool, 1);
    }

    pub fn render(&self, out: &mut String, zones: &Zones, states: &PoolStates) {
        let _ = writeln!(out, "# HELP gpuha_dnsd_dns_queries_total DNS queries answered, by query type and response code.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_dns_queries_total counter");
        for ((t, r), n) in lock(&self.queries).iter() {
            let _ = writeln!(out, "gpuha_dnsd_dns_queries_total{{qtype=\"{t}\",rcode=\"{r}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_dns_answers_total Service answers that included a pool, by the pool's state.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_dns_answers_total counter");
        let answers: BTreeMap<(String, String), [u64; 3]> =
            lock(&self.answers).iter().flat_map(|(s, m)| m.iter().map(move |(p, c)| ((s.clone(), p.clone()), *c))).collect();
        for ((s, p), counts) in &answers {
            for (l, n) in LIVENESS.iter().zip(counts) {
                if *n > 0 {
                    let _ = writeln!(out, "gpuha_dnsd_dns_answers_total{{service=\"{}\",pool=\"{}\",pool_state=\"{}\"}} {n}", esc(s), esc(p), l.as_str());
                }
            }
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_failwhale_answers_total Service answers with the fail-whale set (no pool alive).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_failwhale_answers_total counter");
        let fw = lock(&self.failwhale);
        for s in &zones.services {
            let _ = writeln!(out, "gpuha_dnsd_failwhale_answers_total{{service=\"{}\"}} {}", esc(&s.label), fw.get(&s.label).copied().unwrap_or(0));
        }
        drop(fw);
        for (name, help, map) in [
            ("gpuha_dnsd_pool_evictions_total", "Pools leaving the answer (answerable -> dead).", &self.evictions),
            ("gpuha_dnsd_pool_failbacks_total", "Pools returning to the answer (dead -> answerable).", &self.failbacks),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let m = lock(map);
            for p in &zones.pools {
                let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", esc(&p.id), m.get(&p.id).copied().unwrap_or(0));
            }
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_pool_state Current pool state (1 for the state it is in).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_state gauge");
        for (i, p) in zones.pools.iter().enumerate() {
            for st in LIVENESS {
                let v = u8::from(states.get(i) == st);
                let _ = writeln!(
                    out,
                    "gpuha_dnsd_pool_state{{pool=\"{}\",region=\"{}\",cloud=\"{}\",state=\"{}\"}} {v}",
                    esc(&p.id),
                    esc(&p.region),
                    esc(&p.cloud),
                    st.as_str()
                );
            }
        }
        for (name, help, v) in [
            ("gpuha_dnsd_dns_malformed_total", "DNS datagrams and TCP messages that did not parse; dropped.", &self.malformed),
            ("gpuha_dnsd_dns_truncated_total", "UDP responses sent with TC (the client retries over TCP).", &self.truncated),
            ("gpuha_dnsd_dns_tcp_rejected_total", "TCP connections closed at once: too many open.", &self.tcp_rejected),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}

/// Gauges of what DNS answers right now (computed from `states` at scrape time, not from queries,
/// so an alert fires although nobody asked): per service whether it answers the fail-whale set
/// and how many pools, per service and pool whether the pool is in the answer, and since when
/// each pool is in its answerability (its last eviction or failback, or dnsd's start).
pub fn render_now(out: &mut String, zones: &Zones, states: &PoolStates, changed_ms: &[Option<u64>], started_ms: u64) {
    let _ = writeln!(out, "# HELP gpuha_dnsd_service_failwhale 1 while the service answers its fail-whale set (no pool answerable).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_service_failwhale gauge");
    let mut answered = Vec::new();
    for (i, s) in zones.services.iter().enumerate() {
        let (_, served) = service_addresses(zones, states, i);
        let _ = writeln!(out, "gpuha_dnsd_service_failwhale{{service=\"{}\"}} {}", esc(&s.label), u8::from(served.fail_whale));
        answered.push(served);
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_service_pool_answered 1 while the pool's routers are in the service's answer.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_service_pool_answered gauge");
    for (s, served) in zones.services.iter().zip(&answered) {
        for &p in &s.pools {
            let v = u8::from(served.pools.iter().any(|(q, _)| *q == p));
            let _ = writeln!(out, "gpuha_dnsd_service_pool_answered{{service=\"{}\",pool=\"{}\"}} {v}", esc(&s.label), esc(&zones.pools[p].id));
        }
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_pool_state_changed_timestamp_seconds When the pool last left or rejoined the answer (dnsd's start if it has not since).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_state_changed_timestamp_seconds gauge");
    for (i, p) in zones.pools.iter().enumerate() {
        let at = changed_ms.get(i).copied().flatten().unwrap_or(started_ms);
        let _ = writeln!(out, "gpuha_dnsd_pool_state_changed_timestamp_seconds{{pool=\"{}\"}} {:.3}", esc(&p.id), at as f64 / 1000.0);
    }
}

/// Gauges of the operators' overrides per configured pool: which one is in force, and for a
/// pool out of the answer whether the last TTL handed out with it has run out (safe) and when.
pub fn render_overrides(out: &mut String, zones: &Zones, states: &PoolStates, drains: &[Option<gpuha_liveness::admin::DrainProgress>]) {
    use gpuha_liveness::admin::PoolOverride;
    let _ = writeln!(out, "# HELP gpuha_dnsd_pool_admin_state The operator's override of the pool (1 for the one in force; all 0: none, liveness decides).");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_admin_state gauge");
    for (i, p) in zones.pools.iter().enumerate() {
        for o in PoolOverride::ALL {
            let _ = writeln!(out, "gpuha_dnsd_pool_admin_state{{pool=\"{}\",state=\"{}\"}} {}", esc(&p.id), o.as_str(), u8::from(states.override_of(i) == Some(o)));
        }
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_pool_drain_safe 1 once the pool is out of every answer and the last TTL handed out with it has run out: no client should still hold its routers' addresses.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_drain_safe gauge");
    for (p, d) in zones.pools.iter().zip(drains) {
        if let Some(d) = d {
            let _ = writeln!(out, "gpuha_dnsd_pool_drain_safe{{pool=\"{}\"}} {}", esc(&p.id), u8::from(d.safe));
        }
    }
    let _ = writeln!(out, "# HELP gpuha_dnsd_pool_answer_cached_until_timestamp_seconds Until when the latest answer naming the pool may be cached (Unix time): a drained pool is safe from then.");
    let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_answer_cached_until_timestamp_seconds gauge");
    for (p, d) in zones.pools.iter().zip(drains) {
        if let Some(d) = d {
            let _ = writeln!(out, "gpuha_dnsd_pool_answer_cached_until_timestamp_seconds{{pool=\"{}\"}} {:.3}", esc(&p.id), d.safe_at_ms as f64 / 1000.0);
        }
    }
}
