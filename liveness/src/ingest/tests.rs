use super::*;
use crate::frame::tests::sample;

const NOW: u64 = 1_800_000_000_000;

fn ingest() -> Ingest {
    Ingest::new(KeyRing::single(1, b"k".to_vec()))
}

#[test]
fn accepts_in_order_and_drops_replays() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    let b7 = f.encode(b"k").unwrap();
    assert!(ing.accept(&b7, NOW).is_ok());
    assert_eq!(ing.accept(&b7, NOW), Err(DropReason::Replay));
    f.seq = 6;
    assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::Replay));
    f.seq = 8;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    assert_eq!(ing.counters().accepted, 2);
    assert_eq!(ing.counters().dropped(DropReason::Replay), 2);
}

#[test]
fn restart_with_new_boot_is_accepted_but_old_boot_is_replay() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    let old = f.encode(b"k").unwrap();
    assert!(ing.accept(&old, NOW).is_ok());
    let mut g = f.clone();
    g.boot_id = 99;
    g.seq = 1;
    g.sent_ms = NOW + 500;
    assert!(ing.accept(&g.encode(b"k").unwrap(), NOW + 500).is_ok());
    // The old boot's frame played back after the restart.
    assert_eq!(ing.accept(&old, NOW + 600), Err(DropReason::Replay));
}

#[test]
fn forged_garbage_and_skew_are_counted_by_reason() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    assert_eq!(ing.accept(&f.encode(b"wrong").unwrap(), NOW), Err(DropReason::BadMac));
    assert_eq!(ing.accept(b"\x00\x01garbage", NOW), Err(DropReason::Malformed));
    f.key_id = 3;
    assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::UnknownKey));
    f.key_id = 1;
    f.sent_ms = NOW - 60_000;
    assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::ClockSkew));
    let c = ing.counters();
    assert_eq!(c.accepted, 0);
    assert_eq!(c.dropped_total(), 4);
    for r in [DropReason::BadMac, DropReason::Malformed, DropReason::UnknownKey, DropReason::ClockSkew] {
        assert_eq!(c.dropped(r), 1, "{}", r.as_str());
    }
}

#[test]
fn truncated_frame_is_counted_as_malformed() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    let b = f.encode(b"k").unwrap();
    for cut in [61, 62, b.len() - 1] {
        assert_eq!(ing.accept(&b[..cut], NOW), Err(DropReason::Malformed), "cut at {cut}");
    }
    assert_eq!(ing.counters().dropped(DropReason::BadMac), 0);
}

/// Past the bound, new ids are dropped and counted; known ids go on, and room comes back
/// when the fleet forgets a worker.
#[test]
fn new_ids_past_the_bound_are_dropped_never_known_ones() {
    let mut ing = ingest().with_max_workers(2);
    let mut f = sample();
    f.sent_ms = NOW;
    for (id, seq) in [("a", 1), ("b", 1)] {
        f.worker_id = id.into();
        f.seq = seq;
        assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    }
    f.worker_id = "c".into();
    assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::TooManyWorkers));
    f.worker_id = "a".into();
    f.seq = 2;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok(), "a known worker is never pushed out");
    assert_eq!((ing.tracked(), ing.counters().dropped(DropReason::TooManyWorkers)), (2, 1));
    // The fleet forgot "b" and no replay of it can pass the skew check: room for "c".
    ing.retain(NOW + DEFAULT_MAX_SKEW_MS + 1, |id| id == "a");
    f.worker_id = "c".into();
    f.sent_ms = NOW + DEFAULT_MAX_SKEW_MS + 1;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW + DEFAULT_MAX_SKEW_MS + 1).is_ok());
}

/// The order map is looked up by the id borrowed from the datagram and updated in place:
/// per worker, a replay and a frame older than an accepted one are still dropped, other
/// workers (ids sharing a prefix) are their own, and the frame given back is the one sent.
#[test]
fn borrowed_accept_orders_per_worker() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    let mut sent = Vec::new();
    for (id, seq) in [("w", 5), ("w1", 5), ("w10", 5), ("w", 6), ("w1", 7)] {
        f.worker_id = id.into();
        f.seq = seq;
        let b = f.encode(b"k").unwrap();
        let got = ing.accept_ref(&b, NOW).map(|r| r.to_frame());
        assert_eq!(got, Ok(f.clone()), "{id} seq {seq}");
        sent.push(b);
    }
    for b in &sent {
        assert_eq!(ing.accept_ref(b, NOW).err(), Some(DropReason::Replay), "a replay");
    }
    // Reordered: "w1" seq 6 after seq 7; "w10" seq 6 is news for it.
    f.worker_id = "w1".into();
    f.seq = 6;
    assert_eq!(ing.accept_ref(&f.encode(b"k").unwrap(), NOW).err(), Some(DropReason::Replay));
    f.worker_id = "w10".into();
    assert!(ing.accept_ref(&f.encode(b"k").unwrap(), NOW).is_ok());
    assert_eq!((ing.tracked(), ing.counters().accepted, ing.counters().dropped(DropReason::Replay)), (3, 6, 6));
}

#[test]
fn forged_frame_does_not_advance_sequence() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    f.seq = 1_000;
    assert_eq!(ing.accept(&f.encode(b"evil").unwrap(), NOW), Err(DropReason::BadMac));
    f.seq = 1;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
}

/// The captured sequence from the fuzzer: two boots with the same send time, replayed in
/// turn. Each frame must be accepted at most once, and nothing older than an accepted frame.
#[test]
fn alternating_boots_with_equal_send_times_are_not_replayed() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    f.boot_id = 255;
    f.seq = 1;
    let a = f.encode(b"k").unwrap();
    f.boot_id = 65;
    let b = f.encode(b"k").unwrap();
    f.seq = 2;
    f.sent_ms = NOW - 1_000;
    let c = f.encode(b"k").unwrap();
    assert!(ing.accept(&a, NOW).is_ok());
    assert_eq!(ing.accept(&b, NOW), Err(DropReason::Replay), "B is older in the order than A");
    assert_eq!(ing.accept(&c, NOW), Err(DropReason::Replay));
    assert_eq!(ing.accept(&a, NOW), Err(DropReason::Replay), "A accepted twice");
    assert_eq!(ing.counters().accepted, 1);
}

/// Within one boot a frame sent earlier than an accepted one is older, whatever its seq:
/// otherwise it re-opens the door for the boot that came before it.
#[test]
fn same_boot_frame_sent_earlier_is_replay() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    f.seq += 1;
    f.sent_ms = NOW - 1;
    assert_eq!(ing.accept(&f.encode(b"k").unwrap(), NOW), Err(DropReason::Replay));
}

/// After a future-dated frame (the worker's clock ran 4.9 s ahead), a restart whose clock is
/// right is dropped only until its clock passes that frame: a bounded stall, never a lockout.
#[test]
fn restart_after_future_dated_frame_is_accepted_once_its_clock_passes_it() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW + 4_900;
    assert!(ing.accept(&f.encode(b"k").unwrap(), NOW).is_ok());
    f.boot_id = 1;
    f.seq = 1;
    let mut t = NOW + 500;
    let mut first_ok = None;
    while t < NOW + 2 * DEFAULT_MAX_SKEW_MS + 1_000 {
        f.sent_ms = t;
        f.seq += 1;
        if ing.accept(&f.encode(b"k").unwrap(), t).is_ok() {
            first_ok = Some(t);
            break;
        }
        t += 500;
    }
    assert_eq!(first_ok, Some(NOW + 5_000));
}

/// Forgetting a worker must not forget what it sent while those frames can still pass the
/// skew check: a forgotten worker's last frame replayed a moment later is still a replay.
#[test]
fn forgetting_a_worker_keeps_its_order_while_replays_could_pass_the_skew_check() {
    let mut ing = ingest();
    let mut f = sample();
    f.sent_ms = NOW;
    let b = f.encode(b"k").unwrap();
    assert!(ing.accept(&b, NOW).is_ok());
    ing.retain(NOW + 100, |_| false);
    assert_eq!(ing.accept(&b, NOW + 200), Err(DropReason::Replay));
    ing.retain(NOW + DEFAULT_MAX_SKEW_MS + 1, |_| false);
    assert_eq!(ing.accept(&b, NOW + DEFAULT_MAX_SKEW_MS + 2), Err(DropReason::ClockSkew));
    assert!(ing.last.is_empty(), "state is dropped once no replay can pass the skew check");
}

mod replay_model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const SKEW: u64 = DEFAULT_MAX_SKEW_MS;

    /// What happens next, to the worker, the network or the attacker.
    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes (ms).
        Wait(u64),
        /// The worker sends a frame; the attacker captures it; `delivered` says whether the
        /// network delivers it now or loses (or withholds) it.
        Send { delivered: bool },
        /// The sidecar restarts with a new boot id and a clock off by `offset` ms.
        Restart { boot: u64, offset: i64 },
        /// The worker's clock is stepped (NTP) to `offset` ms, same boot.
        Step { offset: i64 },
        /// The attacker sends any frame captured so far.
        Replay(prop::sample::Index),
    }

    fn op() -> impl Strategy<Value = Op> {
        let off = -(SKEW as i64)..=SKEW as i64;
        prop_oneof![
            4 => (1u64..3_000).prop_map(Op::Wait),
            4 => any::<bool>().prop_map(|delivered| Op::Send { delivered }),
            1 => (prop_oneof![0u64..4, any::<u64>()], off.clone()).prop_map(|(boot, offset)| Op::Restart { boot, offset }),
            1 => off.prop_map(|offset| Op::Step { offset }),
            4 => any::<prop::sample::Index>().prop_map(Op::Replay),
        ]
    }

    fn key(f: &Frame) -> (u64, u64, u64) {
        (f.sent_ms, f.boot_id, f.seq)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the interleaving of boots, clock jumps, losses and replays: no frame is
        /// accepted twice, every accepted frame is newer in the order than all accepted
        /// before it, and a genuine frame sent more than 2 x skew after the worker's last
        /// restart or clock step is accepted.
        #[test]
        fn no_replay_and_restart_is_accepted_within_bound(ops in proptest::collection::vec(op(), 1..120),
                                                           offset0 in -(SKEW as i64)..=SKEW as i64) {
            let mut ing = ingest();
            let mut now = NOW;
            let (mut boot, mut seq, mut offset, mut changed_at) = (7u64, 0u64, offset0, NOW);
            let mut captured: Vec<Vec<u8>> = Vec::new();
            let mut accepted: HashSet<Vec<u8>> = HashSet::new();
            let mut newest: Option<(u64, u64, u64)> = None;
            let mut f = sample();
            for op in ops {
                let (bytes, genuine_now) = match op {
                    Op::Wait(ms) => { now += ms; continue; }
                    Op::Restart { boot: b, offset: o } => { boot = b; seq = 0; offset = o; changed_at = now; continue; }
                    Op::Step { offset: o } => { offset = o; changed_at = now; continue; }
                    Op::Send { delivered } => {
                        seq += 1;
                        f.boot_id = boot;
                        f.seq = seq;
                        f.sent_ms = now.saturating_add_signed(offset);
                        let b = f.encode(b"k").unwrap();
                        captured.push(b.clone());
                        // One frame per millisecond at most, as a real sidecar.
                        now += 1;
                        if !delivered { continue; }
                        (b, true)
                    }
                    Op::Replay(i) => {
                        if captured.is_empty() { continue; }
                        (captured[i.index(captured.len())].clone(), false)
                    }
                };
                let rx = if genuine_now { now - 1 } else { now };
                match ing.accept(&bytes, rx) {
                    Ok(fr) => {
                        prop_assert!(accepted.insert(bytes), "frame accepted twice: {:?}", key(&fr));
                        if let Some(n) = newest {
                            prop_assert!(key(&fr) > n, "accepted {:?} after newer {:?}", key(&fr), n);
                        }
                        newest = Some(key(&fr));
                    }
                    Err(r) => {
                        prop_assert!(matches!(r, DropReason::Replay | DropReason::ClockSkew), "{r:?}");
                        prop_assert!(!(genuine_now && rx > changed_at + 2 * SKEW),
                                     "genuine frame {}ms after the last restart or clock step dropped: {r:?}", rx - changed_at);
                    }
                }
            }
        }
    }
}
