"""What the fake-worker drills share beyond the stack: printing figures into the test log,
waiting until a router routes, and the checks every drill makes on what clients saw."""

from __future__ import annotations

from .client import Outcome, chat, is_transport_error, make_client
from .envoy_log import filter_stat
from .stack import Envoy, Stack
from .wait import wait_for


def report(line: str) -> None:
    """A figure for the test log (pytest -s / -rA shows it)."""
    print(f"\n{line}", flush=True)


def warm_up(stack: Stack, envoy: Envoy) -> None:
    """Waits until the picker has a fleet view and has picked a worker for a real request."""
    wait_for(lambda: filter_stat(envoy, "fleet_polls") >= 1, 10, "the picker's first fleet poll")
    client = make_client(envoy.base_url)
    before = filter_stat(envoy, "picks")

    def one_pick():
        o = chat(client, -1, 1)
        assert o.kind == "completed", f"warm-up request failed: {o.describe()}"
        return filter_stat(envoy, "picks") > before

    wait_for(one_pick, 10, "a request routed by the picker (gpuha.picks rising)", interval=0.1)


def assert_whole_and_single_worker(outcomes: list[Outcome]) -> None:
    bad = [o.describe() for o in outcomes if o.kind in ("splice", "short")]
    assert not bad, "splices or short answers:\n" + "\n".join(bad)
    for o in outcomes:
        if o.kind == "truncated" and o.error is not None:
            # A JSON error here would mean a partial SSE event reached the SDK.
            assert is_transport_error(o.error), f"truncation surfaced as {type(o.error).__name__}: {o.describe()}"
