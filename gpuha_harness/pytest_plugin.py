"""The `stack` fixture and the report hook it needs, for every conftest that drives the harness
(tests/drills, tests/ops): a conftest imports both names, and pytest finds them there."""

from __future__ import annotations

import shutil
import sys

import pytest

from .stack import Stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def stack(request):
    """A `Stack` that always cleans up, prints every process's log tail when the test
    failed, and keeps its log dir under GPUHA_DRILL_LOGS."""
    s = Stack(name=request.node.name)
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
