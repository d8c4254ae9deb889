"""Pytest wiring for the drills: the repository root on `sys.path` (the `gpuha_harness` package),
and the harness's `stack` fixture that always cleans up and prints every process's log tail when
the drill failed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpuha_harness.pytest_plugin import pytest_runtest_makereport, stack  # noqa: E402,F401  (found by pytest here)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a drill that takes more than ~20 s (still run by default)")
