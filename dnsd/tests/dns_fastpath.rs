//! The fast path (answers prebuilt per snapshot, `dns::fast`) against hickory's path for the
//! same query: whenever the fast path answers, its bytes are exactly hickory's, over query
//! shapes drawn at random (names and their case, flags, EDNS sizes and flags, types, classes,
//! trailing bytes, cut messages); and the shapes clients send are answered by the fast path.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use gpuha_dnsd::admin::Admin;
use gpuha_dnsd::dns::transport::{respond, respond_hickory};
use gpuha_dnsd::dns::DnsService;
use gpuha_dnsd::state::AppState;
use gpuha_dnsd::Config;
use hickory_server::net::xfer::Protocol;

fn service(dir: &tempfile::TempDir) -> DnsService {
    service_with(dir, "")
}

/// [`service`] with `more` appended to the DNS section (more services).
fn service_with(dir: &tempfile::TempDir, more: &str) -> DnsService {
    let path = dir.path().join("dnsd.toml");
    std::fs::write(&path, config_text(dir.path(), &(dns_section("") + more))).expect("write config");
    let config = Config::load(&path).expect("config");
    let state = Arc::new(AppState::new(config.key_ring().expect("keys"), 5_000, 60_000, 1_000, now_ms()));
    let admin = Arc::new(Admin::new(None, None).expect("admin"));
    DnsService::new(config.dns.as_ref().expect("dns section"), state, admin).expect("dns service")
}

/// xorshift64*: the shapes are random but the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

const NAMES: &[&str] = &["api.gpuha.test", "prio.gpuha.test", "big.gpuha.test", "txt.gpuha.test", "chat.gpuha.test", "nope.gpuha.test", "gpuha.test", "x.api.gpuha.test", "www.example.com"];

/// A query as a client might write it, with the random parts `rng` picks.
fn shape(rng: &mut Rng) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&(rng.next() as u16).to_be_bytes());
    // Flags: mostly a plain query with or without RD; sometimes any bits at all.
    let flags: u16 = if rng.chance(4) { rng.next() as u16 } else { (rng.below(2) as u16) << 8 | if rng.chance(4) { 0x0010 } else { 0 } };
    q.extend_from_slice(&flags.to_be_bytes());
    let edns = !rng.chance(3);
    let qd: u16 = if rng.chance(16) { rng.below(3) as u16 } else { 1 };
    let an: u16 = if rng.chance(16) { 1 } else { 0 };
    let ar: u16 = u16::from(edns) + if rng.chance(16) { 1 } else { 0 };
    for c in [qd, an, 0, ar] {
        q.extend_from_slice(&c.to_be_bytes());
    }
    let name = NAMES[rng.below(NAMES.len() as u64) as usize];
    for label in name.split('.') {
        q.push(label.len() as u8);
        for b in label.bytes() {
            // 0x20 randomisation, as resolvers do.
            q.push(if rng.chance(2) { b.to_ascii_uppercase() } else { b });
        }
    }
    q.push(0);
    let qtype: u16 = match rng.below(8) {
        0..=3 => 1,
        4 | 5 => 28,
        6 => [2, 5, 6, 16, 255, 252][rng.below(6) as usize],
        _ => rng.next() as u16,
    };
    let qclass: u16 = if rng.chance(8) { [3, 4, 255, 254][rng.below(4) as usize] } else { 1 };
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    if edns {
        let size: u16 = [512, 600, 1232, 4096, 65_535, 100, 0][rng.below(7) as usize];
        let version: u8 = if rng.chance(8) { 1 } else { 0 };
        let ext_rcode: u8 = if rng.chance(16) { 1 } else { 0 };
        let do_flag: u8 = if rng.chance(3) { 0x80 } else { 0 };
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[ext_rcode, version, do_flag, 0]);
        if rng.chance(8) {
            // An option (a cookie): hickory's business.
            q.extend_from_slice(&[0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        } else {
            q.extend_from_slice(&[0, 0]);
        }
    }
    if rng.chance(16) {
        q.push(0);
    }
    if rng.chance(16) {
        let cut = rng.below(q.len() as u64) as usize;
        q.truncate(cut);
    }
    q
}

#[tokio::test]
async fn fast_answers_are_hickorys_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir);
    let src: SocketAddr = "127.0.0.1:5300".parse().expect("addr");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut fast, mut total) = (0, 0);
    for _ in 0..20_000 {
        let q = shape(&mut rng);
        for (protocol, udp) in [(Protocol::Udp, true), (Protocol::Tcp, false)] {
            total += 1;
            let snap = svc.pool_states(now_ms());
            let mut out = Vec::new();
            if snap.fast.answer(&q, udp, &mut out).is_none() {
                continue;
            }
            fast += 1;
            let slow = respond_hickory(&svc, q.clone(), src, protocol).await;
            assert_eq!(Some(&out), slow.as_ref(), "{protocol:?} query {q:02x?}");
        }
    }
    // Several thousand shapes were the common query (2 590 of 40 000 with this seed: most
    // names and types drawn are not service A/AAAA): the comparison is not vacuous.
    assert!(fast > 2_000, "fast path answered {fast} of {total}");
}

/// The shapes dnsperf, stub resolvers and recursive resolvers send are all answered fast.
#[tokio::test]
async fn common_queries_take_the_fast_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir);
    let snap = svc.pool_states(now_ms());
    let mut out = Vec::new();
    for (name, t, edns) in [
        ("api.gpuha.test.", hickory_proto::rr::RecordType::A, None),
        ("API.gpuha.TEST.", hickory_proto::rr::RecordType::A, Some(1232)),
        ("api.gpuha.test.", hickory_proto::rr::RecordType::AAAA, Some(4096)),
        ("prio.gpuha.test.", hickory_proto::rr::RecordType::A, None),
    ] {
        let q = query_msg(name, t, edns).to_vec().expect("encode");
        assert!(snap.fast.answer(&q, true, &mut out).is_some(), "{name} {t} {edns:?}");
    }
    // 100 addresses: over the UDP limit hickory truncates; over TCP the fast path answers.
    let q = query_msg("big.gpuha.test.", hickory_proto::rr::RecordType::A, Some(4096)).to_vec().expect("encode");
    assert!(snap.fast.answer(&q, true, &mut out).is_none());
    assert!(snap.fast.answer(&q, false, &mut out).is_some());
}

/// Counters and the drain bookkeeping (`handed_until`) move the same on both paths.
#[tokio::test]
async fn fast_answers_are_counted_like_hickorys() {
    let (d1, d2) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let (a, b) = (service(&d1), service(&d2));
    let src: SocketAddr = "127.0.0.1:5300".parse().expect("addr");
    for (name, t) in [("api.gpuha.test.", hickory_proto::rr::RecordType::A), ("api.gpuha.test.", hickory_proto::rr::RecordType::AAAA), ("prio.gpuha.test.", hickory_proto::rr::RecordType::A)] {
        let q = query_msg(name, t, None).to_vec().expect("encode");
        for _ in 0..3 {
            respond(&a, q.clone(), src, Protocol::Udp).await.expect("fast answer");
            respond_hickory(&b, q.clone(), src, Protocol::Udp).await.expect("hickory answer");
        }
    }
    let counters = |svc: &DnsService| {
        let mut out = String::new();
        svc.render_metrics(&mut out, now_ms());
        out.lines().filter(|l| l.contains("_total")).map(str::to_string).collect::<Vec<_>>()
    };
    let (ca, cb) = (counters(&a), counters(&b));
    assert!(ca.iter().any(|l| l.contains("queries_total") && l.ends_with(" 6")), "{ca:#?}");
    assert_eq!(ca, cb);
    for pool in ["pool-a", "pool-b"] {
        assert!(a.handed_until(pool) > now_ms(), "{pool}");
        assert_eq!(a.handed_until(pool) / 1000, b.handed_until(pool) / 1000, "{pool}");
    }
}

/// With many service names the fast path hashes them instead of comparing: same answers.
#[tokio::test]
async fn many_services_are_found_by_hash() {
    let more: String = (0..40).map(|i| format!("\n[[dns.services]]\nname = \"s{i}.gpuha.test.\"\npools = [\"pool-a\", \"pool-b\"]\nfail_whale = [\"10.9.9.9\"]\n")).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_with(&dir, &more);
    let src: SocketAddr = "127.0.0.1:5300".parse().expect("addr");
    let snap = svc.pool_states(now_ms());
    let mut out = Vec::new();
    for name in (0..40).map(|i| format!("S{i}.gpuha.test.")).chain(["api.gpuha.test.".to_string()]) {
        for t in [hickory_proto::rr::RecordType::A, hickory_proto::rr::RecordType::AAAA] {
            let q = query_msg(&name, t, Some(1232)).to_vec().expect("encode");
            assert!(snap.fast.answer(&q, true, &mut out).is_some(), "{name} {t}");
            assert_eq!(Some(&out), respond_hickory(&svc, q, src, Protocol::Udp).await.as_ref(), "{name} {t}");
        }
    }
    let q = query_msg("s40.gpuha.test.", hickory_proto::rr::RecordType::A, None).to_vec().expect("encode");
    assert!(snap.fast.answer(&q, true, &mut out).is_none(), "not a service");
}
