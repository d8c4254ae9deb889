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

import gpuha_harness as harness
from gpuha_harness import chat, make_client

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
