//! Valid signed frames built from the input's fields, then mutated: with the signature kept
//! (every change must be refused) and re-signed over the mutated bytes (the parser behind the
//! MAC sees hostile input from a key holder). Then a sequence of them through ingest and the
//! fleet state, checking the replay order.
#![no_main]

use arbitrary::Arbitrary;
use gpuha_liveness::{FleetState, Frame, Ingest, KeyRing, Metrics};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const NOW: u64 = 1_800_000_000_000;
const KEY: &[u8] = b"0123456789abcdef-fuzz";
const TAG: usize = 32;

#[derive(Debug, Arbitrary)]
struct Fields {
    key_id: u16,
    boot_id: u64,
    seq: u64,
    /// Offset of the send time from the receive time.
    skew: i16,
    worker: String,
    pool: String,
    v6: bool,
    ip: [u8; 16],
    port: u16,
    models: Vec<String>,
    adapters: Vec<String>,
    metrics: [Option<f64>; 9],
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    Set { at: u16, byte: u8 },
    Xor { at: u16, mask: u8 },
    Truncate { to: u16 },
    Append(Vec<u8>),
    Insert { at: u16, bytes: Vec<u8> },
    Remove { at: u16, len: u8 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    frames: Vec<(Fields, Vec<Mutation>, bool)>,
}

fn frame_of(f: &Fields) -> Frame {
    let ip: std::net::IpAddr = if f.v6 {
        std::net::Ipv6Addr::from(f.ip).into()
    } else {
        std::net::Ipv4Addr::new(f.ip[0], f.ip[1], f.ip[2], f.ip[3]).into()
    };
    let m = f.metrics;
    Frame {
        key_id: f.key_id % 3,
        boot_id: f.boot_id,
        seq: f.seq,
        sent_ms: NOW.saturating_add_signed(i64::from(f.skew)),
        worker_id: f.worker.clone(),
        pool_id: f.pool.clone(),
        addr: std::net::SocketAddr::new(ip, f.port),
        models: f.models.clone(),
        adapters: f.adapters.clone(),
        metrics: Metrics { running: m[0], waiting: m[1], kv_usage: m[2], ttft_sum_s: m[3], ttft_count: m[4], prompt_tokens: m[5], generation_tokens: m[6], preemptions: m[7], engine_steps: m[8] },
    }
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |i: u16, len: usize| usize::from(i) % (len + 1);
    match m {
        Mutation::Set { at: i, byte } if !bytes.is_empty() => {
            let i = usize::from(*i) % bytes.len();
            bytes[i] = *byte;
        }
        Mutation::Xor { at: i, mask } if !bytes.is_empty() => {
            let i = usize::from(*i) % bytes.len();
            bytes[i] ^= *mask;
        }
        Mutation::Truncate { to } => bytes.truncate(usize::from(*to)),
        Mutation::Append(b) => bytes.extend_from_slice(b),
        Mutation::Insert { at: i, bytes: b } => {
            let i = at(*i, bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Remove { at: i, len } => {
            let i = at(*i, bytes.len());
            let end = (i + usize::from(*len)).min(bytes.len());
            bytes.drain(i..end);
        }
        _ => {}
    }
}

fn resign(body: &[u8]) -> Vec<u8> {
    let mut mac = match Hmac::<Sha256>::new_from_slice(KEY) {
        Ok(m) => m,
        Err(_) => return body.to_vec(),
    };
    mac.update(body);
    let mut out = body.to_vec();
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

fuzz_target!(|input: Input| {
    let keys = KeyRing::single(1, KEY.to_vec());
    let mut ingest = Ingest::new(keys.clone());
    let mut fleet = FleetState::new(NOW - 60_000);
    let mut newest: std::collections::HashMap<String, (u64, u64, u64)> = Default::default();
    for (i, (fields, mutations, resigned)) in input.frames.iter().enumerate().take(16) {
        let mut frame = frame_of(fields);
        // The sender's trim: whatever the adapters, what is left fits (or the identity does not).
        frame.fit_adapters();
        assert!(frame.adapters.len() <= gpuha_liveness::frame::MAX_ADAPTERS);
        let Ok(valid) = frame.encode(KEY) else { continue };
        assert_eq!(valid.len(), frame.encoded_len());
        // Every frame that encodes decodes to itself (key 1 only: the others are unknown here).
        match Frame::decode(&valid, &keys) {
            Ok(back) => assert_eq!(back, frame, "round trip"),
            Err(e) => assert_ne!(frame.key_id, 1, "a valid frame did not decode: {e}"),
        }
        let mut bytes = valid.clone();
        if *resigned && bytes.len() >= TAG {
            bytes.truncate(bytes.len() - TAG);
            for m in mutations.iter().take(8) {
                mutate(&mut bytes, m);
            }
            bytes = resign(&bytes);
        } else {
            for m in mutations.iter().take(8) {
                mutate(&mut bytes, m);
            }
            if bytes != valid {
                assert!(Frame::decode(&bytes, &keys).is_err(), "altered bytes passed the MAC");
            }
        }
        let now = NOW + i as u64;
        if let Ok(f) = ingest.accept(&bytes, now) {
            let order = (f.sent_ms, f.boot_id, f.seq);
            if let Some(prev) = newest.insert(f.worker_id.clone(), order) {
                assert!(order > prev, "accepted {order:?} after {prev:?}");
            }
            // What was accepted re-encodes (a receiver can serve everything it accepted).
            if f.key_id == 1 {
                let again = f.encode(KEY).expect("an accepted frame encodes");
                assert_eq!(Frame::decode(&again, &keys).expect("and decodes"), f);
            }
            fleet.observe_tracked(f, now);
        }
    }
    let v = fleet.view(NOW + 2_000);
    let _ = gpuha_liveness::FleetView::from_json(v.to_json().as_bytes()).expect("view JSON reads back");
});
