"""Bounded waits and plain HTTP: readiness is always observed (a port, a line, an answer), never
slept for."""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    """A bounded wait ran out. An AssertionError so pytest shows it as a drill failure."""


def wait_for(pred: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.02) -> T:
    """Polls `pred` until it returns something truthy; raises `Timeout` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (and of binds to port 0)."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed out below the ephemeral range start here; drawn by a generator of their own (a
# drill that seeds `random` does not make two runs' ports collide).
_QUIET_PORTS_FROM = 20000
_PORTS_RNG = random.Random()


def free_port() -> int:
    """A TCP port that was free a moment ago (for processes that cannot bind port 0 themselves
    and report it, such as Envoy's listeners rendered into a config), and never one this process
    was given before: two calls before anything binds can otherwise get the same port back (an
    Envoy config with its listener and a tier listener on one port, seen once in CI's drills).
    Chosen below the kernel's ephemeral range where there is room: a port from that range could
    be taken by any outgoing connection (a sidecar's scrape, a client) before its process binds
    it (seen: Envoy exited with "cannot bind: Address already in use" on its listener's port)."""
    lo, _ = _ephemeral_range()
    if lo - _QUIET_PORTS_FROM >= 1000:
        for _ in range(100):
            port = _PORTS_RNG.randrange(_QUIET_PORTS_FROM, lo)
            if port in _GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET without proxies; returns (status, body). Connection errors raise OSError."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post(url: str, body: bytes, headers: Optional[dict] = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json", **(headers or {})})
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------------------------
# Processes
