//! dnsd's DNS request path (`transport::respond`: parse, decide, size, encode) over arbitrary
//! messages, over UDP and TCP, from an address allowed AXFR and one that is not, against the
//! DNS test battery's zone with one pool alive, one in cold start and one never heard from.
//! Every reply must parse and, over UDP, fit the client's limit (512 without EDNS).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use gpuha_dnsd::admin::Admin;
use gpuha_dnsd::dns::{DnsConfig, DnsService};
use gpuha_dnsd::state::{now_ms, AppState};
use gpuha_liveness::{Frame, KeyRing, Metrics};
use hickory_server::net::xfer::Protocol;
use libfuzzer_sys::fuzz_target;

const ZONE: &str = r#"
listen = "127.0.0.1:0"
allow_axfr = ["127.0.0.0/8"]

[[zones]]
origin = "gpuha.test."
ns = ["ns1.gpuha.test.", "ns2.gpuha.test."]
soa = { rname = "hostmaster.gpuha.test.", serial = 7, minimum = 3 }
records = [
  { name = "ns1", type = "A", value = "127.0.0.1" },
  { name = "ns2", type = "A", value = "127.0.0.2" },
  { name = "txt", type = "TXT", value = "hello" },
  { name = "chat", type = "CNAME", value = "api.gpuha.test." },
  { name = "away", type = "CNAME", value = "www.elsewhere.example." },
  { name = "a.b.deep", type = "A", value = "127.0.0.5" },
]

[[pools]]
id = "pool-a"
region = "r1"
cloud = "c1"
routers = ["10.0.1.1", "fd00::1:1"]

[[pools]]
id = "pool-b"
routers = ["10.0.2.1", "10.0.2.2"]
min_workers = 2

[[pools]]
id = "pool-big"
routers = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6", "10.1.0.7", "10.1.0.8", "10.1.0.9", "10.1.0.10", "10.1.0.11", "10.1.0.12", "10.1.0.13", "10.1.0.14", "10.1.0.15", "10.1.0.16", "10.1.0.17", "10.1.0.18", "10.1.0.19", "10.1.0.20", "10.1.0.21", "10.1.0.22", "10.1.0.23", "10.1.0.24", "10.1.0.25", "10.1.0.26", "10.1.0.27", "10.1.0.28", "10.1.0.29", "10.1.0.30", "10.1.0.31", "10.1.0.32", "10.1.0.33", "10.1.0.34", "10.1.0.35", "10.1.0.36", "10.1.0.37", "10.1.0.38", "10.1.0.39", "10.1.0.40", "fd00::1", "fd00::2", "fd00::3", "fd00::4", "fd00::5", "fd00::6", "fd00::7", "fd00::8"]

[[services]]
name = "api.gpuha.test."
pools = ["pool-a", "pool-b"]
fail_whale = ["10.9.9.9", "fd00::99"]

[[services]]
name = "prio.gpuha.test."
policy = "priority"
pools = ["pool-b", "pool-a"]
ttl = 2
fail_whale = ["10.9.9.9"]

[[services]]
name = "big.gpuha.test."
pools = ["pool-big"]
fail_whale = ["10.9.9.9"]
"#;

const KEY: &[u8] = b"0123456789abcdef-fuzz";

struct Dns {
    rt: tokio::runtime::Runtime,
    svc: Arc<DnsService>,
}

fn dns() -> &'static Dns {
    static DNS: OnceLock<Dns> = OnceLock::new();
    DNS.get_or_init(|| {
        let config: DnsConfig = toml::from_str(ZONE).expect("zone");
        let now = now_ms();
        let state = Arc::new(AppState::new(KeyRing::single(1, KEY.to_vec()), 3_600_000, 3_600_000, 20_000, now));
        let frame = Frame { key_id: 1, boot_id: 1, seq: 1, sent_ms: now, worker_id: "a1".into(), pool_id: "pool-a".into(), addr: SocketAddr::from(([10, 0, 0, 1], 8000)), models: vec![], adapters: vec![], metrics: Metrics::default() };
        state.ingest(&frame.encode(KEY).expect("frame"), now).expect("ingest");
        let svc = Arc::new(DnsService::new(&config, state, Arc::new(Admin::default())).expect("service"));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        Dns { rt, svc }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, msg)) = data.split_first() else { return };
    let d = dns();
    let protocol = if how & 1 == 0 { Protocol::Udp } else { Protocol::Tcp };
    let src: SocketAddr = if how & 2 == 0 { ([127, 0, 0, 1], 5353).into() } else { ([192, 0, 2, 1], 5353).into() };
    let Some(reply) = d.rt.block_on(gpuha_dnsd::dns::transport::respond(&d.svc, msg.to_vec(), src, protocol)) else { return };
    let parsed = hickory_server::proto::op::Message::from_vec(&reply);
    assert!(parsed.is_ok(), "reply does not parse: {reply:02x?}");
    if protocol == Protocol::Udp {
        // The client's limit as a stock decoder reads its query (1232 if it cannot).
        let limit = match hickory_server::proto::op::Message::from_vec(msg) {
            Ok(q) => q.edns.as_ref().map_or(512, |e| e.max_payload().clamp(512, 1232)),
            Err(_) => 1232,
        };
        assert!(reply.len() <= usize::from(limit), "UDP reply of {} bytes over the client's {limit}", reply.len());
    }
});
