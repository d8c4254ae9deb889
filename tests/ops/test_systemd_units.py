"""deploy/systemd/ through `systemd-analyze verify`, offline: the units are laid in a scratch root
(`--root`) with the system's own units beside them and a stub for each program they start, so
that verify checks the units themselves and not what this machine has installed. Template units
(`vllm@.service`) are verified as an instance. A warning (an unknown key, a value systemd cannot
parse) fails the test: verify itself exits 0 on those. Every service sets its file limit
(LimitNOFILE, issue 18)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
SYSTEM_UNITS = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]


def units() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def instance(p: Path) -> str:
    return p.name.replace("@.", "@0.")


def exec_paths(p: Path) -> list[str]:
    out = []
    for line in p.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("ExecStart", "ExecReload", "ExecStop", "ExecStartPre"):
            out.append(value.split()[0].lstrip("-@:+!"))
    return out


def make_root(root: Path) -> None:
    sysdir = next((d for d in SYSTEM_UNITS if (d / "sysinit.target").exists()), None)
    if sysdir is None:
        pytest.skip("no systemd unit directory with sysinit.target: systemd is not installed (apt-get install systemd)")
    shutil.copytree(sysdir, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    etc = root / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for p in units():
        shutil.copy(p, etc / p.name)
        for prog in exec_paths(p):
            stub = root / prog.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)


def verify(root: Path, names: list[str]) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([tool, "verify", f"--root={root}", *names], capture_output=True, text=True, timeout=120)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert units(), "no units in deploy/systemd"
    make_root(tmp_path)
    r = verify(tmp_path, [instance(p) for p in units()])
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a bad value and an unknown key are reported."""
    make_root(tmp_path)
    unit = tmp_path / "etc" / "systemd" / "system" / "gpuha-dnsd.service"
    unit.write_text(unit.read_text().replace("LimitNOFILE=8192", "LimitNOFILE=lots\nRestartt=always"))
    r = verify(tmp_path, ["gpuha-dnsd.service"])
    assert "lots" in r.stderr and "Restartt" in r.stderr, r.stderr


@pytest.mark.parametrize("unit", [p.name for p in units()])
def test_every_service_sets_its_file_limit(unit: str) -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / unit).read_text())
    value = cp.get("Service", "LimitNOFILE", fallback=None)
    assert value is not None, f"{unit}: no LimitNOFILE (issue 18)"
    assert int(value.split(":")[0]) >= 1024
