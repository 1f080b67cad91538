"""The in-memory route view: stale-while-revalidate, and what invalidates it."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from tests.api.conftest import AppFactory, FakeClock
from tests.api.helpers import heartbeat, small_swarm


def _coordinator(client: TestClient):  # type: ignore[no-untyped-def]
    return client.app.state.coordinator  # type: ignore[attr-defined]


def _wait_for_refresh(coordinator, old) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = coordinator.core.cached_view()
        if current is not None and current is not old:
            return current
        time.sleep(0.01)
    raise AssertionError("the background refresh never replaced the stale view")


def test_a_stale_view_answers_while_one_thread_rebuilds_it(
    make_client: AppFactory, sqlite_url: str, clock: FakeClock
) -> None:
    client = make_client(sqlite_url)
    small_swarm(client)
    coordinator = _coordinator(client)
    first = coordinator.view()
    assert coordinator.view() is first  # fresh: no rebuild
    clock.advance(coordinator.view_refresh_s + 0.5)
    started = threading.active_count()
    assert coordinator.view() is first  # stale: still answers with the old view at once...
    refreshed = _wait_for_refresh(coordinator, first)  # ...and a background thread replaces it
    assert refreshed.built_at == clock.now  # type: ignore[attr-defined]
    assert threading.active_count() <= started + 1


def test_rtt_samples_do_not_rebuild_the_view_but_a_new_span_does(
    make_client: AppFactory, sqlite_url: str
) -> None:
    client = make_client(sqlite_url)
    tokens = small_swarm(client)
    coordinator = _coordinator(client)
    view = coordinator.view()
    span = view.spans["s0"]
    loaded = {"start": span.start, "end": span.end}
    reply = heartbeat(client, "s0", tokens["s0"], loaded, rtts={"east": 7.5})
    assert reply.status_code == 200
    assert coordinator.view() is view  # RTTs wait for the periodic refresh
    reply = heartbeat(client, "s0", tokens["s0"], None)  # unloads its span: routing must know
    assert reply.status_code == 200
    assert coordinator.view() is not view
