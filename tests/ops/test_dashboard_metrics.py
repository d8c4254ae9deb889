"""Every metric the dashboard (deploy/grafana/gpuha.json) and the alert rules
(deploy/prometheus/gpuha-alerts.yml) query exists in a real scrape: dnsd's /metrics and the
pool router's Envoy /stats/prometheus (names as the example config's router job stores them),
from a running stack after some traffic. The sidecar serves no metrics endpoint, so there is
nothing of it to scrape. `up` is Prometheus's own. And through a real Prometheus with the
example config's router job: the native build of the filter exports other names in Envoy's
output, renamed there."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import gpuha_harness as harness
import opsrig

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = {"up"}  # written by Prometheus for every target


def queried_names() -> dict[str, set[str]]:
    import yaml  # noqa: PLC0415

    out: dict[str, set[str]] = {}
    d = json.loads((REPO / "deploy" / "grafana" / "gpuha.json").read_text())
    for p in d["panels"]:
        for t in p.get("targets", []):
            for n in opsrig.promql_metric_names(t["expr"]):
                out.setdefault(n, set()).add(f"dashboard panel {p['title']!r}")
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "gpuha-alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            for n in opsrig.promql_metric_names(r["expr"]):
                out.setdefault(n, set()).add(f"alert {r['alert']}")
    return out


@functools.cache
def name_relabels() -> list[tuple[str, str]]:
    """The example config's router job's renamings of `__name__` (regex, replacement)."""
    import yaml  # noqa: PLC0415

    example = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.example.yml").read_text())
    job = next(j for j in example["scrape_configs"] if j["job_name"] == "gpuha-envoy")
    return [(r["regex"], r["replacement"]) for r in job.get("metric_relabel_configs", [])
            if r.get("source_labels") == ["__name__"] and r.get("target_label") == "__name__"]


def renamed(name: str) -> str:
    """`name` as the example job stores it (the native build's names are renamed; Prometheus
    anchors the regex)."""
    for regex, replacement in name_relabels():
        m = re.fullmatch(regex, name)
        if m:
            name = m.expand(replacement.replace("$", "\\"))
    return name


def test_promql_name_extraction() -> None:
    got = opsrig.promql_metric_names(
        'sum by (pool, state) (rate(gpuha_x_total{reason=~"a|b"}[$__rate_interval])) / on (pool) group_left max(up{job="j"}) '
        '> 0.5 or absent(gpuha_y) and time() - gpuha_z')
    assert got == {"gpuha_x_total", "up", "gpuha_y", "gpuha_z"}, got


def test_every_queried_metric_exists_in_a_real_scrape(stack) -> None:
    dnsd = opsrig.start(stack)
    router = stack.start_pool_router()
    client = harness.make_client(router.base_url)
    outcomes = [harness.chat(client, i, max_tokens=4, stream=i % 2 == 0) for i in range(6)]
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes]
    # DNS answers, so the per-answer series have samples too.
    assert sorted(opsrig.dns_query(dnsd)) == sorted(opsrig.POOLS.values())
    status, body = harness.http_get(f"http://{dnsd.http}/metrics")
    assert status == 200
    have = opsrig.metric_names(body.decode())
    status, body = harness.http_get(f"http://{router.admin}/stats/prometheus")
    assert status == 200
    have |= {renamed(n) for n in opsrig.metric_names(body.decode())}
    wanted = queried_names()
    missing = {n: sorted(w) for n, w in wanted.items() if n not in have and n not in SYNTHETIC}
    assert not missing, f"queried but not exported: {json.dumps(missing, indent=1)}"
    print(f"\n{len(wanted)} metric names queried by the dashboard and the alert rules, all exported")


def test_router_metrics_reach_prometheus_through_the_example_scrape_config(stack) -> None:
    """A real Prometheus scrapes a pool router with `prometheus.example.yml`'s gpuha-envoy job, its
    metric_relabel_configs included: every router metric the dashboard and the rules query has
    series there. With the Wasm build the names pass as they are; with the native build
    (GPUHA_FILTER_BUILD=native, `tests/run.sh` runs it so) only the renaming makes them so."""
    import yaml  # noqa: PLC0415

    opsrig.start(stack)
    router = stack.start_pool_router()
    client = harness.make_client(router.base_url)
    outcomes = [harness.chat(client, i, max_tokens=4, stream=i % 2 == 0) for i in range(6)]
    assert all(o.kind == "completed" for o in outcomes), [o.describe() for o in outcomes]
    example = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.example.yml").read_text())
    job = next(j for j in example["scrape_configs"] if j["job_name"] == "gpuha-envoy")
    base = opsrig.prometheus(stack, [{**job, "static_configs": [{"targets": [router.admin]}]}])
    # The router's names: the rest are dnsd's (gpuha_dnsd_*) and Prometheus's own.
    wanted = {n: w for n, w in queried_names().items() if not n.startswith("gpuha_dnsd_") and n not in SYNTHETIC}
    assert "gpuha_picks" in wanted, sorted(wanted)

    def scraped() -> bool:
        status, body = harness.http_get(f"{base}/api/v1/query?query=up%7Bjob%3D%22gpuha-envoy%22%7D%3D%3D1")
        return status == 200 and bool(json.loads(body)["data"]["result"])

    harness.wait_for(scraped, 20, "the router scraped", 0.25)
    status, body = harness.http_get(f"{base}/api/v1/label/__name__/values")
    assert status == 200, body[:200]
    have = set(json.loads(body)["data"])
    missing = {n: sorted(w) for n, w in wanted.items() if n not in have}
    assert not missing, f"queried but not in Prometheus: {json.dumps(missing, indent=1)}"
    # The router's own counts, not only its names (requests sent before its first fleet view
    # fail open and are not picks).
    status, body = harness.http_get(f"{base}/api/v1/query?query=sum(gpuha_picks)")
    assert status == 200 and float(json.loads(body)["data"]["result"][0]["value"][1]) >= 1, body[:300]
    print(f"\n{len(wanted)} router metric names queried by the dashboard and the alert rules, all in Prometheus")
