"""deploy/systemd/ through `systemd-analyze verify`, offline: the units are laid in a scratch root
(`--root`) with the system's own units beside them and a stub for each program they start, so
that verify checks the units themselves and not what this machine has installed. Template units
(`vllm@.service`) are verified as an instance. A warning (an unknown key, a value systemd cannot
parse) fails the test: verify itself exits 0 on those. Every service sets its file limit
(LimitNOFILE, issue 18). The dnsd config these units run (deploy/dnsd/dnsd.toml) passes
`gpuha-dnsd --check` with certificates from deploy/tls/make-certs.sh, and the router unit, the
dnsd config and the Prometheus example agree on the mutual-TLS and metrics ports."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import gpuha_harness as harness

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


def test_the_units_dnsd_config_is_accepted_with_its_certificates(tmp_path: Path) -> None:
    """deploy/dnsd/dnsd.toml serves the routers off loopback, so over mutual TLS: with files made
    here (make-certs.sh) `gpuha-dnsd --check` accepts it; without [http.tls] it is refused."""
    try:
        dnsd = harness.binary("gpuha-dnsd")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = (REPO / "deploy" / "dnsd" / "dnsd.toml").read_text()
    cfg = tomllib.loads(text)
    assert not cfg["http"]["listen"].startswith("127.") and "tls" in cfg["http"]
    certs = tmp_path / "certs"
    r = subprocess.run(["bash", str(REPO / "deploy" / "tls" / "make-certs.sh"), "all", str(certs), "--san", "IP:10.0.0.53"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (tmp_path / "frame.key").write_bytes(bytes(range(32)))
    (tmp_path / "admin.token").write_text("0123456789abcdef0123456789abcdef\n")
    for old, new in [("/etc/gpuha/frame-key-1", tmp_path / "frame.key"), ("/etc/gpuha/admin.token", tmp_path / "admin.token"),
                     ("/var/lib/gpuha-dnsd/", f"{tmp_path}/"), ("/etc/gpuha/tls/dnsd.crt", certs / "dnsd.crt"),
                     ("/etc/gpuha/tls/dnsd.key", certs / "dnsd.key"), ("/etc/gpuha/tls/ca.crt", certs / "ca.crt")]:
        assert f'"{old}' in text, old
        text = text.replace(f'"{old}', f'"{new}')
    conf = tmp_path / "dnsd.toml"
    conf.write_text(text)
    r = subprocess.run([str(dnsd), "--config", str(conf), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "config ok" in r.stdout, r.stdout + r.stderr
    conf.write_text("\n".join(line for line in text.splitlines() if not line.startswith("tls = ")))
    r = subprocess.run([str(dnsd), "--config", str(conf), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "loopback" in r.stderr, r.stderr


def test_router_unit_and_prometheus_use_dnsds_tls_and_metrics_ports() -> None:
    http = tomllib.loads((REPO / "deploy" / "dnsd" / "dnsd.toml").read_text())["http"]
    tls_port, metrics_port = http["listen"].rsplit(":", 1)[1], http["metrics_listen"].rsplit(":", 1)[1]
    assert tls_port != metrics_port
    render = " ".join(line.lstrip("# ").rstrip("\\ ") for line in (UNITS / "gpuha-envoy.service").read_text().splitlines()
                      if line.startswith("#"))
    fleet = re.search(r"--fleet (\S+)", render)
    assert fleet and fleet.group(1).rsplit(":", 1)[1] == tls_port, "the router polls dnsd's TLS port"
    assert re.search(r"--dnsd-tls /\S+", render), "the router's render command: --dnsd-tls"
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.example.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "gpuha-dnsd")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.rsplit(":", 1)[1] == metrics_port for t in targets), "Prometheus scrapes the metrics listener"
