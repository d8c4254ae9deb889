"""Envoy closes an idle connection to a worker before the worker does.

vLLM's API server (uvicorn) closes a keep-alive connection idle for 5 s
(`VLLM_HTTP_TIMEOUT_KEEP_ALIVE`). Envoy keeps pooled upstream connections for an hour by default,
so a request it sends on one just as vLLM closes it fails with a reset (`UC`) that no worker
failure caused; a retry that meets it can leave the client with an error (the real-vLLM d1 drill
saw three retries fail that way on the surviving server). `render.py --upstream-idle-timeout`
(4 s by default) makes Envoy close them first.
"""

from __future__ import annotations

import time

from gpuha_harness import chat, make_client, wait_for

VLLM_KEEP_ALIVE_S = 5.0  # vllm/envs.py: VLLM_HTTP_TIMEOUT_KEEP_ALIVE
CX = "cluster.gpuha_workers.upstream_cx_"


def test_envoy_closes_idle_worker_connections_before_vllm_does(stack):
    stack.start_dnsd()
    stack.start_workers(1)
    envoy = stack.start_pool_router()
    client = make_client(envoy.base_url, timeout=10)
    o = chat(client, 0, 4)
    assert o.error is None, o.describe()
    done = time.monotonic()

    def closed_idle() -> int:
        return envoy.stats(CX + "idle_timeout").get(CX + "idle_timeout", 0)

    wait_for(closed_idle, VLLM_KEEP_ALIVE_S + 3, "Envoy to close its idle connection to the worker")
    after = time.monotonic() - done
    st = envoy.stats(CX)
    print(f"\n[keepalive] idle upstream connection closed by Envoy {after:.2f}s after the answer; "
          f"idle_timeout={st.get(CX + 'idle_timeout')} destroy_local={st.get(CX + 'destroy_local')} "
          f"destroy_remote={st.get(CX + 'destroy_remote')}")
    # Closed by Envoy, at its own 4 s, before a vLLM would have closed it.
    assert st.get(CX + "destroy_remote", 0) == 0, st
    assert 3.0 <= after < VLLM_KEEP_ALIVE_S, f"closed {after:.2f}s after the answer"
