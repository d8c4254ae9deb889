//! The `[dns]` section of dnsd's config, and its compiled form [`Zones`] that the resolver reads.
//!
//! (Over 500 lines on purpose: the schema of `[dns]`, its validation and its compilation into
//! [`Zones`] are kept together, so that every key is checked where it is compiled.)
//!
//! ```toml
//! [dns]
//! listen = "0.0.0.0:53"
//!
//! [[dns.zones]]
//! origin = "gpuha.example."
//! ns = ["ns1.gpuha.example.", "ns2.gpuha.example."]
//! soa = { rname = "hostmaster.gpuha.example.", serial = 2026010101, minimum = 5 }
//! records = [
//!   { name = "ns1", type = "A", value = "192.0.2.53" },
//!   { name = "@", type = "TXT", value = "gpu-ha" },
//! ]
//!
//! [[dns.pools]]
//! id = "us-east-gcp"          # the `pool` field of the sidecars' frames
//! region = "us-east"
//! cloud = "gcp"
//! routers = ["192.0.2.10", "2001:db8::10"]
//! min_workers = 1
//!
//! [[dns.services]]
//! name = "api.gpuha.example."
//! policy = "all"              # or "priority": the first alive pool in `pools` order
//! pools = ["us-east-gcp"]
//! ttl = 5
//! fail_whale = ["192.0.2.99"]
//! ```
//!
//! Record and service names ending in `.` are absolute; others are relative to the zone origin
//! (`@` is the origin itself). Names are case-insensitive.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use serde::Deserialize;

use crate::error::ConfigError;

/// Dynamic answers may be cached this long at most: with the 10 s eviction window, an evicted
/// pool is out of every well-behaved cache 15 s after its last frame.
pub const MAX_SERVICE_TTL: u32 = 5;
/// EDNS payload we advertise and cap responses at (the DNS Flag Day 2020 value: no fragments).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1232;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP address for DNS (same port for both).
    pub listen: SocketAddr,
    /// Largest UDP response, when the client's EDNS buffer allows it (512..=4096).
    #[serde(default = "default_max_udp")]
    pub max_udp_payload: u16,
    /// A TCP connection idle this long is closed.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout_ms: u64,
    /// Clients (addresses or CIDR networks) allowed AXFR over TCP. Empty: AXFR always refused.
    #[serde(default)]
    pub allow_axfr: Vec<String>,
    /// How often pool transitions (evictions, failbacks) are checked without queries.
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    pub zones: Vec<ZoneConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

fn default_max_udp() -> u16 {
    DEFAULT_MAX_UDP_PAYLOAD
}
fn default_tcp_idle() -> u64 {
    10_000
}
fn default_tick() -> u64 {
    500
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// The zone apex, e.g. `gpuha.example.`.
    pub origin: String,
    /// Name servers of the zone (NS at the apex). Give their A/AAAA in `records` when in-zone.
    pub ns: Vec<String>,
    pub soa: SoaConfig,
    /// TTL of the apex SOA/NS and of static records without their own.
    #[serde(default = "default_static_ttl")]
    pub ttl: u32,
    #[serde(default)]
    pub records: Vec<RecordConfig>,
}

fn default_static_ttl() -> u32 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoaConfig {
    /// Primary name server; defaults to the first `ns`.
    #[serde(default)]
    pub mname: Option<String>,
    /// Responsible mailbox as a name (`hostmaster.example.` for hostmaster@example).
    pub rname: String,
    #[serde(default = "default_serial")]
    pub serial: u32,
    #[serde(default = "default_refresh")]
    pub refresh: i32,
    #[serde(default = "default_retry")]
    pub retry: i32,
    #[serde(default = "default_expire")]
    pub expire: i32,
    /// Negative-caching TTL (RFC 2308): how long NXDOMAIN / NODATA may be cached.
    #[serde(default = "default_minimum")]
    pub minimum: u32,
}

fn default_serial() -> u32 {
    1
}
fn default_refresh() -> i32 {
    3_600
}
fn default_retry() -> i32 {
    600
}
fn default_expire() -> i32 {
    1_209_600
}
fn default_minimum() -> u32 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    /// A/AAAA: an address; TXT: the text; CNAME: a name; MX: "PREFERENCE NAME".
    pub value: String,
    #[serde(default)]
    pub ttl: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Matches the `pool` field of telemetry frames.
    pub id: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub cloud: String,
    /// Addresses of the pool's L7 routers (Envoy): what the service names resolve to.
    pub routers: Vec<IpAddr>,
    /// Workers that must have sent a valid frame within the eviction window.
    #[serde(default = "default_min_workers")]
    pub min_workers: usize,
}

fn default_min_workers() -> usize {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Every alive pool's routers.
    #[default]
    All,
    /// The routers of the first alive pool, in the service's `pools` order.
    Priority,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(default)]
    pub policy: Policy,
    pub pools: Vec<String>,
    #[serde(default = "default_service_ttl")]
    pub ttl: u32,
    /// Answered when no pool of the service is alive: a degraded-but-correct endpoint.
    pub fail_whale: Vec<IpAddr>,
}

fn default_service_ttl() -> u32 {
    MAX_SERVICE_TTL
}

fn parse_name(key: &str, s: &str, origin: Option<&Name>) -> Result<Name, ConfigError> {
    let bad = |e: &dyn std::fmt::Display| ConfigError::invalid(key, format!("`{s}` is not a domain name: {e}"));
    if s.is_empty() {
        return Err(ConfigError::invalid(key, "empty name"));
    }
    let name = match (s, origin) {
        ("@", Some(o)) => o.clone(),
        (_, Some(o)) if !s.ends_with('.') => Name::from_ascii(s).map_err(|e| bad(&e))?.append_domain(o).map_err(|e| bad(&e))?,
        _ if !s.ends_with('.') => {
            return Err(ConfigError::invalid(key, format!("`{s}` must be absolute (end with a dot)")));
        }
        _ => Name::from_ascii(s).map_err(|e| bad(&e))?,
    };
    Ok(name.to_lowercase())
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Zones::compile(self).map(|_| ())
    }
}

/// One service, compiled.
#[derive(Debug, Clone)]
pub struct Service {
    /// As configured (lower case, absolute): the metrics label.
    pub label: String,
    pub policy: Policy,
    /// Indexes into [`Zones::pools`].
    pub pools: Vec<usize>,
    pub ttl: u32,
    pub fail_whale: Vec<IpAddr>,
}

/// One pool, compiled.
#[derive(Debug, Clone)]
pub struct Pool {
    pub id: String,
    pub region: String,
    pub cloud: String,
    pub routers: Vec<IpAddr>,
    pub min_workers: usize,
}

/// One authoritative zone, compiled.
#[derive(Debug, Clone)]
pub struct Zone {
    pub origin: LowerName,
    pub soa: Record,
    /// Negative TTL: min(SOA TTL, SOA minimum) (RFC 2308 §5).
    pub negative_ttl: u32,
    /// Static records (apex NS included) by owner name.
    pub records: BTreeMap<LowerName, Vec<Record>>,
    /// Services by owner name (values index [`Zones::services`]).
    pub services: BTreeMap<LowerName, usize>,
}

impl Zone {
    /// Whether `name` owns data, or has descendants that do (an empty non-terminal).
    pub fn name_exists(&self, name: &LowerName) -> bool {
        if name == &self.origin || self.records.contains_key(name) || self.services.contains_key(name) {
            return true;
        }
        self.records.keys().chain(self.services.keys()).any(|owner| name.zone_of(owner))
    }
}

/// Everything the resolver needs, validated.
#[derive(Debug, Clone)]
pub struct Zones {
    pub zones: Vec<Zone>,
    pub pools: Vec<Pool>,
    pub services: Vec<Service>,
    pub max_udp_payload: u16,
    pub allow_axfr: Vec<(IpAddr, u8)>,
}

fn parse_net(key: &str, s: &str) -> Result<(IpAddr, u8), ConfigError> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| ConfigError::invalid(key, format!("`{s}` is not an address or CIDR network")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| ConfigError::invalid(key, format!("`{s}`: bad prefix length")))?,
        None => max,
    };
    Ok((ip, len))
}

/// Whether `ip` lies in `net/len`.
pub fn net_contains(net: (IpAddr, u8), ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match (net.0, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if net.1 == 0 { 0 } else { u32::MAX << (32 - u32::from(net.1)) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if net.1 == 0 { 0 } else { u128::MAX << (128 - u32::from(net.1)) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn static_rdata(key: &str, rtype: &str, value: &str) -> Result<RData, ConfigError> {
    let bad = |what: &str| ConfigError::invalid(key, format!("`{value}` is not {what}"));
    Ok(match rtype.to_ascii_uppercase().as_str() {
        "A" => RData::A(A(value.parse().map_err(|_| bad("an IPv4 address"))?)),
        "AAAA" => RData::AAAA(AAAA(value.parse().map_err(|_| bad("an IPv6 address"))?)),
        "TXT" => {
            // One character-string holds at most 255 bytes: split longer text.
            let chunks: Vec<String> = value.as_bytes().chunks(255).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
            RData::TXT(TXT::new(if chunks.is_empty() { vec![String::new()] } else { chunks }))
        }
        "CNAME" => RData::CNAME(CNAME(parse_name(key, value, None)?)),
        "MX" => {
            let (pref, host) = value.split_once(' ').ok_or_else(|| bad("`PREFERENCE NAME`"))?;
            let pref: u16 = pref.trim().parse().map_err(|_| bad("`PREFERENCE NAME`"))?;
            RData::MX(MX::new(pref, parse_name(key, host.trim(), None)?))
        }
        other => {
            return Err(ConfigError::invalid(
                key.replace(".value", ".type"),
                format!("record type `{other}` is not supported (A, AAAA, TXT, CNAME, MX)"),
            ))
        }
    })
}

/// The limits of `[dns]` itself.
fn check_limits(config: &DnsConfig) -> Result<(), ConfigError> {
    if !(512..=4096).contains(&config.max_udp_payload) {
        return Err(ConfigError::invalid("dns.max_udp_payload", "must be within 512..=4096"));
    }
    if config.tcp_idle_timeout_ms == 0 {
        return Err(ConfigError::invalid("dns.tcp_idle_timeout_ms", "must be > 0"));
    }
    if !(10..=60_000).contains(&config.tick_ms) {
        return Err(ConfigError::invalid("dns.tick_ms", "must be within 10..=60000"));
    }
    if config.zones.is_empty() {
        return Err(ConfigError::invalid("dns.zones", "at least one zone is required"));
    }
    Ok(())
}

/// `[[dns.pools]]`: the pools, and their index by id.
fn compile_pools(config: &[PoolConfig]) -> Result<(Vec<Pool>, BTreeMap<String, usize>), ConfigError> {
    let mut pools = Vec::new();
    let mut pool_index = BTreeMap::new();
    for (i, p) in config.iter().enumerate() {
        let key = |k: &str| format!("dns.pools[{i}].{k}");
        if p.id.is_empty() || p.id.len() > 64 {
            return Err(ConfigError::invalid(key("id"), "must be 1..=64 bytes (as in telemetry frames)"));
        }
        if pool_index.insert(p.id.clone(), i).is_some() {
            return Err(ConfigError::invalid(key("id"), format!("pool `{}` is defined twice", p.id)));
        }
        if p.routers.is_empty() {
            return Err(ConfigError::invalid(key("routers"), "a pool needs at least one router address"));
        }
        if p.min_workers == 0 {
            return Err(ConfigError::invalid(key("min_workers"), "must be >= 1"));
        }
        pools.push(Pool {
            id: p.id.clone(),
            region: p.region.clone(),
            cloud: p.cloud.clone(),
            routers: p.routers.clone(),
            min_workers: p.min_workers,
        });
    }
    Ok((pools, pool_index))
}

/// `dns.zones[zi]`: its SOA, name servers and static records (`before`: the zones already
/// compiled, so that an origin defined twice is refused).
fn compile_zone(zi: usize, z: &ZoneConfig, before: &[Zone]) -> Result<Zone, ConfigError> {
        let key = |k: &str| format!("dns.zones[{zi}].{k}");
        let origin = parse_name(&key("origin"), &z.origin, None)?;
        if before.iter().any(|o| *o.origin == origin) {
            return Err(ConfigError::invalid(key("origin"), format!("zone `{origin}` is defined twice")));
        }
        if z.ns.is_empty() {
            return Err(ConfigError::invalid(key("ns"), "a zone needs at least one name server"));
        }
        let ns: Vec<Name> = z.ns.iter().map(|n| parse_name(&key("ns"), n, Some(&origin))).collect::<Result<_, _>>()?;
        let soa_cfg = &z.soa;
        let mname = match &soa_cfg.mname {
            Some(m) => parse_name(&key("soa.mname"), m, Some(&origin))?,
            None => ns[0].clone(),
        };
        let rname = parse_name(&key("soa.rname"), &soa_cfg.rname, Some(&origin))?;
        if soa_cfg.refresh <= 0 || soa_cfg.retry <= 0 || soa_cfg.expire <= 0 {
            return Err(ConfigError::invalid(key("soa"), "refresh, retry and expire must be > 0"));
        }
        if soa_cfg.minimum > 86_400 {
            return Err(ConfigError::invalid(key("soa.minimum"), "negative TTL over a day; use a few seconds"));
        }
        let soa: Record = Record::from_rdata(
            origin.clone(),
            z.ttl,
            RData::SOA(SOA::new(mname, rname, soa_cfg.serial, soa_cfg.refresh, soa_cfg.retry, soa_cfg.expire, soa_cfg.minimum)),
        );
        let origin_l = LowerName::new(&origin);
        let mut records: BTreeMap<LowerName, Vec<Record>> = BTreeMap::new();
        records.entry(origin_l.clone()).or_default().push(soa.clone());
        for n in &ns {
            records.entry(origin_l.clone()).or_default().push(Record::from_rdata(origin.clone(), z.ttl, RData::NS(NS(n.clone()))));
        }
        for (ri, r) in z.records.iter().enumerate() {
            let key = |k: &str| format!("dns.zones[{zi}].records[{ri}].{k}");
            let owner = parse_name(&key("name"), &r.name, Some(&origin))?;
            if !origin.zone_of(&owner) {
                return Err(ConfigError::invalid(key("name"), format!("`{owner}` is outside zone `{origin}`")));
            }
            let data = static_rdata(&key("value"), &r.rtype, &r.value)?;
            let rec = Record::from_rdata(owner.clone(), r.ttl.unwrap_or(z.ttl), data);
            let set = records.entry(LowerName::new(&owner)).or_default();
            if set.contains(&rec) {
                return Err(ConfigError::invalid(key("value"), "duplicate record"));
            }
            set.push(rec);
        }
        for (owner, set) in &records {
            let cnames = set.iter().filter(|r| r.record_type() == RecordType::CNAME).count();
            if cnames > 0 && (set.len() > 1 || *owner == origin_l) {
                return Err(ConfigError::invalid(
                    key("records"),
                    format!("`{owner}` has a CNAME and other data (or is the apex): a CNAME must stand alone"),
                ));
            }
        }
        Ok(Zone { origin: origin_l, negative_ttl: z.ttl.min(soa_cfg.minimum), soa, records, services: BTreeMap::new() })
}

/// `[[dns.services]]`, each placed in the deepest zone that holds its name.
fn compile_services(config: &[ServiceConfig], pool_index: &BTreeMap<String, usize>, zones: &mut [Zone]) -> Result<Vec<Service>, ConfigError> {
    let mut services = Vec::new();
    let mut seen = HashSet::new();
    for (si, s) in config.iter().enumerate() {
        let key = |k: &str| format!("dns.services[{si}].{k}");
        let name = parse_name(&key("name"), &s.name, None)?;
        let lname = LowerName::new(&name);
        if !seen.insert(lname.clone()) {
            return Err(ConfigError::invalid(key("name"), format!("service `{name}` is defined twice")));
        }
        let zone = zones
            .iter_mut()
            .filter(|z| z.origin.zone_of(&lname))
            .max_by_key(|z| z.origin.num_labels())
            .ok_or_else(|| ConfigError::invalid(key("name"), format!("`{name}` is in none of the configured zones")))?;
        if zone.records.contains_key(&lname) {
            return Err(ConfigError::invalid(key("name"), format!("`{name}` also has static records; a service name must stand alone")));
        }
        if s.pools.is_empty() {
            return Err(ConfigError::invalid(key("pools"), "a service needs at least one pool"));
        }
        let mut idx = Vec::new();
        let mut uniq = BTreeSet::new();
        for p in &s.pools {
            let i = *pool_index.get(p).ok_or_else(|| ConfigError::invalid(key("pools"), format!("pool `{p}` is not defined under [[dns.pools]]")))?;
            if !uniq.insert(i) {
                return Err(ConfigError::invalid(key("pools"), format!("pool `{p}` is listed twice")));
            }
            idx.push(i);
        }
        if s.ttl > MAX_SERVICE_TTL {
            return Err(ConfigError::invalid(
                key("ttl"),
                format!("{} s is over the {MAX_SERVICE_TTL} s cap: caches would keep an evicted pool too long", s.ttl),
            ));
        }
        if s.fail_whale.is_empty() {
            return Err(ConfigError::invalid(key("fail_whale"), "give at least one address to answer when no pool is alive"));
        }
        zone.services.insert(lname, services.len());
        services.push(Service { label: name.to_ascii(), policy: s.policy, pools: idx, ttl: s.ttl, fail_whale: s.fail_whale.clone() });
    }
    Ok(services)
}

/// A name in a parent zone that falls inside a child zone is shadowed by the child: refuse the
/// config rather than serve data no query can reach.
fn refuse_shadowed_names(zones: &[Zone]) -> Result<(), ConfigError> {
    for z in zones {
        for owner in z.records.keys().chain(z.services.keys()) {
            if let Some(child) = zones.iter().find(|c| c.origin != z.origin && z.origin.zone_of(&c.origin) && c.origin.zone_of(owner)) {
                return Err(ConfigError::invalid("dns.zones", format!("`{owner}` lies in zone `{}` as well as `{}`", child.origin, z.origin)));
            }
        }
    }
    Ok(())
}

impl Zones {
    /// Validates `config` and builds the lookup structures, section by section. Errors name the
    /// key.
    pub fn compile(config: &DnsConfig) -> Result<Self, ConfigError> {
        check_limits(config)?;
        let allow_axfr = config
            .allow_axfr
            .iter()
            .map(|s| parse_net("dns.allow_axfr", s))
            .collect::<Result<Vec<_>, _>>()?;
        let (pools, pool_index) = compile_pools(&config.pools)?;
        let mut zones: Vec<Zone> = Vec::new();
        for (zi, z) in config.zones.iter().enumerate() {
            let zone = compile_zone(zi, z, &zones)?;
            zones.push(zone);
        }
        let services = compile_services(&config.services, &pool_index, &mut zones)?;
        refuse_shadowed_names(&zones)?;
        Ok(Zones { zones, pools, services, max_udp_payload: config.max_udp_payload, allow_axfr })
    }

    /// The zone `name` belongs to (the longest matching origin), if any.
    pub fn zone_for(&self, name: &LowerName) -> Option<&Zone> {
        self.zones.iter().filter(|z| z.origin.zone_of(name)).max_by_key(|z| z.origin.num_labels())
    }

    pub fn axfr_allowed(&self, ip: IpAddr) -> bool {
        self.allow_axfr.iter().any(|n| net_contains(*n, ip))
    }
}
