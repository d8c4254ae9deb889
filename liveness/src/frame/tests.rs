use super::*;
use proptest::prelude::*;

pub(crate) fn sample() -> Frame {
    Frame {
        key_id: 1,
        boot_id: 0xdead_beef,
        seq: 7,
        sent_ms: 1_800_000_000_000,
        worker_id: "w1".into(),
        pool_id: "eu-west".into(),
        addr: "127.0.0.1:8000".parse().unwrap(),
        models: vec!["tiny".into()],
        adapters: vec!["adapter-a".into(), "sql-lora".into()],
        metrics: Metrics {
            running: Some(2.0),
            waiting: Some(1.0),
            kv_usage: Some(0.25),
            ttft_sum_s: Some(1.5),
            ttft_count: Some(10.0),
            prompt_tokens: Some(100.0),
            generation_tokens: Some(400.0),
            preemptions: None,
            engine_steps: Some(350.0),
        },
    }
}

/// A version-2 frame (no adapter list) or version-1 frame (also 8 metrics), as older
/// sidecars send them.
fn encode_old(f: &Frame, key: &[u8], version: u8) -> Vec<u8> {
    let f = Frame { adapters: Vec::new(), ..f.clone() };
    let v3 = f.encode(key).unwrap();
    let mut body = v3[..v3.len() - TAG_LEN].to_vec();
    // The adapter count (0) sits just before the presence bits.
    let count_at = body.len() - 2 - 8 * METRICS_V2 - 1;
    assert_eq!(body.remove(count_at), 0);
    body[2] = version;
    if version == 1 {
        body.truncate(body.len() - 8);
        let present_at = body.len() - 2 - 8 * METRICS_V1;
        let present = u16::from_be_bytes([body[present_at], body[present_at + 1]]) & !(1 << 8);
        body[present_at..present_at + 2].copy_from_slice(&present.to_be_bytes());
    }
    let mut mac = mac_for(key);
    mac.update(&body);
    body.extend_from_slice(&mac.finalize().into_bytes());
    body
}

#[test]
fn version_1_and_2_frames_are_still_read() {
    let ring = KeyRing::single(1, b"k".to_vec());
    let f = sample();
    let got = Frame::decode(&encode_old(&f, b"k", 1), &ring).unwrap();
    assert_eq!(got.metrics.engine_steps, None);
    assert_eq!(got.metrics, Metrics { engine_steps: None, ..f.metrics });
    assert!(got.adapters.is_empty());
    let got = Frame::decode(&encode_old(&f, b"k", 2), &ring).unwrap();
    assert_eq!(got, Frame { adapters: Vec::new(), ..f.clone() });
    let mut v4 = f.encode(b"k").unwrap();
    v4[2] = 4;
    assert_eq!(Frame::decode(&v4, &ring), Err(FrameError::UnsupportedVersion(4)));
    // A v3 body relabelled v2 (or the reverse) is never read as the other: the MAC covers
    // the version byte.
    let mut relabelled = f.encode(b"k").unwrap();
    relabelled[2] = 2;
    assert!(Frame::decode(&relabelled, &ring).is_err());
}

/// The adapter list is trimmed, least recently active last, until the frame fits; what
/// is left always encodes and decodes to itself.
#[test]
fn adapters_are_trimmed_to_fit() {
    let ring = KeyRing::single(1, b"k".to_vec());
    let mut f = sample();
    f.worker_id = "w".repeat(64);
    f.pool_id = "p".repeat(64);
    f.addr = "[2001:db8::1]:8000".parse().unwrap();
    f.models = (0..2).map(|i| format!("{i}{}", "m".repeat(63))).collect();
    f.adapters = (0..10).map(|i| format!("{i}{}", "a".repeat(63))).collect();
    f.adapters.insert(3, String::new());
    f.adapters.insert(4, "x".repeat(65));
    assert!(f.encode(b"k").is_err());
    let dropped = f.fit_adapters();
    let bytes = f.encode(b"k").unwrap();
    assert_eq!(bytes.len(), f.encoded_len());
    assert!(bytes.len() <= MAX_FRAME_LEN);
    assert_eq!(dropped + f.adapters.len(), 12);
    assert_eq!(f.adapters[0], format!("0{}", "a".repeat(63)));
    assert!(!f.adapters.is_empty());
    let mut one_more = f.clone();
    one_more.adapters.push(format!("{}{}", f.adapters.len(), "a".repeat(63)));
    assert!(one_more.encoded_len() > MAX_FRAME_LEN, "trimmed more than needed");
    assert_eq!(Frame::decode(&bytes, &ring).unwrap(), f);
    // A frame that fits keeps every adapter.
    let mut g = sample();
    assert_eq!(g.fit_adapters(), 0);
    assert_eq!(g.adapters.len(), 2);
}

#[test]
fn round_trip() {
    let ring = KeyRing::single(1, b"k".to_vec());
    let f = sample();
    let bytes = f.encode(b"k").unwrap();
    assert!(bytes.len() <= MAX_FRAME_LEN);
    assert_eq!(Frame::decode(&bytes, &ring).unwrap(), f);
}

#[test]
fn ipv6_and_many_models_fit() {
    let mut f = sample();
    f.addr = "[2001:db8::1]:8000".parse().unwrap();
    f.worker_id = "w".repeat(64);
    f.pool_id = "p".repeat(64);
    f.models = (0..3).map(|i| format!("{i}{}", "m".repeat(63))).collect();
    let bytes = f.encode(b"k").unwrap();
    assert_eq!(Frame::decode(&bytes, &KeyRing::single(1, b"k".to_vec())).unwrap(), f);
}

#[test]
fn oversized_frame_is_refused_at_encode() {
    let mut f = sample();
    f.worker_id = "w".repeat(64);
    f.pool_id = "p".repeat(64);
    f.models = (0..8).map(|i| format!("{i}{}", "m".repeat(63))).collect();
    assert!(matches!(f.encode(b"k"), Err(FrameError::TooLarge(_))));
}

/// Decode rejects a non-finite metric, so encode must refuse to sign one: a frame every
/// receiver drops would be sent for nothing, and the sender would never know.
#[test]
fn non_finite_metric_is_refused_at_encode() {
    for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
        let mut f = sample();
        f.metrics.running = Some(bad);
        assert_eq!(f.encode(b"k"), Err(FrameError::Encode("metric is not a finite number")), "{bad}");
    }
}

#[test]
fn wrong_key_and_unknown_key_and_tamper() {
    let bytes = sample().encode(b"k").unwrap();
    assert_eq!(Frame::decode(&bytes, &KeyRing::single(1, b"other".to_vec())), Err(FrameError::BadMac));
    assert_eq!(Frame::decode(&bytes, &KeyRing::single(2, b"k".to_vec())), Err(FrameError::UnknownKey(1)));
    let mut t = bytes.clone();
    t[40] ^= 1;
    assert_eq!(Frame::decode(&t, &KeyRing::single(1, b"k".to_vec())), Err(FrameError::BadMac));
}

#[test]
fn key_files() {
    assert_eq!(key_from_file_bytes(b"0123456789abcdef\n".to_vec()), Ok(b"0123456789abcdef".to_vec()));
    assert_eq!(key_from_file_bytes(b"0123456789abcdef\r\n".to_vec()), Ok(b"0123456789abcdef".to_vec()));
    assert_eq!(key_from_file_bytes(b"short\n".to_vec()), Err(5));
    assert_eq!(key_from_file_bytes(Vec::new()), Err(0));
}

#[test]
fn key_rotation_accepts_both_keys() {
    let mut ring = KeyRing::single(1, b"old".to_vec());
    ring.insert(2, b"new".to_vec());
    let mut f = sample();
    assert!(Frame::decode(&f.encode(b"old").unwrap(), &ring).is_ok());
    f.key_id = 2;
    assert!(Frame::decode(&f.encode(b"new").unwrap(), &ring).is_ok());
}

#[test]
fn replaced_key_is_used_and_debug_shows_no_key_material() {
    let mut ring = KeyRing::single(1, b"old-secret".to_vec());
    ring.insert(1, b"new-secret".to_vec());
    let f = sample();
    assert_eq!(Frame::decode(&f.encode(b"old-secret").unwrap(), &ring), Err(FrameError::BadMac));
    assert!(Frame::decode(&f.encode(b"new-secret").unwrap(), &ring).is_ok());
    let shown = format!("{ring:?} {ring:#?}");
    assert!(!shown.contains("secret") && !shown.contains("Hmac"), "{shown}");
    assert_eq!(shown.matches("key_ids").count(), 2, "{shown}");
}

#[test]
fn garbage_is_typed() {
    let ring = KeyRing::single(1, b"k".to_vec());
    assert_eq!(Frame::decode(b"", &ring), Err(FrameError::BadMagic));
    assert_eq!(Frame::decode(b"hello", &ring), Err(FrameError::BadMagic));
    assert!(matches!(Frame::decode(b"GH\x01", &ring), Err(FrameError::Truncated { .. })));
    assert!(matches!(Frame::decode(&[b'G'; 600], &ring), Err(FrameError::TooLarge(600))));
    let mut v = sample().encode(b"k").unwrap();
    v[2] = 9;
    assert_eq!(Frame::decode(&v, &ring), Err(FrameError::UnsupportedVersion(9)));
}

/// A frame cut short anywhere is `Truncated` (counted as malformed), not `BadMac`: from 61
/// bytes on the cut frame is long enough to reach the MAC check, which it always fails.
#[test]
fn truncated_frame_is_truncated_not_bad_mac() {
    let ring = KeyRing::single(1, b"k".to_vec());
    for f in [sample(), { let mut f = sample(); f.addr = "[2001:db8::1]:80".parse().unwrap(); f.models = vec!["a".into(), "bb".into()]; f }] {
        let good = f.encode(b"k").unwrap();
        for cut in 0..good.len() {
            let r = Frame::decode(&good[..cut], &ring);
            assert!(matches!(r, Err(FrameError::Truncated { .. }) | Err(FrameError::BadMagic)), "cut at {cut} of {}: {r:?}", good.len());
        }
        // Tampering is still a MAC failure, wherever it lands.
        for i in 3..good.len() {
            let mut t = good.clone();
            t[i] ^= 0x40;
            let r = Frame::decode(&t, &ring);
            assert!(r.is_err() && !matches!(r, Err(FrameError::Truncated { .. })) || i < 5, "byte {i}: {r:?}");
        }
    }
}

/// A correctly signed body whose fields lie about their lengths still decodes to an error.
#[test]
fn signed_but_malformed_body() {
    let key = b"k";
    let ring = KeyRing::single(1, key.to_vec());
    let good = sample().encode(key).unwrap();
    let body = &good[..good.len() - TAG_LEN];
    for cut in HEADER_LEN..body.len() {
        let mut b = body[..cut].to_vec();
        let mut mac = mac_for(key);
        mac.update(&b);
        b.extend_from_slice(&mac.finalize().into_bytes());
        assert!(Frame::decode(&b, &ring).is_err(), "cut at {cut} decoded");
    }
}

proptest! {
    #[test]
    fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = Frame::decode(&bytes, &KeyRing::single(1, b"k".to_vec()));
    }

    #[test]
    fn decode_is_total_after_magic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600), version in 1u8..=4) {
        if bytes.len() >= 3 { bytes[0] = b'G'; bytes[1] = b'H'; bytes[2] = version; }
        let _ = Frame::decode(&bytes, &KeyRing::single(1, b"k".to_vec()));
    }

    /// A correctly signed body of any readable version whose bytes after the header are
    /// arbitrary: still a frame or a typed error (the parser, not the MAC, is tested).
    #[test]
    fn decode_is_total_when_signed(tail in proptest::collection::vec(any::<u8>(), 0..400), version in 1u8..=3) {
        let good = sample().encode(b"k").unwrap();
        let mut b = good[..HEADER_LEN].to_vec();
        b[2] = version;
        b.extend_from_slice(&tail);
        b.truncate(MAX_FRAME_LEN - TAG_LEN);
        let mut mac = mac_for(b"k");
        mac.update(&b);
        b.extend_from_slice(&mac.finalize().into_bytes());
        let _ = Frame::decode(&b, &KeyRing::single(1, b"k".to_vec()));
    }

    #[test]
    fn round_trip_any(seq in any::<u64>(), boot in any::<u64>(), sent in any::<u64>(),
                      running in proptest::option::of(0.0f64..1e6), kv in proptest::option::of(0.0f64..1.0),
                      port in any::<u16>(), worker in "[a-z0-9-]{1,64}",
                      adapters in proptest::collection::vec("[a-zA-Z0-9/_.-]{0,70}", 0..12)) {
        let mut f = sample();
        f.seq = seq; f.boot_id = boot; f.sent_ms = sent; f.metrics.running = running;
        f.metrics.kv_usage = kv; f.addr.set_port(port); f.worker_id = worker;
        f.adapters = adapters;
        f.fit_adapters();
        prop_assert_eq!(f.encoded_len(), f.encode(b"k").unwrap().len());
        let b = f.encode(b"k").unwrap();
        prop_assert_eq!(Frame::decode(&b, &KeyRing::single(1, b"k".to_vec())).unwrap(), f);
    }
}

fn name_list(n: usize, salt: u8) -> Vec<String> {
    (0..n).map(|i| format!("name-{salt}-{i}")).collect()
}

proptest! {
    /// The borrowed decode is the owned one, and assigning it over any frame (keeping that
    /// frame's allocations) gives the same frame as a fresh copy.
    #[test]
    fn borrowed_decode_and_assign_match_the_owned_frame(n_models in 0usize..=8, n_adapters in 0usize..=8,
                                                         old_models in 0usize..=8, old_adapters in 0usize..=8,
                                                         salt in 0u8..3, same_ids in any::<bool>(), v6 in any::<bool>()) {
        let ring = KeyRing::single(1, b"k".to_vec());
        let mut f = sample();
        f.models = name_list(n_models, 0);
        f.adapters = name_list(n_adapters, 1);
        if v6 {
            f.addr = "[2001:db8::1]:9000".parse().unwrap();
        }
        let bytes = f.encode(b"k").unwrap();
        let r = FrameRef::decode(&bytes, &ring).unwrap();
        prop_assert_eq!(r.to_frame(), f.clone());
        prop_assert_eq!(Frame::decode(&bytes, &ring).unwrap(), f.clone());
        prop_assert_eq!(r.models.len(), n_models);
        let mut old = sample();
        old.models = name_list(old_models, salt);
        old.adapters = name_list(old_adapters, salt);
        if !same_ids {
            old.worker_id = "another-worker".into();
            old.pool_id = "another-pool".into();
        }
        old.seq = 1;
        old.metrics.running = None;
        r.assign_to(&mut old);
        prop_assert_eq!(old, f);
    }
}

#[test]
fn borrowed_decode_refuses_what_decode_refuses() {
    let ring = KeyRing::single(1, b"k".to_vec());
    let b = sample().encode(b"k").unwrap();
    let mut forged = b.clone();
    forged[40] ^= 1;
    assert_eq!(FrameRef::decode(&forged, &ring), Err(FrameError::BadMac));
    assert_eq!(FrameRef::decode(&b[..b.len() - 1], &ring).err(), Frame::decode(&b[..b.len() - 1], &ring).err());
    assert_eq!(FrameRef::decode(&b, &KeyRing::single(2, b"k".to_vec())), Err(FrameError::UnknownKey(1)));
}
