//! DNS answers to hostile queries, sent as raw datagrams: every reply must parse with a stock
//! decoder and fit the client's UDP limit, whatever the query did to get there.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// The question section of a raw DNS message with one question: its bytes after the header.
fn question_bytes(raw: &[u8]) -> &[u8] {
    assert!(raw.len() >= 12, "reply shorter than a header: {raw:02x?}");
    assert_eq!(u16::from_be_bytes([raw[4], raw[5]]), 1, "QDCOUNT");
    let mut i = 12;
    while raw[i] != 0 {
        assert!(raw[i] < 0x40, "question name is not a plain label sequence at byte {i}: {raw:02x?}");
        i += 1 + usize::from(raw[i]);
    }
    &raw[12..i + 5]
}

/// Raw query: header (no RD, QDCOUNT = `questions.len()`, ARCOUNT 1 with an OPT of `edns`),
/// then the questions as given, uncompressed.
fn raw_query(id: u16, questions: &[Vec<u8>], edns: Option<u16>) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0]);
    q.extend_from_slice(&(questions.len() as u16).to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&u16::from(edns.is_some()).to_be_bytes());
    for question in questions {
        q.extend_from_slice(question);
    }
    if let Some(size) = edns {
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}

/// `q00.gpuha.test. A IN` .. as 20 uncompressed bytes each.
fn question(i: usize) -> Vec<u8> {
    let mut q = vec![3];
    q.extend_from_slice(format!("q{:02}", i % 100).as_bytes());
    q.extend_from_slice(b"\x05gpuha\x04test\x00\x00\x01\x00\x01");
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_question_is_answered_uncompressed() {
    let d = Dnsd::start(&dns_section("")).await;
    // The fuzzer's query: the question is a pointer to offset 2 of the query (`01 00 00 ..`,
    // the name "\000."). Echoed byte for byte, the pointer lands on the reply's flags (0x81).
    let q = hex("123401000001000000000000c00200010001");
    let raw = udp_raw(d.dns, &q, Duration::from_secs(2)).await.expect("a reply");
    let m = Message::from_vec(&raw).unwrap_or_else(|e| panic!("reply does not parse: {e}: {raw:02x?}"));
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(question_bytes(&raw), &hex("01000000010001")[..], "canonical question: {raw:02x?}");
    assert_eq!(m.queries.len(), 1);

    // A pointer to the header's QDCOUNT (`00 01`: the root name), type SOA.
    let q = hex("abcd00000001000000000000c00400060001");
    let raw = udp_raw(d.dns, &q, Duration::from_secs(2)).await.expect("a reply");
    assert!(Message::from_vec(&raw).is_ok(), "{raw:02x?}");
    assert_eq!(question_bytes(&raw), &hex("0000060001")[..], "{raw:02x?}");

    // The case of the question is kept (resolvers using 0x20 randomisation compare it).
    let raw = udp_raw(d.dns, &raw_query(7, &[b"\x03ApI\x05gPuHa\x04TEST\x00\x00\x01\x00\x01".to_vec()], None), Duration::from_secs(2)).await.expect("reply");
    assert_eq!(question_bytes(&raw), b"\x03ApI\x05gPuHa\x04TEST\x00\x00\x01\x00\x01");
    let m = Message::from_vec(&raw).expect("parse");
    assert_eq!(m.answers.len(), 3);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_reply_never_exceeds_the_client_limit() {
    let d = Dnsd::start(&dns_section("")).await;
    // 40 questions, 812 bytes, no EDNS: FORMERR in at most 512 bytes, no question echoed.
    let qs: Vec<Vec<u8>> = (0..40).map(question).collect();
    let q = raw_query(1, &qs, None);
    assert_eq!(q.len(), 812);
    let raw = udp_raw(d.dns, &q, Duration::from_secs(2)).await.expect("a reply");
    assert!(raw.len() <= 512, "{} bytes without EDNS", raw.len());
    let m = Message::from_vec(&raw).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.queries.is_empty(), "no question section in a FORMERR for {} questions", qs.len());

    // With EDNS 600 and 70 questions (1.4 KB): at most 600 bytes, our OPT kept.
    let qs: Vec<Vec<u8>> = (0..70).map(question).collect();
    let raw = udp_raw(d.dns, &raw_query(2, &qs, Some(600)), Duration::from_secs(2)).await.expect("a reply");
    assert!(raw.len() <= 600, "{} bytes with EDNS 600", raw.len());
    let m = Message::from_vec(&raw).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.edns.is_some());

    // Two questions are a FORMERR too, and the server answers the next query as usual.
    let raw = udp_raw(d.dns, &raw_query(3, &[question(1), question(2)], None), Duration::from_secs(2)).await.expect("a reply");
    let m = Message::from_vec(&raw).expect("parse");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    let (m, len) = udp(d.dns, &query_msg("api.gpuha.test.", RecordType::A, None)).await;
    assert!(len <= 512);
    assert_eq!(m.answers.len(), 3);
    d.stop().await;
}
