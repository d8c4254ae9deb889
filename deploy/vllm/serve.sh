#!/usr/bin/env bash
# Starts N real vLLM servers, each in its own process group, with a gpuha-sidecar beside each.
# See `deploy/vllm/serve.sh --help` (serve.py) and deploy/vllm/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 "$here/serve.py" "$@"
