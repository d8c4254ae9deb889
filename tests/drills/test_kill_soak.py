"""A short kill soak for CI (tests/soak/kill_soak.py has the whole story and the long run): 20
faults (SIGKILL, engine hang, SIGSTOP of random workers, recovered by a restart or a resume)
under streaming load through stock Envoy, one dnsd restart that keeps dnsd down past the
picker's stale limit (so the picker really fails open) and one frame-key rotation (dnsd with
both keys, each sidecar switched, dnsd with the new key only). Every request is judged against
the fault log; the drill fails on a splice, a short answer, an unexplained truncation, an error
a retry could have avoided, a frame dropped for its key, or a frame lost outside a dnsd restart.

The seed is drawn and printed; `GPUHA_SOAK_SEED=N` repeats a run's choices (not its timing).

Also here: the regression drills for what the soak found (retries of a request the picker did not
pick went back to a worker they had tried; a request outlived its endpoint list, every listed worker
faulting while it was in flight, with a live worker left).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soak"))

import kill_soak  # noqa: E402
import pytest  # noqa: E402
from gpuha_harness import Timeout, access_entries, chat, filter_stat, http_get, make_client, report, wait_for  # noqa: E402


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


def test_a_list_of_the_one_worker_dnsd_knows_still_retries_on_the_clusters_others(stack):
    """Found by the kill soak (CI: a 502 after 1 attempt of the 3 it could make): dnsd knows only
    the workers whose frames it has had (just restarted: those that have sent one since), and the
    picker counted its retries past the list over dnsd's workers alone. A list of the one worker
    dnsd knew got `x-envoy-max-retries: 0`, so when that worker failed the client got the error
    while the cluster held live workers. The retries past the list count the cluster's configured
    workers too: here dnsd knows w1 only (w2 and w3 have no sidecar), w1 is killed, and the
    requests listed to it while its last frames still look fresh complete on w2 or w3."""
    stack.start_dnsd()
    workers = [stack.start_worker(f"w{i + 1}", ttft_ms=5, tokens_per_s=500, sidecar=i == 0) for i in range(3)]
    stack.wait_fresh(["w1"])
    envoy = stack.start_pool_router(picker_config=json.dumps({"pick": {"affinity": {"enabled": False}}}))
    warm = make_client(envoy.base_url, timeout=10)
    wait_for(lambda: chat(warm, 0, 2).kind == "completed" and filter_stat(envoy, "picks") >= 1, 10,
             "a request the picker picked for", interval=0.1)
    workers[0].proc.kill9()
    client = make_client(envoy.base_url, timeout=30)
    outcomes = [chat(client, i, 3) for i in range(1, 7)]
    entries = [e for e in access_entries(envoy) if e["path"].endswith("/chat/completions")]
    listed_dead = [e for e in entries[-len(outcomes):] if e["endpoints"] == [workers[0].addr]]
    report(f"a list of the one worker dnsd knows, that worker killed: {[o.describe() for o in outcomes]}; access log "
           f"{[(e['code'], e['attempts'], e['upstream'], e['endpoints']) for e in entries[-len(outcomes):]]}")
    assert listed_dead, "no request was listed to the killed worker alone: the drill tested nothing"
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes if o.kind != "completed"]
    assert all(e["code"] == "200" and e["attempts"] >= 2 and e["upstream"] in (workers[1].addr, workers[2].addr)
               for e in listed_dead), listed_dead


def running_requests(w) -> int:
    """vLLM's `num_requests_running` on `w`'s /metrics (0 when it does not answer)."""
    try:
        text = http_get(f"http://{w.addr}/metrics", timeout=1.0)[1].decode()
    except OSError:
        return 0
    m = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


@pytest.mark.parametrize("past_list,fault", [(2, "kill"), (2, "hang"), (0, "kill")])
def test_retries_outlive_a_list_whose_workers_all_fail(stack, past_list, fault):
    """Found by the kill soak: the picker lists 3 of the fleet's workers when the request arrives,
    and each of them faulted while the request was in flight (one frozen just before the pick,
    one hung, one frozen later), so its 3 attempts were spent with live workers idle. Stock
    Envoy's `override_host` reads the list once per request; past its end the fallback round
    robin (with `previous_hosts`) chooses an untried worker, and the picker's per-request retry
    count (`pick.retries_past_list`, default 2) lets the request get there.

    4 workers, all fresh; the picker lists 3 of them. Whichever worker the request is running on
    is killed (SIGKILL) or hung (fake-vllm's SIGUSR1: the engine stops, `/metrics` answers) before
    its first token, 3 times: every listed worker fails while the request is in flight, and the
    fourth, which the list does not name, is alive. With `retries_past_list: 0` (what the router
    did before) the client gets an error after 3 attempts: the control case that shows the
    drill tests something."""
    stack.start_dnsd()
    # TTFT 1 s: time to see the request running on a worker and fault it before its first token.
    workers = [stack.start_worker(f"w{i + 1}", ttft_ms=1000, tokens_per_s=200) for i in range(4)]
    stack.wait_fresh([w.id for w in workers])
    pick = {"max_endpoints": 3, "retries_past_list": past_list, "affinity": {"enabled": False}}
    # A hung attempt is retried at the per-try timeout (the guard's stall rescue would take the
    # 3 s gate + 2 s); 3 s is the TTFT budget, above the workers' 1 s.
    envoy = stack.start_pool_router(picker_config=json.dumps({"pick": pick}), per_try_timeout="3s")
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    client = make_client(envoy.base_url, timeout=60)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("o", chat(client, 1, 5)))
    t.start()
    faulted = []
    try:
        for _ in range(3):
            live = [w for w in workers if w not in faulted]
            try:
                w = wait_for(lambda: next((x for x in live if running_requests(x) >= 1), None), 10,
                             f"the request running on one of {[x.id for x in live]}", interval=0.02)
            except Timeout:
                break  # the request ended (the control case: its list is used up)
            if fault == "kill":
                w.proc.kill9()
            else:
                w.proc.signal(signal.SIGUSR1)
            faulted.append(w)
        t.join(60)
    finally:
        for w in faulted:
            if fault == "hang" and w.proc.alive():
                w.proc.signal(signal.SIGUSR1)
    o = box["o"]
    entries = [e for e in access_entries(envoy) if e["path"].endswith("/chat/completions")]
    report(f"retries past the list ({past_list}), {fault}: faulted {[w.id for w in faulted]}: {o.describe()}; "
           f"access log {[(e['code'], e['attempts'], e['upstream'], e['endpoints']) for e in entries]}")
    assert len(entries) == 1 and len(entries[0]["endpoints"]) == 3, entries
    listed = set(entries[0]["endpoints"])
    assert len(faulted) == 3 and {w.addr for w in faulted} == listed, \
        f"the faults must hit exactly the 3 listed workers: {[w.addr for w in faulted]} vs {sorted(listed)}"
    spare = next(w for w in workers if w not in faulted)
    if past_list == 0:
        assert o.kind == "error" and entries[0]["attempts"] == 3, f"the control case must fail: {o.describe()}"
        return
    assert o.kind == "completed" and o.worker == spare.id, o.describe()
    assert entries[0]["code"] == "200" and entries[0]["attempts"] == 4 and entries[0]["upstream"] == spare.addr, entries[0]
