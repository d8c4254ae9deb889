impl FleetState {
    /// The oracle of [`FleetState::pool_outlook`]: whether `pool` may be answered: alive with `min_workers` (each heard from within the
    /// window, and sending for the failback hold-down), or still in cold start.
    fn pool_liveness(&self, pool: &str, min_workers: usize, now_ms: u64) -> Liveness {
        let counted = self.workers.values().filter(|w| w.frame.pool_id == pool && w.counts_for_pool(now_ms)).count();
        if counted >= min_workers.max(1) {
            Liveness::Alive
        } else if now_ms.saturating_sub(self.started_ms) < EVICTION_WINDOW_MS {
            Liveness::ColdStart
        } else {
            Liveness::Dead
        }
    }
}

use super::*;
use crate::frame::tests::sample;
use proptest::prelude::*;

const T0: u64 = 1_800_000_000_000;

fn frame(worker: &str, pool: &str, boot: u64, seq: u64, sent: u64) -> Frame {
    let mut f = sample();
    f.worker_id = worker.into();
    f.pool_id = pool.into();
    f.boot_id = boot;
    f.seq = seq;
    f.sent_ms = sent;
    // A busy engine that makes progress: one step per frame.
    f.metrics.engine_steps = Some(seq as f64);
    f
}

/// A frame of a hung engine: busy, its counters frozen at `steps`.
fn hung(worker: &str, pool: &str, seq: u64, sent: u64, steps: f64) -> Frame {
    let mut f = frame(worker, pool, 1, seq, sent);
    f.metrics.engine_steps = Some(steps);
    f
}

#[test]
fn evidence_rules() {
    use Evidence::{Frozen, Idle, Moved, Unjudged};
    let busy = sample().metrics;
    let step = Metrics { engine_steps: busy.engine_steps.map(|s| s + 1.0), ..busy };
    assert_eq!(evidence(&busy, &busy), Frozen, "busy, nothing advanced: no progress");
    assert_eq!(evidence(&busy, &step), Moved, "an engine step is progress (a chunked prefill)");
    let tok = Metrics { generation_tokens: busy.generation_tokens.map(|g| g + 1.0), ..busy };
    assert_eq!(evidence(&busy, &tok), Moved);
    // A long chunked prefill: vLLM's steps and tokens stay put, its KV-cache usage grows.
    let chunk = Metrics { kv_usage: busy.kv_usage.map(|k| k + 0.01), ..busy };
    assert_eq!(evidence(&busy, &chunk), Moved);
    let admitted = Metrics { waiting: Some(0.0), running: busy.running.map(|r| r + 1.0), ..busy };
    assert_eq!(evidence(&busy, &admitted), Moved, "the scheduler moved a request");
    let idle = Metrics { running: Some(0.0), waiting: Some(0.0), ..busy };
    assert_eq!((evidence(&busy, &idle), evidence(&idle, &idle)), (Idle, Idle), "an idle engine is never stalled");
    let blind = Metrics { running: Some(1.0), waiting: None, engine_steps: None, generation_tokens: None, prompt_tokens: None, kv_usage: None, preemptions: None, ..busy };
    assert_eq!(evidence(&blind, &blind), Unjudged, "no counters: nothing to judge by, every frame counts");
    let reset = Metrics { engine_steps: Some(0.0), ..busy };
    assert_eq!(evidence(&busy, &reset), Moved, "a counter reset is a change");
}

/// Exactly one condition at a time: alive while fresh, stalled while frames come without
/// progress, and still stalled once they stop too when they came frozen for longer than the
/// gate (no sign of life since); silent when frames stop within the gate of the last sign of
/// life. The gauges and alerts rest on this.
#[test]
fn condition_is_alive_then_stalled_then_silent() {
    // Frozen frames until `last` after the last sign of life at T0, then none.
    let run = |last: u64| {
        let mut fleet = FleetState::new(T0 - 60_000);
        fleet.observe(frame("w1", "p", 1, 1, T0), T0);
        for i in 1..=last / 500 {
            fleet.observe(hung("w1", "p", 1 + i, T0 + i * 500, 1.0), T0 + i * 500);
        }
        fleet.worker("w1").unwrap().clone()
    };
    let w = run(5_000);
    assert_eq!(w.condition(T0 + 3_000), Condition::Alive);
    assert_eq!(w.condition(T0 + 3_001), Condition::Stalled);
    assert_eq!((w.since_frame_ms(T0 + 6_000), w.age_ms(T0 + 6_000)), (1_000, 6_000));
    // The last frame came at T0 + 5 s, frozen for 5 s: hung, whether its frames come or not.
    assert_eq!((w.condition(T0 + 8_001), w.condition(T0 + 60_000)), (Condition::Stalled, Condition::Stalled));
    // Frozen frames for 2.5 s, then silence: stalled only while its last frame is within the gate.
    let short = run(2_500);
    assert_eq!(short.condition(T0 + 5_500), Condition::Stalled);
    assert_eq!(short.condition(T0 + 5_501), Condition::Silent);
    // Exactly the gate is not past it; one more frozen frame is.
    assert_eq!(run(3_000).condition(T0 + 6_001), Condition::Silent);
    assert_eq!(run(3_500).condition(T0 + 6_501), Condition::Stalled);
    for w in [w, short] {
        for t in (T0..T0 + 20_000).step_by(250) {
            let c = w.condition(t);
            assert_eq!(c == Condition::Alive, w.is_fresh(t));
            assert_eq!(c == Condition::Stalled, w.is_stalled(t));
        }
    }
}

/// A live engine whose telemetry comes in bursts seconds apart (a busy host's `/metrics`): each
/// frame's counters moved across a silence past the gate, so its sure age counts from the frame
/// before (never fresh), but moving counters are not a hang: never stalled. A frozen frame after
/// such a frame is (a hang behind quiet telemetry, seen one frame later).
#[test]
fn telemetry_in_bursts_is_never_a_stall() {
    let mut fleet = FleetState::new(T0 - 60_000);
    for i in 0..20u64 {
        let t = T0 + i * 4_000;
        fleet.observe(frame("w1", "p", 1, 1 + i, t), t);
        let w = fleet.worker("w1").unwrap();
        for dt in (0..4_000).step_by(100) {
            assert!(!w.is_stalled(t + dt), "frame {i} + {dt} ms: moving counters called stalled");
        }
        if i > 0 {
            assert_eq!(w.condition(t), Condition::Silent);
            assert!(!fleet.view(t).workers[0].stalled);
        }
    }
    // Frames milliseconds apart with the same numbers (overlapping scrapes answered together):
    // one snapshot, not a freeze; frozen over most of a scrape interval, a stall.
    let t = T0 + 80_000;
    let mut dup = fleet.clone();
    dup.observe(frame("w1", "p", 1, 21, t), t);
    dup.observe(hung("w1", "p", 22, t + 5, 21.0), t + 5);
    dup.observe(hung("w1", "p", 23, t + 9, 21.0), t + 9);
    let w = dup.worker("w1").unwrap();
    assert_eq!(w.age_ms(t + 9), 4_009, "dated at the frame before the silence");
    assert!(!w.is_stalled(t + 9) && !w.is_stalled(t + 3_000));
    dup.observe(hung("w1", "p", 24, t + 450, 21.0), t + 450);
    let w = dup.worker("w1").unwrap();
    assert!(w.is_stalled(t + 450) && !w.is_stalled(t + 3_451), "frozen 450 ms: stalled while its frames come");
    // The same numbers 4 s after the frame before: no sign of life for 8 s now, and none since.
    fleet.observe(hung("w1", "p", 40, t, 20.0), t);
    let w = fleet.worker("w1").unwrap();
    assert_eq!(w.age_ms(t), 8_000);
    assert!(w.is_stalled(t) && w.is_stalled(t + 3_001) && w.is_stalled(t + 30_000));
}

/// A hang with `/metrics` still answering: frames keep coming with frozen counters. The
/// worker leaves the picker after the 3 s gate and its pool's count after the 10 s window,
/// exactly like a silent one; progress brings it back (after the failback hold-down).
#[test]
fn a_hung_engine_ages_like_a_silent_one() {
    let mut fleet = FleetState::new(T0 - 60_000);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    // Hung from T0: frames every 500 ms, counters frozen.
    for i in 1..=30u64 {
        fleet.observe(hung("w1", "p", 1 + i, T0 + i * 500, 1.0), T0 + i * 500);
    }
    let w = fleet.worker("w1").unwrap();
    assert!(w.is_fresh(T0 + 3_000) && !w.is_fresh(T0 + 3_001));
    assert!(w.is_stalled(T0 + 3_001) && w.is_stalled(T0 + 15_000));
    let pools = [("p", 1usize)];
    assert_eq!(fleet.pool_outlook(&pools, T0 + 10_000).states, vec![Liveness::Alive]);
    assert_eq!(fleet.pool_outlook(&pools, T0 + 10_001).states, vec![Liveness::Dead]);
    let v = fleet.view(T0 + 4_000);
    assert!(v.workers[0].stalled && !v.workers[0].fresh);
    // It makes progress again: fresh at once, counted after the hold-down.
    fleet.observe(frame("w1", "p", 1, 40, T0 + 16_000), T0 + 16_000);
    let w = fleet.worker("w1").unwrap();
    assert!(w.is_fresh(T0 + 16_000) && !w.is_stalled(T0 + 16_000));
    assert_eq!(fleet.pool_outlook(&pools, T0 + 16_500).states, vec![Liveness::Dead]);
    assert_eq!(fleet.pool_outlook(&pools, T0 + 17_000).states, vec![Liveness::Alive]);
    // An idle worker with frozen counters is alive.
    let mut idle = hung("w2", "p", 1, T0, 5.0);
    idle.metrics.running = Some(0.0);
    idle.metrics.waiting = Some(0.0);
    let mut f2 = FleetState::new(T0);
    for i in 0..30u64 {
        let mut f = idle.clone();
        f.seq = 1 + i;
        f.sent_ms = T0 + i * 500;
        f2.observe(f, T0 + i * 500);
    }
    assert!(f2.worker("w2").unwrap().is_fresh(T0 + 14_500));
}

fn busy_view(id: &str, pool: &str, running: f64, gen_tps: f64) -> WorkerView {
    WorkerView { id: id.into(), pool: pool.into(), models: vec![], adapters: vec![], addr: String::new(), age_ms: 500, fresh: true, stalled: false, boot: 1, running: Some(running), waiting: None, kv: None, ttft_ms: None, gen_tps: Some(gen_tps), prompt_tps: None, preemptions: None, pace: Some(gen_tps / running.max(1.0)), slow: None, drained: false }
}

/// The quadratic definition [`mark_slow_workers`] must agree with: each worker against the
/// median of every other paced worker of its pool.
fn mark_slow_workers_oracle(workers: &mut [WorkerView]) {
    let pace = |w: &WorkerView| -> Option<f64> {
        w.running.filter(|r| r.is_finite() && *r >= 1.0)?;
        let p = w.pace.filter(|p| p.is_finite() && *p >= 0.0)?;
        w.fresh.then_some(p)
    };
    let paces: Vec<(usize, String, f64)> = workers.iter().enumerate().filter_map(|(i, w)| pace(w).map(|p| (i, w.pool.clone(), p))).collect();
    for (i, pool, mine) in &paces {
        let mut peers: Vec<f64> = paces.iter().filter(|(j, p, _)| j != i && p == pool).map(|(_, _, x)| *x).collect();
        if peers.is_empty() {
            continue;
        }
        peers.sort_by(f64::total_cmp);
        let mid = peers.len() / 2;
        let median = if peers.len().is_multiple_of(2) { (peers[mid - 1] + peers[mid]) / 2.0 } else { peers[mid] };
        if median > 0.0 && *mine < median * GRAY_PACE_RATIO {
            let f = if *mine > 0.0 { (median / mine).min(GRAY_MAX_PENALTY) } else { GRAY_MAX_PENALTY };
            workers[*i].slow = Some((f * 10.0).round() / 10.0);
        }
    }
}

#[test]
fn gray_failures_are_judged_against_peers() {
    // w3 decodes at a fifth of its peers' pace (per running sequence).
    let mut v = vec![busy_view("w1", "p", 4.0, 400.0), busy_view("w2", "p", 2.0, 200.0), busy_view("w3", "p", 4.0, 80.0), busy_view("x1", "q", 1.0, 5.0)];
    mark_slow_workers(&mut v);
    assert_eq!(v.iter().map(|w| w.slow).collect::<Vec<_>>(), vec![None, None, Some(5.0), None], "x1 has no peer: never judged");
    // A fleet-wide slowdown changes nothing.
    let mut all = vec![busy_view("w1", "p", 4.0, 40.0), busy_view("w2", "p", 4.0, 42.0), busy_view("w3", "p", 4.0, 38.0)];
    mark_slow_workers(&mut all);
    assert!(all.iter().all(|w| w.slow.is_none()));
    // Idle or stale workers are not compared; a stopped decoder gets the cap.
    let mut v = vec![busy_view("w1", "p", 1.0, 0.0), busy_view("w2", "p", 2.0, 100.0), busy_view("w3", "p", 2.0, 0.0)];
    v[0].fresh = false;
    mark_slow_workers(&mut v);
    assert_eq!(v.iter().map(|w| w.slow).collect::<Vec<_>>(), vec![None, None, Some(GRAY_MAX_PENALTY)]);
}

#[test]
fn freshness_gate_is_three_seconds() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    let w = fleet.worker("w1").unwrap();
    assert!(w.is_fresh(T0 + 3_000));
    assert!(!w.is_fresh(T0 + 3_001));
}

#[test]
fn pool_dies_after_window_and_comes_back() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    fleet.observe(frame("w2", "p", 1, 1, T0), T0);
    assert_eq!(fleet.pool_liveness("p", 2, T0 + 10_000), Liveness::Alive);
    assert_eq!(fleet.pool_liveness("p", 2, T0 + 10_001), Liveness::Dead);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 10_001), Liveness::Dead);
    // Back from silence: held down for one second, then answered again (failback).
    fleet.observe(frame("w1", "p", 1, 2, T0 + 20_000), T0 + 20_000);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 20_000), Liveness::Dead);
    fleet.observe(frame("w1", "p", 1, 3, T0 + 20_500), T0 + 20_500);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 20_999), Liveness::Dead);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 21_000), Liveness::Alive);
    assert_eq!(fleet.pool_liveness("p", 2, T0 + 21_000), Liveness::Dead);
}

#[test]
fn sidecar_restart_without_silence_is_not_held_down() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    fleet.observe(frame("w1", "p", 2, 1, T0 + 5_000), T0 + 5_000);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 5_000), Liveness::Alive);
    fleet.observe(frame("w1", "p", 3, 1, T0 + 30_000), T0 + 30_000);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 30_000), Liveness::Dead);
}

#[test]
fn cold_start_is_not_death() {
    let fleet = FleetState::new(T0);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 9_999), Liveness::ColdStart);
    assert_eq!(fleet.pool_liveness("p", 1, T0 + 10_000), Liveness::Dead);
}

#[test]
fn derived_values_from_deltas_and_reset_on_restart() {
    let mut fleet = FleetState::new(T0);
    let mut a = frame("w1", "p", 1, 1, T0);
    a.metrics.ttft_sum_s = Some(1.0);
    a.metrics.ttft_count = Some(10.0);
    a.metrics.generation_tokens = Some(100.0);
    fleet.observe(a.clone(), T0);
    let mut b = frame("w1", "p", 1, 2, T0 + 500);
    b.metrics.ttft_sum_s = Some(1.4);
    b.metrics.ttft_count = Some(12.0);
    b.metrics.generation_tokens = Some(150.0);
    fleet.observe(b.clone(), T0 + 500);
    let d = fleet.worker("w1").unwrap().derived;
    assert!((d.ttft_recent_ms.unwrap() - 200.0).abs() < 1e-9);
    assert!((d.gen_tps.unwrap() - 100.0).abs() < 1e-9);
    // No new first tokens: keeps the last known TTFT.
    let mut c = b.clone();
    c.seq = 3;
    c.sent_ms = T0 + 1_000;
    fleet.observe(c, T0 + 1_000);
    assert!((fleet.worker("w1").unwrap().derived.ttft_recent_ms.unwrap() - 200.0).abs() < 1e-9);
    // Restart: derived values start over.
    let r = frame("w1", "p", 2, 1, T0 + 1_500);
    fleet.observe(r, T0 + 1_500);
    assert_eq!(fleet.worker("w1").unwrap().derived, Derived::default());
}

#[test]
fn counter_reset_gives_no_rate() {
    let mut fleet = FleetState::new(T0);
    let mut a = frame("w1", "p", 1, 1, T0);
    a.metrics.generation_tokens = Some(100.0);
    fleet.observe(a, T0);
    let mut b = frame("w1", "p", 1, 2, T0 + 500);
    b.metrics.generation_tokens = Some(10.0);
    fleet.observe(b, T0 + 500);
    assert_eq!(fleet.worker("w1").unwrap().derived.gen_tps, None);
}

#[test]
fn view_round_trips_through_json() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w2", "p", 1, 1, T0), T0);
    fleet.observe(frame("w1", "q", 1, 1, T0), T0 + 100);
    let v = fleet.view(T0 + 3_050);
    assert_eq!(v.workers[0].id, "w1");
    assert!(v.workers[0].fresh);
    assert!(!v.workers[1].fresh);
    assert_eq!(v.workers[1].age_ms, 3_050);
    assert_eq!(v.pools.len(), 2);
    assert_eq!((v.pools[0].pool.as_str(), v.pools[0].fresh, v.pools[0].in_window), ("p", 0, 1));
    assert_eq!(FleetView::from_json(v.to_json().as_bytes()).unwrap(), v);
}

/// A worker's loaded adapters reach the view from its last frame; a worker with none has no
/// `adapters` key at all (the view stays compact), and a view without the key reads back.
#[test]
fn adapters_are_in_the_view_only_when_there_are_some() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    let mut bare = frame("w2", "p", 1, 1, T0);
    bare.adapters.clear();
    fleet.observe(bare, T0);
    let v = fleet.view(T0 + 10);
    assert_eq!(v.workers[0].adapters, vec!["adapter-a".to_string(), "sql-lora".to_string()]);
    assert!(v.workers[1].adapters.is_empty());
    let json = v.to_json();
    assert_eq!(json.matches("\"adapters\"").count(), 1, "{json}");
    assert_eq!(FleetView::from_json(json.as_bytes()).unwrap(), v);
}

#[test]
fn bounded_view_is_stable_while_workers_keep_sending_and_changes_at_the_gate() {
    let mut fleet = FleetState::new(T0);
    let all: Vec<String> = vec![];
    for (i, t) in [0u64, 500, 1_000, 1_500].iter().enumerate() {
        fleet.observe(frame("w1", "p", 1, i as u64 + 1, T0 + t), T0 + t);
        fleet.observe(frame("w2", "q", 1, i as u64 + 1, T0 + t), T0 + t);
    }
    let v0 = fleet.view_of(T0 + 1_600, &all, Ages::Bounded);
    assert_eq!(v0.now_ms, 0);
    assert!(v0.workers.iter().all(|w| w.age_ms == VIEW_AGE_FLOOR_MS && w.fresh));
    // Same frames (numbers unchanged), later instants: the same view.
    let mut f2 = fleet.clone();
    f2.observe(frame("w1", "p", 1, 5, T0 + 2_000), T0 + 2_000);
    f2.observe(frame("w2", "q", 1, 5, T0 + 2_000), T0 + 2_000);
    assert_eq!(f2.view_of(T0 + 2_400, &all, Ages::Bounded), v0);
    assert_eq!(fleet.view_of(T0 + 2_499, &all, Ages::Bounded), v0);
    // Late (over a second): the exact age shows.
    assert_eq!(fleet.view_of(T0 + 2_700, &all, Ages::Bounded).workers[0].age_ms, 1_200);
    // At the gate still fresh and exact, past it stale and no longer changing.
    let at_gate = fleet.view_of(T0 + 4_500, &all, Ages::Bounded);
    assert_eq!((at_gate.workers[0].age_ms, at_gate.workers[0].fresh), (3_000, true));
    let past = fleet.view_of(T0 + 4_501, &all, Ages::Bounded);
    assert_eq!((past.workers[0].age_ms, past.workers[0].fresh), (VIEW_AGE_STALE_MS, false));
    assert_eq!(fleet.view_of(T0 + 6_499, &all, Ages::Bounded).workers, past.workers);
    // Further past it, a few steps: how long it has shown no sign of life, never overstated,
    // and the pool window (10 s) exact.
    let age_at = |t: u64| fleet.view_of(t, &all, Ages::Bounded).workers[0].age_ms;
    assert_eq!([age_at(T0 + 6_500), age_at(T0 + 11_500), age_at(T0 + 11_501), age_at(T0 + 16_499), age_at(T0 + 16_500)], [5_000, 5_000, 10_001, 10_001, 15_000]);
    let window = |t: u64| fleet.view_of(t, &all, Ages::Bounded).pools.iter().map(|p| p.in_window).sum::<usize>();
    assert_eq!((window(T0 + 11_500), window(T0 + 11_501)), (2, 0), "both leave the window 10 s after their last frame");
    // The exact form is unchanged.
    assert_eq!(fleet.view(T0 + 2_700).workers[0].age_ms, 1_200);
    assert_eq!(fleet.view(T0 + 2_700).now_ms, T0 + 2_700);
}

#[test]
fn view_of_pools_holds_only_their_workers() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    fleet.observe(frame("w2", "q", 1, 1, T0), T0);
    fleet.observe(frame("w3", "r", 1, 1, T0), T0);
    let v = fleet.view_of(T0, &["r".to_string(), "p".to_string()], Ages::Exact);
    assert_eq!(v.workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["w1", "w3"]);
    assert_eq!(v.pools.iter().map(|p| p.pool.as_str()).collect::<Vec<_>>(), ["p", "r"]);
    assert!(fleet.view_of(T0, &["zzz".to_string()], Ages::Bounded).workers.is_empty());
}

#[test]
fn forget_silent_drops_old_workers() {
    let mut fleet = FleetState::new(T0);
    fleet.observe(frame("w1", "p", 1, 1, T0), T0);
    fleet.observe(frame("w2", "p", 1, 1, T0 + 50_000), T0 + 50_000);
    assert_eq!(fleet.forget_silent(T0 + 60_001, 60_000), 1);
    assert!(fleet.worker("w1").is_none());
    // A hung engine that keeps sending is stalled, never forgotten (and so never new again).
    let mut f = FleetState::new(T0);
    for i in 0..=200u64 {
        f.observe(hung("w3", "p", i + 1, T0 + i * 500, 1.0), T0 + i * 500);
    }
    assert_eq!(f.forget_silent(T0 + 100_000, 60_000), 0);
    assert!(f.worker("w3").unwrap().is_stalled(T0 + 100_000));
}

/// Counters that moved across a silence past the gate moved at an unknown instant after the
/// frame before it: the worker's sure age counts from that frame (not fresh, and not stalled:
/// they moved; stalled once a frame comes frozen), its pool's window from the new frame's arrival; its next frame that moves
/// makes it fresh. Idle, or a silence within the gate: dated at arrival.
#[test]
fn counters_moved_across_a_silence_date_life_at_the_frame_before() {
    let mut fleet = FleetState::new(T0 - 60_000);
    for i in 0..3u64 {
        fleet.observe(frame("w1", "p", 1, 1 + i, T0 + i * 500), T0 + i * 500);
    }
    // Quiet from T0 + 1 s (its sidecar stopped, or `/metrics` unanswered); back at T0 + 9 s
    // with the steps its engine made before it hung.
    fleet.observe(frame("w1", "p", 1, 4, T0 + 9_000), T0 + 9_000);
    let w = fleet.worker("w1").unwrap();
    assert_eq!((w.age_ms(T0 + 9_000), w.since_frame_ms(T0 + 9_000)), (8_000, 0));
    assert!(!w.is_fresh(T0 + 9_000) && !w.is_stalled(T0 + 9_000), "moving counters are not a stall");
    assert!(w.is_in_window(T0 + 19_000) && !w.is_in_window(T0 + 19_001), "the window counts from the frame's arrival");
    let pools = [("p", 1usize)];
    assert_eq!(fleet.pool_outlook(&pools, T0 + 18_000).states, vec![Liveness::Alive]);
    let v = fleet.view(T0 + 9_000);
    assert!(!v.workers[0].stalled && !v.workers[0].fresh && v.workers[0].age_ms == 8_000);
    assert_eq!((v.pools[0].fresh, v.pools[0].in_window), (0, 1));
    let b = fleet.view_of(T0 + 12_000, &[], Ages::Bounded);
    assert_eq!((b.workers[0].age_ms, b.pools[0].in_window), (EVICTION_WINDOW_MS + 1, 1), "bounded ages: in window by arrival");
    // Frozen after that (a hang): still no life since T0 + 1 s, stalled from this frame.
    fleet.observe(hung("w1", "p", 5, T0 + 9_500, 4.0), T0 + 9_500);
    assert_eq!(fleet.worker("w1").unwrap().age_ms(T0 + 9_500), 8_500);
    assert!(fleet.worker("w1").unwrap().is_stalled(T0 + 9_500) && fleet.view(T0 + 9_500).workers[0].stalled);
    // It moves again in the next frame (a live engine): fresh at once.
    fleet.observe(frame("w1", "p", 1, 6, T0 + 10_000), T0 + 10_000);
    assert!(fleet.worker("w1").unwrap().is_fresh(T0 + 10_000));
    // Back after a silence idle, or within the gate: alive at arrival.
    let mut idle = frame("w1", "p", 1, 7, T0 + 20_000);
    idle.metrics.running = Some(0.0);
    idle.metrics.waiting = Some(0.0);
    fleet.observe(idle, T0 + 20_000);
    assert!(fleet.worker("w1").unwrap().is_fresh(T0 + 20_000));
    fleet.observe(frame("w1", "p", 1, 8, T0 + 23_000), T0 + 23_000);
    assert_eq!(fleet.worker("w1").unwrap().age_ms(T0 + 23_000), 0, "3 s without a frame is within the gate");
    assert_eq!(life_ms(T0, T0 - 5_000, T0 + 3_001, true), T0);
    assert_eq!(life_ms(T0, T0 - 5_000, T0 + 3_001, false), T0 + 3_001);
    assert_eq!(life_ms(T0, T0, T0 + 3_000, true), T0 + 3_000);
}

proptest! {
    /// The sorted, per-pool median agrees with the definition, duplicates and all.
    #[test]
    fn slow_workers_match_the_definition(ws in proptest::collection::vec((0u8..3, 0u8..12, prop::bool::weighted(0.9), 0u8..3), 0..24)) {
        let mut v: Vec<WorkerView> = ws
            .iter()
            .enumerate()
            .map(|(i, (pool, pace, fresh, running))| {
                let mut w = busy_view(&format!("w{i}"), &format!("p{pool}"), f64::from(*running), 0.0);
                w.pace = Some(f64::from(*pace) * 5.0);
                w.fresh = *fresh;
                w
            })
            .collect();
        let mut oracle = v.clone();
        mark_slow_workers(&mut v);
        mark_slow_workers_oracle(&mut oracle);
        prop_assert_eq!(v, oracle);
    }

    /// Whatever frames arrive when, a pool is alive exactly when enough of its workers were
    /// heard from within the window and have been sending for the hold-down (outside cold
    /// start), and fresh implies in-window.
    #[test]
    fn liveness_matches_definition(events in proptest::collection::vec((0u8..4, 0u64..30_000), 1..40),
                                   min in 1usize..3, probe in 0u64..45_000) {
        let mut fleet = FleetState::new(T0);
        let mut evs = events.clone();
        evs.sort_by_key(|e| e.1);
        // Model: per worker, (last frame, start of the current run of frames).
        let mut last: HashMap<u8, (u64, u64)> = HashMap::new();
        for (seq, (w, t)) in evs.iter().enumerate() {
            fleet.observe(frame(&format!("w{w}"), "p", 1, seq as u64 + 1, T0 + t), T0 + t);
            let streak = match last.get(w) {
                Some((l, s)) if t - l <= EVICTION_WINDOW_MS => *s,
                _ => *t,
            };
            last.insert(*w, (*t, streak));
        }
        let now = T0 + evs.last().unwrap().1 + probe;
        let counted = last
            .values()
            .filter(|(t, s)| now - (T0 + *t) <= EVICTION_WINDOW_MS && now - (T0 + *s) >= FAILBACK_HOLD_DOWN_MS)
            .count();
        let l = fleet.pool_liveness("p", min, now);
        prop_assert_eq!(l == Liveness::Alive, counted >= min);
        for w in fleet.workers() {
            prop_assert!(!w.is_fresh(now) || w.is_in_window(now));
        }
    }

    /// A reader that adds its own elapsed time `e` to a bounded age makes the same gate
    /// decision as with the exact age, for every `e` below `gate - VIEW_AGE_FLOOR_MS`; and a
    /// bounded age is never below the exact age of a fresh worker.
    #[test]
    fn bounded_ages_keep_gate_decisions(age in 0u64..20_000, e in 0u64..(FRESHNESS_GATE_MS - VIEW_AGE_FLOOR_MS)) {
        let b = bounded_age_ms(age);
        prop_assert_eq!(b + e < FRESHNESS_GATE_MS, age + e < FRESHNESS_GATE_MS);
        prop_assert_eq!(b + e <= FRESHNESS_GATE_MS, age + e <= FRESHNESS_GATE_MS);
        if age <= FRESHNESS_GATE_MS {
            prop_assert!(b >= age);
        } else {
            // Past the gate: a lower bound (what a reader may count as time without life),
            // and on the same side of the pool window.
            prop_assert!(b > FRESHNESS_GATE_MS && b <= age);
            prop_assert_eq!(b <= EVICTION_WINDOW_MS, age <= EVICTION_WINDOW_MS);
        }
    }

    /// The outlook agrees with `pool_liveness` at `now` and everywhere in its validity span,
    /// and after one more frame, everywhere before the instant `observe_tracked` returned.
    #[test]
    fn outlook_and_tracked_changes_agree_with_pool_liveness(
        events in proptest::collection::vec((0u8..5, 0u8..2, 0u8..2, 0u64..30_000), 1..30),
        extra in (0u8..5, 0u8..2, 0u8..2, 0u64..30_000),
        now_off in 0u64..45_000, probes in proptest::collection::vec(0u64..45_000, 1..20),
    ) {
        let pools = [("p0", 1usize), ("p1", 2usize)];
        let mut evs = events.clone();
        evs.sort_by_key(|e| e.3);
        let mut fleet = FleetState::new(T0);
        for (seq, (w, p, boot, t)) in evs.iter().enumerate() {
            fleet.observe(frame(&format!("w{w}"), &format!("p{p}"), u64::from(*boot), seq as u64 + 1, T0 + t), T0 + t);
        }
        let now = T0 + now_off;
        let o = fleet.pool_outlook(&pools, now);
        prop_assert!(o.valid_from <= now && now < o.valid_until);
        let live = |f: &FleetState, t: u64| pools.iter().map(|(p, m)| f.pool_liveness(p, *m, t)).collect::<Vec<_>>();
        prop_assert_eq!(&o.states, &live(&fleet, now));
        let edges = [o.valid_from, o.valid_until.saturating_sub(1)];
        for t in probes.iter().map(|p| T0 + p).chain(edges) {
            if o.valid_from <= t && t < o.valid_until {
                prop_assert_eq!(&o.states, &live(&fleet, t), "at {}", t);
            }
        }
        let before = fleet.clone();
        let (w, p, boot, t) = extra;
        let changed = fleet.observe_tracked(frame(&format!("w{w}"), &format!("p{p}"), u64::from(boot), 1_000, T0 + t), T0 + t);
        for probe in probes.iter().chain([&t, &now_off]) {
            let at = T0 + probe;
            if at < changed {
                prop_assert_eq!(live(&before, at), live(&fleet, at), "at {} (changed {})", probe, changed);
            }
        }
    }
}
