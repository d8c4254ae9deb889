"""A short kill soak for CI (tests/soak/kill_soak.py has the whole story and the long run): 20
faults (SIGKILL, engine hang, SIGSTOP of random workers, recovered by a restart or a resume)
under streaming load through stock Envoy, one dnsd restart that keeps dnsd down past the
picker's stale limit (so the picker really fails open) and one frame-key rotation (dnsd with
both keys, each sidecar switched, dnsd with the new key only). Every request is judged against
the fault log; the drill fails on a splice, a short answer, an unexplained truncation, an error
a retry could have avoided, a frame dropped for its key, or a frame lost outside a dnsd restart.

The seed is drawn and printed; `GPUHA_SOAK_SEED=N` repeats a run's choices (not its timing).

Also here: the regression drill for what the soak found (retries of a request the picker did not
pick went back to a worker they had tried).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soak"))

import kill_soak  # noqa: E402
from gpuha_harness import access_entries, chat, filter_stat, make_client, wait_for  # noqa: E402
from gpuha_harness import report  # noqa: E402


def test_kill_soak_short(stack):
    seed = os.environ.get("GPUHA_SOAK_SEED")
    opts = kill_soak.Options(events=20, workers=5, clients=6, seed=int(seed) if seed else None, max_faulted=2,
                             down_s=(1.0, 4.0), gap_s=(0.5, 1.5), dnsd_restarts=1, rotations=1)
    soak = kill_soak.Soak(stack, opts)
    print(f"\nkill soak seed {soak.seed}", flush=True)
    res = soak.run()
    report(res.table)
    for x in res.figures["exhausted_errors"]:
        report(f"error after all attempts: {x}")
    report(res.summary)
    assert res.ok, "\n".join(res.failures[:30])
    assert res.figures["faults"] == 20 and res.figures["plain_dnsd_restarts"] == 1 and res.figures["rotations"] == 1
    assert res.figures["streaming_at_fault"] >= 1, "no fault caught a stream mid-flight: the soak tested nothing"
    assert res.figures["frames_sent_while_dnsd_down"] >= 1, "dnsd's restart lost no frame: was it down at all?"


def test_fail_open_retries_never_go_back_to_a_worker_they_tried(stack):
    """Found by the kill soak: with no pick (the picker fails open: dnsd down, or no fleet view),
    Envoy's fallback round robin chooses each attempt, and under concurrency it chose a worker the
    request had just failed on again, with live workers idle: an error a retry could have avoided.
    The route's `previous_hosts` retry predicate makes the 3 attempts go to 3 different workers, so
    with 2 of 3 workers dead every request still completes."""
    stack.start_dnsd()
    # No sidecars: dnsd knows no worker, so the picker never picks (fail open) and the fallback
    # round robin chooses every attempt.
    workers = [stack.start_worker(f"w{i + 1}", ttft_ms=5, tokens_per_s=500, sidecar=False) for i in range(3)]
    envoy = stack.start_pool_router()
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    for w in workers[:2]:
        w.proc.kill9()
    client = make_client(envoy.base_url, timeout=30)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda i: chat(client, i, 3), range(120)))
    entries = [e for e in access_entries(envoy) if e["path"].endswith("/chat/completions")]
    kinds: dict[str, int] = {}
    for o in outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    report(f"fail-open retries, 2 of 3 workers dead: {kinds}; attempts per request "
           f"{sorted({e['attempts'] for e in entries})}; fail_open {filter_stat(envoy, 'fail_open')}")
    assert filter_stat(envoy, "picks") == 0, "the picker picked: this drill needs it to fail open"
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes if o.kind != "completed"][:5]
    assert all(e["upstream"] == workers[2].addr for e in entries if e["code"] == "200")
