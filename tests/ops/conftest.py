"""Pytest wiring for the operator tests: the drills' harness (tests/drills/harness.py, the one
harness) and its `stack` fixture (tests/drills/stack_fixture.py), which keeps the log dir
(screenshots, Prometheus data) under GPUHA_DRILL_LOGS."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drills"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack_fixture import pytest_runtest_makereport, stack  # noqa: E402,F401  (found by pytest here)
