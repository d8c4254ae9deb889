//! The sidecar's scrape path: an HTTP response from "vLLM" (raw bytes, whole or filtered to the
//! lines the mapping reads, or the input as the body) parsed, its Prometheus text mapped to the
//! frame's numbers, and the frame signed. The mapping promises finite numbers, so every mapped
//! frame must encode and decode to itself.
//!
//! The first byte chooses the path: `& 3` = 0 whole response, 1 the input is the body, 2 the
//! sidecar's streaming line filter, 3 the same in reads of `1 + (byte >> 2)` bytes, which must
//! give what one read gives. Seeds (fuzz/make_seeds.py) are ~3 KB excerpts of real pages, not
//! whole ~50 KB pages: the lines the mapping reads and some that the filter skips.
#![no_main]

use gpuha_liveness::{Frame, KeyRing};
use gpuha_sidecar::http::{parse_response, parse_response_lines, parse_response_reads};
use gpuha_sidecar::scrape::{parse, wanted_line};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"0123456789abcdef-fuzz";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = match mode & 3 {
        0 => match parse_response(rest) {
            Ok(t) => t,
            Err(_) => return,
        },
        // The sidecar's path: only the lines the mapping reads are kept as the body streams in.
        2 => match parse_response_lines(rest, wanted_line) {
            Ok(t) => t,
            Err(_) => return,
        },
        3 => {
            let split = parse_response_reads(rest.chunks(1 + usize::from(mode >> 2)), wanted_line);
            let whole = parse_response_lines(rest, wanted_line);
            match (split, whole) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "reads of {} bytes", 1 + (mode >> 2));
                    a
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string());
                    return;
                }
                (a, b) => panic!("reads of {} bytes: {a:?}; one read: {b:?}", 1 + (mode >> 2)),
            }
        }
        _ => String::from_utf8_lossy(rest).into_owned(),
    };
    let Ok(scraped) = parse(&text) else { return };
    assert!(scraped.models.len() <= 8 && scraped.models.iter().all(|m| !m.is_empty() && m.len() <= 64));
    if let Some(l) = &scraped.lora {
        let ok = |v: &Vec<String>| v.len() <= 16 && v.iter().all(|n| !n.is_empty() && n.len() <= 64);
        assert!(ok(&l.running) && ok(&l.waiting) && ok(&l.recent), "{l:?}");
    }
    let mut frame = Frame {
        key_id: 1,
        boot_id: 1,
        seq: 1,
        sent_ms: 1_800_000_000_000,
        worker_id: "w".into(),
        pool_id: "p".into(),
        addr: std::net::SocketAddr::from(([10, 0, 0, 1], 8000)),
        models: scraped.models.clone(),
        adapters: gpuha_sidecar::lora::loaded(scraped.lora.as_ref()),
        metrics: scraped.metrics,
    };
    frame.fit_adapters();
    let bytes = frame.encode(KEY).expect("a mapped scrape encodes");
    assert_eq!(Frame::decode(&bytes, &KeyRing::single(1, KEY.to_vec())).expect("and decodes"), frame);
});
