"""What a pool router says about a request: the filter's counters and its access log (format in
envoy/pool-router.yaml)."""

from __future__ import annotations

import re

from .stack import Envoy
from .wait import wait_for


def filter_stat(envoy: Envoy, name: str) -> int:
    """A gpuha filter counter (`gpuha.<name>`, shown by Envoy as `wasmcustom.gpuha.<name>`),
    summed over every key ending with it."""
    return sum(v for k, v in envoy.stats(r"gpuha\.").items() if k.endswith(f"gpuha.{name}"))


ACCESS_RX = re.compile(
    r"^\[(?P<start>[^\]]+)\] \"(?P<method>\S+) (?P<path>\S+)\" (?P<code>\d+) flags=(?P<flags>\S*) "
    r"upstream=(?P<upstream>\S*) attempts=(?P<attempts>\S*) guard=(?P<guard>\S*) endpoints=(?P<endpoints>\S*)"
    r"(?: probe=(?P<probe>\S*))?(?: tier=(?P<tier>\S*) spilled=(?P<spilled>\S*))?(?: details=(?P<details>\S*))?")


def access_entries(envoy: Envoy, settle: bool = True) -> list[dict]:
    """Parsed pool-router access log lines (format in envoy/pool-router.yaml). `start` is a
    UNIX timestamp (float). Envoy flushes the file about once a second: with `settle`, waits
    until it holds a line for every request the listener has completed."""
    import datetime as _dt

    if settle:
        want = envoy.stats(r"^http\.gpuha\.downstream_rq_completed$").get("http.gpuha.downstream_rq_completed", 0)
        wait_for(lambda: len(envoy.access_log_entries()) >= want, 10,
                 f"{envoy.name}'s access log to hold {want} lines", interval=0.1)
    out = []
    for line in envoy.access_log_entries():
        m = ACCESS_RX.match(line)
        if not m:
            continue
        d = m.groupdict()
        try:
            d["start"] = _dt.datetime.strptime(d["start"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=_dt.timezone.utc).timestamp()
        except ValueError:
            d["start"] = None
        d["attempts"] = int(d["attempts"]) if d["attempts"].isdigit() else 0
        d["endpoints"] = [] if d["endpoints"] in ("", "-") else d["endpoints"].split(",")
        d["probe"] = None if d.get("probe") in (None, "", "-") else d["probe"]
        d["tier"] = None if d.get("tier") in (None, "", "-") else d["tier"]
        d["spilled"] = None if d.get("spilled") in (None, "", "-") else d["spilled"]
        out.append(d)
    return out
