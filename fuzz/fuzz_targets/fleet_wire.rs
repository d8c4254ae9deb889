//! The binary fleet view (`gpuha_liveness::fleetwire`) as the filter reads it from dnsd and
//! from shared data: arbitrary bytes, and valid encodings of arbitrary views with bytes
//! flipped. Never a panic; what decodes re-encodes to the same view; a view encodes and
//! decodes back (its non-finite numbers absent, as in JSON); an update is all or nothing.
#![no_main]

use arbitrary::Arbitrary;
use gpuha_liveness::{fleetwire, FleetView, PoolView, WorkerView};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Worker {
    id: String,
    addr: String,
    pool: u8,
    models: Vec<u8>,
    adapters: Vec<u8>,
    age_ms: u64,
    flags: u8,
    boot: u64,
    metrics: [Option<f64>; 9],
}

#[derive(Arbitrary, Debug)]
struct Input {
    raw: Vec<u8>,
    now_ms: u64,
    workers: Vec<Worker>,
    pools: Vec<(u8, u32, u32, u32)>,
    flips: Vec<(u16, u8)>,
}

fn view_of(i: &Input) -> FleetView {
    let name = |p: &str, n: u8| format!("{p}{}", n % 5);
    let workers = i
        .workers
        .iter()
        .map(|w| {
            let m = w.metrics;
            WorkerView {
                id: w.id.clone(),
                pool: name("pool-", w.pool),
                models: w.models.iter().map(|n| name("model-", *n)).collect(),
                adapters: w.adapters.iter().map(|n| name("lora-", *n)).collect(),
                addr: w.addr.clone(),
                age_ms: w.age_ms,
                fresh: w.flags & 1 != 0,
                stalled: w.flags & 2 != 0,
                boot: w.boot,
                running: m[0],
                waiting: m[1],
                kv: m[2],
                ttft_ms: m[3],
                gen_tps: m[4],
                prompt_tps: m[5],
                preemptions: m[6],
                pace: m[7],
                slow: m[8],
                drained: w.flags & 4 != 0,
            }
        })
        .collect();
    let pools = i.pools.iter().map(|&(p, a, b, c)| PoolView { pool: name("pool-", p), workers: a as usize, fresh: b as usize, in_window: c as usize }).collect();
    FleetView { now_ms: i.now_ms, workers, pools }
}

/// `v` as it reads back: non-finite numbers absent.
fn finite(mut v: FleetView) -> FleetView {
    for w in &mut v.workers {
        for m in [&mut w.running, &mut w.waiting, &mut w.kv, &mut w.ttft_ms, &mut w.gen_tps, &mut w.prompt_tps, &mut w.preemptions, &mut w.pace, &mut w.slow] {
            *m = m.filter(|x| x.is_finite());
        }
    }
    v
}

/// Whatever decodes re-encodes to itself, and updates a view of the same identity to itself.
fn check_decoded(b: &[u8]) {
    if let Ok(v) = fleetwire::decode(b) {
        assert_eq!(fleetwire::decode(&fleetwire::encode(&v)).expect("a re-encoded view decodes"), v);
        let mut held = v.clone();
        fleetwire::update(&mut held, b).expect("bytes that decode update a view of their identity");
        assert_eq!(held, v);
    }
}

fuzz_target!(|i: Input| {
    check_decoded(&i.raw);
    let v = view_of(&i);
    let enc = fleetwire::encode(&v);
    let back = fleetwire::decode(&enc).expect("an encoded view decodes");
    assert_eq!(back, finite(v));
    let mut flipped = enc.clone();
    for (at, x) in &i.flips {
        let n = flipped.len();
        flipped[usize::from(*at) % n] ^= x;
    }
    check_decoded(&flipped);
    let mut held = back.clone();
    if fleetwire::update(&mut held, &flipped).is_err() {
        assert_eq!(held, back, "a refused update changed the view");
    }
});
