"""A busy vLLM is not a dead one: `/metrics` answered seconds late keeps its worker fresh.

vLLM serves `/metrics` on the event loop that streams the tokens. On the real CPU build under 40
streams a scrape took up to 5 s; the sidecar, one scrape at a time with a 2.5 s timeout, then
sent nothing, both workers aged past the 3 s freshness gate, and the picker answered its own
503 "no worker" while both servers streamed. Scrapes now overlap (`sidecar/src/schedule.rs`), so
answers 4 s late still give a frame about every interval. And still no frame without an answer:
a stopped worker goes stale at the gate with its scrapes in flight.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gpuha_harness as harness
from gpuha_harness import chat, make_client, wait_for

DELAY_MS = 4_000  # over the old 2.5 s scrape timeout and over the 3 s freshness gate
GATE_S = 3.0


def test_workers_with_slow_metrics_stay_fresh_and_serve(stack):
    stack.start_dnsd()
    ws = [stack.start_worker(f"w{i + 1}", extra=["--metrics-delay-ms", str(DELAY_MS)]) for i in range(2)]
    # The first frame can only come with the first answer, DELAY_MS after the sidecar starts.
    stack.wait_fresh([w.id for w in ws], timeout=DELAY_MS / 1000 + 10)
    envoy = stack.start_pool_router()
    client = make_client(envoy.base_url, timeout=20)

    ages: list[float] = []
    stop = threading.Event()

    def watch():  # the oldest frame of the two, as dnsd's view shows it, every 100 ms
        while not stop.is_set():
            try:
                view = stack.fleet_workers()
                ages.append(max(view[w.id]["age_ms"] for w in ws))
            except (OSError, KeyError, ValueError, AssertionError):
                pass
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outs = []
    t_end = time.monotonic() + 3 * DELAY_MS / 1000  # three whole slow answers
    i = 0
    while time.monotonic() < t_end:
        outs.append(chat(client, i, 8))
        i += 1
    stop.set()
    watcher.join(5)
    bad = [o.describe() for o in outs if o.error is not None]
    no_worker = harness.filter_stat(envoy, "no_worker")
    print(f"\n[slow-metrics] /metrics {DELAY_MS} ms late: {len(outs)} requests, {len(bad)} errors, "
          f"picker no_worker={no_worker}, oldest frame seen {max(ages):.0f} ms over {len(ages)} samples")
    assert not bad, "\n".join(bad)
    assert no_worker == 0, f"the picker found no fresh worker {no_worker} times"
    assert ages, "no fleet view sampled"
    assert max(ages) < GATE_S * 1000, f"a worker aged past the gate: oldest frame {max(ages):.0f} ms"

    # Evidence only: a stopped worker (its scrapes still out) is stale at the gate, not later.
    victim = ws[0]
    victim.proc.stop()
    t_stop = time.monotonic()
    try:
        stack.wait_stale([victim.id], timeout=GATE_S + 3)
        stale_after = time.monotonic() - t_stop
        o = chat(client, 1000, 8)
        assert o.error is None, o.describe()
    finally:
        victim.proc.cont()
    print(f"[slow-metrics] SIGSTOPped worker stale {stale_after:.2f}s after the stop")
    stack.wait_fresh([victim.id], timeout=DELAY_MS / 1000 + 10)


def test_telemetry_in_bursts_moves_no_request(stack):
    """A live worker whose telemetry comes in a burst after a silence (its `/metrics` unanswered
    for 5 s: its sidecar stopped) while it holds requests in a long prefill (its engine steps
    every 100 ms). The first frame back shows counters that moved at some instant of the
    silence: dnsd dates its sure life at the frame before (not fresh) but calls it neither
    stalled nor hung, so the guard moves none of its held requests; they get their first token
    on it. Before, that frame made it "stalled" for its 5 s without a sure sign of life, and the
    guard handed its held requests to a retry (their prefill thrown away)."""
    stack.start_dnsd()
    ws = stack.start_workers(3, ttft_ms=9_000, tokens_per_s=50)
    bursty = ws[1]
    assert bursty.sidecar is not None
    envoy = stack.start_pool_router(per_try_timeout="25s")
    wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= 1, 10, "the router's first fleet poll")
    client = make_client(envoy.base_url, timeout=60)
    with ThreadPoolExecutor(max_workers=6) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(chat, client, i, 4) for i in range(6)]
        wait_for(lambda: (stack.fleet_workers()[bursty.id].get("running") or 0) > 0, 5,
                 f"{bursty.id} to hold a request in its prefill", interval=0.05)
        bursty.sidecar.stop()
        stopped_s = time.monotonic() - t0
        try:
            # Silent past the gate, its age in the router's view 5 s (the guard's stall rule
            # would then count 2 s of stall: its rescue bound).
            wait_for(lambda: (stack.fleet_workers()[bursty.id].get("age_ms") or 0) >= 5_200, 8,
                     f"{bursty.id} 5.2 s without a sure sign of life", interval=0.05)
        finally:
            bursty.sidecar.cont()
        back_s = time.monotonic() - t0
        views = []
        deadline = time.monotonic() + 2.0
        tick = threading.Event()
        while time.monotonic() < deadline:  # dnsd's view of it once its frames come again, every 50 ms
            views.append(stack.fleet_workers()[bursty.id])
            tick.wait(0.05)
        outcomes = [f.result(timeout=60) for f in futures]
    stalled_seen = sum(bool(v.get("stalled")) for v in views)
    fresh_again = next((i * 0.05 for i, v in enumerate(views) if v.get("fresh")), None)
    on_bursty = [o for o in outcomes if o.worker == bursty.id]
    rescues = harness.filter_stat(envoy, "stall_rescues")
    retries = harness.filter_stat(envoy, "pre_token_retries")
    print(f"\n[slow-metrics] telemetry in a burst: sidecar of {bursty.id} stopped at {stopped_s:.2f} s, back at "
          f"{back_s:.2f} s; dnsd's view over the next 2 s: stalled in {stalled_seen} of {len(views)} reads, fresh again "
          f"after {fresh_again} s; requests {[o.kind for o in outcomes]}, {len(on_bursty)} served by {bursty.id}; "
          f"guard stall rescues {rescues}, pre-token retries {retries}")
    assert all(o.error is None and o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes]
    assert rescues == 0 and retries == 0, f"requests held on a live worker were moved ({rescues} stall rescues)"
    assert on_bursty, f"no request was on {bursty.id}: the drill tested nothing"
    assert stalled_seen == 0, f"dnsd called a worker whose counters moved stalled ({stalled_seen} reads)"
    assert fresh_again is not None, f"{bursty.id} was not fresh again within 2 s of its frames coming back"
