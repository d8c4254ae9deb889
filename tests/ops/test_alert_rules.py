"""The alert rules (deploy/prometheus/gpuha-alerts.yml) with promtool: the file checks, and
every rule fires on its synthetic failure and stays quiet otherwise (gpuha-alerts.test.yml).
Also: every rule has a unit test, and the dashboard is well-formed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import opsrig

REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"


def promtool() -> str:
    p = shutil.which("promtool")
    assert p, "promtool not found: deploy/ensure-deps.sh installs it (Debian package prometheus)"
    return p


def test_rules_check_and_unit_tests_pass() -> None:
    for argv in (["check", "rules", "gpuha-alerts.yml"], ["check", "config", "prometheus.example.yml"],
                 ["test", "rules", "gpuha-alerts.test.yml"]):
        r = subprocess.run([promtool(), *argv], cwd=PROM, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool {' '.join(argv)}:\n{r.stdout}\n{r.stderr}"


def test_every_rule_is_shown_to_fire_and_to_stay_quiet() -> None:
    import yaml  # noqa: PLC0415 (PyYAML: Debian's python3-yaml, or pip)

    rules = [r["alert"] for g in yaml.safe_load((PROM / "gpuha-alerts.yml").read_text())["groups"] for r in g["rules"]]
    tests = yaml.safe_load((PROM / "gpuha-alerts.test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    assert set(rules) - fired == set(), "rules never shown to fire"
    assert set(rules) - quiet == set(), "rules never shown to stay quiet"


def test_dashboard_is_well_formed() -> None:
    d = json.loads((REPO / "deploy" / "grafana" / "gpuha.json").read_text())
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert panels and all(p.get("targets") for p in panels)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        for t in p["targets"]:
            assert opsrig.promql_metric_names(t["expr"]), f"{p['title']}: no metric in {t['expr']!r}"
