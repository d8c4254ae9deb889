//! Counters of the DNS tier, rendered in Prometheus text format after dnsd's own metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use gpuha_liveness::Liveness;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::answer::{service_addresses, PoolStates, Served};
use super::config::Zones;

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

#[derive(Debug, Default)]
pub struct DnsMetrics {
    queries: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// (service, pool, pool state) -> answers that included the pool.
    answers: Mutex<BTreeMap<(usize, usize, &'static str), u64>>,
    failwhale: Mutex<BTreeMap<usize, u64>>,
    evictions: Mutex<BTreeMap<usize, u64>>,
    failbacks: Mutex<BTreeMap<usize, u64>>,
    pub malformed: AtomicU64,
    pub truncated: AtomicU64,
    pub tcp_rejected: AtomicU64,
}

/// Escapes a label value (backslash, quote, newline) for the Prometheus text format.
pub(crate) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DnsMetrics {
    pub fn query(&self, qtype: &'static str, rcode: &'static str) {
        *lock(&self.queries).entry((qtype, rcode)).or_default() += 1;
    }

    pub fn served(&self, s: &Served) {
        if s.fail_whale {
            *lock(&self.failwhale).entry(s.service).or_default() += 1;
        }
        let mut a = lock(&self.answers);
        for (pool, state) in &s.pools {
            *a.entry((s.service, *pool, state.as_str())).or_default() += 1;
        }
    }

    pub fn eviction(&self, pool: usize) {
        *lock(&self.evictions).entry(pool).or_default() += 1;
    }

    pub fn failback(&self, pool: usize) {
        *lock(&self.failbacks).entry(pool).or_default() += 1;
    }

    pub fn render(&self, out: &mut String, zones: &Zones, states: &PoolStates) {
        let pool = |i: usize| zones.pools.get(i).map(|p| esc(&p.id)).unwrap_or_default();
        let svc = |i: usize| zones.services.get(i).map(|s| esc(&s.label)).unwrap_or_default();
        let _ = writeln!(out, "# HELP gpuha_dnsd_dns_queries_total DNS queries answered, by query type and response code.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_dns_queries_total counter");
        for ((t, r), n) in lock(&self.queries).iter() {
            let _ = writeln!(out, "gpuha_dnsd_dns_queries_total{{qtype=\"{t}\",rcode=\"{r}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_dns_answers_total Service answers that included a pool, by the pool's state.");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_dns_answers_total counter");
        for ((s, p, st), n) in lock(&self.answers).iter() {
            let _ = writeln!(out, "gpuha_dnsd_dns_answers_total{{service=\"{}\",pool=\"{}\",pool_state=\"{st}\"}} {n}", svc(*s), pool(*p));
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_failwhale_answers_total Service answers with the fail-whale set (no pool alive).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_failwhale_answers_total counter");
        let fw = lock(&self.failwhale);
        for (i, _) in zones.services.iter().enumerate() {
            let _ = writeln!(out, "gpuha_dnsd_failwhale_answers_total{{service=\"{}\"}} {}", svc(i), fw.get(&i).copied().unwrap_or(0));
        }
        drop(fw);
        for (name, help, map) in [
            ("gpuha_dnsd_pool_evictions_total", "Pools leaving the answer (answerable -> dead).", &self.evictions),
            ("gpuha_dnsd_pool_failbacks_total", "Pools returning to the answer (dead -> answerable).", &self.failbacks),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let m = lock(map);
            for (i, _) in zones.pools.iter().enumerate() {
                let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", pool(i), m.get(&i).copied().unwrap_or(0));
            }
        }
        let _ = writeln!(out, "# HELP gpuha_dnsd_pool_state Current pool state (1 for the state it is in).");
        let _ = writeln!(out, "# TYPE gpuha_dnsd_pool_state gauge");
        for (i, p) in zones.pools.iter().enumerate() {
            for st in [Liveness::Alive, Liveness::ColdStart, Liveness::Dead] {
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
