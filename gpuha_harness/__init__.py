"""The one harness of GPU HA's drills, real-vLLM drills, demo, `deploy/vllm/serve.sh` and bench:
processes by PID and process group, ports, the stack (Envoy, dnsd, fake vLLM workers, sidecars),
network-namespace clouds, the openai-SDK client and its outcome classification, and real vLLM
servers.

Modules:

- `env`: where the binaries, the Wasm filter and Envoy are (``GPUHA_BIN_DIR``, ``GPUHA_WASM``,
  ``GPUHA_ENVOY``)
- `wait`: bounded waits (`wait_for`), ports, plain HTTP
- `proc`: one process in its own group (`Proc`), and what /proc says about process groups
- `stack`: the stack on 127.0.0.1 (`Stack`, `Worker`, `Dnsd`, `Envoy`, `FleetSamples`, `write_zone_config`)
- `envoy_log`: a router's filter counters and access log
- `client`: one openai-SDK request as an `Outcome`, `Load`, classification helpers
- `drill`: what drills share beyond the stack (`warm_up`, `report`, whole-answer checks)
- `netns`, `dns_world`: network-namespace "clouds" and the DNS drills' world and client
- `vllm`, `vllm_rig`: real vLLM servers in their own process groups, and the real-vLLM drills' rig

Nothing here imports from ``tests/``; the repository root must be on ``sys.path`` (each
conftest and script puts it there).
"""

from .client import (TOKEN_RX, ChildLoad, Load, Outcome, chat, is_inband_error, is_transport_error, join_all, make_client,
                     per_worker, run_concurrently, summarize)
from .drill import assert_whole_and_single_worker, report, warm_up
from .env import REPO, START_TIMEOUT_S, bin_dir, binary, envoy_bin, wasm_path
from .envoy_log import ACCESS_RX, access_entries, filter_stat
from .proc import Proc
from .stack import Dnsd, Envoy, FleetSamples, Stack, Worker, parse_metrics, succeeds, tail_file, write_zone_config
from .wait import Timeout, free_port, http_get, http_post, port_accepts, wait_for

__all__ = ["ChildLoad", 
    "ACCESS_RX", "REPO", "START_TIMEOUT_S", "TOKEN_RX", "Dnsd", "Envoy", "FleetSamples", "Load", "Outcome", "Proc", "Stack", "Timeout",
    "Worker", "access_entries", "assert_whole_and_single_worker", "bin_dir", "binary", "chat", "envoy_bin",
    "filter_stat", "free_port", "http_get", "http_post", "is_inband_error", "is_transport_error", "join_all",
    "make_client", "parse_metrics", "per_worker", "port_accepts", "report", "run_concurrently", "succeeds", "summarize", "wait_for",
    "tail_file", "warm_up", "wasm_path", "write_zone_config",
]
