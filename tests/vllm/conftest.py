"""Pytest wiring for the drills against real vLLM: one session-wide rig (dnsd, 2 real vLLM
servers, a sidecar beside each) shared by every drill, restarted piecemeal (only the server a
drill killed), always torn down, with the measured times printed at the end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # the gpuha_harness package

# The binaries built for these drills (CARGO_TARGET_DIR=target-vllm), unless told otherwise.
_tv = REPO / "target-vllm"
if "GPUHA_BIN_DIR" not in os.environ and (_tv / "release" / "gpuha-dnsd").exists():
    os.environ["GPUHA_BIN_DIR"] = str(_tv / "release")
if "GPUHA_WASM" not in os.environ and (_tv / "wasm32-wasip1" / "release" / "gpuha_filter.wasm").exists():
    os.environ["GPUHA_WASM"] = str(_tv / "wasm32-wasip1" / "release" / "gpuha_filter.wasm")

from gpuha_harness import vllm_rig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a drill that takes more than ~20 s (still run by default)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed and rep.when == "call" and vllm_rig.CURRENT is not None:
        # Every process's log tail in the failure report.
        rep.sections.append(("gpuha vLLM rig logs", vllm_rig.CURRENT.dump_logs()))


@pytest.fixture(scope="session")
def rig():
    missing = vllm_rig.missing_install()
    if missing:
        if os.environ.get("GPUHA_VLLM_REQUIRED") == "1":
            pytest.fail(f"real vLLM not installed: {missing} (run deploy/vllm/setup.sh)")
        pytest.skip(f"real vLLM not installed: {missing} (run deploy/vllm/setup.sh, or deploy/vllm/drills.sh)")
    r = vllm_rig.Rig()
    try:
        r.start()
        yield r
    finally:
        r.close()


def pytest_terminal_summary(terminalreporter):
    if vllm_rig.TIMES:
        terminalreporter.write_sep("=", "real vLLM drill times")
        for k, v in vllm_rig.TIMES:
            terminalreporter.write_line(f"{k}: {v}")
