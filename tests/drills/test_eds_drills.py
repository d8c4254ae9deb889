"""Membership over EDS (issue 14, part 1): the router's worker cluster comes from dnsd
(`POST /v3/discovery:endpoints`, REST-JSON polled by stock Envoy), built from the sidecars'
frames. No `--workers`, no re-render, no Envoy restart.

  scale     2 workers, add 2 (fake vLLM + sidecar started), remove 3 (two killed, one drained
            through dnsd's admin API and stopped), add 1 back, all under traffic: 0 client
            errors; a new worker is served within ~1 s of its first frame; no request reaches a
            removed worker after it left the cluster; a worker of another pool never joins;
            Envoy's pid never changes.
  restart   dnsd restarted on the same ports under traffic: the router keeps its membership
            (dnsd answers 503 during its warm-up, Envoy keeps what it has), no request lost.
  leave     a worker whose sidecar goes silent leaves after leave_after; the stream it serves
            then runs to its end.
  tiers     EDS with a degraded tier: dnsd puts the tier endpoints named in the node metadata
            at priority 1; every full-size worker killed → the degraded tier serves.

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \\
        python3 -m pytest tests/drills/test_eds_drills.py -v -s
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import gpuha_harness as harness
from gpuha_harness import Load, Outcome, access_entries, chat, filter_stat, free_port, http_post, make_client, per_worker, wait_for
from gpuha_harness import summarize, warm_up

MODEL = "tiny"
# Short for the drill (the default is 2 min): silent this long, a worker leaves the cluster.
LEAVE_AFTER_MS = 4_000
ADMIN_TOKEN = "drill-admin-token-0123456789"


def report(line: str) -> None:
    print(f"\n{line}", flush=True)


def dnsd_config(stack: harness.Stack) -> Path:
    token = stack.logdir / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    cfg = stack.logdir / "dnsd.toml"
    cfg.write_text(
        f'[ingest]\nkeys = [{{ id = {stack.key_id}, file = "{stack.key_file}" }}]\n'
        f'[eds]\nleave_after_ms = {LEAVE_AFTER_MS}\n'
        f'[admin]\ntoken_file = "{token}"\n'
    )
    return cfg


def members(envoy: harness.Envoy) -> dict[str, str]:
    """The worker cluster's hosts in Envoy right now: {ip:port: priority}."""
    return {h: s.get("priority", "?") for h, s in envoy.host_stats("gpuha_workers").items() if "priority" in s}



class Watch:
    """Polls Envoy's cluster and dnsd's fleet every 10 ms in a thread: when each address joined
    and left the cluster, when each worker id first showed in dnsd's view (minus its age: the
    first frame's arrival; frames come every 500 ms, so the first sighting is of the first one),
    and every address ever seen in the cluster."""

    def __init__(self, stack: harness.Stack, envoy: harness.Envoy):
        self.stack, self.envoy = stack, envoy
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.first_frame: dict[str, float] = {}
        self.ever: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            try:
                hosts = set(members(self.envoy))
            except OSError:
                hosts = None
            if hosts is not None:
                self.ever |= hosts
                for h in hosts:
                    self.joined.setdefault(h, now)
                    self.left.pop(h, None)
                for h in set(self.joined) - hosts:
                    self.left.setdefault(h, now)
            try:
                for w in self.stack.dnsd.fleet().get("workers", []):
                    self.first_frame.setdefault(w["id"], now - w["age_ms"] / 1000)
            except (OSError, AssertionError, ValueError):
                pass
            time.sleep(0.01)

    def __enter__(self) -> "Watch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def kill_worker(w: harness.Worker) -> None:
    """The machine dies: the worker and its sidecar (silence)."""
    w.proc.kill9()
    if w.sidecar is not None:
        w.sidecar.kill9()


def ms(x: float) -> str:
    return f"{1000 * x:.0f} ms"


def test_eds_scale_during_traffic(stack):
    stack.start_dnsd(config=dnsd_config(stack))
    w1, w2 = stack.start_worker("w1"), stack.start_worker("w2")
    other = stack.start_worker("x1", pool="p2")  # another pool's worker: never in this router's cluster
    stack.wait_fresh(["w1", "w2", "x1"])
    envoy = stack.start_pool_router(eds=True, pool="p1")
    envoy_pid = envoy.proc.pid
    wait_for(lambda: set(members(envoy)) == {w1.addr, w2.addr}, 10, f"w1 and w2 ({w1.addr}, {w2.addr}) in Envoy's cluster over EDS")
    warm_up(stack, envoy)
    client = make_client(envoy.base_url)

    with Watch(stack, envoy) as watch, Load(client, 3, stream=False) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 20, "20 requests with 2 workers")
        # Scale up: two new machines, their sidecars start sending.
        w3, w4 = stack.start_worker("w3"), stack.start_worker("w4")
        added = [w3, w4]
        wait_for(lambda: all(w.addr in watch.joined for w in added), 10, "w3 and w4 in Envoy's cluster")
        served = lambda ws: all(any(e["upstream"] == w.addr for e in access_entries(envoy, settle=False)) for w in ws)  # noqa: E731
        wait_for(lambda: served(added), 10, "a request served by w3 and by w4", interval=0.1)

        # Scale down: two machines die, one is drained and stopped gracefully.
        removed_at = time.time()
        kill_worker(w1)
        kill_worker(w3)
        st, _, body = http_post(f"http://{stack.dnsd.http}/v1/admin/workers/w2", b'{"state":"drain","reason":"scale down"}',
                                headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert st == 200, body
        wait_for(lambda: stack.fleet_workers()["w2"].get("drained"), 5, "w2 drained in dnsd's view")
        # Its requests in flight finish; then the pod goes away.
        wait_for(lambda: members(envoy).get(w2.addr) is None or envoy.host_stats("gpuha_workers").get(w2.addr, {}).get("rq_active") == "0",
                 10, "w2 idle")
        w2.sidecar.terminate()
        w2.proc.terminate()
        gone = [w1, w2, w3]
        wait_for(lambda: all(w.addr in watch.left for w in gone), LEAVE_AFTER_MS / 1000 + 10, "w1, w2, w3 out of Envoy's cluster")

        # Scale up again: one machine back.
        w5 = stack.start_worker("w5")
        wait_for(lambda: w5.addr in watch.joined, 10, "w5 in Envoy's cluster")
        wait_for(lambda: served([w5]), 10, "a request served by w5", interval=0.1)
        wait_for(lambda: sum(o.started > time.monotonic() - 1 for o in load.outcomes) >= 5, 10, "traffic after the last join")
    entries = access_entries(envoy)

    def first_served(w: harness.Worker) -> float:
        return min(e["start"] for e in entries if e["upstream"] == w.addr and e["start"])

    joins = {w.id: (watch.joined[w.addr] - watch.first_frame[w.id], first_served(w) - watch.first_frame[w.id]) for w in (w3, w4, w5)}
    leaves = {w.id: watch.left[w.addr] - removed_at for w in gone}
    late = [e for w in gone for e in entries if e["upstream"] == w.addr and e["start"] and e["start"] > watch.left[w.addr]]
    errors = [o.describe() for o in load.outcomes if o.kind != "completed"]
    eds = envoy.stats(r"^cluster\.gpuha_workers\.(update_success|update_failure|update_attempt|membership_change)$")
    report(f"eds scale: {len(load.outcomes)} requests {summarize(load.outcomes)}; first frame → in the cluster / first request "
           f"served: {', '.join(f'{k} {ms(a)} / {ms(b)}' for k, (a, b) in joins.items())}; removal → out of the cluster "
           f"(leave_after {LEAVE_AFTER_MS} ms): {', '.join(f'{k} {ms(v)}' for k, v in leaves.items())}; requests to a "
           f"removed worker after it left: {len(late)}; Envoy pid {envoy_pid} → {envoy.proc.pid} alive={envoy.proc.alive()}; "
           f"{eds}")

    assert not errors, "client errors:\n" + "\n".join(errors[:10])
    for wid, (member, first) in joins.items():
        assert member <= 1.5 and first <= 1.5, f"{wid} served {ms(first)} after its first frame (member after {ms(member)})"
    assert not late, f"requests to removed workers after they left: {late[:5]}"
    assert other.addr not in watch.ever, "a worker of pool p2 joined the p1 router's cluster"
    assert envoy.proc.alive() and envoy.proc.pid == envoy_pid
    assert set(members(envoy)) == {w4.addr, w5.addr}


def test_eds_dnsd_restart_keeps_membership(stack):
    cfg = dnsd_config(stack)
    dnsd = stack.start_dnsd(config=cfg)
    ws = [stack.start_worker(f"w{i}") for i in (1, 2)]
    stack.wait_fresh([w.id for w in ws])
    envoy = stack.start_pool_router(eds=True, pool="p1")
    want = {w.addr for w in ws}
    wait_for(lambda: set(members(envoy)) == want, 10, "both workers in Envoy's cluster")
    warm_up(stack, envoy)
    client = make_client(envoy.base_url)
    fail0 = envoy.stats(r"update_failure$").get("cluster.gpuha_workers.update_failure", 0)
    seen: list[set[str]] = []
    with Load(client, 3, stream=False) as load:
        wait_for(lambda: len(load.outcomes) >= 20, 20, "20 requests before the restart")
        down_at = time.monotonic()
        dnsd.proc.terminate()
        # While dnsd is down the router polls in vain and keeps what it has.
        wait_for(lambda: envoy.stats(r"update_failure$").get("cluster.gpuha_workers.update_failure", 0) >= fail0 + 2, 10,
                 "Envoy's EDS polls failing while dnsd is down")
        seen.append(set(members(envoy)))
        new = stack.start_dnsd(ingest=dnsd.ingest, http=dnsd.http, config=cfg)
        back_at = time.monotonic()
        # Through the new dnsd's warm-up (503s) to its first answers: counted by the new dnsd,
        # since the same membership gets the same version, which Envoy holds, so dnsd answers
        # 304 and Envoy counts no update.

        def answered() -> bool:
            seen.append(set(members(envoy)))  # the membership all along the warm-up
            m = new.metrics()
            return sum(m.get(f'gpuha_dnsd_eds_requests_total{{result="{r}"}}', 0) for r in ("ok", "not_modified")) >= 2

        wait_for(answered, 15, "the restarted dnsd to answer Envoy's EDS polls", interval=0.05)
        answered_at = time.monotonic()
        seen.append(set(members(envoy)))
        wait_for(lambda: sum(o.started > answered_at for o in load.outcomes) >= 20, 20, "20 requests after the restart")
    during = [o for o in load.outcomes if o.started >= down_at]
    eds = envoy.stats(r"^cluster\.gpuha_workers\.(update_success|update_failure|membership_change)$")
    report(f"eds dnsd restart: {len(load.outcomes)} requests {summarize(load.outcomes)}, {len(during)} from the stop on; "
           f"dnsd down {ms(back_at - down_at)}, first EDS answers {ms(answered_at - back_at)} after its start (warm-up); "
           f"membership samples {len(seen)}, all equal to the last: {all(s == want for s in seen)}; {eds}")
    assert all(o.kind == "completed" for o in load.outcomes), [o.describe() for o in load.outcomes if o.kind != "completed"][:10]
    assert all(s == want for s in seen), f"membership changed across the restart: {seen}"
    assert set(members(envoy)) == want


def test_eds_keeps_the_tiers_at_priority_one(stack):
    cfg = dnsd_config(stack)
    dnsd = stack.start_dnsd(config=cfg)
    a = stack.start_worker("a1", pool="a")
    small = stack.start_worker("s1", model="small", sidecar=False)
    stack.wait_fresh(["a1"])
    tier_port = free_port()
    envoy = stack.start_pool_router(eds=True, pool="a", tier_name="a",
                                    degraded=json.dumps({"name": "small", "port": tier_port, "workers": [small.addr], "model": "small", "max_tokens": 5}))
    tier_addr = f"127.0.0.1:{tier_port}"
    wait_for(lambda: members(envoy) == {a.addr: "0", tier_addr: "1"}, 10, "a1 at priority 0 and the tier at priority 1 over EDS")
    warm_up(stack, envoy)
    client = make_client(envoy.base_url)
    # dnsd gone past the freshness gate: the picker fails open to its own workers, as the last
    # fleet view named them (the config names none), before the tiers.
    dnsd.proc.terminate()
    opened = filter_stat(envoy, "fail_open")
    wait_for(lambda: chat(client, -1, 1, stream=False) and filter_stat(envoy, "fail_open") > opened, 15,
             "the picker failing open (its fleet view stale)", interval=0.2)
    blind = [chat(client, i, 10, stream=False) for i in range(10)]
    stack.start_dnsd(ingest=dnsd.ingest, http=dnsd.http, config=cfg)
    # The restarted dnsd knows a1 again, and the picker picks it (a worker dying in the restarted
    # dnsd's first second is another drill: its view is empty then).
    warm_up(stack, envoy)
    with Load(client, 2, stream=False) as load:
        wait_for(lambda: len(load.outcomes) >= 10, 20, "10 requests before the kill")
        kill_mono = time.monotonic()
        kill_worker(a)
        wait_for(lambda: sum(o.started > kill_mono and o.worker == "s1" for o in load.outcomes) >= 10, 20, "10 requests served by the tier")
    after = [o for o in load.outcomes if o.started > kill_mono]
    report(f"eds tiers: dnsd down: {len(blind)} requests {summarize(blind)} served by {per_worker(blind)}; "
           f"membership {members(envoy)}; after the kill {len(after)} requests {summarize(after)} "
           f"(short: the degraded tier caps answers at 5 tokens), "
           f"served by the tier {sum(o.worker == 's1' for o in after)}")
    bad = [o.describe() for o in after if o.error is not None or o.spliced or not o.finish_reason]
    assert not bad, "client errors after the kill:\n" + "\n".join(bad[:10])
    assert all(o.kind == "completed" and o.worker == "a1" for o in blind), [o.describe() for o in blind]


def test_eds_member_that_leaves_keeps_its_stream(stack):
    """A worker whose sidecar goes silent leaves the cluster after leave_after; a stream it is
    serving when it leaves runs to its end (Envoy drains a removed host, it does not reset it)."""
    stack.start_dnsd(config=dnsd_config(stack))
    # 5 tokens/s: a 40-token stream outlives the worker's membership (leave_after 4 s).
    slow = stack.start_worker("w1", tokens_per_s=5)
    other = stack.start_worker("w2")
    stack.wait_fresh(["w1", "w2"])
    envoy = stack.start_pool_router(eds=True, pool="p1")
    wait_for(lambda: set(members(envoy)) == {slow.addr, other.addr}, 10, "both workers in Envoy's cluster")
    warm_up(stack, envoy)
    client = make_client(envoy.base_url)
    first = threading.Event()
    box: list[Outcome] = []

    def stream():
        # Until one lands on the slow worker (the picker spreads requests).
        for i in range(50):
            o = chat(client, i, 40, on_first_token=lambda o: first.set() if o.worker == "w1" else None, timeout=30)
            if o.worker == "w1":
                box.append(o)
                return
            first.clear()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    wait_for(first.is_set, 20, "a stream's first token from w1")
    silent_at = time.monotonic()
    slow.sidecar.kill9()
    wait_for(lambda: slow.addr not in members(envoy), LEAVE_AFTER_MS / 1000 + 5, "w1 out of Envoy's cluster")
    left_after = time.monotonic() - silent_at
    still_streaming = t.is_alive()
    t.join(timeout=30)
    o = box[0]
    report(f"eds leave with a stream in flight: w1 left {ms(left_after)} after its sidecar died, its stream "
           f"{'was still running' if still_streaming else 'had ended'} then and ended {o.kind} with {len(o.tokens)} tokens "
           f"{ms(o.ended - silent_at)} after the silence")
    assert still_streaming, "the stream ended before w1 left: lower tokens_per_s"
    assert o.kind == "completed", o.describe()
