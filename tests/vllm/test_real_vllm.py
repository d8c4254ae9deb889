"""Drills against real, unmodified vLLM 0.32.0 servers (CPU build here; GPU build where lent):
two servers behind stock Envoy (envoy/render.py pool-router, the gpuha filter), dnsd and one
gpuha-sidecar per server, driven by the official `openai` SDK with ``max_retries=0``.

    deploy/vllm/drills.sh            # setup (idempotent) + these drills
    python3 -m pytest tests/vllm -v -s

The servers are started once, in parallel, and shared; a drill that kills one leaves it dead and
the next drill's `Rig.ensure_up()` restarts only that one. Each drill prints a ``COUNTS`` line.
How responses and workers are told apart (SSE ids, ``?drill=N`` in Envoy's access log, the
deterministic reference text) is explained in gpuha_harness/vllm_rig.py.

(Over 500 lines on purpose: the drills share one session's two servers, restarted piecemeal, and
each checks the premise it needs from vLLM's own numbers before judging the router.)
"""

from __future__ import annotations

import calendar
import json
import re
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import openai
import pytest

import gpuha_harness as harness
from gpuha_harness import vllm as vl
from gpuha_harness import report, vllm_rig, wait_for
from gpuha_harness.env import filter_build
from gpuha_harness.vllm_rig import (Outcome, Rig, attach_access_log, chat, classify, fleet_entry, join_all, make_client, record,
                      run_concurrently, summarize)

pytestmark = pytest.mark.slow

# A token already on the wire when the worker died reaches the client a little after the kill.
EPS = 0.5


def warm_up(rig: Rig, envoy: harness.Envoy) -> None:
    """One request through Envoy, so that the picker has a view and a pick was made."""
    client = make_client(envoy.base_url, timeout=120)
    before = harness.filter_stat(envoy, "picks")

    def ok():
        o = chat(client, -1, 0, 4)
        assert o.error is None, f"warm-up through Envoy failed: {o.describe()}"
        return harness.filter_stat(envoy, "picks") > before

    wait_for(ok, 120, "a request routed by the picker (gpuha.picks rising)", interval=0.2)


PICKED: dict[str, float] = {}  # the gauges `pick_victim` picked its victim on


def pick_victim(rig: Rig, gen0: dict[str, float], min_running: int = 2, min_waiting: int = 1,
                timeout: float = 180.0) -> str:
    """Waits until one server has streams past their first token (generation counter moved,
    `min_running` running) AND requests still queued before their first token (`min_waiting`),
    read from that server's own /metrics. A failed scrape (slow under load) is retried; the
    timeout names the most ever seen, so a load that never queued is told from a slow one."""
    seen: dict[str, tuple[float, float]] = {}
    failed = {w: 0 for w in rig.servers}
    scrapes = {w: 0 for w in rig.servers}
    slowest = {w: 0.0 for w in rig.servers}
    PICKED.clear()

    def check():
        best = None
        for wid in rig.servers:
            t0 = time.monotonic()
            g = rig.try_gauges(wid)
            scrapes[wid] += 1
            slowest[wid] = max(slowest[wid], time.monotonic() - t0)
            if g is None:
                failed[wid] += 1
                continue
            run_, wait_ = g.get("vllm:num_requests_running", 0), g.get("vllm:num_requests_waiting", 0)
            r0, w0 = seen.get(wid, (0.0, 0.0))
            seen[wid] = (max(r0, run_), max(w0, wait_))
            moved = g.get("vllm:generation_tokens_total", 0) > gen0.get(wid, 0) + 4 * min_running
            if run_ >= min_running and wait_ >= min_waiting and moved:
                if best is None or wait_ > best[1]:
                    best = (wid, wait_)
                    PICKED.clear()
                    PICKED.update(g)  # the victim's gauges as seen when it was picked
        return best[0] if best else None

    try:
        return wait_for(check, timeout, f"a server with >= {min_running} running streams and >= {min_waiting} queued",
                        interval=0.05)
    except harness.Timeout as e:
        raise harness.Timeout(f"{e} (most seen (running, waiting): {seen}; scrapes: {scrapes}, failed: {failed}, "
                              f"slowest: { {w: round(v, 2) for w, v in slowest.items()} }s)") from None


def gen_counters(rig: Rig) -> dict[str, float]:
    return {wid: rig.vllm_gauges(wid).get("vllm:generation_tokens_total", 0) for wid in rig.servers}


def outcomes_table(outs: list[Outcome], kinds: dict[int, str]) -> str:
    return "\n".join(f"  {kinds[o.idx]:>17} {o.describe()}" for o in outs)


def text_stats(outs: list[Outcome]) -> str:
    same = sum(o.text_matches_ref is True for o in outs)
    return f"text_as_reference={same}/{len(outs)}"


def gpu_mem_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, from nvidia-smi; empty where there is no NVIDIA GPU."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


def survivor_of(rig: Rig, victim: str) -> str:
    return next(w for w in rig.servers if w != victim)


# --------------------------------------------------------------------------------------------


def test_sidecar_metric_mapping_live(rig: Rig):
    """`gpuha-sidecar --once` and dnsd's /v1/fleet follow real vLLM's /metrics under load:
    running, waiting and KV usage rise while requests run; TTFT count grows by the requests."""
    t_start = time.monotonic()
    rig.ensure_up()
    wid = "v1"
    s = rig.servers[wid]
    side = harness.binary("gpuha-sidecar")

    def once() -> dict[str, float]:
        r = subprocess.run([str(side), "--once", "--metrics-url", f"http://{s.addr}/metrics", "--worker-id", wid,
                            "--pool", "p1", "--serve-addr", s.addr, "--key-file", str(rig.stack.key_file)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sidecar --once failed ({r.returncode}): {r.stderr}"
        vals = {k: float(v) for k, v in re.findall(r"(\w+): Some\(\s*([0-9.eE+-]+),?\s*\)", r.stdout)}
        for k in ("running", "waiting", "kv_usage", "ttft_count"):
            assert k in vals, f"sidecar --once printed no {k}:\n{r.stdout}"
        return vals

    idle = once()
    g_idle = rig.vllm_gauges(wid)
    assert idle["running"] == g_idle["vllm:num_requests_running"] == 0, (idle, g_idle)
    assert idle["waiting"] == g_idle["vllm:num_requests_waiting"] == 0, (idle, g_idle)
    assert idle["ttft_count"] == g_idle["vllm:time_to_first_token_seconds_count"], (idle, g_idle)

    # 16 = 2 x --max-num-seqs 8, all to ONE server, same length: 8 run while 8 wait for a whole
    # 512-step batch (seconds even at full speed), so the state is held while it is observed.
    n, max_tokens = 16, 512
    # Straight to the server (the mapping is the subject), from a child process: this one only
    # scrapes, so what it reads is vLLM's state when vLLM reported it.
    load = harness.ChildLoad(lambda: make_client(f"http://{s.addr}/v1", timeout=120), lambda c, i: chat(c, 5000 + i, i, max_tokens), n)
    try:
        def vllm_busy():
            g = rig.try_gauges(wid)
            return g if g and g.get("vllm:num_requests_running", 0) >= 2 and g.get("vllm:num_requests_waiting", 0) >= 1 \
                and g.get("vllm:kv_cache_usage_perc", 0) > 0 else None

        g_seen = wait_for(vllm_busy, 180, "vLLM /metrics to show requests running and waiting", interval=0.1)
        busy = once()
        g_busy = rig.vllm_gauges(wid)

        def fleet_busy():
            e = fleet_entry(rig, wid)
            return e if e and e.get("fresh") and (e.get("running") or 0) >= 1 and (e.get("waiting") or 0) >= 1 \
                and (e.get("kv") or 0) > 0 else None

        f_busy = wait_for(fleet_busy, 30, "dnsd /v1/fleet to show v1 running, waiting and kv > 0", interval=0.1)
    finally:
        results = load.join(180)
    outs = [r for r in results if r is not None]
    assert all(o.error is None and o.finish_reason == "length" for o in outs), "\n".join(o.describe() for o in outs)

    # After: the gauges fall back and the TTFT histogram counted every request.
    def settled():
        g = rig.try_gauges(wid)
        return g if g and g["vllm:num_requests_running"] == 0 and g["vllm:num_requests_waiting"] == 0 else None

    g_after = wait_for(settled, 60, "v1 idle again", interval=0.2)
    after = once()
    f_after = wait_for(lambda: (lambda e: e if e and e.get("running") == 0 and e.get("waiting") == 0 else None)(fleet_entry(rig, wid)),
                       30, "dnsd /v1/fleet to show v1 idle", interval=0.1)

    report(f"COUNTS metrics: requests={n} max_tokens={max_tokens} first seen busy running={g_seen['vllm:num_requests_running']:.0f} "
           f"waiting={g_seen['vllm:num_requests_waiting']:.0f} | idle sidecar running={idle['running']:.0f} waiting={idle['waiting']:.0f} kv={idle['kv_usage']:.4f} "
           f"ttft_count={idle['ttft_count']:.0f} | busy sidecar running={busy['running']:.0f} waiting={busy['waiting']:.0f} "
           f"kv={busy['kv_usage']:.4f} (vLLM right after: running={g_busy['vllm:num_requests_running']:.0f} "
           f"waiting={g_busy['vllm:num_requests_waiting']:.0f} kv={g_busy['vllm:kv_cache_usage_perc']:.4f}) | fleet busy "
           f"running={f_busy.get('running')} waiting={f_busy.get('waiting')} kv={f_busy.get('kv')} | after sidecar "
           f"ttft_count={after['ttft_count']:.0f} (vLLM {g_after['vllm:time_to_first_token_seconds_count']:.0f}) fleet "
           f"ttft_ms={f_after.get('ttft_ms')} running={f_after.get('running')} waiting={f_after.get('waiting')}")
    assert busy["running"] >= 2 and busy["waiting"] >= 1 and busy["kv_usage"] > idle["kv_usage"], busy
    assert busy["running"] <= 8, f"more running than --max-num-seqs: {busy}"
    assert after["ttft_count"] == g_after["vllm:time_to_first_token_seconds_count"] >= idle["ttft_count"] + n, (after, g_after)
    assert after["running"] == 0 and after["waiting"] == 0
    assert f_after.get("ttft_ms") is not None and f_after["ttft_ms"] > 0, f_after
    record("drill metrics", f"{time.monotonic() - t_start:.1f}s")


# The guard's stall rescue is off in the drills about other failures: two CPU vLLM engines, Envoy
# and the clients share 2 cores here, and a starved engine (no step for several seconds while its
# API server answers /metrics) is indistinguishable from a hung one; rescuing it moved requests to
# the server whose engine was being killed (seen 2026-11-29). The hang drill tests the rescue.
NO_RESCUE = json.dumps({"rescue": False})

# Tokens per stream in the drills that need requests queued behind running ones. 256 was enough
# on a loaded host; on a quiet one the Python client takes ~2 s to start its 40 streams while
# vLLM finishes a 256-token stream in 0.2-0.4 s, so no queue ever formed (seen 2026-11-29: at
# most 2 running, 0 waiting, for 180 s). At 2048 each stream runs for seconds.
QUEUE_TOKENS = 2048


def test_api_surface_same_through_the_router(rig: Rig):
    """Issue 11: the official openai SDK against every API, through the router and directly
    against one real server, with the same answers (status, content type, the shape of every
    body and streamed event; tests/drills/test_api_surface.py, here with a seed and greedy
    decoding so that a real model's answers repeat). What this generation server does not serve
    (embeddings, transcription: 404) must come back the same 404, not a retry, a 503 or an open
    circuit."""
    from gpuha_harness import api_surface as api

    t_start = time.monotonic()
    rig.ensure_up()
    envoy = rig.envoy()
    warm_up(rig, envoy)
    srv = rig.servers["v1"]
    direct = api.exercise(make_client(f"http://{srv.addr}/v1", timeout=120), f"http://{srv.addr}", model=vllm_rig.MODEL, repeatable=True)
    routed = api.exercise(make_client(envoy.base_url, timeout=120), f"http://127.0.0.1:{envoy.port}", model=vllm_rig.MODEL, repeatable=True)
    matched, differ = api.compare(direct, routed)
    statuses = {name: d[0] for name, d in direct.items()}
    retries, trips = harness.filter_stat(envoy, "pre_token_retries"), harness.filter_stat(envoy, "breaker_trips")
    report(f"COUNTS api-surface: {len(matched)}/{len(direct)} APIs answered the same through the router as directly by "
           f"real vLLM ({', '.join(matched)}); differ: {differ or 'none'}; statuses direct: {statuses}; "
           f"pre_token_retries {retries}, breaker_trips {trips}")
    assert not differ, "\n".join(differ)
    assert all(statuses[n] == 200 for n in statuses if not n.startswith(("embeddings", "audio"))), statuses
    assert retries == 0 and trips == 0, f"{retries} retries, {trips} circuits opened by a healthy server"
    rig.stop_envoy(envoy)
    record("drill api-surface", f"{time.monotonic() - t_start:.1f}s")


def test_every_sidecar_silent_still_serves(rig: Rig):
    """Both sidecars stop sending (SIGSTOP) while both servers serve: what a session-27 run saw
    when every sidecar's scrape of a loaded CPU server timed out at once, and one request got the
    picker's own 503 with no attempt. dnsd's view is fresh and no server in it is: with no
    fallback tier to go to, the picker fails open onto the silent servers (`silent_fail_open`),
    and each request is served whole by one of them."""
    t_start = time.monotonic()
    rig.ensure_up()
    envoy = rig.envoy()
    sidecars = [rig.stack.workers[wid].sidecar for wid in rig.servers]
    try:
        warm_up(rig, envoy)
        for sc in sidecars:
            sc.stop()
        rig.stack.wait_stale(list(rig.servers), timeout=10)
        polls = harness.filter_stat(envoy, "fleet_polls")
        harness.wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= polls + 2, 5, "two more fleet polls")
        silent0, no_worker0 = harness.filter_stat(envoy, "silent_fail_open"), harness.filter_stat(envoy, "no_worker")
        client = make_client(envoy.base_url, timeout=60)
        outs = [harness.chat(client, i, 8, stream=(i % 2 == 0), model=vllm_rig.MODEL, extra_body={"ignore_eos": True},
                             extra_query={"drill": str(5600 + i)}, **({"stream_options": {"include_usage": True}} if i % 2 == 0 else {}))
                for i in range(6)]

        def served_by() -> dict:
            return {drill_idx(e["path"]): e["upstream"] for e in harness.access_entries(envoy) if (drill_idx(e["path"]) or 0) >= 5600}
        harness.wait_for(lambda: len(served_by()) >= len(outs), 5, "the requests' access log lines")
        servers = served_by()
        silent = harness.filter_stat(envoy, "silent_fail_open") - silent0
        no_worker = harness.filter_stat(envoy, "no_worker") - no_worker0
        fresh_now = rig.stack.fresh_ids()
    finally:
        for sc in sidecars:
            sc.cont()
        rig.stop_envoy(envoy)
        record("drill every sidecar silent", f"{time.monotonic() - t_start:.1f}s")
    report(f"COUNTS every sidecar silent: {[(o.finish_reason, o.completion_tokens, type(o.error).__name__ if o.error else None) for o in outs]}; served by {sorted(servers.items())}; silent_fail_open +{silent}, "
           f"no_worker +{no_worker}; fresh in dnsd's view while sent: {sorted(fresh_now)}")
    assert not fresh_now, fresh_now
    whole = [o.error is None and o.finish_reason == "length" and o.completion_tokens == 8 for o in outs]
    assert all(whole), [o.describe() for o, ok in zip(outs, whole) if not ok]
    assert silent == len(outs) and no_worker == 0, (silent, no_worker)
    assert set(servers.values()) <= {s.addr for s in rig.servers.values()}, servers


def test_a_long_answer_that_does_not_stream_completes(rig: Rig):
    """A request that does not stream: vLLM sends its headers only with the whole answer, and
    Envoy's per-try timeout runs until the headers. Through the router with the default budgets
    (per-try 5 s: a time to first token), a 6000-token answer (~10 s on this CPU build) must
    complete in one attempt, as directly: the picker gives requests that do not stream their
    own budget (`non_stream_timeout_ms`). Before it, each attempt was cut at 5 s and the
    request ended in a 504 after every server had generated for 5 s."""
    t_start = time.monotonic()
    rig.ensure_up()
    envoy = rig.envoy()
    try:
        warm_up(rig, envoy)
        client = make_client(envoy.base_url, timeout=300)
        n_tokens = 6000
        t0 = time.monotonic()
        r = client.chat.completions.create(model=vllm_rig.MODEL, messages=[{"role": "user", "content": vllm_rig.PROMPTS[0]}],
                                           max_tokens=n_tokens, temperature=0, stream=False, extra_body={"ignore_eos": True},
                                           extra_query={"drill": "5200"})
        took = time.monotonic() - t0
        entries = [e for e in harness.access_entries(envoy) if drill_idx(e["path"]) == 5200]
        report(f"COUNTS long answer, not streamed: {r.usage.completion_tokens} tokens in {took:.1f}s through the router "
               f"(per-try 5 s for streams); access log {[(e['code'], e['attempts'], e['flags']) for e in entries]}")
        assert r.usage.completion_tokens == n_tokens and r.choices[0].finish_reason == "length", r
        assert len(entries) == 1 and entries[0]["code"] == "200" and entries[0]["attempts"] == 1, entries
        assert took > 5.0, f"{took:.1f}s: not longer than the route's per-try budget, so this tested nothing"
    finally:
        rig.stop_envoy(envoy)
        record("drill long answer, not streamed", f"{time.monotonic() - t_start:.1f}s")


def test_d1_group_sigkill_mid_traffic(rig: Rig):
    """Process-group SIGKILL of one vLLM with streams past their first token and requests still
    queued: the queued ones complete on the other server (one clean response each), the started
    ones end as clean truncations from the killed server, nothing is spliced."""
    t_start = time.monotonic()
    rig.ensure_up()
    # The per-try timeout is the TTFT budget (the guard holds the headers until the first token).
    # After the kill the survivor works through every queued request 8 at a time: on a slow VM of
    # this kind (2026-11-30) a batch took ~22 s, so the last requests sent got their first token
    # ~66 s after the kill; at 60 s their retry went to the listed dead server and they failed.
    # What is tested is the kill, not the survivor's speed: a budget no CPU run has reached, under
    # the client's 120 s read timeout (the router's answer, not the client's, is what is judged).
    envoy = rig.envoy(per_try_timeout="110s", guard_config=NO_RESCUE)
    try:
        warm_up(rig, envoy)
        # 20 a server: 8 run while 12 wait, so requests stay queued for ~2 whole batches: the
        # pick reads that state, it does not race it. QUEUE_TOKENS: see there.
        n, max_tokens = 40, QUEUE_TOKENS
        refs = {p: rig.reference(p, max_tokens) for p in range(4)}
        client = make_client(envoy.base_url, timeout=120)
        gen0 = gen_counters(rig)
        for srv in rig.servers.values():
            srv.remember_shm()  # slow under load: done before the load, not between the pick and the kill
        # The 40 streams are parsed in a child process: parsed here they starved this one, whose
        # scrape then read a victim's queue seconds after vLLM had reported it, and the kill came
        # once every stream was generated (seen 2026-11-30: 40 completed, none truncated).
        load = harness.ChildLoad(lambda: make_client(envoy.base_url, timeout=120), lambda c, i: chat(c, i, i % 4, max_tokens), n)
        try:
            victim = pick_victim(rig, gen0)
            g_kill = dict(PICKED)  # read when picked: no second scrape before the kill
            members = rig.servers[victim].kill_group(remember=False)  # kill -KILL -<pgid>, waits until the group is gone
            kill_mono = Outcome.t0 = rig.servers[victim].killed_at  # the instant the signal went out
            kill_s = time.monotonic() - kill_mono
            kill_wall = time.time() - kill_s
        finally:
            results = load.join(180)
        outs = [r for r in results if r is not None]
        attach_access_log(envoy, outs)
        kinds = {o.idx: classify(o, refs[o.prompt]) for o in outs}
        vaddr, saddr = rig.servers[victim].addr, rig.servers[survivor_of(rig, victim)].addr
        # Judged by what the router saw, not by when the client read it: a client parsing 40
        # streams reads events seconds after they came (seen: a stream vLLM had finished before
        # the kill read whole after it). Answered by the survivor: pre-token at the kill (or sent
        # after it). Answered by the victim with text: started there before the kill; still
        # streaming at the kill if Envoy ended it after.
        envoy_end = envoy_end_times(envoy)
        pre = [o for o in outs if o.upstream != vaddr]
        post_victim = [o for o in outs if o.upstream == vaddr and o.text and envoy_end.get(o.idx, 0.0) > kill_wall]
        retried = [o for o in outs if kinds[o.idx] == "completed" and o.attempts >= 2 and o.upstream == saddr]
        counts = summarize(list(kinds.values()))

        # After the freshness gate, nothing new goes to the dead server.
        rig.stack.wait_stale([victim], timeout=8)
        polls = harness.filter_stat(envoy, "fleet_polls")
        wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= polls + 2, 5, "two more fleet polls")
        threads, tail_res = run_concurrently(lambda i: chat(client, 1000 + i, i % 4, 8), 8)
        join_all(threads, 300)
        tail = [r for r in tail_res if r is not None]
        attach_access_log(envoy, tail)
        tail_bad = [o.describe() for o in tail if o.error is not None or o.upstream != saddr]

        report(f"COUNTS d1: requests={n} max_tokens={max_tokens} victim={victim} (running={g_kill.get('vllm:num_requests_running', 0):.0f} "
               f"waiting={g_kill.get('vllm:num_requests_waiting', 0):.0f} at kill; group of {len(members)} processes gone in {kill_s:.2f}s) "
               f"kinds={counts} pre_token_at_kill={len(pre)} retried_to_survivor={len(retried)} "
               f"post_token_on_victim={len(post_victim)} truncated_from_victim={sum(kinds[o.idx] == 'truncated' and o.upstream == vaddr for o in outs)} "
               f"pre_token_retries_stat={harness.filter_stat(envoy, 'pre_token_retries')} "
               f"post_token_truncations_stat={harness.filter_stat(envoy, 'post_token_truncations')} "
               f"after_gate={len(tail)} to_victim_after_gate={sum(o.upstream == vaddr for o in tail)} {text_stats(outs)}")
        table = outcomes_table(outs, kinds)
        assert counts.get("splice", 0) == 0 and counts.get("short", 0) == 0, "splices or short answers:\n" + table
        assert counts.get("failed", 0) == 0, "a client saw an error without any token (an honest retry was possible):\n" + table
        assert all(kinds[o.idx] == "completed" for o in pre), "a request that was pre-token at the kill did not complete:\n" + table
        assert all(len(o.ids) == 1 for o in outs), "a response without exactly one SSE id:\n" + table
        for o in outs:
            if kinds[o.idx] == "truncated":
                assert o.upstream == vaddr, f"a truncation not from the killed server: {o.describe()}"
                # Counted in tokens (one content chunk each), not against the reference's length:
                # on CPU the text can differ from the reference with the batch (see classify).
                assert o.finish_reason is None and o.content_chunks < o.max_tokens, o.describe()
        assert post_victim, "no stream was past its first token on the victim at the kill: the drill tested nothing\n" + table
        # A stream may still complete if its last event was already on the wire at the kill.
        assert all(kinds[o.idx] == "truncated" or (kinds[o.idx] == "completed" and envoy_end[o.idx] <= kill_wall + EPS)
                   for o in post_victim), "a started stream on the killed server did not truncate:\n" + table
        assert any(kinds[o.idx] == "truncated" for o in post_victim), "no truncation at all:\n" + table
        assert retried, "no queued request was retried on the survivor: the drill tested nothing\n" + table
        assert not tail_bad, "after the freshness gate:\n" + "\n".join(tail_bad)
    finally:
        rig.stop_envoy(envoy)
        record("drill d1", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


def test_engine_core_sigkill(rig: Rig):
    """SIGKILL of the EngineCore process only. vLLM notices 2-3.5 s later and sends
    ``data: {"error": ...}`` inside each 200 stream: before the first token the guard turns it
    into a retry (the client gets a clean answer from the other server); after it, the stream
    ends with that error event."""
    t_start = time.monotonic()
    rig.ensure_up()
    # 110 s to the first token, as in d1: the retried requests queue on the survivor (seen
    # 2026-12-01 with 60 s: 8 of them timed out there, 504 after their second attempt).
    envoy = rig.envoy(per_try_timeout="110s", guard_config=NO_RESCUE)
    victim = None
    try:
        warm_up(rig, envoy)
        # Long enough that streams are still running when vLLM notices; 20 a server, so 12 stay
        # queued for ~2 whole batches while the pick reads that from /metrics (QUEUE_TOKENS).
        n, max_tokens = 40, QUEUE_TOKENS
        refs = {p: rig.reference(p, max_tokens) for p in range(4)}
        gen0 = gen_counters(rig)
        # Read from /proc now, not between the pick and the kill (slow on a loaded host).
        all_engines = {w: s.engine_core_pids() for w, s in rig.servers.items()}
        load = harness.ChildLoad(lambda: make_client(envoy.base_url, timeout=120), lambda c, i: chat(c, 2000 + i, i % 4, max_tokens), n)
        try:
            victim = pick_victim(rig, gen0)
            srv = rig.servers[victim]
            engines = all_engines[victim]
            assert engines, f"no EngineCore process in group {srv.pgid}: {srv.describe()}"
            titles = {p: vl.comm(p) for p in engines}
            g_kill = dict(PICKED)  # read when picked: no second scrape before the kill
            kill_mono = Outcome.t0 = time.monotonic()
            for p in engines:
                vl.os.kill(p, signal.SIGKILL)
        finally:
            results = load.join(180)
        # The API server shuts itself down after reporting the engine death.
        try:
            srv.popen.wait(timeout=60)
            api_exit_s = f"{time.monotonic() - kill_mono:.1f}s"
        except subprocess.TimeoutExpired:
            api_exit_s = "still running after 60s"
        outs = [r for r in results if r is not None]
        attach_access_log(envoy, outs)
        kinds = {o.idx: classify(o, refs[o.prompt]) for o in outs}
        vaddr, saddr = srv.addr, rig.servers[survivor_of(rig, victim)].addr
        # By where each was answered, not when the client read it (see d1): by the survivor,
        # pre-token at the death; by the victim with text, started there before it.
        pre = [o for o in outs if o.upstream != vaddr]
        err_events = [o for o in outs if kinds[o.idx] == "ended_error_event"]
        retried = [o for o in outs if kinds[o.idx] == "completed" and o.attempts >= 2 and o.upstream == saddr]
        detect = min((o.ended - kill_mono for o in err_events), default=float("nan"))
        counts = summarize(list(kinds.values()))
        report(f"COUNTS engine-death: requests={n} max_tokens={max_tokens} victim={victim} killed={titles} "
               f"(running={g_kill.get('vllm:num_requests_running', 0):.0f} waiting={g_kill.get('vllm:num_requests_waiting', 0):.0f}) "
               f"kinds={counts} pre_token_at_kill={len(pre)} retried_to_survivor={len(retried)} "
               f"error_event_after_token={len(err_events)} first_error_event_after={detect:.2f}s api_server_exit={api_exit_s} "
               f"guard_retried={sum(o.guard == 'retried' for o in outs)} "
               f"pre_token_retries_stat={harness.filter_stat(envoy, 'pre_token_retries')} "
               f"post_token_errors_stat={harness.filter_stat(envoy, 'post_token_errors')} {text_stats(outs)}")
        table = outcomes_table(outs, kinds)
        assert counts.get("splice", 0) == 0 and counts.get("short", 0) == 0, "splices or short answers:\n" + table
        assert counts.get("failed", 0) == 0, "a client saw an error without any token:\n" + table
        assert all(kinds[o.idx] == "completed" for o in pre), "a request pre-token at the engine death did not complete:\n" + table
        assert all(len(o.ids) == 1 for o in outs), "a response without exactly one SSE id:\n" + table
        assert err_events, "no stream ended with vLLM's in-band error event: the drill tested nothing\n" + table
        assert all(o.upstream == vaddr for o in err_events), table
        assert retried, "no queued request was retried on the survivor after the error event\n" + table
    finally:
        rig.stop_envoy(envoy)
        if victim is not None:
            rig.servers[victim].kill_group()  # what the dead API server left (orphans, shm)
        record("drill engine-death", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


IDLE_TIMEOUT_S = 10
# Tokens of a "long" stream: vLLM (CPU, tiny model) makes ~750 a second per stream with 8
# running (4096 in 5.5 s, measured), so 16384 keeps a stream generating for 20+ s.
LONG_TOKENS = 16384


def test_sigterm_stall(rig: Rig):
    """SIGTERM of one API server mid-traffic: its streams stall (no bytes, no close). Requests
    still queued before their first token ON THAT SERVER are retried on the other server within
    the per-try (TTFT) budget; started streams end at the stream idle timeout as clean truncations.

    The load is built so that the state at the SIGTERM is a fact read from the victim's own
    /metrics, not a race: (1) a few long streams through Envoy, the victim is the server with the
    most of them running; (2) its other --max-num-seqs slots are filled with long requests sent
    straight to it (not through Envoy: background only), so nothing frees a slot there for the
    rest of the drill; (3) small bursts of short requests through Envoy until one is queued on the
    victim (its `num_requests_waiting` rises), and the SIGTERM goes out right then, well inside
    that request's first per-try window. The survivor keeps free slots (its streams are few or
    short), so a retry's own TTFT there is small."""
    t_start = time.monotonic()
    rig.ensure_up()
    per_try = 3.0
    # hedge_on_per_try_timeout: a queued request slower than the budget on a live server is not
    # cancelled, a second attempt races it (the guard's held headers make the first token win).
    envoy = rig.envoy(per_try_timeout=f"{per_try:.0f}s", hedge=True, stream_idle_timeout=f"{IDLE_TIMEOUT_S}s", guard_config=NO_RESCUE)
    victim = None
    bg_threads: list = []
    try:
        warm_up(rig, envoy)
        # Long: vLLM must still be generating them at the SIGTERM, 10-15 s after they start here (the
        # set-up under load). 4096 tokens were too few: vLLM ends them in ~5.5 s on this box while the
        # client, parsing every event through the SDK, still reads them seconds later.
        long_tokens, short_tokens, bg_tokens, n_long = LONG_TOKENS, 32, 4096, 4
        refs = {(0, long_tokens): rig.reference(0, long_tokens)}
        refs.update({(p, short_tokens): rig.reference(p, short_tokens) for p in (1, 2, 3)})
        client = make_client(envoy.base_url, timeout=120)
        gen0 = gen_counters(rig)
        outs_box: list = []  # (threads, results) of each wave through Envoy

        def wave(first_idx: int, prompts: list[int], max_tokens: int) -> None:
            outs_box.append(run_concurrently(lambda i: chat(client, first_idx + i, prompts[i], max_tokens), len(prompts)))

        wave(3000, [0] * n_long, long_tokens)
        try:
            # (1) The victim: the server with the most long Envoy streams past their first token.
            samples: list = []

            def long_running():
                gs = {w: rig.try_gauges(w) for w in rig.servers}
                samples.append({w: g and (g.get("vllm:num_requests_running", 0), g.get("vllm:generation_tokens_total", 0) - gen0[w])
                                for w, g in gs.items()})
                # A scrape of a busy API server can take seconds here: take the first sample that
                # shows a server running long streams past their first token, not "all of them".
                runs = {w: g.get("vllm:num_requests_running", 0) for w, g in gs.items() if g is not None}
                if not runs:
                    return None
                w = max(runs, key=lambda k: (runs[k], k == "v1"))
                return (w, runs[w]) if runs[w] >= 1 and gs[w].get("vllm:generation_tokens_total", 0) > gen0[w] + 4 * runs[w] else None

            try:
                victim, r_envoy = wait_for(long_running, 120, f"all {n_long} long streams running, past their first token",
                                           interval=0.1)
            except harness.Timeout as e:
                raise harness.Timeout(f"{e}; (running, generated) samples: {samples[:3]} ... {samples[-3:]}") from None
            srv = rig.servers[victim]
            # (2) Fill the victim's other slots with requests straight to it, topping up (never
            # past 8 running + waiting) until it runs 8: then no slot frees there for the drill.
            direct = make_client(f"http://{srv.addr}/v1", timeout=120)
            n_bg, fill_seen = 0, []

            def fill():
                nonlocal n_bg
                g = rig.try_gauges(victim)
                if g is None:
                    return None
                run_, wait_ = g.get("vllm:num_requests_running", 0), g.get("vllm:num_requests_waiting", 0)
                fill_seen.append((run_, wait_))
                if run_ >= 8:
                    return g
                k = 8 - int(run_ + wait_)
                if k > 0:
                    bg_threads.extend(run_concurrently(lambda i, b=n_bg: chat(direct, 9000 + b + i, i % 4, bg_tokens), k)[0])
                    n_bg += k

                    def admitted():  # vLLM counts them (running or waiting) before we look again
                        g2 = rig.try_gauges(victim)
                        return g2 is not None and g2.get("vllm:num_requests_running", 0) + g2.get("vllm:num_requests_waiting", 0) >= 8

                    wait_for(admitted, 30, f"{k} background requests admitted by {victim}", interval=0.1)
                return None

            try:
                wait_for(fill, 120, f"{victim} full: {r_envoy:.0f} long Envoy streams + background = 8 running", interval=0.2)
            except harness.Timeout as e:
                raise harness.Timeout(f"{e}; sent {n_bg} background; (running, waiting) seen: {fill_seen[-10:]}") from None
            # (3) Short requests through Envoy, a small burst at a time, until one is queued on the
            # victim; then the SIGTERM, at once.
            g_kill, sent, bursts = None, 0, 0
            while g_kill is None and bursts < 8:
                k = 2 + bursts
                wave(3100 + sent, [1 + (sent + i) % 3 for i in range(k)], short_tokens)
                sent, bursts = sent + k, bursts + 1
                deadline = time.monotonic() + 2.0  # well inside the 3 s per-try window of the burst
                while time.monotonic() < deadline:
                    g = rig.try_gauges(victim, timeout=2.0)
                    if g and g.get("vllm:num_requests_waiting", 0) >= 1:
                        g_kill = g
                        break
                    time.sleep(0.05)
                if g_kill is None:
                    join_all(outs_box[-1][0], 60)  # this burst's requests are answered before the next
            assert g_kill is not None, f"none of {sent} short requests in {bursts} bursts was ever queued on the full {victim}"
            kill_mono = Outcome.t0 = time.monotonic()
            vl.os.kill(srv.pid, signal.SIGTERM)  # the API server only, as an orchestrator's stop would
        finally:
            for threads, _ in outs_box:
                join_all(threads, 180)
        still_alive = srv.alive()
        outs = [r for _, results in outs_box for r in results if r is not None]
        attach_access_log(envoy, outs)
        kinds = {o.idx: classify(o, refs[(o.prompt, o.max_tokens)]) for o in outs}
        vaddr, saddr = srv.addr, rig.servers[survivor_of(rig, victim)].addr
        pre = [o for o in outs if o.first_token_at is None or o.first_token_at > kill_mono + EPS]
        # Pre-token at the SIGTERM, answered by the survivor after more than one attempt: the
        # requests that were queued on the victim.
        # (vLLM 0.26 aborts them at once, so their retry's first token can come sooner than EPS.)
        retried = [o for o in outs if kinds[o.idx] == "completed" and o.attempts >= 2 and o.upstream == saddr
                   and o.first_token_at is not None and o.first_token_at > kill_mono]
        # What a started stream on the SIGTERMed server does varies: vLLM 0.32 (CPU) mostly stalls
        # it (it ends at Envoy's stream idle timeout as a transport truncation) and sometimes its
        # engine dies first (vLLM's in-band error event, then the end); vLLM 0.26 (GPU run) aborts
        # it at once with its own `finish_reason: "abort"`. Each is a clean end for the client.
        stalled = [o for o in outs if kinds[o.idx] in ("truncated", "aborted", "ended_error_event") and o.upstream == vaddr]
        aborted = [o for o in stalled if kinds[o.idx] == "aborted"]
        errored = [o for o in stalled if kinds[o.idx] == "ended_error_event"]
        retry_ttft = max((o.first_token_at - kill_mono for o in retried), default=float("nan"))
        stall_end = [o.ended - kill_mono for o in stalled]
        counts = summarize(list(kinds.values()))
        w_kill = g_kill.get("vllm:num_requests_waiting", 0)
        report(f"COUNTS stall: requests={len(outs)} ({n_long} x {long_tokens} tokens, {sent} x {short_tokens} in {bursts} bursts; "
               f"{n_bg} x {bg_tokens} straight to the victim) victim={victim} per_try_timeout={per_try}s "
               f"stream_idle_timeout={IDLE_TIMEOUT_S}s (running={g_kill.get('vllm:num_requests_running', 0):.0f} "
               f"waiting={w_kill:.0f} at SIGTERM) kinds={counts} pre_token_at_sigterm={len(pre)} "
               f"retried_to_survivor={len(retried)} first_token_after_sigterm={[round(o.first_token_at - kill_mono, 2) for o in retried]} "
               f"stalled_then_ended={len(stalled)} (of which vLLM aborted={len(aborted)}, vLLM error event={len(errored)}) ended_after={[round(x, 1) for x in stall_end]} "
               f"flags={sorted({o.flags for o in stalled})} api_server_alive_after={still_alive} {text_stats(outs)}")
        table = outcomes_table(outs, kinds)
        assert counts.get("splice", 0) == 0 and counts.get("short", 0) == 0, "splices or short answers:\n" + table
        assert counts.get("failed", 0) == 0, "a client saw an error without any token:\n" + table
        assert all(kinds[o.idx] == "completed" for o in pre), "a request pre-token at SIGTERM did not complete:\n" + table
        assert retried, ("no request queued on the victim at SIGTERM was answered by the survivor after a retry: "
                         "the drill tested nothing\n" + table)
        # Retried within the TTFT budget: one per-try timeout, then the survivor's own TTFT.
        assert retry_ttft <= per_try + 8, f"retry came {retry_ttft:.1f}s after SIGTERM\n" + table
        assert stalled, "no started stream on the SIGTERMed server stalled, was aborted or got vLLM's error event: the drill tested nothing\n" + table
        assert all(x <= IDLE_TIMEOUT_S + 4 for x in stall_end), f"a stall outlived the idle timeout: {stall_end}\n" + table
    finally:
        rig.stop_envoy(envoy)
        if victim is not None:
            rig.servers[victim].kill_group()  # also ends the background requests' connections
        for t in bg_threads:
            t.join(60)
        record("drill stall", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


def test_real_vllm_as_the_degraded_tier(rig: Rig):
    """Issue 13: the CPU build as the degraded tier behind a pool of fake full-size workers
    (model `big`), which are all killed mid-traffic: the router's next tier, this real server
    (model rewritten to its served name, `max_tokens` capped), serves every request after the
    kill with 0 client errors; the SDK sees a normal completion naming the degraded model, capped
    (`finish_reason` "length"); `x-gpuha-tier` names the tier."""
    t_start = time.monotonic()
    rig.ensure_up()
    st = rig.stack
    big = [st.start_worker(f"big{i}", model="big", pool="big", ttft_ms=30, tokens_per_s=200) for i in (1, 2)]
    st.wait_fresh([w.id for w in big])
    cap = 6
    tier = json.dumps({"name": "cpu", "port": harness.free_port(), "workers": [rig.servers["v1"].addr],
                       "model": vllm_rig.MODEL, "max_tokens": cap, "set": {"temperature": 0}})
    envoy = st.start_pool_router("envoy-degraded", workers=big, pool="big", tier_name="big", degraded=tier)
    try:
        wait_for(lambda: harness.filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
        client = make_client(envoy.base_url, timeout=120)

        def one(i: int):
            t0 = time.monotonic()
            r = client.chat.completions.with_raw_response.create(
                model="big", messages=[{"role": "user", "content": f"degraded {i}"}], max_tokens=32)
            c = r.parse()
            return t0, time.monotonic() - t0, r.headers.get("x-gpuha-tier"), c

        before = [one(i) for i in range(4)]
        kill_mono = time.monotonic()
        for w in big:
            w.proc.kill9()
            if w.sidecar is not None:
                w.sidecar.kill9()
        after, errors = [], []
        i = 100
        while time.monotonic() < kill_mono + 8.0 or len(after) < 6:
            try:
                after.append(one(i))
            except Exception as e:  # noqa: BLE001 - every client error is a failure of the drill
                errors.append(f"#{i}: {e!r}")
            i += 1
            assert time.monotonic() < kill_mono + 120, "the drill ran past two minutes"
        tiers = {}
        for _, _, t, _ in after:
            tiers[t] = tiers.get(t, 0) + 1
        deg = [(d, c) for _, d, t, c in after if t == "cpu"]
        own_ms = statistics.median(d for _, d, _, _ in before) * 1e3
        deg_ms = statistics.median(d for d, _ in deg) * 1e3 if deg else float("nan")
        report(f"COUNTS degraded: {len(after)} requests after every full-size worker died, client errors {len(errors)}, "
               f"served per tier {tiers}; whole answer median: full-size {own_ms:.0f} ms, degraded (real vLLM, "
               f"{cap} tokens) {deg_ms:.0f} ms; gpuha.degraded={harness.filter_stat(envoy, 'degraded')} "
               f"tier_adapted={harness.filter_stat(envoy, 'tier_adapted')}")
        assert not errors, errors[:5]
        assert all(t == "big" and c.model == "big" for _, _, t, c in before)
        assert deg, "the degraded tier served nothing"
        for _, c in deg:
            assert c.model == vllm_rig.MODEL, c.model
            assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == cap, c
        assert all(t in ("big", "cpu") for t in tiers), tiers
    finally:
        rig.stop_envoy(envoy)
        for w in big:
            # Dead on purpose: the rig's later `ensure_up` must not wait for them.
            w.proc.kill9()
            if w.sidecar is not None:
                w.sidecar.kill9()
            st.workers.pop(w.id, None)
    record("drill degraded", f"{time.monotonic() - t_start:.1f}s")


def test_apiserver_only_kill_leaves_orphans(rig: Rig):
    """SIGKILL of the API server process alone: its engine processes live on holding memory
    (the VRAM zombie on a GPU) while the sidecar goes silent; killing the group removes them."""
    t_start = time.monotonic()
    rig.ensure_up()
    victim = "v2"
    srv = rig.servers[victim]
    members_before = srv.members()
    rss_before = sum(srv.rss().values())
    srv.kill_api_server_only()
    kill_mono = srv.killed_at
    rig.stack.wait_stale([victim], timeout=8)
    stale_s = time.monotonic() - kill_mono
    orphans = srv.members()
    desc = {p: (vl.comm(p), vl.proc_ppid(p), vl.rss_bytes(p)) for p in orphans}
    orphan_rss = sum(r for _, _, r in desc.values())
    shm = sorted(srv.remember_shm())
    vram = gpu_mem_by_pid()  # {} on CPU
    orphan_vram = {p: vram[p] for p in orphans if p in vram}
    try:
        report(f"COUNTS api-only: group {srv.pgid} had {len(members_before)} processes ({rss_before / 2**20:.0f} MiB RSS); "
               f"after SIGKILL of the API server pid {srv.pid}: sidecar stale in dnsd after {stale_s:.1f}s, "
               f"orphans={len(orphans)} " + ", ".join(f"{p}:{c} ppid={pp} rss={r / 2**20:.0f}MiB" for p, (c, pp, r) in desc.items())
               + f" orphan_rss_total={orphan_rss / 2**20:.0f}MiB shm_files={len(shm)} subreaper={rig.subreaper}"
               + (f" gpu: nvidia-smi shows orphans holding {orphan_vram} MiB of GPU memory" if vram else ""))
        if rig.servers[victim].build == "gpu":
            assert orphan_vram, f"GPU build, but nvidia-smi shows no orphan holding GPU memory: {vram}"
        assert orphans, "no orphan left: this vLLM cleaned up after its API server by itself"
        assert orphan_rss > 100 * 2**20, f"orphans hold only {orphan_rss} bytes"
        assert all(vl.proc_state(p) not in (None, "Z") for p in orphans), desc
    finally:
        gone = srv.kill_group()  # kill -KILL -<pgid>; reaps re-parented orphans; removes the shm files
    left = vl.group_pids(srv.pgid, include_zombies=True)
    vram_left = {p: m for p, m in gpu_mem_by_pid().items() if p in orphans} if vram else {}
    report(f"COUNTS api-only cleanup: kill -KILL -{srv.pgid} ended {len(gone)} processes; left in group={left}; "
           f"shm files left={[p for p in shm if vl.os.path.exists(p)]}" + (f"; GPU memory still held by them={vram_left}" if vram else ""))
    assert not vram_left, f"GPU memory still held after the group kill: {vram_left}"
    assert not left, f"group {srv.pgid} still has {left} after the group kill"
    assert not [p for p in shm if vl.os.path.exists(p)], "shared-memory files survived the cleanup"
    record("drill api-only", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


ENVOY_LOG_RX = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]")


def envoy_log_instants(rig: Rig, envoy: harness.Envoy, needle: str) -> list[float]:
    """UNIX times of Envoy's own log lines (local time, ms) that contain `needle`."""
    path = rig.stack.logdir / f"{envoy.name}.log"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        m = ENVOY_LOG_RX.match(line)
        if m and needle in line:
            sec, ms = m.group(1).rsplit(".", 1)
            out.append(time.mktime(time.strptime(sec, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000)
    return out


def drill_idx(path: str) -> Optional[int]:
    m = re.search(r"[?&]drill=(-?\d+)", path)
    return int(m.group(1)) if m else None


DUR_RX = re.compile(r"dur_ms=(\d+)")


def envoy_end_times(envoy: harness.Envoy) -> dict[int, float]:
    """drill idx -> UNIX time at which Envoy ended the response (access log start + dur_ms)."""
    out = {}
    for line in envoy.access_log_entries():
        m, d = harness.ACCESS_RX.match(line), DUR_RX.search(line)
        if not (m and d) or drill_idx(m.group("path")) is None:
            continue
        sec, _, frac = m.group("start").rstrip("Z").partition(".")
        start = calendar.timegm(time.strptime(sec, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))
        out[drill_idx(m.group("path"))] = start + int(d.group(1)) / 1000
    return out


HANG_TTFT_AFTER_S = 3.0  # requests arriving this long after the hang: first-token target below
HANG_TTFT_TARGET_S = 3.0
HANG_STREAM_END_S = 15.0  # in-flight streams on the hung server end within this of its last sign of life
# vLLM's counters move on after its engine stops while the API server works through the outputs
# the engine made before (seen 3 s on 2 loaded cores): the hung server's last sign of life, as
# dnsd saw it, may come this long after the hang.
HANG_LAST_LIFE_S = 5.0


def test_engine_core_sigstop_hang(rig: Rig):
    """SIGSTOP of ONLY the EngineCore process of one server: what a CUDA/NCCL hang looks like from
    outside. Its API server keeps answering `/metrics` with frozen counters (running unchanged),
    sends 200 + headers at once to new requests and then nothing, and leaves its streams open
    with no bytes. Liveness is progress: the sidecar's frames keep coming, but the busy engine's
    numbers stop, so the picker stops sending it new requests ~3 s after the hang, the guard
    hands requests held before their first token on it to a retry as soon as the stall is known,
    and ends its streams past their first token 10 s after that (clean truncations). Both count
    from its last sign of life as dnsd saw it, which can come seconds after the hang (the API
    server still counting the engine's last outputs) and is bounded here too; a stall first
    seen late (its `/metrics` unanswered meanwhile) is judged by how long it has lasted.

    Load, placed by the drill so that the premise does not depend on the picker's choices: the
    victim's `n_long` long streams go through a second router that knows only the victim (its
    guard ends them); as many long streams go straight to the other server, so both servers'
    frames show the same load; then short streaming requests at `rate` a second through the
    router in front of both, from before the hang until `run_s` after it (equal frames, equal
    own load: it spreads them over both, so some are held on the victim when it hangs). At the
    end the EngineCore gets SIGCONT; the server is kept if it serves again, else its group is
    killed so that `ensure_up` restarts it."""
    t_start = time.monotonic()
    rig.ensure_up()
    per_try = 8.0  # far above the rescue: a retry seen before it is the guard's doing
    # Affinity off: the short requests share three prompts, and a key sticks to its worker; what
    # is tested is the hang contract, not placement.
    no_affinity = json.dumps({"pick": {"affinity": {"enabled": False}}})
    victim, engines, stopped = "v1", [], False
    survivor = survivor_of(rig, victim)
    envoy = rig.envoy(per_try_timeout=f"{per_try:.0f}s", picker_config=no_affinity)  # the short requests
    # Its cluster holds only the victim: a pick of the other server (the picker lists the whole
    # pool from dnsd) falls back to it. 60 s to the first token, and no "unseen by the engine"
    # rescue before it: a CPU engine just restarted took ~30 s over its first two long streams
    # (seen twice: retried onto itself until a 503). Their start is not under test, their end is.
    long_envoy = rig.envoy(per_try_timeout="60s", picker_config=no_affinity, guard_config=json.dumps({"unseen_after_ms": 60_000}),
                           only=[victim])
    srv = rig.servers[victim]
    cont_note = "not stopped"
    bg_loads: list = []
    try:
        warm_up(rig, envoy)
        warm_up(rig, long_envoy)
        # The long streams ran on both servers in 2 of 9 runs on this 2-core box (2026-11-30): mostly
        # the second one through the victim's router reached Envoy only when the first ended (each
        # from its own child process, or both from one; not explained, and not seen with a fake
        # worker's streams sent the same way), once the guard's unseen rescue retried them off a
        # just-restarted engine (now off for them). One a server (tried once) did not help.
        long_tokens, short_tokens, n_long = LONG_TOKENS, 16, 2
        rate, lead_s, run_s = 2.5, 3.0, 18.0
        refs = {(0, long_tokens): rig.reference(0, long_tokens)}
        refs.update({(p, short_tokens): rig.reference(p, short_tokens) for p in (1, 2, 3)})
        client = make_client(envoy.base_url, timeout=120)
        gen0 = gen_counters(rig)
        engines = srv.engine_core_pids()  # /proc now, not at the hang
        assert engines, f"no EngineCore process in group {srv.pgid}: {srv.describe()}"
        titles = {p: vl.comm(p) for p in engines}
        # Each long stream is read in a child process of its own: parsed here, their events starved
        # the short requests this drill times (seen: first tokens read 12 s after they came); two
        # in one child, the second was sent 20 s after the first.
        long_loads = [harness.ChildLoad(lambda: make_client(long_envoy.base_url, timeout=120),
                                        lambda c, i, k=k: chat(c, 4000 + k, 0, long_tokens), 1) for k in range(n_long)]
        bg_loads = [harness.ChildLoad(lambda: make_client(f"http://{rig.servers[survivor].addr}/v1", timeout=120),
                                      lambda c, i, k=k: chat(c, 9400 + k, 0, long_tokens), 1) for k in range(n_long)]
        long_res: list = []
        short_threads: list = []
        short_res: list[Outcome] = []
        lock = threading.Lock()
        view = harness.FleetSamples(rig.stack).__enter__()
        view_t0 = time.monotonic()
        hang_mono = None
        try:
            samples: list = []
            seen_ok: dict[str, tuple[float, float]] = {}  # server -> (when, running) it last ran its long streams

            def long_running():  # both servers run their long streams, past the first token
                gs = {w: rig.try_gauges(w, timeout=5) for w in rig.servers}
                samples.append({w: g and g.get("vllm:num_requests_running", 0) for w, g in gs.items()})
                now = time.monotonic()
                for w, g in gs.items():
                    if g is not None and g.get("vllm:num_requests_running", 0) >= n_long \
                            and g.get("vllm:generation_tokens_total", 0) > gen0[w] + 8 * n_long:
                        seen_ok[w] = (now, g["vllm:num_requests_running"])
                # Within 5 s of each other, not in one sample: a scrape of a busy server can fail.
                fresh = all(w in seen_ok and now - seen_ok[w][0] < 5.0 for w in rig.servers)
                return seen_ok[victim][1] if fresh else None

            try:
                r_victim = wait_for(long_running, 120, f"{n_long} long streams running past their first token on each server",
                                    interval=0.2)
            except harness.Timeout as e:
                raise harness.Timeout(f"{e}; running samples: {samples[:3]} ... {samples[-3:]}") from None

            def one(i: int) -> None:
                o = chat(client, i, 1 + i % 3, short_tokens)
                with lock:
                    short_res.append(o)

            def feed(until: float, first: int) -> int:
                i = first
                nxt = time.monotonic()
                while time.monotonic() < until:
                    t = threading.Thread(target=one, args=(i,), daemon=True)
                    t.start()
                    short_threads.append(t)
                    i += 1
                    nxt += 1.0 / rate
                    time.sleep(max(0.0, nxt - time.monotonic()))  # the request rate, not a readiness wait
                return i

            nxt_idx = feed(time.monotonic() + lead_s, 4100)
            hang_wall = time.time()
            hang_mono = Outcome.t0 = time.monotonic()
            for p in engines:
                vl.os.kill(p, signal.SIGSTOP)
            stopped = True
            feed(hang_mono + run_s, nxt_idx)
            join_all(short_threads, 120)
        finally:
            long_res = [o for ld in long_loads for o in ld.join(300)]
            if short_threads:
                join_all(short_threads, 120)
            view.__exit__(None, None, None)
            # Before the hang too: a server that looked stalled then (seen once: the victim's engine
            # at 0.2 tokens/s for 30 s on the loaded 2 cores) has its streams ended before the drill.
            report(f"COUNTS hang view before the hang (dnsd, every 0.2 s, from the long streams' start, times from it): "
                   f"{view_timeline(view, view_t0, hang_mono if hang_mono is not None else time.monotonic())}")
            if hang_mono is not None:
                report(f"COUNTS hang view (dnsd, every 0.2 s, from the hang to {run_s:.0f}s after; the survivor must look "
                       f"alive for the guard to end the hung server's streams): {view_timeline(view, hang_mono, hang_mono + run_s)}")
        states = {p: vl.proc_state(p) for p in engines}
        long_outs = [r for r in long_res if r is not None]
        outs = long_outs + list(short_res)
        attach_access_log(long_envoy, long_outs)
        attach_access_log(envoy, short_res)
        kinds = {o.idx: classify(o, refs[(o.prompt, o.max_tokens)]) for o in outs}
        vaddr, saddr = srv.addr, rig.servers[survivor].addr
        harness.access_entries(envoy)  # waits until the logs hold every completed request
        harness.access_entries(long_envoy)
        # drill idx -> UNIX time Envoy ended the response (the two routers' idx ranges differ)
        envoy_end = {**envoy_end_times(envoy), **envoy_end_times(long_envoy)}
        entries = [e for e in harness.access_entries(envoy, settle=False) if drill_idx(e["path"]) is not None]
        first_pick = {drill_idx(e["path"]): (e["endpoints"][0] if e["endpoints"] else e["upstream"]) for e in entries}
        first_pick.update({o.idx: vaddr for o in long_outs})  # the long streams' router knows only the victim
        # Routed to the hung server after the hang (first pick), and when.
        to_hung = sorted(e["start"] - hang_wall for e in entries if e["start"] and e["start"] >= hang_wall
                         and first_pick.get(drill_idx(e["path"])) == vaddr)
        last_new = max(to_hung, default=float("nan"))
        # Streams past their first token on the hung server that Envoy had not ended by the hang:
        # answered by it (last attempt), with text. (A stream vLLM finished before the hang may
        # still reach the SDK after it: the client parses every event; Envoy's end tells.)
        post = [o for o in outs if o.upstream == vaddr and o.text and envoy_end.get(o.idx, 0.0) > hang_wall]
        post_end = [round(o.ended - hang_mono, 2) for o in post]
        post_envoy_end = [round(envoy_end[o.idx] - hang_wall, 2) for o in post]
        last_life = last_sign_of_life(view, victim, hang_mono, hang_mono + max(post_envoy_end, default=run_s))
        # Held before their first token on the hung server: first pick the victim, and started
        # after the hang (its engine makes no token) or answered by another attempt; not one whose
        # first token the client had read before the hang (the router sent it earlier still). Seen
        # 2026-12-01: a long stream retried once before the hang (Envoy reused a connection vLLM
        # had just closed), its first token 4.5 s before the hang, counted here and failed below.
        pre_on_hung = [o for o in outs if first_pick.get(o.idx) == vaddr and envoy_end.get(o.idx, 0.0) > hang_wall
                       and (o.started >= hang_mono or o.attempts >= 2)
                       and not (o.first_token_at is not None and o.first_token_at <= hang_mono)]
        rescues = sorted(round(t - hang_wall, 2) for t in envoy_log_instants(rig, envoy, "held attempt handed to a retry")
                         if t >= hang_wall - 1)
        ends = sorted(round(t - hang_wall, 2) for e in (envoy, long_envoy)
                      for t in envoy_log_instants(rig, e, "stream past its first token ended") if t >= hang_wall - 1)
        pre_ft = [round(o.first_token_at - hang_mono, 2) if o.first_token_at else None for o in pre_on_hung]
        after = [o for o in short_res if o.started >= hang_mono]
        late = [o for o in after if o.started >= hang_mono + HANG_TTFT_AFTER_S]
        late_ttft = [o.first_token_at - o.started for o in late if o.first_token_at is not None]
        worst_late = max(late_ttft, default=float("nan"))
        early = [o for o in after if o.started < hang_mono + HANG_TTFT_AFTER_S and o.first_token_at is not None]
        worst_early = max((o.first_token_at - o.started for o in early), default=float("nan"))
        counts = summarize(list(kinds.values()))
        report(f"COUNTS hang: victim={victim} stopped={titles} states_before_cont={states} long={n_long}x{long_tokens} "
               f"a server ({r_victim:.0f} running on the victim) short={len(short_res)}x{short_tokens} at {rate}/s from {lead_s}s before "
               f"to {run_s}s after | last_new_to_hung={last_new:.2f}s (all {[round(x, 2) for x in to_hung]}) | "
               f"pre_token_on_hung={len(pre_on_hung)} retried_at={rescues} their_first_token={pre_ft} "
               f"their_wait={[round(o.first_token_at - max(o.started, hang_mono), 2) if o.first_token_at else None for o in pre_on_hung]} "
               f"attempts={[o.attempts for o in pre_on_hung]} | post_token_on_hung={len(post)} ended_at={post_end} "
               f"(envoy {post_envoy_end}; the victim's last sign of life {last_life:+.2f}s) "
               f"guard_end_log={ends} kinds={[kinds[o.idx] for o in post]} | started_after_hang={len(after)} "
               f"{summarize([kinds[o.idx] for o in after])} worst_ttft_arriving>={HANG_TTFT_AFTER_S:.0f}s={worst_late:.2f}s "
               f"(n={len(late)}) worst_ttft_arriving<{HANG_TTFT_AFTER_S:.0f}s={worst_early:.2f}s | all kinds={counts} "
               f"stall_rescues={harness.filter_stat(envoy, 'stall_rescues')} "
               f"stall_truncations={harness.filter_stat(envoy, 'stall_truncations') + harness.filter_stat(long_envoy, 'stall_truncations')} "
               f"pre_token_retries={harness.filter_stat(envoy, 'pre_token_retries')} {text_stats(outs)}")
        table = outcomes_table(outs, kinds)
        assert counts.get("splice", 0) == 0 and counts.get("short", 0) == 0, "splices or short answers:\n" + table
        assert all(len(o.ids) == 1 for o in outs), "a response without exactly one SSE id:\n" + table
        for o in outs:
            if kinds[o.idx] == "truncated":
                # A transport end, not a JSON error: the SDK got only whole SSE events.
                assert vllm_rig.is_transport_error(o.error), o.describe()
        assert post, "no stream was past its first token on the hung server: the drill tested nothing\n" + table
        assert all(kinds[o.idx] == "truncated" for o in post), "a stream on the hung server did not truncate:\n" + table
        # The router's end of each stream (Envoy's access log: start + duration) is what the bound
        # is about. The SDK client sees its end later by however long it takes to parse the
        # events vLLM made BEFORE the hang that are still queued towards it (this Python client
        # reads ~150 events/s a stream on 2 shared cores, vLLM makes ~750/s): reported, not bound.
        # The guard can act only on what dnsd saw: the bound counts from the victim's last sign
        # of life in dnsd's view (its counters' last move), which must come soon after the hang.
        assert last_life <= HANG_LAST_LIFE_S, f"dnsd saw the hung server alive until {last_life:.2f}s after the hang\n" + table
        assert max(post_envoy_end) <= max(last_life, 0.0) + HANG_STREAM_END_S, \
            f"Envoy ended the streams on the hung server {post_envoy_end}s after the hang, its last sign of life {last_life:+.2f}s\n" + table
        assert pre_on_hung, "no request was held before its first token on the hung server: the drill tested nothing\n" + table
        assert all(kinds[o.idx] == "completed" and o.upstream == saddr for o in pre_on_hung), \
            "a request held on the hung server was not answered by the other one:\n" + table
        assert all(kinds[o.idx] == "completed" for o in after), "a request started after the hang did not complete:\n" + table
        assert late and worst_late <= HANG_TTFT_TARGET_S, \
            f"a request arriving >= {HANG_TTFT_AFTER_S}s after the hang waited {worst_late:.2f}s for its first token\n" + table
    finally:
        rig.stop_envoy(envoy)
        rig.stop_envoy(long_envoy)
        if stopped:
            cont_note = cont_engines(rig, victim, engines)
            report(f"COUNTS hang cleanup: {cont_note}")
        for ld in bg_loads:
            ld.join(300)  # the survivor's direct long streams: not into the next drill
        record("drill hang", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


def test_engine_core_sigstop_last_attempt_rescue(rig: Rig):
    """SIGSTOP of one server's EngineCore while it runs a stream, behind a router that knows only
    that server and whose lists hold one worker and no attempt past it. A new stream sent to it
    gets 200 and headers at once from its API server, then nothing; its frames keep coming with
    frozen counters, so once the stall has lasted past the gate the guard's rescue makes the held
    answer a retryable 503. With no attempt left Envoy hands that 503 to the client, and its
    body never comes: the picker answers in its place with an OpenAI-shaped 503
    (`x-gpuha-guard: rescued`), so the client gets an error it can retry within seconds of the
    hang instead of waiting for its own timeout (60 s here; the per-try budget is 60 s too).
    (Stopped while idle, it sends a stream's headers at once too; the rule for an engine hung
    while idle finds it then: `test_engine_core_sigstop_while_idle_streams`.) A request that does not stream, sent at the same moment, gets no
    headers before its whole answer: the guard follows it from its start and answers it the same
    way once the stall shows (the native guard for the server, the Wasm guard to the client as
    the request's last attempt), where it waited out its budget (300 s) before."""
    t_start = time.monotonic()
    rig.ensure_up()
    victim = "v1"
    srv = rig.servers[victim]
    one_attempt = json.dumps({"pick": {"max_endpoints": 1, "retries_past_list": 0, "affinity": {"enabled": False}}})
    envoy = rig.envoy(per_try_timeout="60s", picker_config=one_attempt, only=[victim])
    engines: list[int] = []
    stopped = False
    long_load = None
    try:
        warm_up(rig, envoy)
        gen0 = gen_counters(rig)[victim]
        # The busy engine's stream, straight to it (read in a child process: see the hang drill).
        long_load = harness.ChildLoad(lambda: make_client(f"http://{srv.addr}/v1", timeout=120),
                                      lambda c, i: chat(c, 5100, 0, 8192), 1)

        def running_past_first_token() -> bool:
            g = rig.try_gauges(victim, timeout=5)
            return bool(g) and g.get("vllm:num_requests_running", 0) >= 1 and g.get("vllm:generation_tokens_total", 0) > gen0 + 8

        wait_for(running_past_first_token, 120, "the victim's stream running past its first token", interval=0.2)
        engines, hang_mono = stop_engine_cores(srv)
        stopped = True
        whole: list = []
        sender = threading.Thread(target=lambda: whole.append(harness.chat(make_client(envoy.base_url, timeout=60), 5001, 8, stream=False,
                                                                     model=vllm_rig.MODEL, temperature=0, extra_query={"drill": "5001"})))
        sender.start()
        o = chat(make_client(envoy.base_url, timeout=60), 5000, 1, 8)
        join_all([sender], 90)
        for out in [o, *whole]:
            answered = out.ended - hang_mono
            entries = [e for e in harness.access_entries(envoy) if drill_idx(e["path"]) == out.idx]
            kind = "a stream" if out.stream else "an answer that does not stream"
            report(f"COUNTS last-attempt rescue ({filter_build()}): {kind} sent at the hang answered {getattr(out.error, 'status_code', None)} "
                   f"{answered:.2f}s after it ({[(e['code'], e['guard'], e['attempts']) for e in entries]}; {out.describe()}); "
                   f"stall_rescues {harness.filter_stat(envoy, 'stall_rescues')}")
            assert isinstance(out.error, openai.InternalServerError) and out.error.status_code == 503, out.describe()
            assert "no other attempt was left" in str(out.error), out.describe()
            assert answered < 15.0, f"the client's answer came {answered:.2f}s after the hang ({kind})"
            assert len(entries) == 1 and entries[0]["guard"] == "rescued" and entries[0]["attempts"] == 1, entries
        assert len(whole) == 1
    finally:
        rig.stop_envoy(envoy)
        if stopped:
            report(f"COUNTS last-attempt rescue cleanup: {cont_engines(rig, victim, engines)}")
        if long_load is not None:
            long_load.join(300)
        record("drill last-attempt rescue", f"{time.monotonic() - t_start:.1f}s (includes any restart)")


def test_engine_core_sigstop_answer_that_does_not_stream(rig: Rig):
    """SIGSTOP of the EngineCore of the server generating an answer that does not stream (8000
    tokens, ignore_eos). vLLM sends such an answer's headers only with the whole answer, so
    nothing is held to rescue. With the native filter the guard follows the attempt from its
    start: once the stopped server shows no sign of life (its frames keep coming with frozen
    counters; the gate and 2 s), the attempt is answered for the server with a retryable 503 that
    the router retries on the other server, and the client gets the whole answer from it well
    before the request's per-try budget (`non_stream_timeout_ms`, 60 s here). With the Wasm
    filter (Envoy's Wasm host cannot answer for the server) the budget decides: the retry comes
    at 60 s."""
    t_start = time.monotonic()
    rig.ensure_up()
    native = filter_build() == "native"
    budget_s = 60.0
    n_tokens = 8000
    envoy = rig.envoy(picker_config=json.dumps({"non_stream_timeout_ms": int(budget_s * 1000)}))
    victim = ""
    engines: list[int] = []
    try:
        warm_up(rig, envoy)
        gen0 = gen_counters(rig)
        client = make_client(envoy.base_url, timeout=240)

        def one() -> tuple[float, object]:
            try:
                r = client.chat.completions.create(model=vllm_rig.MODEL, messages=[{"role": "user", "content": vllm_rig.PROMPTS[0]}],
                                                   max_tokens=n_tokens, temperature=0, stream=False, extra_body={"ignore_eos": True},
                                                   extra_query={"drill": "5300"})
            except openai.OpenAIError as e:
                return time.monotonic(), e
            return time.monotonic(), r

        def generating() -> Optional[str]:
            for wid in rig.servers:
                g = rig.try_gauges(wid, timeout=5)
                if g and g.get("vllm:num_requests_running", 0) >= 1 and g.get("vllm:generation_tokens_total", 0) > gen0[wid] + 8:
                    return wid
            return None

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(one)
            victim = wait_for(generating, 120, "the answer generating on a server", interval=0.2)
            srv = rig.servers[victim]
            engines, hang_mono = stop_engine_cores(srv)
            ended, r = future.result(timeout=300)
        entries = [e for e in harness.access_entries(envoy) if drill_idx(e["path"]) == 5300]
        took = ended - hang_mono
        report(f"COUNTS answer that does not stream, {victim}'s engine stopped mid-answer ({filter_build()}): answered "
               f"{took:.1f} s after the hang ({r.usage.completion_tokens if not isinstance(r, Exception) else repr(r)}); access log "
               f"{[(e['code'], e['attempts'], e['endpoints'], e['upstream']) for e in entries]}; stall_rescues {harness.filter_stat(envoy, 'stall_rescues')}")
        assert not isinstance(r, Exception) and r.usage.completion_tokens == n_tokens, r
        assert len(entries) == 1, entries
        e = entries[0]
        assert e["code"] == "200" and e["attempts"] == 2 and e["endpoints"][:1] == [srv.addr] and e["upstream"] != srv.addr, e
        if native:
            assert took < budget_s, f"the rescued answer came {took:.1f} s after the hang: its attempt waited out its budget"
            assert harness.filter_stat(envoy, "stall_rescues") >= 1
        else:
            assert took > budget_s, f"Wasm: retried before the per-try budget ({took:.1f} s): this drill's premise changed"
    finally:
        end_engine_drill(rig, envoy, victim, engines, "answer that does not stream", "drill answer that does not stream, engine stopped", t_start)


def end_engine_drill(rig: Rig, envoy: harness.Envoy, victim: str, engines: list[int], what: str, drill: str, t_start: float) -> None:
    """A stopped-engine drill's end, whatever its outcome: its Envoy stopped, the `engines` it
    stopped resumed (the server is kept if it serves again, else its group is killed), and its
    time recorded as `drill`."""
    rig.stop_envoy(envoy)
    if engines:
        report(f"COUNTS {what} cleanup: {cont_engines(rig, victim, engines)}")
    record(drill, f"{time.monotonic() - t_start:.1f}s (includes any restart)")


def stop_engine_cores(srv: vl.VllmServer, clock: Callable[[], float] = time.monotonic) -> tuple[list[int], float]:
    """SIGSTOP of `srv`'s EngineCore process(es), its API server left running: a hang as a
    CUDA/NCCL hang looks from outside. Returns them (for `cont_engines`) and `clock()` read just
    before the stop."""
    engines = srv.engine_core_pids()
    assert engines, f"no EngineCore process in group {srv.pgid}: {srv.describe()}"
    at = clock()
    for p in engines:
        vl.os.kill(p, signal.SIGSTOP)
    return engines, at


def stop_idle_engine(rig: Rig, envoy: harness.Envoy, victim: str) -> tuple[list[int], float]:
    """Stops (SIGSTOP) `victim`'s EngineCore once it has served a request and is idle: its
    `/metrics` keeps answering with its numbers frozen at zero, so it looks idle (the best pick).
    Returns the stopped processes (for `cont_engines`) and the wall time of the stop."""
    srv = rig.servers[victim]
    warm_up(rig, envoy)
    # The rule judges an engine that has served (a fresh engine's first step shows nothing).
    served = chat(make_client(f"http://{srv.addr}/v1", timeout=120), 5400, 0, 4)
    assert served.error is None, served.describe()
    wait_for(lambda: rig.stack.fleet_workers().get(victim, {}).get("ttft_ms") is not None, 30, "the victim's TTFT in the fleet view", interval=0.2)

    def idle() -> bool:
        g = rig.try_gauges(victim, timeout=5)
        return bool(g) and g.get("vllm:num_requests_running", 0) == 0 and g.get("vllm:num_requests_waiting", 0) == 0

    wait_for(idle, 60, "the victim idle", interval=0.2)
    return stop_engine_cores(srv, time.time)


def paced_pairs(first: int, send: Callable[[int], Outcome], wait_s: float) -> list[Outcome]:
    """Six pairs of requests (`send(drill index)`), a pair a second. Two at a time: each server
    idle, the picker sends a lone request to the better score every time; the second of a pair
    goes to the server with less of this router's load."""
    outs: list = []
    lock = threading.Lock()

    def one(i: int) -> None:
        o = send(i)
        with lock:
            outs.append(o)

    threads = []
    for i in range(first, first + 12, 2):
        for k in (i, i + 1):
            threads.append(threading.Thread(target=one, args=(k,), daemon=True))
            threads[-1].start()
        time.sleep(1.0)  # the request rate, not a readiness wait
    join_all(threads, wait_s)
    return outs


def first_sent_to(envoy: harness.Envoy, srv: vl.VllmServer, first_idx: int, hang_wall: float, outs: list[Outcome]) -> tuple[list[dict], dict[int, float], str]:
    """The requests from drill index `first_idx` on, sent after the stop at `hang_wall`, whose
    first endpoint was `srv` (breaker probes left out), from the access log; each request's time
    from sent to answered; and those requests for the report (index, sent after the stop, status,
    attempts, time)."""
    entries = [e for e in harness.access_entries(envoy) if (drill_idx(e["path"]) or 0) >= first_idx and e["start"] and e["start"] >= hang_wall]
    on_victim = [e for e in entries if e["endpoints"][:1] == [srv.addr] and not e["probe"]]
    took = {o.idx: o.ended - o.started for o in outs}
    shown = [(drill_idx(e["path"]), round(e["start"] - hang_wall, 1), e["code"], e["attempts"], round(took.get(drill_idx(e["path"]), -1), 1)) for e in on_victim]
    return on_victim, took, str(shown)


def test_engine_core_sigstop_while_idle_answers_that_do_not_stream(rig: Rig):
    """SIGSTOP of one server's EngineCore while it is idle (`stop_idle_engine`): vLLM 0.32 sends
    a new request that does not stream no headers (they come with the whole answer). Requests
    that do not stream, through a router in front of both servers, two at a time: one the
    stopped server takes stays unseen by its engine, and once its idle frames still do not show
    it after `unseen_no_headers_after_ms` (8 s here) the guard charges the server, whose circuit
    opens, and moves the attempt where the host can (the native filter: answered for the server,
    retried on the other). With the Wasm filter the attempt waits out its per-try budget
    (`non_stream_timeout_ms`, 60 s here), and no request sent after the charge goes to the
    stopped server but a half-open probe. Before, every request it took waited its budget, and
    it was charged only then."""
    t_start = time.monotonic()
    rig.ensure_up()
    native = filter_build() == "native"
    budget_s, unseen_s = 60.0, 8.0
    victim = "v1"
    srv = rig.servers[victim]
    envoy = rig.envoy(picker_config=json.dumps({"non_stream_timeout_ms": int(budget_s * 1000), "pick": {"affinity": {"enabled": False}}}),
                      guard_config=json.dumps({"unseen_no_headers_after_ms": int(unseen_s * 1000)}))
    engines: list[int] = []
    try:
        engines, hang_wall = stop_idle_engine(rig, envoy, victim)
        client = make_client(envoy.base_url, timeout=budget_s + 60)
        outs = paced_pairs(5410, lambda i: harness.chat(client, i, 8, stream=False, model=vllm_rig.MODEL, temperature=0,
                                                        extra_query={"drill": str(i)}), budget_s + 90)
        on_victim, took, shown = first_sent_to(envoy, srv, 5410, hang_wall, outs)
        charges, rescues = harness.filter_stat(envoy, "unseen_charges"), harness.filter_stat(envoy, "stall_rescues")
        report(f"COUNTS idle engine stopped, answers that do not stream ({filter_build()}): {summarize(outs)}; first sent to {victim}: {shown}; "
               f"slowest {max(took.values(), default=0):.1f} s; unseen charges {charges}, rescues {rescues}, "
               f"breaker_trips {harness.filter_stat(envoy, 'breaker_trips')}")
        whole = [o for o in outs if o.error is None and o.completion_tokens == 8]
        assert len(outs) == 12 and len(whole) == 12, [o.describe() for o in outs if o not in whole]
        assert on_victim, "no request went to the stopped server: the drill tested nothing"
        first = min(e["start"] for e in on_victim) - hang_wall
        late = [e for e in on_victim if e["start"] - hang_wall > first + unseen_s + 3.0]
        assert not late, f"requests still went to the stopped server after it was charged: {late}"
        assert charges + rescues >= 1
        for e in on_victim:
            t = took[drill_idx(e["path"])]
            if native:
                assert t < unseen_s + 15.0, f"#{drill_idx(e['path'])} took {t:.1f} s: its attempt waited on the stopped server"
            else:
                assert t > budget_s, f"Wasm: #{drill_idx(e['path'])} took {t:.1f} s, within its budget: this drill's premise changed"
    finally:
        end_engine_drill(rig, envoy, victim, engines, "idle engine stopped", "drill idle engine stopped, answers that do not stream", t_start)


def test_engine_core_sigstop_while_idle_streams(rig: Rig):
    """The idle stop above (`stop_idle_engine`), with streams and the guard's defaults: vLLM 0.32
    sends a stream's `200` and headers at once even with its EngineCore stopped (measured
    directly: 0.00 s; a request that does not stream gets none), and the guard holds them until
    the first token. The stopped server's idle frames never show such a request, so after
    `unseen_after_ms` (2.5 s, and a frame taken a second after it arrived) the guard hands it to
    a retry and the server's circuit opens: each stream it took is answered whole from the other
    server within a few seconds, in both builds (a held attempt is one Envoy's Wasm host lets the
    guard move), and no new request goes to it after the first one's rescue."""
    t_start = time.monotonic()
    rig.ensure_up()
    victim = "v1"
    srv = rig.servers[victim]
    unseen_s = 2.5
    envoy = rig.envoy(picker_config=json.dumps({"pick": {"affinity": {"enabled": False}}}))
    engines: list[int] = []
    try:
        engines, hang_wall = stop_idle_engine(rig, envoy, victim)
        client = make_client(envoy.base_url, timeout=60)
        outs = paced_pairs(5430, lambda i: chat(client, i, i % len(vllm_rig.PROMPTS), 8), 90)
        on_victim, took, shown = first_sent_to(envoy, srv, 5430, hang_wall, outs)
        rescues, trips = harness.filter_stat(envoy, "stall_rescues"), harness.filter_stat(envoy, "breaker_trips")
        report(f"COUNTS idle engine stopped, streams ({filter_build()}): {[classify(o, '') for o in outs]}; first sent to {victim}: {shown}; "
               f"slowest {max(took.values(), default=0):.1f} s; rescues {rescues}, breaker_trips {trips}")
        kinds = [classify(o, "") for o in outs]
        assert len(outs) == 12 and all(k == "completed" for k in kinds), [o.describe() for o, k in zip(outs, kinds) if k != "completed"]
        assert on_victim, "no request went to the stopped server: the drill tested nothing"
        first = min(e["start"] for e in on_victim) - hang_wall
        late = [e for e in on_victim if e["start"] - hang_wall > first + unseen_s + 2.5]
        assert not late, f"requests still went to the stopped server after its first was rescued: {late}"
        assert rescues >= len(on_victim) and trips >= 1, (rescues, trips)
        slow = {drill_idx(e["path"]): round(took[drill_idx(e["path"])], 1) for e in on_victim if took[drill_idx(e["path"])] > unseen_s + 4.0}
        assert not slow, f"streams waited on the stopped server: {slow}"
    finally:
        end_engine_drill(rig, envoy, victim, engines, "idle engine stopped", "drill idle engine stopped, streams", t_start)


def last_sign_of_life(view: harness.FleetSamples, wid: str, t0: float, t1: float) -> float:
    """When `wid` last showed a sign of life (its counters moved, or it was idle), in seconds
    after t0, as dnsd's view sampled from t0 to t1 dates it (a sample's time less the worker's
    exact age); t0 when no sample in that span shows it stale."""
    stale = [t - w.get("age_ms", 0) / 1000 for t, ws in view.samples if t0 <= t <= t1
             for w in [ws.get(wid)] if w is not None and not w.get("fresh")]
    return max(stale, default=t0) - t0


def view_timeline(view: harness.FleetSamples, t0: float, t1: float) -> str:
    """dnsd's view of each server from t0 to t1 (times in seconds after t0): how many samples
    showed it not fresh, the first of them, the first showing no sign of life (stalled, last
    sign of life older than the 3 s gate: what the guard acts on), the longest time without one. The hang drill's
    bounds rest on what the routers saw (the guard ends a hung server's streams only while
    another server is alive); when they are missed, this says whether a server looked dead or
    alive, and when."""
    out = []
    window = [(t - t0, ws) for t, ws in view.samples if t0 <= t <= t1]
    for wid in sorted({w for _, ws in window for w in ws}):
        seen = [(t, ws[wid]) for t, ws in window if wid in ws]
        stale = [t for t, w in seen if not w.get("fresh")]
        no_life = [t for t, w in seen if w.get("stalled") and (w.get("age_ms") or 0) > 3000]
        line = f"{wid}: not fresh {len(stale)}/{len(seen)}" + (f" (first {stale[0]:+.1f}s)" if stale else "")
        line += f", no sign of life from {no_life[0]:+.1f}s" if no_life else ", no sign of life never"
        line += f", longest without a sign of life {max((w.get('age_ms') or 0 for _, w in seen), default=0) / 1000:.1f}s"
        # Each change of condition: A alive (fresh), S stalled (frames, numbers frozen), D silent.
        changes, last = [], None
        for t, w in seen:
            c = "A" if w.get("fresh") else "S" if w.get("stalled") else "D"
            if c != last:
                changes.append(f"{c}{t:+.1f}")
                last = c
        line += f", conditions {' '.join(changes)}"
        out.append(line)
    times = [t for t, _ in window]
    gaps = [b - a for a, b in zip(times, times[1:])]
    failed = [f"{t - t0:+.1f}s {why}" for t, why in view.failures if t0 <= t <= t1]
    out.append(f"{len(times)} samples, longest gap {max(gaps, default=0.0):.1f}s, {len(failed)} reads failed {failed[:6]}")
    return "; ".join(out) or "no samples"


def cont_engines(rig: Rig, wid: str, engines: list[int]) -> str:
    """SIGCONT to the stopped EngineCore processes of `wid`, then `resume_or_kill`."""
    for p in engines:
        try:
            vl.os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return resume_or_kill(rig, wid)


def resume_or_kill(rig: Rig, wid: str, timeout: float = 30.0) -> str:
    """After SIGCONT: keeps the server if its engine serves again (a short request straight to
    it completes and dnsd sees it fresh), else kills its group so that `ensure_up` restarts it."""
    srv = rig.servers[wid]
    t0 = time.monotonic()
    client = make_client(f"http://{srv.addr}/v1", timeout=timeout)
    o = chat(client, -2, 1, 8, timeout=timeout)
    if o.error is None and o.finish_reason == "length":
        try:
            rig.stack.wait_fresh([wid], timeout=10)
            return f"{wid} served again {time.monotonic() - t0:.1f}s after SIGCONT: kept"
        except harness.Timeout:
            pass
    srv.kill_group()
    return f"{wid} did not serve after SIGCONT ({o.describe()}): group killed for a restart"
