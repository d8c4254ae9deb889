//! The authoritative DNS tier of dnsd: answers the service names of its zones with the L7
//! routers of the pools that are alive, evicts pools whose workers fell silent, and answers a
//! fail-whale set when no pool is left.
//!
//! (About 500 lines: the request handler and the snapshot it answers from; the pieces it uses
//! are the modules below.)
//!
//! - [`config`]: the `[dns]` section and its validated, compiled form.
//! - [`answer`]: the pure resolver (zones + pool states + question -> records), where every
//!   decision is made and tested with synthetic time.
//! - this module: [`DnsService`], a hickory-server [`RequestHandler`] that turns a [`Request`]
//!   into a response (EDNS, truncation, AXFR policy, metrics), and the transitions tick. The
//!   question is written back re-encoded (never the client's bytes), and not at all in a
//!   FORMERR for a query of several questions, so every reply parses and fits the UDP limit.
//! - [`fast`]: the common query (A/AAAA of a service name) answered from bytes prebuilt per
//!   [`Snapshot`], identical to what this handler writes for it; everything else comes here.
//! - [`transport`]: the UDP threads (batched) and TCP loop. They are ours rather than
//!   `hickory_server::Server`'s so that a packet that does not parse is counted and dropped
//!   (hickory answers FORMERR or drops it silently), and each response is sized by our rules.
//!
//! **Cold start.** Until one eviction window (10 s) has passed since dnsd started, a pool it has
//! not heard enough frames from is `ColdStart`, which is answered like `Alive`: no data is not
//! death. After that, a pool needs `min_workers` workers with a valid frame in the last 10 s.
//!
//! **Reload.** [`DnsService::set_zones`] swaps the compiled zones at once: every query is
//! answered from one [`Snapshot`] (zones and pool states taken together), so a query sees the
//! old config or the new one, never a mix, and none is dropped.
//!
//! **Several instances.** Nothing is shared between dnsd instances: each sidecar sends every
//! frame to every instance, and each decides from the same frames with the same rules, so their
//! answers agree within one window (up to frame loss and the instant each one looks).

pub mod answer;
pub mod config;
pub mod fast;
pub mod metrics;
pub mod transport;

use std::iter;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, LowerQuery, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder, NameEncoding};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};

use gpuha_liveness::admin::{drain_progress, DrainProgress};

use crate::admin::Admin;
use crate::error::ConfigError;
use crate::state::{now_ms, AppState, OutlookValidity, OutlookWatch};
use answer::{PoolStates, Resolution, Transition, Transitions};
pub use config::{DnsConfig, Zones};
use metrics::{qtype_label, rcode_label, DnsMetrics};

/// The DNS tier's state: compiled zones, the fleet it reads, counters, and pool transitions.
pub struct DnsService {
    /// Swapped whole by a reload ([`Self::set_zones`]).
    zones: RwLock<Arc<Zones>>,
    state: Arc<AppState>,
    /// Operators' overrides, read when a snapshot is taken.
    admin: Arc<Admin>,
    metrics: DnsMetrics,
    /// Also serialises taking a new [`Snapshot`], so the newest one is the one kept.
    transitions: Mutex<Transitions>,
    /// Every pool's state, and until when it holds: queries read this instead of scanning the
    /// fleet under the ingest lock (which costs O(workers) per query).
    snapshot: RwLock<Arc<Snapshot>>,
    watch: OutlookWatch,
    tcp_idle: Duration,
    tick: Duration,
    /// The latest pool transitions, newest last, for the fleet page (`GET /v1/dns`), and when
    /// each pool last changed answerability.
    recent: Mutex<RecentTransitions>,
}

/// The largest TTL a service answer may carry, in ms: how long after dnsd starts an answer a
/// previous run gave may still be cached.
const MAX_TTL_MS: u64 = config::MAX_SERVICE_TTL as u64 * 1000;

/// The latest pool transitions kept for operators; older ones are in the log.
pub const RECENT_TRANSITIONS: usize = 64;

/// A pool transition as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TransitionRecord {
    pub at_ms: u64,
    pub pool: String,
    /// `evicted` or `failed_back` (liveness); an operator's `drain`, `force_out`, `force_in`
    /// or `auto` (override lifted).
    pub event: &'static str,
}

#[derive(Debug, Default)]
struct RecentTransitions {
    log: std::collections::VecDeque<TransitionRecord>,
    /// Per pool id: when it last changed answerability (or its override).
    changed_ms: std::collections::HashMap<String, u64>,
}

/// The zones and the pool states computed once, answered by every query while they hold.
pub struct Snapshot {
    pub zones: Arc<Zones>,
    pub states: Arc<PoolStates>,
    validity: Option<OutlookValidity>,
    /// The common answers of these states, prebuilt ([`fast`]); empty for a snapshot that
    /// never holds (it is only a placeholder until the next query takes one).
    pub fast: fast::FastTable,
}

impl Snapshot {
    fn holds_at(&self, now_ms: u64) -> bool {
        self.validity.as_ref().is_some_and(|v| v.holds_at(now_ms))
    }
}

/// What the handler decided, ready to encode.
struct Outcome {
    metadata: Metadata,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additional: Vec<Record>,
    edns: Option<Edns>,
}

impl DnsService {
    pub fn new(config: &DnsConfig, state: Arc<AppState>, admin: Arc<Admin>) -> Result<Self, ConfigError> {
        let zones = Arc::new(Zones::compile(config)?);
        let watch = state.watch_outlook();
        let empty = Arc::new(PoolStates { live: vec![], overrides: vec![] });
        Ok(DnsService {
            zones: RwLock::new(zones.clone()),
            state,
            admin,
            metrics: DnsMetrics::default(),
            transitions: Mutex::new(Transitions::default()),
            snapshot: RwLock::new(Arc::new(Snapshot { zones, states: empty, validity: None, fast: fast::FastTable::default() })),
            watch,
            tcp_idle: Duration::from_millis(config.tcp_idle_timeout_ms),
            tick: Duration::from_millis(config.tick_ms),
            recent: Mutex::new(RecentTransitions::default()),
        })
    }

    /// The zones in force now.
    pub fn zones(&self) -> Arc<Zones> {
        self.zones.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in newly compiled zones (a reload): queries answered from then on use them.
    /// Transitions start over (pool numbers change); counters follow pools by name.
    pub fn set_zones(&self, zones: Zones) {
        let mut tr = self.transitions.lock().unwrap_or_else(|e| e.into_inner());
        *tr = Transitions::default();
        let zones = Arc::new(zones);
        *self.zones.write().unwrap_or_else(|e| e.into_inner()) = zones.clone();
        let empty = Arc::new(PoolStates { live: vec![], overrides: vec![] });
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Snapshot { zones, states: empty, validity: None, fast: fast::FastTable::default() });
    }

    /// The next query takes a new snapshot: an operator's override changed.
    pub fn invalidate(&self) {
        let _tr = self.transitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut snap = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        let stale = Snapshot { zones: snap.zones.clone(), states: snap.states.clone(), validity: None, fast: fast::FastTable::default() };
        *snap = Arc::new(stale);
    }

    /// Until when an answer naming `pool` may still be cached by someone (see
    /// [`DnsMetrics::handed_until`]).
    pub fn handed_until(&self, pool: &str) -> u64 {
        self.metrics.handed_until(pool, self.state.started_ms.saturating_add(MAX_TTL_MS))
    }

    /// How far `pool` (an index into `snap`'s zones) is from safe at `now_ms`.
    pub fn drain_progress(&self, snap: &Snapshot, pool: usize, now_ms: u64) -> Option<DrainProgress> {
        let p = snap.zones.pools.get(pool)?;
        let answered = snap.zones.services.iter().any(|s| s.pools.contains(&pool)) && snap.states.answered(pool);
        Some(drain_progress(answered, self.handed_until(&p.id), now_ms))
    }

    /// When `pool` (by id) is safe: its last TTL handed out runs out; `None` when this DNS tier
    /// does not serve it (no TTL of ours can hold it).
    pub fn safe_at(&self, pool: &str) -> Option<u64> {
        let zones = self.zones();
        zones.pools.iter().any(|p| p.id == pool).then(|| self.handed_until(pool))
    }

    /// Logs an operator's change of `pool`'s override in the recent transitions.
    pub fn record_admin(&self, pool: &str, event: &'static str, now_ms: u64) {
        self.push_record(TransitionRecord { at_ms: now_ms, pool: pool.to_string(), event });
    }

    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    /// Pool states at `now_ms`; counts and logs evictions and failbacks.
    ///
    /// Answered from the snapshot while it holds (no fleet scan, no ingest lock); otherwise a
    /// new snapshot is taken. The transitions lock is held while one is taken, so transitions
    /// are observed in time order, and every state a query answers was observed first.
    pub fn pool_states(&self, now_ms: u64) -> Arc<Snapshot> {
        if let Some(snap) = self.snapshot_at(now_ms) {
            return snap;
        }
        let mut tr = self.transitions.lock().unwrap_or_else(|e| e.into_inner());
        // Another caller may have taken one while this one waited.
        if let Some(snap) = self.snapshot_at(now_ms) {
            return snap;
        }
        // Under the transitions lock: a reload or an override waits for this snapshot, then
        // voids it.
        let zones = self.zones();
        let overrides = self.admin.overrides();
        let pools: Vec<(&str, usize)> = zones.pools.iter().map(|p| (p.id.as_str(), p.min_workers)).collect();
        let (outlook, validity) = self.state.pool_outlook(self.watch, &pools, now_ms);
        let states = Arc::new(PoolStates::new(&zones, outlook.states, &overrides));
        for (pool, t) in tr.observe(&states, now_ms) {
            let p = &zones.pools[pool];
            self.record(&p.id, t, now_ms);
            match t {
                Transition::Evicted => {
                    self.metrics.eviction(&p.id);
                    tracing::warn!(pool = %p.id, region = %p.region, cloud = %p.cloud, "pool evicted from DNS answers: fewer than {} workers heard from in {} ms", p.min_workers, gpuha_liveness::EVICTION_WINDOW_MS);
                }
                Transition::FailedBack => {
                    self.metrics.failback(&p.id);
                    tracing::info!(pool = %p.id, region = %p.region, cloud = %p.cloud, "pool back in DNS answers");
                }
            }
        }
        let fast = fast::FastTable::build(&zones, &states);
        let snap = Arc::new(Snapshot { zones, states, validity: Some(validity), fast });
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snap.clone();
        snap
    }

    fn record(&self, pool: &str, t: Transition, now_ms: u64) {
        let event = match t {
            Transition::Evicted => "evicted",
            Transition::FailedBack => "failed_back",
        };
        self.push_record(TransitionRecord { at_ms: now_ms, pool: pool.to_string(), event });
    }

    fn push_record(&self, rec: TransitionRecord) {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        r.changed_ms.insert(rec.pool.clone(), rec.at_ms);
        if r.log.len() >= RECENT_TRANSITIONS {
            r.log.pop_front();
        }
        r.log.push_back(rec);
    }

    /// The latest pool transitions, oldest first.
    pub fn recent_transitions(&self) -> Vec<TransitionRecord> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).log.iter().cloned().collect()
    }

    /// When `pool` last changed answerability; `None` if it never did since dnsd started.
    pub fn changed_ms(&self, pool: &str) -> Option<u64> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).changed_ms.get(pool).copied()
    }

    fn snapshot_at(&self, now_ms: u64) -> Option<Arc<Snapshot>> {
        let snap = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        snap.holds_at(now_ms).then(|| snap.clone())
    }

    pub fn render_metrics(&self, out: &mut String, now_ms: u64) {
        let snap = self.pool_states(now_ms);
        let (zones, states) = (&snap.zones, &snap.states);
        self.metrics.render(out, zones, states);
        let changed: Vec<Option<u64>> = zones.pools.iter().map(|p| self.changed_ms(&p.id)).collect();
        metrics::render_now(out, zones, states, &changed, self.state.started_ms);
        let drains: Vec<Option<DrainProgress>> = (0..zones.pools.len()).map(|i| self.drain_progress(&snap, i, now_ms)).collect();
        metrics::render_overrides(out, zones, states, &drains);
    }

    /// Decides the response to `request` at `now_ms`. Pure apart from the fleet read and counters.
    fn decide(&self, request: &Request, now_ms: u64) -> Outcome {
        let mut md = Metadata::response_from_request(&request.metadata);
        // Our OPT: version 0, no DNSSEC, our payload limit (RFC 6891 §7: answer EDNS with EDNS).
        let snap = self.pool_states(now_ms);
        let zones = &snap.zones;
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(zones.max_udp_payload);
            e
        });
        let mut out = Outcome { metadata: md, answers: vec![], authority: vec![], additional: vec![], edns };
        let fail = |mut out: Outcome, rcode: ResponseCode| {
            out.metadata.response_code = rcode;
            out
        };
        if request.metadata.op_code != OpCode::Query {
            return fail(out, ResponseCode::NotImp);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return fail(out, ResponseCode::BADVERS);
        }
        let [query] = request.queries.queries() else {
            return fail(out, ResponseCode::FormErr);
        };
        let qtype = query.query_type();
        if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
            return fail(out, ResponseCode::Refused);
        }
        let qname = query.original().name();
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // Transfers only over TCP, only of a whole zone, only to configured clients.
            let zone = zones.zones.iter().find(|z| &z.origin == query.name());
            let allowed = request.protocol() == Protocol::Tcp && zones.axfr_allowed(request.src().ip());
            return match zone {
                Some(z) if allowed => {
                    md.authoritative = true;
                    out.metadata = md;
                    out.answers = answer::zone_transfer(zones, &snap.states, z);
                    out
                }
                _ => fail(out, ResponseCode::Refused),
            };
        }
        let Resolution { rcode, authoritative, answers, authority, additional, served } =
            answer::resolve(zones, &snap.states, qname, qtype);
        for s in &served {
            self.metrics.served(zones, s, now_ms);
        }
        md.response_code = rcode;
        md.authoritative = authoritative;
        out.metadata = md;
        out.answers = answers;
        out.authority = authority;
        out.additional = additional;
        out
    }

    /// Largest response for this request: the client's EDNS buffer (at least 512, at most our
    /// limit) over UDP, 512 without EDNS, 64 KiB over TCP.
    fn size_limit(&self, request: &Request) -> u16 {
        let max = self.zones().max_udp_payload;
        match request.protocol() {
            Protocol::Udp => match &request.edns {
                Some(_) => request.max_payload().clamp(512, max),
                None => 512,
            },
            _ => u16::MAX,
        }
    }

    /// Transitions tick: evictions and failbacks are counted even when nobody asks.
    async fn tick_loop(self: Arc<Self>) {
        let mut iv = tokio::time::interval(self.tick);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            let _ = self.pool_states(now_ms());
        }
    }

    /// Serves DNS on the given sockets until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        udp: tokio::net::UdpSocket,
        tcp: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        // UDP on threads of their own, blocked in recvmmsg (no readiness round trip per batch):
        // one per core dnsd may use (a few receivers on one socket), at most 4.
        let udp = udp.into_std()?;
        udp.set_nonblocking(false)?;
        udp.set_read_timeout(Some(transport::UDP_STOP_POLL))?;
        let udp = Arc::new(udp);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let (svc, udp, stop, rt) = (self.clone(), udp.clone(), stop.clone(), tokio::runtime::Handle::current());
            threads.push(std::thread::Builder::new().name(format!("dns-udp-{i}")).spawn(move || transport::udp_thread(svc, udp, stop, rt))?);
        }
        tasks.spawn(transport::tcp_loop(self.clone(), tcp));
        tasks.spawn(self.clone().tick_loop());
        shutdown.await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        // The threads see the flag within one read timeout; the socket closes with the last.
        stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        Ok(())
    }
}

fn servfail(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// The question section as we write it back: `questions` re-encoded with uncompressed names,
/// case kept (resolvers using 0x20 randomisation compare it). hickory would echo the client's
/// bytes, compression pointers included, and those point into the client's message, not ours:
/// a reply a resolver cannot parse. `None` if the questions cannot be written (then the caller
/// answers without a question section).
fn question_section(questions: &[LowerQuery]) -> Option<Queries> {
    let mut buf = Vec::with_capacity(questions.len() * 64);
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_name_encoding(NameEncoding::Uncompressed);
    for q in questions {
        q.emit(&mut enc).ok()?;
    }
    Queries::read(&mut BinDecoder::new(&buf), questions.len()).ok()
}

/// Whether the response fits in `limit` bytes (a trial encode; responses are small).
fn fits(queries: &Queries, out: &Outcome, with_additional: bool, limit: u16) -> bool {
    let mut buf = Vec::with_capacity(usize::from(limit).min(4096));
    let mut enc = BinEncoder::new(&mut buf);
    enc.set_max_size(limit);
    let additional: &[Record] = if with_additional { &out.additional } else { &[] };
    let resp = MessageResponseBuilder::new(queries, out.edns.as_ref()).build(
        out.metadata,
        out.answers.iter(),
        out.authority.iter(),
        iter::empty(),
        additional.iter(),
    );
    matches!(resp.destructive_emit(&mut enc), Ok(h) if !h.truncation)
}

#[async_trait::async_trait]
impl RequestHandler for DnsService {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        let mut out = self.decide(request, now_ms());
        let limit = self.size_limit(request);
        let echoed = match request.queries.queries() {
            [q] => question_section(std::slice::from_ref(q)),
            // Not one question: `decide` answered FORMERR. Its question is not echoed, so a query
            // of many questions cannot make a reply over the client's limit (RFC 1035 leaves
            // the question of a FORMERR to the server).
            _ => None,
        };
        let queries = match (echoed, question_section(&[])) {
            (Some(q), _) => q,
            (None, Some(none)) => {
                if request.queries.len() == 1 {
                    tracing::debug!(src = %request.src(), "cannot write the question back; FORMERR without it");
                    out = Outcome { answers: vec![], authority: vec![], additional: vec![], ..out };
                    out.metadata.response_code = ResponseCode::FormErr;
                }
                none
            }
            (None, None) => {
                tracing::warn!("cannot build an empty question section; dropping the reply");
                return servfail(request);
            }
        };
        if !fits(&queries, &out, true, limit) {
            if !out.additional.is_empty() && fits(&queries, &out, false, limit) {
                // Additional data is optional: drop it rather than truncate.
                out.additional.clear();
            } else {
                // TC with no records rather than a partial RRset: the client retries over TCP.
                out.answers.clear();
                out.authority.clear();
                out.additional.clear();
                out.metadata.truncation = true;
                self.metrics.truncated.fetch_add(1, Ordering::Relaxed);
            }
        }
        let qtype = match request.queries.queries() {
            [q] => Some(q.query_type()),
            _ => None,
        };
        // A reply with no records and one question always fits 512 bytes; this keeps "never over
        // the client's limit" true by construction should that ever change.
        let queries = if fits(&queries, &out, false, limit) {
            queries
        } else {
            match question_section(&[]) {
                Some(none) => none,
                None => return servfail(request),
            }
        };
        self.metrics.query(qtype_label(qtype), rcode_label(out.metadata.response_code));
        let resp = MessageResponseBuilder::new(&queries, out.edns.as_ref()).build(
            out.metadata,
            out.answers.iter(),
            out.authority.iter(),
            iter::empty(),
            out.additional.iter(),
        );
        match response_handle.send_response(resp).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("cannot send DNS response: {e}");
                servfail(request)
            }
        }
    }
}
