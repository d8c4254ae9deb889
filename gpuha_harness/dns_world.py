"""The DNS drills' world: three "clouds" as hosts in network namespaces (`netns.Net`), each
with a stock-Envoy pool router, fake vLLM workers and their sidecars; dnsd (authoritative DNS +
ingest) on the test bridge's address in the root namespace; a fail-whale Envoy in a fourth
namespace. And the client that follows dnsd's answers the way a resolver-following client does
(`ClientLoop`): resolve with `dig`, call an answered router with the official `openai` SDK
(max_retries=0), walk the answer on connection errors.

The scenario and what it asserts are in tests/drills/test_dns_drills.py.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import netns
from .client import TOKEN_RX
from .env import REPO, binary, wasm_path
from .proc import Proc
from .stack import Stack, write_zone_config
from .wait import http_get, wait_for

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
    toks = TOKEN_RX.findall(text)
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
    def __init__(self, net: netns.Net, stack: Stack):
        self.net = net
        self.stack = stack
        self.clouds = {c: Cloud(net.add_host(c, 11 + i)) for i, c in enumerate(CLOUDS)}
        self.fw = net.add_host("fw", 99)
        self.dns_addr = net.gateway
        self.dns_port = 0
        self.http = ""
        self.ingest = ""
        self.dnsd: Optional[Proc] = None
        self.whale: Optional[netns.NsEnvoy] = None

    # dnsd in the root namespace, on the bridge's address, ports picked by the kernel; its HTTP
    # side is off loopback, so over mutual TLS (deploy/tls/README.md), as the routers use it
    def dnsd_config(self) -> Path:
        path = write_zone_config(
            self.stack, {c.pool: (f"region-{c.pool}", f"cloud-{c.pool}", c.router) for c in self.clouds.values()},
            SERVICE, self.fw.addr, listen=self.dns_addr, ttl=TTL, policy="all", min_workers=1, http=True)
        tls = self.tls_dir
        if not (tls / "ca.crt").exists():
            r = subprocess.run(["bash", str(REPO / "deploy" / "tls" / "make-certs.sh"), "all", str(tls), "--san", f"IP:{self.dns_addr}"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        with open(path, "a") as f:
            f.write(f'\n[http.tls]\ncert_file = "{tls}/dnsd.crt"\nkey_file = "{tls}/dnsd.key"\nclient_ca_file = "{tls}/ca.crt"\n')
        return path

    @property
    def tls_dir(self) -> Path:
        return self.stack.logdir / "tls"

    def start_dnsd(self) -> None:
        self.dnsd = self.stack.spawn("dnsd", [binary("gpuha-dnsd"), "--config", self.dnsd_config()])
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
                                wasm=wasm_path(), access_log=self.stack.logdir / "failwhale.access.log")
        self.whale = netns.spawn_envoy(self.stack, "failwhale", self.fw, cfg, ROUTER_PORT, ADMIN_PORT,
                                       self.stack.logdir / "failwhale.access.log", concurrency=1)

    def worker_addrs(self, c: Cloud) -> list[str]:
        return [f"{c.host.addr}:{p}" for p in WORKER_PORTS[:WORKERS_PER_CLOUD]]

    def spawn_router(self, c: Cloud) -> None:
        name = f"router-{c.pool}"
        log = self.stack.logdir / f"{name}.access.log"
        cfg = self.stack.render("pool-router", self.stack.logdir / f"{name}.yaml", listen_addr=c.host.addr,
                                listen_port=ROUTER_PORT, admin_addr=c.host.addr, admin_port=ADMIN_PORT,
                                workers=",".join(self.worker_addrs(c)), fleet=self.http, wasm=wasm_path(),
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

        wait_for(check, timeout, f"workers {sorted(ids)} fresh in dnsd", interval=0.05)

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
        status, body = http_get(f"http://{c.envoy.admin}/stats?filter=gpuha", timeout=2)
    except OSError:
        return -1
    return sum(int(v) for k, _, v in (ln.partition(": ") for ln in body.decode().splitlines())
               if k.endswith(f"gpuha.{name}") and v.strip().isdigit())


