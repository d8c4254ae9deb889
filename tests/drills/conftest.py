"""Pytest wiring for the drills: a `stack` fixture that always cleans up and prints every
process's log tail when the drill failed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a drill that takes more than ~20 s (still run by default)")


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
            import shutil

            shutil.rmtree(s.logdir, ignore_errors=True)
