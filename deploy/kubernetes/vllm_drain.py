#!/usr/bin/env python3
"""preStop hook of the vLLM container (vllm-worker.yaml): let the requests in flight finish
before the kubelet sends vLLM its SIGTERM.

When a worker pod is deleted, the kubelet runs this in the vLLM container while it sends the
sidecar (no preStop) its SIGTERM at once: the frames stop, and once the freshness gate (3 s) and
a fleet poll have passed no router picks this worker for a new request. This script waits that
long, then until vLLM's own /metrics show no request running or waiting (twice in a row), and
exits; the kubelet then stops vLLM. terminationGracePeriodSeconds bounds the whole wait.

Fail open: a /metrics that cannot be read or parsed is nothing to wait for (vLLM is already
gone or broken), so the script exits and the pod ends. Stdlib only (it runs in vLLM's image).

    python3 vllm_drain.py [--metrics-url URL] [--gate-s 4] [--period-s 0.5]
Exit status 0 always, except 2 for bad arguments.
"""

import argparse
import re
import sys
import time
import urllib.request

# vLLM's gauges; one line per engine (model_name / engine labels), summed.
BUSY = re.compile(r"^vllm:num_requests_(running|waiting)(\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def busy(url, timeout):
    """Requests running + waiting, or None when /metrics cannot be read or shows no gauge."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read(16 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    found = BUSY.findall(text)
    if not found:
        return None
    return sum(float(v) for _, _, v in found)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8000/metrics")
    ap.add_argument("--gate-s", type=float, default=4.0,
                    help="wait this long first: the freshness gate (3 s) and a fleet poll, after which no router sends new requests here")
    ap.add_argument("--period-s", type=float, default=0.5)
    a = ap.parse_args(argv)
    time.sleep(a.gate_s)
    idle_reads = 0
    while True:
        n = busy(a.metrics_url, timeout=max(a.period_s, 2.0))
        if n is None:
            print("vllm_drain: /metrics unreadable: nothing to wait for", flush=True)
            return 0
        idle_reads = idle_reads + 1 if n == 0 else 0
        if idle_reads >= 2:
            print("vllm_drain: no request running or waiting", flush=True)
            return 0
        time.sleep(a.period_s)


if __name__ == "__main__":
    sys.exit(main())
