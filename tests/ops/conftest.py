"""Pytest wiring for the operator tests: the drills' harness (tests/drills/harness.py, the one
harness) and a `stack` fixture that always cleans up, prints every process's log tail when the
test failed, and keeps the log dir (screenshots, Prometheus data) under GPUHA_DRILL_LOGS."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drills"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def stack(request):
    s = harness.Stack(name=request.node.name)
    try:
        yield s
    finally:
        failed = any(getattr(request.node, f"rep_{w}", None) is not None and getattr(request.node, f"rep_{w}").failed
                     for w in ("setup", "call"))
        s.close()
        if failed:
            s.dump_logs(out=sys.stdout)
        elif not s.keep_logs:
            shutil.rmtree(s.logdir, ignore_errors=True)
