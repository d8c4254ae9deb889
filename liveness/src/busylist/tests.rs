use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::pick::LoadView;

const AGE: u64 = 600_000;

/// Envoy's shared data in memory: every write gets a new token; a write with a stale token fails.
#[derive(Debug, Default)]
struct Mem {
    data: HashMap<String, (Vec<u8>, u32)>,
    next: u32,
    gets: usize,
}

impl Store for Mem {
    fn get(&mut self, key: &str) -> Read {
        self.gets += 1;
        self.data.get(key).map_or((None, None), |(v, c)| (Some(v.clone()), Some(*c)))
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> SetResult {
        if let (Some(c), Some((_, cur))) = (cas, self.data.get(key)) {
            if c != *cur {
                return SetResult::CasMismatch;
            }
        }
        self.next += 1;
        self.data.insert(key.to_string(), (value.to_vec(), self.next));
        SetResult::Ok
    }
}

fn listed(m: &Mem) -> Vec<String> {
    m.data.get(BUSY_KEY).map(|(b, _)| decode_list(b).unwrap().into_iter().map(str::to_string).collect()).unwrap_or_default()
}

fn in_flight(m: &Mem, addr: &str, now: u64) -> u64 {
    m.data.get(&flight_key(addr)).map_or(0, |(b, _)| Flights::decode(b).total(now, AGE))
}

fn start(m: &mut Mem, addr: &str, now: u64) -> Done {
    let mut op = Start::new(addr, now, AGE, None, None);
    run(m, |s| op.step(s))
}

fn end(m: &mut Mem, addr: &str, started: u64, now: u64) -> Done {
    let mut op = End::new(addr, started, now, AGE);
    run(m, |s| op.step(s))
}

fn sweep(m: &mut Mem, now: u64) -> Option<usize> {
    let mut op = Sweep::new(now, AGE, 0);
    run(m, |s| op.step(s))
}

#[test]
fn a_start_lists_its_worker_and_the_sweep_drops_it_once_idle() {
    let mut m = Mem::default();
    assert_eq!(start(&mut m, "a:1", 10_000), Done::Ok);
    assert_eq!(listed(&m), ["a:1"]);
    assert!(slot_listed(m.data.get(&flight_key("a:1")).map(|v| v.0.as_slice())));
    // A second start on a listed slot writes only the slot.
    let before = m.data[BUSY_KEY].1;
    assert_eq!(start(&mut m, "a:1", 10_100), Done::Ok);
    assert_eq!(m.data[BUSY_KEY].1, before);
    assert_eq!(sweep(&mut m, 10_200), Some(1));
    assert_eq!(m.data[BUSY_KEY].1, before, "nothing to drop: no write");
    end(&mut m, "a:1", 10_000, 10_300);
    end(&mut m, "a:1", 10_100, 10_300);
    // The end keeps the byte; the sweep drops the worker and the byte.
    assert_eq!(listed(&m), ["a:1"]);
    assert_eq!(sweep(&mut m, 10_400), Some(0));
    assert!(listed(&m).is_empty());
    assert!(!slot_listed(m.data.get(&flight_key("a:1")).map(|v| v.0.as_slice())));
    // Listed again on the next start.
    start(&mut m, "a:1", 11_000);
    assert_eq!(listed(&m), ["a:1"]);
}

#[test]
fn a_missed_end_leaves_the_list_after_max_age() {
    let mut m = Mem::default();
    start(&mut m, "a:1", 10_000);
    start(&mut m, "b:2", 10_000);
    end(&mut m, "b:2", 10_000, 11_000);
    assert_eq!(sweep(&mut m, 12_000), Some(1));
    assert_eq!(listed(&m), ["a:1"]);
    // a:1's end never comes: its bucket expires, and so does its entry.
    assert_eq!(sweep(&mut m, 10_000 + AGE - 1_000), Some(1));
    assert_eq!(sweep(&mut m, 10_000 + AGE + BUCKET), Some(0));
    assert!(listed(&m).is_empty());
    assert_eq!(m.data[&flight_key("a:1")].0, b"");
}
const BUCKET: u64 = crate::inflight::BUCKET_MS;

#[test]
fn the_sweep_keeps_a_few_idle_workers_listed() {
    let mut m = Mem::default();
    for i in 0..12 {
        start(&mut m, &format!("w:{i}"), 10_000);
        end(&mut m, &format!("w:{i}"), 10_000, 10_500);
    }
    start(&mut m, "w:11", 10_600);
    let mut op = Sweep::new(11_000, AGE, IDLE_KEPT);
    assert_eq!(run(&mut m, |s| op.step(s)), Some(IDLE_KEPT + 1));
    let l = listed(&m);
    assert_eq!(l[..IDLE_KEPT], (0..IDLE_KEPT).map(|i| format!("w:{i}")).collect::<Vec<_>>()[..]);
    assert_eq!(l[IDLE_KEPT], "w:11");
    // A kept one's next start writes only its slot.
    let token = m.data[BUSY_KEY].1;
    start(&mut m, "w:0", 11_000);
    assert_eq!(m.data[BUSY_KEY].1, token);
}

#[test]
fn unreadable_list_reads_every_slot_and_is_rewritten_by_a_start() {
    let mut m = Mem::default();
    m.set(BUSY_KEY, &[0xff, 0xfe], None);
    start(&mut m, "a:1", 10_000);
    // The start lists it over the garbage; the garbage alone makes the load read every slot.
    assert_eq!(listed(&m), ["a:1"]);
    m.set(BUSY_KEY, &[0xff], None);
    let load = BusyLoad::new(&mut m, 10_000, AGE);
    for i in 0..10 {
        load.ours(&format!("x:{i}"), 10_000, 0.0);
    }
    assert_eq!(load.ours("a:1", 10_000, 0.0), 1.0);
    assert_eq!(load.slot_reads(), 11);
    // And a sweep leaves it alone.
    assert_eq!(sweep(&mut m, 10_000), None);
}

#[test]
fn start_heals_a_lost_entry() {
    let mut m = Mem::default();
    start(&mut m, "w:3", 10_000);
    // Two threads created the list at once: w:3's entry was overwritten.
    m.set(BUSY_KEY, b"w:5", None);
    let load = BusyLoad::new(&mut m, 10_000, AGE);
    let seen: f64 = (0..20).rev().map(|i| load.ours(&format!("w:{i}"), 10_000, 0.0)).sum();
    assert_eq!(seen, 0.0, "w:3's request is not seen until healed");
    assert_eq!(load.start("w:3"), Done::Ok);
    drop(load);
    assert_eq!(listed(&m), ["w:5", "w:3"]);
    assert_eq!(in_flight(&m, "w:3", 10_000), 2);
    // Without a list read the start trusts the slot's byte: one write.
    let token = m.data[BUSY_KEY].1;
    start(&mut m, "w:3", 10_000);
    assert_eq!(m.data[BUSY_KEY].1, token);
}

#[test]
fn a_pick_over_many_idle_workers_reads_only_the_listed_slots() {
    let mut m = Mem::default();
    start(&mut m, "w:7", 10_000);
    start(&mut m, "w:7", 10_000);
    start(&mut m, "w:90", 10_000);
    m.gets = 0;
    let load = BusyLoad::new(&mut m, 10_500, AGE);
    let total: f64 = (0..1_000).map(|i| load.ours(&format!("w:{i}"), 10_500, 0.0)).sum();
    assert_eq!(total, 3.0);
    // DIRECT_READS slots, the list, and w:7 and w:90.
    assert_eq!(load.slot_reads(), DIRECT_READS + 2);
    // The pick's start reuses its reads: one write for a listed worker.
    assert_eq!(load.start("w:7"), Done::Ok);
    drop(load);
    assert_eq!(m.gets, DIRECT_READS + 3);
    assert_eq!(in_flight(&m, "w:7", 10_500), 3);
}

/// One operation of a simulated Envoy thread.
#[derive(Debug, Clone)]
enum Op {
    Start(Start),
    End(End),
    Sweep(Sweep),
}

#[derive(Debug, Clone, Copy)]
enum Launch {
    /// Worker, whether the pick read the slot and the list first (at launch: they may be stale by
    /// its first step).
    Start(usize, bool),
    End(usize),
    Sweep,
}

fn launch_strategy() -> impl Strategy<Value = Launch> {
    prop_oneof![
        4 => (0usize..3, any::<bool>()).prop_map(|(w, r)| Launch::Start(w, r)),
        3 => (0usize..3).prop_map(Launch::End),
        2 => Just(Launch::Sweep),
    ]
}

proptest! {
    /// Threads racing starts, ends and sweeps, every interleaving of their store calls: whenever no
    /// start is under way on a worker, a worker with a request in flight is on the list; the
    /// counts are exact; and once everything ended, a sweep empties the list (a missed end only
    /// after max_age).
    #[test]
    fn racing_starts_ends_and_sweeps_keep_busy_workers_listed(
        launches in proptest::collection::vec((launch_strategy(), 0u8..4), 1..40),
        schedule in proptest::collection::vec(0usize..8, 0..400),
        lose_one_end in any::<bool>(), keep_idle in 0usize..2,
    ) {
        let addrs = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"];
        let mut m = Mem::default();
        // The keys exist (their first writes are unconditional: see `start_heals_a_lost_entry`).
        m.set(BUSY_KEY, b"", None);
        for a in addrs {
            m.set(&flight_key(a), b"", None);
        }
        let mut now = 100_000u64;
        // Requests in flight per worker (start times), as the threads know them.
        let mut live: Vec<Vec<u64>> = vec![Vec::new(); 3];
        let mut running: Vec<(usize, Op)> = Vec::new();
        let mut lost = [0u64; 3];
        let mut unlisted = [false; 3];
        let mut pending = launches.into_iter();
        // The schedule, then round robin until everything is launched and done.
        let mut sched = schedule.into_iter().chain(std::iter::repeat(1));
        loop {
            let p = sched.next().unwrap_or(1);
            if p == 0 || running.is_empty() {
                let Some((l, gap)) = pending.next() else {
                    if running.is_empty() { break; }
                    let i = p % running.len();
                    step_one(&mut m, &mut running, i, &mut lost, &mut unlisted, &mut live);
                    continue;
                };
                now += u64::from(gap) * 300;
                match l {
                    Launch::Start(w, read) => {
                        let pre = read.then(|| (m.get(&flight_key(addrs[w])), m.get(BUSY_KEY)));
                        let (slot, list) = pre.map_or((None, None), |(s, l)| (Some(s), Some(l)));
                        running.push((w, Op::Start(Start::new(addrs[w], now, AGE, slot, list))));
                    }
                    Launch::End(w) if !live[w].is_empty() => {
                        let s = live[w].remove(0);
                        running.push((w, Op::End(End::new(addrs[w], s, now, AGE))));
                    }
                    Launch::End(_) => {}
                    Launch::Sweep => running.push((usize::MAX, Op::Sweep(Sweep::new(now, AGE, keep_idle)))),
                }
            } else {
                let i = p % running.len();
                step_one(&mut m, &mut running, i, &mut lost, &mut unlisted, &mut live);
            }
            for (w, a) in addrs.iter().enumerate() {
                let starting = running.iter().any(|(x, op)| *x == w && matches!(op, Op::Start(_)));
                if !starting && !unlisted[w] && in_flight(&m, a, now) > 0 {
                    prop_assert!(listed(&m).iter().any(|x| x == a), "{} busy, not listed: {:?}", a, m.data);
                }
            }
        }
        for (w, a) in addrs.iter().enumerate() {
            let expect = live[w].len() as u64;
            let got = in_flight(&m, a, now);
            prop_assert!(got <= expect + lost[w] && got + lost[w] >= expect, "{}: {} in flight, {} counted", a, expect, got);
        }
        // Everything ends (one end may be missed): the next sweep lists only what is left.
        let mut missed = None;
        for (w, a) in addrs.iter().enumerate() {
            for s in std::mem::take(&mut live[w]) {
                if lose_one_end && missed.is_none() { missed = Some(w); continue; }
                end(&mut m, a, s, now);
            }
        }
        sweep(&mut m, now);
        let left: Vec<String> = listed(&m);
        prop_assert!(left.len() <= usize::from(missed.is_some()) + lost.iter().filter(|n| **n > 0).count(), "{:?}", left);
        sweep(&mut m, now + AGE + BUCKET);
        prop_assert!(listed(&m).is_empty());
    }

    /// With any history behind it, the busy list gives a pick the loads every slot gives,
    /// whatever order the pick asks in.
    #[test]
    fn busy_load_reads_what_the_slots_hold(
        starts in proptest::collection::vec((0usize..30, 0u64..5_000), 0..60),
        ends in proptest::collection::vec(any::<bool>(), 60),
        sweeps in 0usize..3,
        order in Just((0..30).collect::<Vec<usize>>()).prop_shuffle(),
        frame_load in 0.0f64..3.0,
    ) {
        let addr = |i: usize| format!("10.1.0.{i}:8000");
        let mut m = Mem::default();
        let base = 50_000u64;
        for (i, (w, t)) in starts.iter().enumerate() {
            start(&mut m, &addr(*w), base + t);
            if ends[i] {
                end(&mut m, &addr(*w), base + t, base + 5_000);
            }
            if i % 20 == 0 && sweeps > 0 {
                sweep(&mut m, base + 5_000);
            }
        }
        let now = base + 6_000;
        let load = BusyLoad::new(&mut m, now, AGE);
        let got: Vec<f64> = order.iter().map(|i| load.ours(&addr(*i), base + 4_000, frame_load)).collect();
        drop(load);
        for (i, g) in order.iter().zip(got) {
            let truth = m.data.get(&flight_key(&addr(*i))).map_or(0.0, |(b, _)| Flights::decode(b).estimate(now, AGE, base + 4_000, frame_load));
            prop_assert_eq!(g, truth);
        }
    }
}

/// One store call of the `i`-th running operation. A request can end only once its start is
/// done (`live`: its start time).
fn step_one(m: &mut Mem, running: &mut Vec<(usize, Op)>, i: usize, lost: &mut [u64; 3], unlisted: &mut [bool; 3], live: &mut [Vec<u64>]) {
    let (w, op) = &mut running[i];
    let done = match op {
        Op::Start(s) => s.step(m).map(|d| {
            live[*w].push(s.now_ms);
            match d {
                Done::SlotLost => lost[*w] += 1,
                Done::Unlisted | Done::ListLost => unlisted[*w] = true,
                Done::Ok => {}
            }
        }),
        Op::End(e) => e.step(m).map(|d| {
            if d == Done::SlotLost {
                lost[*w] += 1;
            }
        }),
        Op::Sweep(s) => s.step(m).map(|_| ()),
    };
    if done.is_some() {
        running.remove(i);
    }
}

/// Every slot read directly: the load a pick had before the list.
struct Direct(HashMap<String, Flights>, u64);

impl LoadView for Direct {
    fn ours(&self, addr: &str, frame_local_ms: u64, frame_load: f64) -> f64 {
        self.0.get(&flight_key(addr)).map_or(0.0, |f| f.estimate(self.1, AGE, frame_local_ms, frame_load))
    }
}

fn worker(i: usize, ttft: f64, waiting: f64) -> crate::fleet::WorkerView {
    crate::fleet::WorkerView {
        id: format!("w{i}"),
        pool: "p1".into(),
        models: vec!["tiny".into()],
        adapters: vec![],
        addr: format!("10.2.{}.{}:8000", i / 200, i % 200),
        age_ms: 100,
        fresh: true,
        stalled: false,
        pace: None,
        slow: None,
        drained: false,
        boot: 1,
        running: Some(0.0),
        waiting: Some(waiting),
        kv: Some(0.1),
        ttft_ms: Some(ttft),
        gen_tps: None,
        prompt_tps: None,
        preemptions: None,
    }
}

proptest! {
    /// A pick through the busy list gives the answer of a pick that reads every slot (same
    /// endpoints, same random draws, same affinity outcome), on fleets whose near-best band is
    /// wide, after any history of starts, ends and sweeps.
    #[test]
    fn picks_through_the_list_equal_picks_reading_every_slot(
        ws in proptest::collection::vec((0u8..3, 0u8..2), 1..80),
        starts in proptest::collection::vec((0usize..80, 0u64..4_000), 0..50),
        ends in proptest::collection::vec(any::<bool>(), 50),
        sweep_every in 1usize..20,
        seed: u64, max_endpoints in 1usize..5, key in proptest::option::of(any::<u64>()),
    ) {
        use crate::pick::{pick_ranked, PickConfig, Ranked, Rng};
        let workers: Vec<_> = ws.iter().enumerate().map(|(i, (t, q))| worker(i, [100.0, 100.0, 150.0][*t as usize], f64::from(*q))).collect();
        let view = crate::fleet::FleetView { now_ms: 1_800_000_000_000, workers, pools: vec![] };
        let cfg = PickConfig { max_endpoints, ..PickConfig::default() };
        let base = 1_000_000u64;
        let mut m = Mem::default();
        for (i, (w, t)) in starts.iter().enumerate() {
            let addr = &view.workers[w % view.workers.len()].addr;
            start(&mut m, addr, base + t);
            if ends[i] {
                end(&mut m, addr, base + t, base + 4_000);
            }
            if i % sweep_every == 0 {
                sweep(&mut m, base + 4_000);
            }
        }
        let now = base + 5_000;
        let direct = Direct(m.data.iter().map(|(k, (b, _))| (k.clone(), Flights::decode(b))).collect(), now);
        let ranked = Ranked::build(&view, &cfg);
        let want = key.map(crate::affinity::Want::new);
        let adm = |_: &str| crate::breaker::Admission::Allow;
        let expect = pick_ranked(&ranked, &view, now - 200, now, Some("tiny"), want, &direct, &mut Rng::new(seed), &cfg, &[], adm, |_| false);
        let busy = BusyLoad::new(&mut m, now, AGE);
        let got = pick_ranked(&ranked, &view, now - 200, now, Some("tiny"), want, &busy, &mut Rng::new(seed), &cfg, &[], adm, |_| false);
        prop_assert_eq!(expect, got);
        prop_assert!(busy.slot_reads() <= DIRECT_READS + starts.len());
    }
}
