//! DNS correctness battery against an in-process dnsd on 127.0.0.1 (UDP and TCP): AA,
//! REFUSED, NXDOMAIN, NODATA + SOA with the negative TTL, empty non-terminals, CNAME, case,
//! EDNS buffer sizes, 512 bytes without EDNS, TC and the full answer over TCP, BADVERS, NOTIMP,
//! AXFR policy, malformed input counted and dropped.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

fn soa_in_authority(m: &Message) -> Option<(u32, u32)> {
    m.authorities.iter().find_map(|r| match &r.data {
        RData::SOA(s) => Some((r.ttl, s.minimum)),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn battery() {
    let d = Dnsd::start(&dns_section("")).await;
    let s = d.dns;

    // Service during cold start: every pool answered, AA set, TTL 5.
    let (m, _) = udp(s, &query_msg("api.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative, "AA for our zone");
    assert!(!m.metadata.recursion_available);
    assert_eq!(addrs(&m), vec!["10.0.1.1", "10.0.2.1", "10.0.2.2"]);
    assert!(m.answers.iter().all(|r| r.ttl == 5));
    let (m, _) = udp(s, &query_msg("api.gpuha.test.", RecordType::AAAA, None)).await;
    assert_eq!(addrs(&m), vec!["fd00::1:1"]);
    // Priority: first pool of the list; TTL from the service.
    let (m, _) = udp(s, &query_msg("prio.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec!["10.0.2.1", "10.0.2.2"]);
    assert!(m.answers.iter().all(|r| r.ttl == 2));

    // Outside our zones: REFUSED, no AA.
    let (m, _) = udp(s, &query_msg("www.example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    let (m, _) = udp(s, &query_msg("test.", RecordType::SOA, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // NXDOMAIN with SOA; negative TTL = min(SOA TTL, minimum) = 3.
    let (m, _) = udp(s, &query_msg("nope.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    assert!(m.answers.is_empty());
    assert_eq!(soa_in_authority(&m), Some((3, 3)));
    // Below a service name: NXDOMAIN too.
    let (m, _) = udp(s, &query_msg("x.api.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    // NODATA: the name exists, the type does not.
    for (name, t) in [("txt.gpuha.test.", RecordType::A), ("api.gpuha.test.", RecordType::TXT), ("prio.gpuha.test.", RecordType::AAAA)] {
        let (m, _) = udp(s, &query_msg(name, t, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name} {t}");
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty(), "{name} {t}");
        assert_eq!(soa_in_authority(&m), Some((3, 3)), "{name} {t}");
    }
    // Empty non-terminal: NODATA, not NXDOMAIN.
    let (m, _) = udp(s, &query_msg("b.deep.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let (m, _) = udp(s, &query_msg("a.b.deep.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec!["127.0.0.5"]);

    // Apex: SOA, NS (with in-zone addresses in additional), TXT static.
    let (m, _) = udp(s, &query_msg("gpuha.test.", RecordType::SOA, None)).await;
    assert_eq!(m.answers.len(), 1);
    assert!(m.authorities.is_empty());
    let (m, _) = udp(s, &query_msg("gpuha.test.", RecordType::NS, None)).await;
    assert_eq!(m.answers.len(), 2);
    assert_eq!(m.additionals.iter().filter(|r| r.record_type() == RecordType::A).count(), 2);
    let (m, _) = udp(s, &query_msg("txt.gpuha.test.", RecordType::TXT, None)).await;
    assert!(matches!(&m.answers[0].data, RData::TXT(t) if t.to_string() == "hello"));

    // CNAME to a service is followed inside the zone; out-of-zone targets are left to the client.
    let (m, _) = udp(s, &query_msg("chat.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(addrs(&m), vec!["10.0.1.1", "10.0.2.1", "10.0.2.2"]);
    let (m, _) = udp(s, &query_msg("away.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);

    // Case-insensitive; the question comes back as asked.
    let (m, _) = udp(s, &query_msg("ApI.GpUhA.TeSt.", RecordType::A, None)).await;
    assert_eq!(addrs(&m).len(), 3);
    assert_eq!(m.queries[0].name().to_ascii(), "ApI.GpUhA.TeSt.");
    assert!(m.metadata.authoritative);

    // 100 routers: no EDNS -> 512-byte limit, TC, no records; EDNS 4096 -> capped at our 1232,
    // still TC; over TCP, the whole answer.
    let (m, len) = udp(s, &query_msg("big.gpuha.test.", RecordType::A, None)).await;
    assert!(len <= 512);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let (m, len) = udp(s, &query_msg("big.gpuha.test.", RecordType::A, Some(4096))).await;
    assert!(len <= 1232, "{len}");
    assert!(m.metadata.truncation);
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232), "our OPT in the reply");
    let m = tcp(s, &query_msg("big.gpuha.test.", RecordType::A, None)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    // EDNS 1232 fits api's 3 answers; an EDNS buffer under 512 counts as 512 (RFC 6891).
    let (m, _) = udp(s, &query_msg("api.gpuha.test.", RecordType::A, Some(100))).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 3);
    assert!(m.edns.is_some());
    // No EDNS in the query: none in the reply.
    let (m, _) = udp(s, &query_msg("api.gpuha.test.", RecordType::A, None)).await;
    assert!(m.edns.is_none());

    // EDNS version 1: BADVERS.
    let mut q = query_msg("api.gpuha.test.", RecordType::A, Some(1232));
    if let Some(e) = q.edns.as_mut() {
        e.set_version(1);
    }
    let (m, _) = udp(s, &q).await;
    // Extended rcode 16; hickory decodes 16 as BADSIG (same number, TSIG context).
    assert_eq!(u16::from(m.metadata.response_code), 16, "{:?}", m.metadata.response_code);

    // Other opcodes: NOTIMP.
    let mut q = query_msg("api.gpuha.test.", RecordType::A, None);
    q.metadata.op_code = OpCode::Status;
    let (m, _) = udp(s, &q).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

    // AXFR: refused (not configured), over UDP and TCP.
    let (m, _) = udp(s, &query_msg("gpuha.test.", RecordType::AXFR, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = tcp(s, &query_msg("gpuha.test.", RecordType::AXFR, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Malformed: garbage, a short header, a truncated question, a response. Each dropped (no
    // reply), counted, and the server still answers.
    let ok = query_msg("api.gpuha.test.", RecordType::A, None).to_vec().expect("encode");
    let mut response_bit = ok.clone();
    response_bit[2] |= 0x80;
    let junk: Vec<Vec<u8>> = vec![b"\xff\xff\xff".to_vec(), vec![0u8; 11], ok[..ok.len() - 3].to_vec(), response_bit, vec![0xab; 600]];
    for j in &junk {
        assert!(udp_raw(s, j, Duration::from_millis(300)).await.is_none(), "no reply to junk {j:?}");
    }
    let (m, _) = udp(s, &query_msg("api.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.answers.len(), 3);

    let text = d.metrics().await;
    assert_eq!(metric(&text, "gpuha_dnsd_dns_malformed_total"), junk.len() as f64, "{text}");
    assert!(metric(&text, "gpuha_dnsd_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}") >= 5.0, "{text}");
    assert!(metric(&text, "gpuha_dnsd_dns_queries_total{qtype=\"A\",rcode=\"NXDOMAIN\"}") >= 2.0);
    assert!(metric(&text, "gpuha_dnsd_dns_queries_total{qtype=\"AXFR\",rcode=\"REFUSED\"}") >= 2.0);
    assert!(metric(&text, "gpuha_dnsd_dns_truncated_total") >= 2.0);
    assert!(metric(&text, "gpuha_dnsd_dns_answers_total{service=\"api.gpuha.test.\",pool=\"pool-a\",pool_state=\"cold_start\"}") >= 1.0, "{text}");
    assert_eq!(metric(&text, "gpuha_dnsd_pool_state{pool=\"pool-a\",region=\"r1\",cloud=\"c1\",state=\"cold_start\"}"), 1.0);
    assert!(text.contains("gpuha_dnsd_pool_evictions_total{pool=\"pool-a\"} 0"));
    assert!(text.contains("gpuha_dnsd_failwhale_answers_total{service=\"api.gpuha.test.\"} 0"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelined_queries_and_junk_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = Dnsd::start(&dns_section("")).await;
    let mut c = tokio::net::TcpStream::connect(d.dns).await.expect("connect");
    // Two queries in one write: two answers, in order.
    let mut buf = Vec::new();
    for name in ["api.gpuha.test.", "nope.gpuha.test."] {
        let b = query_msg(name, RecordType::A, None).to_vec().expect("enc");
        buf.extend_from_slice(&(b.len() as u16).to_be_bytes());
        buf.extend_from_slice(&b);
    }
    c.write_all(&buf).await.expect("w");
    for want in [ResponseCode::NoError, ResponseCode::NXDomain] {
        let len = c.read_u16().await.expect("len");
        let mut b = vec![0u8; len as usize];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(Message::from_vec(&b).expect("dec").metadata.response_code, want);
    }
    // Junk with a valid length prefix: the connection is closed, the server lives on.
    c.write_all(&[0, 4, 1, 2, 3, 4]).await.expect("w");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await.expect("closed").expect("read");
    assert_eq!(n, 0);
    let m = tcp(d.dns, &query_msg("api.gpuha.test.", RecordType::A, None)).await;
    assert_eq!(m.answers.len(), 3);
    assert_eq!(metric(&d.metrics().await, "gpuha_dnsd_dns_malformed_total"), 1.0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axfr_allowed_for_configured_clients_over_tcp_only() {
    let d = Dnsd::start(&dns_section("allow_axfr = [\"127.0.0.0/8\"]")).await;
    let m = tcp(d.dns, &query_msg("gpuha.test.", RecordType::AXFR, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.first().map(|r| r.record_type()), Some(RecordType::SOA));
    assert_eq!(m.answers.last().map(|r| r.record_type()), Some(RecordType::SOA));
    assert!(m.answers.iter().any(|r| r.name.to_ascii() == "api.gpuha.test." && r.record_type() == RecordType::A));
    // UDP: still refused; a name that is not an apex: refused.
    let (m, _) = udp(d.dns, &query_msg("gpuha.test.", RecordType::AXFR, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    let m = tcp(d.dns, &query_msg("api.gpuha.test.", RecordType::AXFR, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    d.stop().await;
}
