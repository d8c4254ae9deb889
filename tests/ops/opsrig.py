"""The stack the operator tests look at: dnsd with a DNS zone of two pools (p1, p2), one fake
vLLM worker with its sidecar in each, and helpers to read dnsd's operator endpoints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gpuha_harness as harness

SERVICE = "api.gpuha.test."
POOLS = {"p1": "127.0.0.11", "p2": "127.0.0.12"}
FAIL_WHALE = "127.0.0.99"


def dnsd_config(stack: harness.Stack) -> Path:
    return harness.write_zone_config(stack, {p: (f"region-{p}", f"cloud-{p}", r) for p, r in POOLS.items()}, SERVICE, FAIL_WHALE)


def start(stack: harness.Stack) -> harness.Dnsd:
    """dnsd with the zone, and workers w1 (pool p1) and w2 (pool p2), both fresh."""
    dnsd = stack.start_dnsd(config=dnsd_config(stack))
    stack.start_worker("w1", pool="p1")
    stack.start_worker("w2", pool="p2")
    stack.wait_fresh(["w1", "w2"])
    return dnsd


def dns_status(dnsd: harness.Dnsd) -> dict:
    status, body = harness.http_get(f"http://{dnsd.http}/v1/dns")
    assert status == 200, body[:200]
    return json.loads(body)


def pool_state(dnsd: harness.Dnsd, pool: str) -> str:
    return next(p["state"] for p in dns_status(dnsd)["pools"] if p["pool"] == pool)


def dns_query(dnsd: harness.Dnsd, name: str = SERVICE) -> list[str]:
    """One A query to dnsd over UDP (a hand-built packet: no DNS library needed); the addresses."""
    import socket
    import struct

    host, port = dnsd.dns.rsplit(":", 1)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", 0x4711, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(packet, (host, int(port)))
        reply, _ = s.recvfrom(4096)
    ancount = struct.unpack(">H", reply[6:8])[0]
    # Answers follow the echoed question; each is a compressed or plain owner, then fixed fields.
    i = 12 + len(qname) + 4
    addrs = []
    for _ in range(ancount):
        i += 2 if reply[i] & 0xC0 == 0xC0 else reply.index(b"\0", i) + 1 - i
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", reply[i:i + 10])
        i += 10
        if rtype == 1:
            addrs.append(socket.inet_ntoa(reply[i:i + rdlen]))
        i += rdlen
    return addrs


def kill_host(w: harness.Worker) -> None:
    """The worker's host dies: vLLM and its sidecar, SIGKILL."""
    w.proc.kill9()
    if w.sidecar is not None:
        w.sidecar.kill9()


NAME_RX = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)", re.M)


def metric_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (comments skipped)."""
    return {m.group(1) for m in NAME_RX.finditer(text) if not m.group(0).startswith("#")}


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
                "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are neither functions (followed
    by `(`), keywords, label names (inside `by (...)`, `{...}`) nor inside strings or ranges."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, $__rate_interval
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        if m.group(2) or m.group(1).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def prometheus(stack: harness.Stack, scrape_configs: list[dict], rule_files: tuple[Path, ...] = ()) -> str:
    """A real Prometheus (Debian's package) scraping every second with `scrape_configs`;
    returns its base URL once it is ready."""
    prom = shutil.which("prometheus")
    assert prom, "prometheus not found: deploy/ensure-deps.sh installs it (Debian package prometheus)"
    port = harness.free_port()
    cfg = stack.logdir / "prometheus.yml"
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(r) for r in rule_files],
        "scrape_configs": scrape_configs,
    }))
    stack.spawn("prometheus", [prom, f"--config.file={cfg}", f"--storage.tsdb.path={stack.logdir / 'prometheus-data'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"])
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return harness.http_get(f"{base}/-/ready")[0] == 200
        except OSError:
            return False

    harness.wait_for(ready, 30, "prometheus ready", 0.2)
    return base
