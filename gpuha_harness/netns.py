"""Network namespaces for the DNS drills: "clouds" that are separate hosts on one test bridge.

`Net` builds, with iproute2, a private topology that exists only for one test run:

    root namespace                       namespaces (one per "host")
    ┌───────────────────────────┐        ┌──────────────────────────┐
    │ bridge <br> 10.251.X.1/24 │──veth──│ eth0 10.251.X.11  (c1)    │
    │  (dnsd + the DNS/HTTP     │──veth──│ eth0 10.251.X.12  (c2)    │
    │   clients run here)       │──veth──│ eth0 10.251.X.99  (fw)    │
    └───────────────────────────┘        └──────────────────────────┘

Every address the drills talk to is on that bridge's /24, which the run picks among
10.251.0.0/16 subnets nobody on this machine routes yet: no packet goes to an address the test
did not create. Namespaces have only `lo` and their veth end, so nothing inside them reaches
anything else.

Names carry the owner's pid (`ghd-<pid>-<n>-<host>` for namespaces; links are tagged with an
`alias` naming the owner), so runs never collide and `sweep_stale()` can remove what a run
killed before its finalizer left behind, without touching anyone else's namespaces.

A host is taken dark either by killing its processes (`gpuha_harness.Stack`) or by cutting
its link: `link_down(host)` sets the root end of its veth down (the bridge drops its frames;
connections to it time out, its sidecars' frames are lost), `link_up(host)` restores it.

Processes run inside a namespace through `ip netns exec NAME argv...`, which exec()s the command
(no extra process), so the pid a `Proc` holds is the program's own.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .env import START_TIMEOUT_S, binary, envoy_bin, envoy_env
from .proc import Proc
from .stack import Stack, tail_file
from .wait import http_get, port_accepts, wait_for

ALIAS_PREFIX = "gpuha-dnsdrill owner="
NS_RX = re.compile(r"^ghd-(\d+)-\d+-[a-z0-9]+$")
_counter = itertools.count()


class NetError(AssertionError):
    """iproute2 refused something. An AssertionError: the drill fails loudly, never skips."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise NetError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Deletes namespaces and links left by drill runs whose process is gone (a run killed
    before its finalizer ran). Only names this module creates, and only of dead owners."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_RX.match(name)
        if m and not _pid_alive(int(m.group(1))):
            if ip("netns", "del", name, check=False).returncode == 0:
                removed.append(name)
    for line in ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)[@:].*\balias " + re.escape(ALIAS_PREFIX) + r"(\d+)", line)
        if m and not _pid_alive(int(m.group(2))):
            if ip("link", "del", m.group(1), check=False).returncode == 0:
                removed.append(m.group(1))
    return removed


def _free_subnet(start: int) -> ipaddress.IPv4Network:
    """A 10.251.X.0/24 that no address or route on this machine overlaps."""
    used = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for tok in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", ip(*args, check=False).stdout):
            try:
                used.append(ipaddress.ip_network(tok, strict=False))
            except ValueError:
                pass
    for i in range(250):
        net = ipaddress.ip_network(f"10.251.{(start + i) % 250 + 2}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetError("no free 10.251.X.0/24 on this machine")


@dataclass
class Host:
    """One namespace: `name` for `ip netns exec`, `addr` its only address."""

    short: str
    name: str
    addr: str
    veth: str  # root-side end of its veth pair (the one link_down() cuts)

    def argv(self, argv: list) -> list:
        return ["ip", "netns", "exec", self.name, *[str(a) for a in argv]]


class Net:
    """One bridge in the root namespace and any number of single-address namespaces on it."""

    def __init__(self):
        if os.geteuid() != 0:
            raise NetError("the DNS drills create network namespaces: run them as root")
        sweep_stale()
        self.pid = os.getpid()
        self.n = next(_counter)
        tag = f"{_b36(self.pid)}{_b36(self.n)}"
        self.bridge = f"gd{tag}br"
        self.subnet = _free_subnet(self.pid * 7 + self.n * 31)
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])  # the bridge's own address: dnsd and the clients use it
        self._tag = tag
        self.hosts: dict[str, Host] = {}
        self._closed = False
        self._created_links: list[str] = []
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self._created_links.append(self.bridge)
            ip("link", "set", self.bridge, "alias", f"{ALIAS_PREFIX}{self.pid}")
            ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, short: str, last_octet: int) -> Host:
        assert re.fullmatch(r"[a-z0-9]{1,4}", short), short
        name = f"ghd-{self.pid}-{self.n}-{short}"
        addr = str(self.subnet.network_address + last_octet)
        veth = f"gd{self._tag}{short}"
        peer = f"{veth}p"
        try:
            ip("netns", "add", name)
        except NetError as e:
            raise NetError(f"cannot create network namespace {name}: {e}") from e
        host = Host(short=short, name=name, addr=addr, veth=veth)
        self.hosts[short] = host
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        self._created_links.append(veth)
        ip("link", "set", veth, "alias", f"{ALIAS_PREFIX}{self.pid}")
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", peer, "netns", name)
        ip("-n", name, "link", "set", peer, "name", "eth0")
        ip("-n", name, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("link", "set", veth, "up")
        return host

    def link_down(self, short: str) -> None:
        ip("link", "set", self.hosts[short].veth, "down")

    def link_up(self, short: str) -> None:
        ip("link", "set", self.hosts[short].veth, "up")

    def close(self) -> None:
        """Deletes every namespace and link this Net created (processes must be gone first:
        `Stack.close()`). Safe to call twice and after a partial setup."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for h in self.hosts.values():
            r = ip("netns", "del", h.name, check=False)
            if r.returncode != 0 and "No such file" not in r.stderr:
                errors.append(f"netns del {h.name}: {r.stderr.strip()}")
        for link in reversed(self._created_links):
            r = ip("link", "del", link, check=False)
            # A veth disappears with its namespace end: "Cannot find device" is fine.
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                errors.append(f"link del {link}: {r.stderr.strip()}")
        if errors:
            raise NetError("; ".join(errors))

    def __enter__(self) -> "Net":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        n, r = divmod(n, 36)
        s = digits[r] + s
        if n == 0:
            return s


# --------------------------------------------------------------------------------------------
# Processes of the stack inside namespaces (the Stack owns and kills them)


@dataclass
class NsEnvoy:
    name: str
    host: Host
    port: int
    admin: str  # ip:port
    proc: "Proc"
    config: Path
    access_log: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host.addr}:{self.port}/v1"


def spawn_envoy(stack: "Stack", name: str, host: Host, config: Path, port: int, admin_port: int,
                access_log: Path, concurrency: int = 2) -> NsEnvoy:
    """Starts Envoy inside `host`'s namespace. --disable-hot-restart: no shared-memory region
    or domain socket shared between Envoys (Envoy 1.40 has the flag). Does not wait: see
    `wait_envoy` (several Envoys start faster in parallel)."""
    argv = host.argv([envoy_bin(), "-c", config, "--concurrency", str(concurrency), "--disable-hot-restart",
                      "--log-level", "warn", "--log-path", stack.logdir / f"{name}.log"])
    proc = stack.spawn(name, argv, env=envoy_env())
    return NsEnvoy(name=name, host=host, port=port, admin=f"{host.addr}:{admin_port}", proc=proc, config=config,
                   access_log=access_log)


def wait_envoy(e: NsEnvoy, timeout: float = START_TIMEOUT_S) -> None:
    def ready():
        if not e.proc.alive():
            raise AssertionError(f"{e.name} exited with {e.proc.popen.returncode}:\n{e.proc.tail()}\n"
                                 f"{tail_file(Path(str(e.proc.out_path).replace('.out', '.log')))}")
        try:
            status, _ = http_get(f"http://{e.admin}/ready", timeout=1)
        except OSError:
            return False
        return status == 200 and port_accepts(e.port, e.host.addr)

    wait_for(ready, timeout, f"{e.name} /ready and listener {e.host.addr}:{e.port}", interval=0.05)


def spawn_worker(stack: "Stack", host: Host, wid: str, port: int, ttft_ms: int = 5,
                 tokens_per_s: float = 2000) -> "Proc":
    argv = host.argv([binary("fake-vllm"), "--host", host.addr, "--port", str(port), "--id", wid,
                      "--model", "tiny", "--ttft-ms", str(ttft_ms), "--tokens-per-s", str(tokens_per_s),
                      "--max-num-seqs", "64", "--threads", "1"])
    return stack.spawn(f"worker-{wid}", argv)


def spawn_sidecar(stack: "Stack", host: Host, wid: str, worker_addr: str, pool: str, ingest: str,
                  interval_ms: int = 500) -> "Proc":
    argv = host.argv([binary("gpuha-sidecar"), "--metrics-url", f"http://{worker_addr}/metrics",
                      "--ingest", ingest, "--worker-id", wid, "--pool", pool, "--serve-addr", worker_addr,
                      "--key-file", stack.key_file, "--key-id", str(stack.key_id), "--interval-ms", str(interval_ms)])
    return stack.spawn(f"sidecar-{wid}", argv)


def netns_pids(host: Host) -> list[int]:
    """Pids of every process living in `host`'s namespace (to prove a kill left none)."""
    r = ip("netns", "pids", host.name, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]
