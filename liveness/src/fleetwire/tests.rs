use super::*;
use crate::fleet::FleetState;
use crate::frame::tests::sample;
use crate::Ages;
use proptest::prelude::*;

const T0: u64 = 1_800_000_000_000;

fn worker(id: &str, pool: &str, models: &[&str]) -> WorkerView {
    WorkerView {
        id: id.into(),
        pool: pool.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        adapters: Vec::new(),
        addr: format!("10.0.0.{}:8000", id.len()),
        age_ms: 1_000,
        fresh: true,
        stalled: false,
        boot: 7,
        running: Some(3.0),
        waiting: Some(1.0),
        kv: Some(0.25),
        ttft_ms: Some(41.7),
        gen_tps: None,
        prompt_tps: Some(1e6 / 3.0),
        preemptions: Some(0.0),
        pace: Some(12.3),
        slow: None,
        drained: false,
    }
}

fn sample_view() -> FleetView {
    let mut a = worker("w-a", "pool-a", &["tiny", "big"]);
    a.adapters = vec!["sql-lora".into(), "adapter-a".into()];
    let mut b = worker("w-b", "pool-b", &[]);
    (b.stalled, b.fresh, b.drained, b.slow, b.age_ms) = (true, false, true, Some(4.5), 3_001);
    b.addr = "[::1]:9000".into();
    let c = worker("w-c", "pool-a", &["tiny"]);
    FleetView {
        now_ms: 0,
        workers: vec![a, b, c],
        pools: vec![
            PoolView { pool: "pool-a".into(), workers: 2, fresh: 2, in_window: 2 },
            PoolView { pool: "pool-b".into(), workers: 1, fresh: 0, in_window: 1 },
        ],
    }
}

#[test]
fn round_trips_like_json() {
    let v = sample_view();
    let b = encode(&v);
    assert!(is_binary(&b));
    assert_eq!(decode(&b).unwrap(), v);
    assert_eq!(decode(&b).unwrap(), FleetView::from_json(v.to_json().as_bytes()).unwrap());
    let empty = FleetView { now_ms: 5, workers: vec![], pools: vec![] };
    assert_eq!(decode(&encode(&empty)).unwrap(), empty);
}

#[test]
fn a_fleet_states_views_round_trip() {
    let mut fleet = FleetState::new(T0);
    for (i, pool) in ["p", "q", "p"].iter().enumerate() {
        let mut f = sample();
        f.worker_id = format!("w{i}");
        f.pool_id = pool.to_string();
        f.seq = 1;
        fleet.observe(f, T0 + i as u64);
    }
    for ages in [Ages::Exact, Ages::Bounded] {
        let v = fleet.view_of(T0 + 2_000, &[], ages);
        assert_eq!(decode(&encode(&v)).unwrap(), v);
    }
}

/// JSON writes a non-finite number as `null`, which reads back as absent: so does this form.
#[test]
fn non_finite_numbers_read_back_absent_as_in_json() {
    let mut v = sample_view();
    v.workers[0].running = Some(f64::NAN);
    v.workers[0].kv = Some(f64::INFINITY);
    let via_json = FleetView::from_json(v.to_json().as_bytes()).unwrap();
    assert_eq!(via_json.workers[0].running, None);
    assert_eq!(decode(&encode(&v)).unwrap(), via_json);
}

#[test]
fn numbers_update_in_place_when_the_identity_is_the_same() {
    let v = sample_view();
    let mut next = v.clone();
    next.workers[0].running = Some(9.0);
    next.workers[0].adapters = vec!["adapter-a".into()];
    next.workers[1].slow = None;
    next.workers[2].fresh = false;
    next.pools[0].fresh = 1;
    let (b0, b1) = (encode(&v), encode(&next));
    assert_eq!(identity(&b0).unwrap(), identity(&b1).unwrap(), "only numbers changed");
    let mut held = decode(&b0).unwrap();
    update(&mut held, &b1).unwrap();
    assert_eq!(held, next);

    // A worker more, or one restarted: another identity.
    let mut grown = v.clone();
    grown.workers.push(worker("w-d", "pool-b", &["tiny"]));
    assert_ne!(identity(&encode(&grown)).unwrap(), identity(&b0).unwrap());
    let mut restarted = v.clone();
    restarted.workers[1].boot = 8;
    assert_ne!(identity(&encode(&restarted)).unwrap(), identity(&b0).unwrap());
    // Another worker count is refused, and a refused update leaves the view as it was.
    let before = held.clone();
    assert!(update(&mut held, &encode(&grown)).is_err());
    let mut bad = b1.clone();
    bad.push(0);
    assert_eq!(update(&mut held, &bad), Err(WireError::Trailing(1)));
    assert_eq!(held, before);
}

#[test]
fn bad_input_is_an_error() {
    let b = encode(&sample_view());
    assert_eq!(decode(b"{\"now_ms\":0}"), Err(WireError::Magic));
    let mut v2 = b.clone();
    v2[4] = 2;
    assert_eq!(decode(&v2), Err(WireError::Version(2)));
    for n in 0..b.len() {
        assert!(decode(&b[..n]).is_err(), "a prefix of {n} bytes decoded");
    }
    // A worker count no input could hold.
    let mut huge = b.clone();
    huge[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&huge).is_err());
    // An overlong varint.
    let mut r = Reader { b: &[0xff; 11], at: 0, base: 0 };
    assert_eq!(r.varint(), Err(WireError::Varint(0)));
    let mut r = Reader { b: &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], at: 0, base: 0 };
    assert_eq!(r.varint(), Ok(u64::MAX));
}

/// `v` with its non-finite numbers absent (what JSON and this form carry).
fn finite(mut v: FleetView) -> FleetView {
    for w in &mut v.workers {
        for m in [&mut w.running, &mut w.waiting, &mut w.kv, &mut w.ttft_ms, &mut w.gen_tps, &mut w.prompt_tps, &mut w.preemptions, &mut w.pace, &mut w.slow] {
            *m = m.filter(|x| x.is_finite());
        }
    }
    v
}

fn arb_opt() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![Just(None), (-1e12f64..1e12).prop_map(Some), Just(Some(f64::NAN)), Just(Some(0.1))]
}

prop_compose! {
    fn arb_worker()(id in "[a-z0-9-]{0,12}", pool in "p[0-3]", models in proptest::collection::vec("m[0-3]", 0..3),
                    adapters in proptest::collection::vec("a[0-2]", 0..3), addr in "[0-9.:]{0,16}", age in any::<u64>(),
                    flags in 0u8..8, boot in any::<u64>(), m in proptest::collection::vec(arb_opt(), 9)) -> WorkerView {
        WorkerView { id, pool, models, adapters, addr, age_ms: age, fresh: flags & 1 != 0, stalled: flags & 2 != 0, boot,
                     running: m[0], waiting: m[1], kv: m[2], ttft_ms: m[3], gen_tps: m[4], prompt_tps: m[5],
                     preemptions: m[6], pace: m[7], slow: m[8], drained: flags & 4 != 0 }
    }
}

prop_compose! {
    fn arb_view()(now in any::<u64>(), workers in proptest::collection::vec(arb_worker(), 0..6),
                  pools in proptest::collection::vec(("p[0-5]", 0usize..1_000_000, any::<u32>(), any::<usize>()), 0..4)) -> FleetView {
        FleetView { now_ms: now, workers, pools: pools.into_iter().map(|(pool, workers, fresh, in_window)| PoolView { pool, workers, fresh: fresh as usize, in_window }).collect() }
    }
}

proptest! {
    #[test]
    fn every_view_round_trips(v in arb_view()) {
        prop_assert_eq!(decode(&encode(&v)).unwrap(), finite(v));
    }

    #[test]
    fn updates_equal_a_fresh_decode(a in arb_view(), b in arb_view()) {
        let (ea, eb) = (encode(&a), encode(&b));
        let mut held = decode(&ea).unwrap();
        let r = update(&mut held, &eb);
        if identity(&ea).unwrap() == identity(&eb).unwrap() {
            prop_assert!(r.is_ok());
            prop_assert_eq!(held, decode(&eb).unwrap());
        }
    }

    #[test]
    fn arbitrary_and_mutated_bytes_never_panic(v in arb_view(), junk in proptest::collection::vec(any::<u8>(), 0..200),
                                               flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let _ = decode(&junk);
        let mut b = encode(&v);
        for (at, x) in flips {
            let n = b.len();
            b[at % n] ^= x;
        }
        if let Ok(d) = decode(&b) {
            // Whatever decodes re-encodes to the same view.
            prop_assert_eq!(decode(&encode(&d)).unwrap(), d);
        }
        let mut held = v.clone();
        if update(&mut held, &b).is_err() {
            prop_assert_eq!(encode(&held), encode(&v));
        }
    }
}
