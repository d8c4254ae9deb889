//! Membership of the routers' worker cluster, from telemetry: who Envoy's `gpuha_workers`
//! cluster lists, as dnsd serves it over EDS (REST-JSON xDS, `POST /v3/discovery:endpoints`).
//!
//! **Who is a member.** A worker is a member from its first accepted frame until it has been
//! silent (no frame at all, whatever it showed) for `leave_after_ms`: minutes by default
//! ([`DEFAULT_LEAVE_AFTER_MS`]). Never less than the freshness gate: a worker the picker may
//! still pick is always a member ([`is_member`] holds whenever [`WorkerState::is_fresh`] does,
//! see the property test). Membership is not pickability: a stalled, silent or drained worker
//! stays a member (the picker gives it no new requests; requests in flight finish), so the
//! cluster changes only when workers join or are gone for good. A member that leaves keeps its
//! requests in flight: Envoy drains the connection pools of a removed host.
//!
//! **Which workers a router gets.** Only its own pools' (the `gpuha.pools` list in the Envoy
//! node's metadata; every pool when absent), at priority 0; and, at priority 1, the endpoints of
//! its fallback tiers, which only the router knows (the `gpuha.tiers` list in its node
//! metadata, rendered by `envoy/render.py`): the cluster's priority-1 hosts as the static config
//! had them (see `envoy/README.md`, "Fallback chain").
//!
//! **Versions.** The response's `version_info` is a hash of its content: the same membership
//! gets the same version, across dnsd restarts too.
//!
//! **A restarted dnsd knows nobody** until the sidecars' next frames: it answers EDS only after
//! [`WARMUP_MS`] (a fresh worker sends at least once per freshness gate), and Envoy keeps its last
//! membership on a refused or failed poll.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::json;

use crate::fleet::WorkerState;
use crate::FRESHNESS_GATE_MS;

/// How long a silent worker stays a member by default: long enough that a sidecar restart, a
/// network blip or a long GC never churns the cluster, short enough that an autoscaled-away pod
/// is gone from every router within a few minutes.
pub const DEFAULT_LEAVE_AFTER_MS: u64 = 120_000;
/// The shortest `leave_after_ms`: the freshness gate and a second for the routers' polls.
pub const MIN_LEAVE_AFTER_MS: u64 = FRESHNESS_GATE_MS + 1_000;
/// A dnsd that started less than this long ago answers no EDS poll: every worker that is fresh
/// sends at least once in a freshness gate, so after it dnsd knows each of them again.
pub const WARMUP_MS: u64 = FRESHNESS_GATE_MS;
/// Most pools or tier endpoints one router's node metadata may name.
pub const MAX_NAMED: usize = 1_024;
/// The resource type EDS serves.
pub const CLA_TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Whether `w` is a member at `now_ms`: heard (any frame) within `leave_after_ms`, or fresh.
pub fn is_member(w: &WorkerState, now_ms: u64, leave_after_ms: u64) -> bool {
    w.since_frame_ms(now_ms) <= leave_after_ms.max(FRESHNESS_GATE_MS)
}

/// Whether a dnsd started at `started_ms` may answer EDS at `now_ms` ([`WARMUP_MS`]).
pub fn ready(started_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(started_ms) >= WARMUP_MS
}

/// One router's cluster membership: its pools' members, and its tiers' endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Priority 0: the members of the router's pools, sorted, without duplicates.
    pub members: Vec<SocketAddr>,
    /// Priority 1: the router's tier endpoints in its order, without members or duplicates.
    pub tiers: Vec<SocketAddr>,
}

/// The membership of the router that asked with `q`, over `states` at `now_ms`.
pub fn assignment<'a>(states: impl Iterator<Item = &'a WorkerState>, now_ms: u64, q: &EdsQuery, leave_after_ms: u64) -> Assignment {
    let mut members: Vec<SocketAddr> = states
        .filter(|w| q.pools.is_empty() || q.pools.contains(&w.frame.pool_id))
        .filter(|w| is_member(w, now_ms, leave_after_ms))
        .map(|w| w.frame.addr)
        .collect();
    members.sort_unstable();
    members.dedup();
    let mut tiers: Vec<SocketAddr> = Vec::new();
    for t in &q.tiers {
        // A worker that is also listed as a tier stays a worker: one host, one priority.
        if members.binary_search(t).is_err() && !tiers.contains(t) {
            tiers.push(*t);
        }
    }
    Assignment { members, tiers }
}

impl Assignment {
    /// The `ClusterLoadAssignment` named `cluster_name`, as JSON.
    pub fn to_cla(&self, cluster_name: &str) -> serde_json::Value {
        let eps = |addrs: &[SocketAddr]| -> Vec<serde_json::Value> {
            addrs
                .iter()
                .map(|a| json!({"endpoint": {"address": {"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}}}))
                .collect()
        };
        let mut localities = vec![json!({"lb_endpoints": eps(&self.members)})];
        if !self.tiers.is_empty() {
            localities.push(json!({"priority": 1, "lb_endpoints": eps(&self.tiers)}));
        }
        json!({"@type": CLA_TYPE_URL, "cluster_name": cluster_name, "endpoints": localities})
    }

    /// A version that names the content (FNV-1a over it): stable across processes.
    pub fn version(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for a in &self.members {
            eat(a.to_string().as_bytes());
            eat(b",");
        }
        eat(b"|");
        for a in &self.tiers {
            eat(a.to_string().as_bytes());
            eat(b",");
        }
        format!("{h:016x}-{}-{}", self.members.len(), self.tiers.len())
    }
}

/// The `DiscoveryResponse` for `names` (one assignment per name asked for).
pub fn discovery_response(names: &[String], a: &Assignment) -> String {
    let resources: Vec<serde_json::Value> = names.iter().map(|n| a.to_cla(n)).collect();
    json!({"version_info": a.version(), "resources": resources, "type_url": CLA_TYPE_URL}).to_string()
}

/// What dnsd reads from an EDS `DiscoveryRequest`: the resources asked for, and the router's
/// pools and tier endpoints from its node's metadata (`node.metadata.gpuha`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EdsQuery {
    pub resource_names: Vec<String>,
    /// The `version_info` of the last answer the router accepted (empty on its first poll).
    pub version_info: String,
    /// Sorted, deduplicated; empty: every pool.
    pub pools: Vec<String>,
    pub tiers: Vec<SocketAddr>,
}

#[derive(Deserialize)]
struct WireRequest {
    #[serde(default)]
    node: Option<WireNode>,
    #[serde(default)]
    resource_names: Vec<String>,
    #[serde(default)]
    type_url: Option<String>,
    #[serde(default)]
    version_info: Option<String>,
}

#[derive(Deserialize)]
struct WireNode {
    #[serde(default)]
    metadata: Option<WireMetadata>,
}

#[derive(Deserialize)]
struct WireMetadata {
    #[serde(default)]
    gpuha: Option<WireGpuha>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGpuha {
    #[serde(default)]
    pools: Vec<String>,
    #[serde(default)]
    tiers: Vec<String>,
}

/// Parses an EDS `DiscoveryRequest` (JSON, as Envoy's REST subscription posts it). `Err` says
/// what was wrong, for a `400`.
pub fn parse_request(body: &[u8]) -> Result<EdsQuery, String> {
    let w: WireRequest = serde_json::from_slice(body).map_err(|e| format!("not a DiscoveryRequest: {e}"))?;
    if let Some(t) = &w.type_url {
        if !t.is_empty() && t != CLA_TYPE_URL {
            return Err(format!("type_url {t:?}: this endpoint serves only {CLA_TYPE_URL}"));
        }
    }
    if w.resource_names.is_empty() {
        return Err("resource_names: name the cluster (eds_cluster_config.service_name)".into());
    }
    if w.resource_names.len() > MAX_NAMED {
        return Err(format!("resource_names: more than {MAX_NAMED}"));
    }
    let g = w.node.and_then(|n| n.metadata).and_then(|m| m.gpuha).unwrap_or(WireGpuha { pools: Vec::new(), tiers: Vec::new() });
    if g.pools.len() > MAX_NAMED || g.tiers.len() > MAX_NAMED {
        return Err(format!("node.metadata.gpuha: more than {MAX_NAMED} pools or tiers"));
    }
    let mut pools: Vec<String> = g.pools.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
    pools.sort();
    pools.dedup();
    let tiers = g
        .tiers
        .iter()
        .map(|t| t.parse::<SocketAddr>().map_err(|_| format!("node.metadata.gpuha.tiers: {t:?} is not ip:port")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EdsQuery { resource_names: w.resource_names, version_info: w.version_info.unwrap_or_default(), pools, tiers })
}

/// Whether the router that asked with `q` already holds `a`: it names `a`'s version as the
/// last one it accepted. dnsd then answers `304 Not Modified`, which Envoy's REST subscription
/// takes as "nothing new" without parsing anything: at 10 k members an unchanged answer is
/// about 870 KB of JSON that Envoy would parse to find the same version (bench `xds`). The
/// version names the content only; one router's subscription always asks for the same names.
pub fn unchanged(q: &EdsQuery, a: &Assignment) -> bool {
    !q.version_info.is_empty() && q.version_info == a.version()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, Metrics};
    use proptest::prelude::*;

    fn worker(id: &str, pool: &str, addr: &str, last_rx_ms: u64) -> WorkerState {
        let frame = Frame {
            key_id: 1,
            boot_id: 1,
            seq: 1,
            sent_ms: last_rx_ms,
            worker_id: id.into(),
            pool_id: pool.into(),
            addr: addr.parse().unwrap(),
            models: vec!["m".into()],
            adapters: vec![],
            metrics: Metrics::default(),
        };
        WorkerState { frame, last_rx_ms, last_progress_ms: last_rx_ms, life_ms: last_rx_ms, streak_start_ms: last_rx_ms, derived: Default::default() }
    }

    fn query(pools: &[&str], tiers: &[&str]) -> EdsQuery {
        EdsQuery {
            resource_names: vec!["gpuha_workers".into()],
            version_info: String::new(),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            tiers: tiers.iter().map(|t| t.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn joins_on_first_frame_leaves_after_silence() {
        let w = worker("w1", "a", "127.0.0.1:8001", 10_000);
        assert!(is_member(&w, 10_000, 60_000));
        assert!(is_member(&w, 70_000, 60_000));
        assert!(!is_member(&w, 70_001, 60_000));
    }

    #[test]
    fn never_leaves_while_fresh_even_with_a_short_setting() {
        let w = worker("w1", "a", "127.0.0.1:8001", 0);
        assert!(is_member(&w, FRESHNESS_GATE_MS, 1));
        assert!(!is_member(&w, FRESHNESS_GATE_MS + 1, 1));
    }

    #[test]
    fn a_router_gets_its_pools_members_and_its_tiers() {
        let ws = [
            worker("w2", "a", "127.0.0.1:8002", 5_000),
            worker("w1", "a", "127.0.0.1:8001", 5_000),
            worker("w3", "b", "127.0.0.1:8003", 5_000),
            worker("gone", "a", "127.0.0.1:8009", 0),
        ];
        let addrs = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<SocketAddr>>();
        let q = query(&["a"], &["127.0.0.1:10101", "127.0.0.1:8001", "127.0.0.1:10101"]);
        let a = assignment(ws.iter(), 6_000, &q, MIN_LEAVE_AFTER_MS);
        assert_eq!(a.members, addrs(&["127.0.0.1:8001", "127.0.0.1:8002"]), "pool a only; the silent one left");
        assert_eq!(a.tiers, addrs(&["127.0.0.1:10101"]), "a member is never also a tier; no duplicates");
        let before = assignment(ws.iter(), MIN_LEAVE_AFTER_MS, &q, MIN_LEAVE_AFTER_MS);
        assert_eq!(before.members, addrs(&["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8009"]), "not silent long enough yet");
        let all = assignment(ws.iter(), 6_000, &query(&[], &[]), MIN_LEAVE_AFTER_MS);
        assert_eq!(all.members.len(), 3, "every pool when none is named");
    }

    #[test]
    fn response_is_a_cluster_load_assignment_with_a_content_version() {
        let ws = [worker("w1", "a", "[::1]:8001", 0), worker("w2", "a", "127.0.0.1:8002", 0)];
        let a = assignment(ws.iter(), 0, &query(&[], &["127.0.0.1:10101"]), DEFAULT_LEAVE_AFTER_MS);
        let body: serde_json::Value = serde_json::from_str(&discovery_response(&["gpuha_workers".into()], &a)).unwrap();
        assert_eq!(body["type_url"], CLA_TYPE_URL);
        let cla = &body["resources"][0];
        assert_eq!(cla["@type"], CLA_TYPE_URL);
        assert_eq!(cla["cluster_name"], "gpuha_workers");
        assert_eq!(cla["endpoints"][0]["lb_endpoints"][1]["endpoint"]["address"]["socket_address"]["address"], "::1");
        assert_eq!(cla["endpoints"][1]["priority"], 1);
        assert_eq!(cla["endpoints"][1]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"], 10101);
        let same = assignment(ws.iter().rev(), 0, &query(&[], &["127.0.0.1:10101"]), DEFAULT_LEAVE_AFTER_MS);
        assert_eq!(body["version_info"], same.version());
        assert_ne!(a.version(), Assignment { members: a.members.clone(), tiers: vec![] }.version());
        let empty = Assignment::default();
        let body: serde_json::Value = serde_json::from_str(&discovery_response(&["x".into()], &empty)).unwrap();
        assert_eq!(body["resources"][0]["endpoints"][0]["lb_endpoints"], json!([]));
    }

    #[test]
    fn parses_envoys_request_and_refuses_bad_ones() {
        let ok = br#"{"version_info":"1","node":{"id":"r","metadata":{"gpuha":{"pools":["b"," a","b"],"tiers":["127.0.0.1:10101","[::1]:9"]}},"extensions":[{"name":"x"}]},
            "resource_names":["gpuha_workers"],"type_url":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}"#;
        let q = parse_request(ok).unwrap();
        assert_eq!(q.pools, vec!["a", "b"]);
        assert_eq!(q.tiers.len(), 2);
        assert_eq!(parse_request(br#"{"resource_names":["c"]}"#).unwrap().pools, Vec::<String>::new());
        for bad in [
            &b"not json"[..],
            br#"[]"#,
            br#"{"resource_names":[]}"#,
            br#"{"resource_names":"c"}"#,
            br#"{"resource_names":["c"],"type_url":"type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#,
            br#"{"resource_names":["c"],"node":{"metadata":{"gpuha":{"tiers":["w1:80"]}}}}"#,
            br#"{"resource_names":["c"],"node":{"metadata":{"gpuha":{"pool":["a"]}}}}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_answer_the_router_holds_is_unchanged() {
        let ws = [worker("w1", "a", "127.0.0.1:8001", 1_000)];
        let q0 = parse_request(br#"{"resource_names":["gpuha_workers"]}"#).unwrap();
        let a = assignment(ws.iter(), 1_000, &q0, 60_000);
        assert!(!unchanged(&q0, &a), "a first poll names no version");
        let body = format!(r#"{{"resource_names":["gpuha_workers"],"version_info":"{}"}}"#, a.version());
        let q1 = parse_request(body.as_bytes()).unwrap();
        assert_eq!(q1.version_info, a.version());
        assert!(unchanged(&q1, &a));
        let more = [worker("w1", "a", "127.0.0.1:8001", 1_000), worker("w2", "a", "127.0.0.1:8002", 1_000)];
        assert!(!unchanged(&q1, &assignment(more.iter(), 1_000, &q1, 60_000)), "a new member is news");
    }

    proptest! {
        /// A worker the picker may pick is always a member, whatever leave_after_ms says.
        #[test]
        fn fresh_workers_are_members(rx in 0u64..1_000_000, progress_back in 0u64..10_000, dt in 0u64..200_000, leave in 0u64..300_000) {
            let mut w = worker("w", "a", "127.0.0.1:1", rx);
            w.last_progress_ms = rx.saturating_sub(progress_back);
            w.life_ms = w.last_progress_ms;
            let now = rx + dt;
            if w.is_fresh(now) {
                prop_assert!(is_member(&w, now, leave));
            }
            if dt > leave.max(FRESHNESS_GATE_MS) {
                prop_assert!(!is_member(&w, now, leave));
            }
        }

        /// Malformed requests are refused, never a panic.
        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_request(&body);
        }
    }
}
