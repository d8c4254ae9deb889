"""A real Prometheus (Debian's package) with the shipped alert rules scrapes dnsd of a running
stack (two pools, a fake vLLM worker and its sidecar in each) every second. Kill p1's only
worker host: dnsd evicts p1 after its 10 s window, and GpuhaPoolEvacuated fires for p1 its
`for:` (15 s) later, give or take a scrape and an evaluation, while w1's GpuhaWorkerSilent is
pending or firing and nothing else about p2 or dnsd fires. Start p1's worker again: the alert
resolves within a few seconds of p1's failback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gpuha_harness as harness
import opsrig

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "gpuha-alerts.yml"
FOR_S = 15.0  # GpuhaPoolEvacuated's for:
SLACK_S = 4.0  # a 1 s scrape, a 1 s evaluation, and polling


def start_prometheus(stack: harness.Stack, dnsd: harness.Dnsd) -> str:
    return opsrig.prometheus(stack, [{"job_name": "gpuha-dnsd", "static_configs": [{"targets": [dnsd.http]}]}], (RULES,))


def alerts(base: str) -> list[dict]:
    status, body = harness.http_get(f"{base}/api/v1/alerts")
    assert status == 200, body[:200]
    return json.loads(body)["data"]["alerts"]


def find(al: list[dict], name: str, **labels) -> dict | None:
    return next((a for a in al if a["labels"].get("alertname") == name and all(a["labels"].get(k) == v for k, v in labels.items())), None)


def test_pool_evacuated_fires_after_its_for_and_resolves_after_failback(stack) -> None:
    dnsd = opsrig.start(stack)
    base = start_prometheus(stack, dnsd)
    harness.wait_for(lambda: harness.http_get(f"{base}/api/v1/query?query=up")[1].count(b'"1"') >= 1, 20, "dnsd scraped", 0.2)
    assert find(alerts(base), "GpuhaPoolEvacuated") is None

    opsrig.kill_host(stack.workers["w1"])
    killed = time.monotonic()
    dead_at = None

    def fired():
        # Polled: when dnsd evicted the pool, and when the alert fires.
        nonlocal dead_at
        now = time.monotonic()
        if dead_at is None and opsrig.pool_state(dnsd, "p1") == "dead":
            dead_at = now
        a = find(alerts(base), "GpuhaPoolEvacuated", pool="p1")
        return now if a is not None and a["state"] == "firing" else None

    fired_at = harness.wait_for(fired, 10 + FOR_S + 2 * SLACK_S + 5, "GpuhaPoolEvacuated firing for p1", 0.25)
    assert dead_at is not None, "the alert fired before dnsd evicted the pool"
    waited = fired_at - dead_at
    assert FOR_S - 1.0 <= waited <= FOR_S + SLACK_S, f"fired {waited:.1f}s after p1 was evicted (for: {FOR_S}s)"
    al = alerts(base)
    silent = find(al, "GpuhaWorkerSilent", worker="w1")
    assert silent is not None and silent["state"] in ("pending", "firing"), al
    for quiet in ("GpuhaAllPoolsDark", "GpuhaDnsdDown"):
        assert find(al, quiet) is None, f"{quiet} fired: {al}"
    assert find(al, "GpuhaPoolEvacuated", pool="p2") is None and find(al, "GpuhaWorkerSilent", worker="w2") is None, al

    stack.start_worker("w1", pool="p1")
    restarted = time.monotonic()
    harness.wait_for(lambda: opsrig.pool_state(dnsd, "p1") == "alive", 15, "p1 failed back", 0.1)
    back_at = time.monotonic()
    harness.wait_for(lambda: find(alerts(base), "GpuhaPoolEvacuated", pool="p1") is None, SLACK_S + 2, "GpuhaPoolEvacuated to resolve", 0.25)
    resolved_at = time.monotonic()
    print(f"\np1 evicted {dead_at - killed:.1f}s after the kill; GpuhaPoolEvacuated firing {waited:.1f}s later; "
          f"p1 back {back_at - restarted:.1f}s after the restart; alert resolved {resolved_at - back_at:.1f}s later")
