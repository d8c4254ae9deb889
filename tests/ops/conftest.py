"""Pytest wiring for the operator tests: the repository root on `sys.path` (the `gpuha_harness`
package, the one harness) and its `stack` fixture, which keeps the log dir (screenshots,
Prometheus data) under GPUHA_DRILL_LOGS; and this folder (opsrig.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpuha_harness.pytest_plugin import pytest_runtest_makereport, stack  # noqa: E402,F401  (found by pytest here)
