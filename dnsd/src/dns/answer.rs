//! The pure part of the DNS tier: given the compiled zones, each pool's liveness and a question,
//! what goes in the answer. No clock, no socket, no lock: time enters only through
//! [`PoolStates::compute`]'s `now_ms`, so tests drive eviction and cold start by hand.
//!
//! Rules for a service name:
//! - `all`: the routers of every pool that is [`Liveness::Alive`] or [`Liveness::ColdStart`];
//! - `priority`: the routers of the first such pool in the service's order (A and AAAA come from
//!   the same pool, so a dual-stack client never straddles two pools);
//! - no such pool: the service's fail-whale set, never NXDOMAIN;
//! - a [`Liveness::Dead`] (evicted) pool is never in an answer;
//! - an operator's override ([`gpuha_liveness::admin`]) decides over liveness: a drained or
//!   forced-out pool is never in an answer, a forced-in one always is.
//!
//! During the first eviction window after dnsd starts, `pool_outlook` reports pools it has not
//! heard from yet as `ColdStart`, which is answerable: a restarted dnsd keeps answering every
//! configured pool instead of sending everyone to the fail-whale while frames trickle in.

use std::net::IpAddr;

use gpuha_liveness::admin::{pool_answered, Overrides, PoolOverride};
use gpuha_liveness::{FleetState, Liveness};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use super::config::{Policy, Zone, Zones};

/// Liveness of every configured pool (indexed like [`Zones::pools`]) at one instant, and the
/// operators' overrides in force then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStates {
    pub live: Vec<Liveness>,
    /// Indexed like `live`.
    pub overrides: Vec<Option<PoolOverride>>,
}

impl PoolStates {
    /// `live` with the overrides in `ov` of the pools of `zones`.
    pub fn new(zones: &Zones, live: Vec<Liveness>, ov: &Overrides) -> Self {
        let overrides = zones.pools.iter().map(|p| ov.pool(&p.id)).collect();
        PoolStates { live, overrides }
    }

    pub fn compute(zones: &Zones, fleet: &FleetState, ov: &Overrides, now_ms: u64) -> Self {
        let pools: Vec<(&str, usize)> = zones.pools.iter().map(|p| (p.id.as_str(), p.min_workers)).collect();
        Self::new(zones, fleet.pool_outlook(&pools, now_ms).states, ov)
    }

    pub fn get(&self, pool: usize) -> Liveness {
        self.live.get(pool).copied().unwrap_or(Liveness::Dead)
    }

    pub fn override_of(&self, pool: usize) -> Option<PoolOverride> {
        self.overrides.get(pool).copied().flatten()
    }

    /// Whether the pool's routers may be answered ([`pool_answered`]).
    pub fn answered(&self, pool: usize) -> bool {
        pool < self.live.len() && pool_answered(self.get(pool), self.override_of(pool))
    }
}

/// What one service answer was made of (for metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub service: usize,
    /// Pools whose routers were answered, with their state.
    pub pools: Vec<(usize, Liveness)>,
    /// True when no pool was answerable and the fail-whale set was answered.
    pub fail_whale: bool,
}

/// The addresses a service resolves to right now.
pub fn service_addresses(zones: &Zones, states: &PoolStates, service: usize) -> (Vec<IpAddr>, Served) {
    let svc = &zones.services[service];
    let answerable = svc.pools.iter().copied().filter(|p| states.answered(*p));
    let chosen: Vec<usize> = match svc.policy {
        Policy::All => answerable.collect(),
        Policy::Priority => answerable.take(1).collect(),
    };
    let fail_whale = chosen.is_empty();
    let mut addrs: Vec<IpAddr> = Vec::new();
    let source: Vec<IpAddr> = if fail_whale {
        svc.fail_whale.clone()
    } else {
        chosen.iter().flat_map(|p| zones.pools[*p].routers.iter().copied()).collect()
    };
    for a in source {
        // Two pools may share a router: each address once.
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let served = Served { service, pools: chosen.iter().map(|p| (*p, states.get(*p))).collect(), fail_whale };
    (addrs, served)
}

/// The answer to one question, before it becomes a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub rcode: ResponseCode,
    /// AA: set for every name inside one of our zones.
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    pub served: Vec<Served>,
}

impl Resolution {
    fn refused() -> Self {
        Resolution {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            authority: vec![],
            additional: vec![],
            served: vec![],
        }
    }

    /// NOERROR with no answer for the asked type is NODATA.
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

fn matches(qtype: RecordType, rtype: RecordType) -> bool {
    qtype == RecordType::ANY || qtype == rtype
}

fn with_owner(mut r: Record, owner: &Name) -> Record {
    r.name = owner.clone();
    r
}

/// CNAME chains inside our zones are followed this far.
const MAX_CHAIN: usize = 8;

/// Answers `qtype` for `qname`. `owner` is the name as the client spelled it (its case is kept
/// in the answer's owner names; lookups are case-insensitive).
pub fn resolve(zones: &Zones, states: &PoolStates, qname: &Name, qtype: RecordType) -> Resolution {
    let mut name = LowerName::new(qname);
    let mut owner = qname.clone();
    let Some(mut zone) = zones.zone_for(&name) else {
        return Resolution::refused();
    };
    let mut res = Resolution {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers: vec![],
        authority: vec![],
        additional: vec![],
        served: vec![],
    };
    for _ in 0..MAX_CHAIN {
        let before = res.answers.len();
        if let Some(&si) = zone.services.get(&name) {
            if matches(qtype, RecordType::A) || matches(qtype, RecordType::AAAA) {
                let (addrs, served) = service_addresses(zones, states, si);
                let ttl = zones.services[si].ttl;
                for a in addrs {
                    let data = match a {
                        IpAddr::V4(v4) => RData::A(A(v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                    };
                    if matches(qtype, data.record_type()) {
                        res.answers.push(Record::from_rdata(owner.clone(), ttl, data));
                    }
                }
                res.served.push(served);
            }
            return finish(res, zone, before);
        }
        let Some(set) = zone.records.get(&name) else {
            if !zone.name_exists(&name) {
                res.rcode = ResponseCode::NXDomain;
            }
            return finish(res, zone, before);
        };
        let cname = set.iter().find(|r| r.record_type() == RecordType::CNAME);
        match cname {
            Some(c) if qtype != RecordType::CNAME && qtype != RecordType::ANY => {
                res.answers.push(with_owner(c.clone(), &owner));
                let RData::CNAME(target) = &c.data else { return res };
                let target_l = LowerName::new(&target.0);
                match zones.zone_for(&target_l) {
                    Some(z) => {
                        zone = z;
                        name = target_l;
                        owner = target.0.clone();
                    }
                    // Out of our zones: the client's resolver follows it.
                    None => return res,
                }
            }
            _ => {
                for r in set.iter().filter(|r| matches(qtype, r.record_type())) {
                    res.answers.push(with_owner(r.clone(), &owner));
                }
                add_glue(zones, &mut res);
                return finish(res, zone, before);
            }
        }
    }
    // A loop or an overlong chain: what we have is all we answer.
    res
}

/// In-zone addresses of NS and MX targets, so a client need not ask again.
fn add_glue(zones: &Zones, res: &mut Resolution) {
    let targets: Vec<Name> = res
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            RData::MX(mx) => Some(mx.exchange.clone()),
            _ => None,
        })
        .collect();
    for t in targets {
        let lt = LowerName::new(&t);
        if let Some(set) = zones.zone_for(&lt).and_then(|z| z.records.get(&lt)) {
            for r in set.iter().filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA)) {
                if !res.additional.contains(r) {
                    res.additional.push(r.clone());
                }
            }
        }
    }
}

/// NODATA and NXDOMAIN carry the zone's SOA in authority, with the negative TTL (RFC 2308);
/// `before` is how many answers (a CNAME chain) preceded the final name.
fn finish(mut res: Resolution, zone: &Zone, before: usize) -> Resolution {
    if res.answers.len() == before || res.rcode == ResponseCode::NXDomain {
        let mut soa = zone.soa.clone();
        soa.ttl = zone.negative_ttl;
        res.authority.push(soa);
    }
    res
}

/// The whole zone for AXFR: SOA, every record, service names as answered now, SOA again.
///
/// Service answers change with pool liveness while the serial does not: a transfer is a
/// snapshot for inspection, not something a secondary should serve (it would keep evicted pools).
pub fn zone_transfer(zones: &Zones, states: &PoolStates, zone: &Zone) -> Vec<Record> {
    let mut out = vec![zone.soa.clone()];
    for set in zone.records.values() {
        out.extend(set.iter().filter(|r| r.record_type() != RecordType::SOA).cloned());
    }
    for (name, si) in &zone.services {
        let (addrs, _) = service_addresses(zones, states, *si);
        let owner = Name::from(name.clone());
        let ttl = zones.services[*si].ttl;
        out.extend(addrs.into_iter().map(|a| {
            let data = match a {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            Record::from_rdata(owner.clone(), ttl, data)
        }));
    }
    out.push(zone.soa.clone());
    out
}

/// A change of a pool's answerability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Was answerable (alive or cold start), now dead.
    Evicted,
    /// Was dead, now answerable again.
    FailedBack,
}

/// Remembers each pool's last state to report transitions, whoever looks first (a query or the
/// periodic tick). Liveness only: an operator's override is logged and counted where it is set.
#[derive(Debug, Default)]
pub struct Transitions {
    last: Vec<Option<Liveness>>,
    last_now_ms: u64,
}

impl Transitions {
    /// Records `states` seen at `now_ms`; returns the pools that changed. Observations older than
    /// the newest one seen are ignored, so two racing queries cannot report a flap.
    pub fn observe(&mut self, states: &PoolStates, now_ms: u64) -> Vec<(usize, Transition)> {
        if now_ms < self.last_now_ms {
            return vec![];
        }
        self.last_now_ms = now_ms;
        if self.last.len() < states.live.len() {
            self.last.resize(states.live.len(), None);
        }
        let mut out = Vec::new();
        for (i, now) in states.live.iter().enumerate() {
            match (self.last[i], now.is_answerable()) {
                (Some(prev), false) if prev.is_answerable() => out.push((i, Transition::Evicted)),
                (Some(prev), true) if !prev.is_answerable() => out.push((i, Transition::FailedBack)),
                _ => {}
            }
            self.last[i] = Some(*now);
        }
        out
    }
}
