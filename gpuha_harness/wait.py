"""Bounded waits and plain HTTP: readiness is always observed (a port, a line, an answer), never
slept for."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
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


def free_port() -> int:
    """A TCP port that was free a moment ago (for processes that cannot bind port 0 themselves
    and report it, such as Envoy's listeners rendered into a config), and never one this process
    was given before: two calls before anything binds can otherwise get the same port back (an
    Envoy config with its listener and a tier listener on one port, seen once in CI's drills)."""
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
