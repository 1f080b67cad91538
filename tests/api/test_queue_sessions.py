"""The central FIFO queue through the coordinator (POST /v1/sessions with wait_s): a waiting
booking gets its 201 when a slot frees, expiry, the bound, no jumping the queue, 16 threads
and two coordinator instances on one PostgreSQL: never over-admitted, never out of order."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.api.deps import run_write
from app.service import telemetry
from app.service.errors import Conflict
from app.service.queue import TooManyRequests
from app.service.session_schemas import BookingIn
from app.store.booking_queue import QueuedRequest
from app.store.session_tables import QueueRow
from tests.api.conftest import ADMIN, AppFactory, admin, bearer, example_scenario
from tests.api.helpers import route_params, small_swarm
from tests.api.test_concurrency import two_instances  # noqa: F401  (the fixture)
from tests.api.test_session_security import units_by_server


def fill(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    """Book until every chain is full; the sessions booked."""
    booked = []
    while True:
        response = client.post("/v1/sessions", json={**route_params(), **body})
        if response.status_code != 201:
            assert response.status_code == 503, response.text
            return booked
        booked.append(response.json())
        assert len(booked) < 1000


def release(client: TestClient, session: dict[str, Any]) -> None:
    path = f"/v1/sessions/{session['id']}"
    assert client.delete(path, headers=bearer(session["token"])).status_code == 204


def queue_rows(url: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(select(QueueRow).order_by(QueueRow.seq)))
    finally:
        engine.dispose()


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def assert_within_capacity(url: str) -> None:
    for server_id, (reserved, capacity) in units_by_server(url).items():
        assert 0 <= reserved <= capacity, f"{server_id} over-committed: {reserved} > {capacity}"


def test_a_waiting_booking_gets_its_201_as_soon_as_a_slot_frees(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    booked = fill(client)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(client.post, "/v1/sessions", json={**route_params(), "wait_s": 30})
        wait_until(lambda: len(queue_rows(database_url)) == 1, "the booking never queued")
        assert not waiting.done()
        release(client, booked[0])
        reply = waiting.result(timeout=30)
    assert reply.status_code == 201, reply.text
    assert reply.json()["token"] and queue_rows(database_url) == []
    assert_within_capacity(database_url)
    assert telemetry.QUEUE_DEPTH._value.get() == 0  # type: ignore[attr-defined]


def test_a_booking_that_waits_too_long_gets_503_and_leaves_the_queue(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    fill(client)
    started = time.monotonic()
    response = client.post("/v1/sessions", json={**route_params(), "wait_s": 0.4})
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 503 and "wait_s" in response.json()["detail"]
    assert "Retry-After" in response.headers
    assert queue_rows(database_url) == []


def test_the_queue_is_bounded(
    make_client: AppFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BPRR_QUEUE_MAX_DEPTH", "1")
    client = make_client(database_url)
    small_swarm(client, count=3, memory_gb=4.0)
    fill(client)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    first = sessions.start(BookingIn(**route_params(), wait_s=30))
    with pytest.raises(TooManyRequests):
        sessions.start(BookingIn(**route_params(), wait_s=30))
    response = client.post("/v1/sessions", json={**route_params(), "wait_s": 30})
    assert response.status_code == 429 and "Retry-After" in response.headers
    sessions.abandon(first)
    assert queue_rows(database_url) == []


def test_a_direct_booking_never_takes_the_slot_a_waiting_one_is_owed(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    booked = fill(client)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    sessions.queue._stop.set()  # no pump: the test runs the queue's rounds itself
    pending = sessions.start(BookingIn(**route_params(), wait_s=30))
    release(client, booked[0])
    # Units are free, but the head of the queue has the first claim on them.
    refused = client.post("/v1/sessions", json=route_params())
    assert refused.status_code == 503, refused.text
    assert sessions.queue.run_round() == 1
    assert pending.future.result(timeout=5)
    assert_within_capacity(database_url)


def _waiters_admitted_in_order(
    instances: list[Any], clients: list[TestClient], url: str, booked: list[dict[str, Any]]
) -> None:
    """16 threads wait in the queue (spread over the instances); sessions are released one
    at a time (on alternating instances): each release admits exactly one waiter, the
    oldest."""
    done: list[str] = []
    lock = threading.Lock()

    def wait(i: int) -> str:
        body = BookingIn(**route_params(inputs=5, outputs=5), wait_s=120)
        out = instances[i % len(instances)].book(body)
        with lock:
            done.append(out.id)
        return str(out.id)

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures: list[Future[str]] = [pool.submit(wait, i) for i in range(16)]
        wait_until(lambda: len(queue_rows(url)) == 16, "not every booking queued")
        order = [row.session_id for row in queue_rows(url)]
        for n in range(16):
            release(clients[n % len(clients)], booked[n])
            wait_until(lambda n=n: len(done) >= n + 1, f"release {n + 1} admitted nobody")
            time.sleep(0.05)  # a second admission, if any, would show here
            assert len(done) == n + 1, "one release admitted more than one booking"
            assert_within_capacity(url)
        for future in futures:
            future.result(timeout=30)
    assert done == order, "admitted out of arrival order"
    assert queue_rows(url) == []


def test_sixteen_threads_are_admitted_in_order_never_beyond_capacity(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    booked = fill(client, input_tokens=5, output_tokens=5)
    assert len(booked) >= 16
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    _waiters_admitted_in_order([sessions], [client], database_url, booked)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_coordinators_share_one_queue_in_order(make_client: AppFactory, pg_url: str) -> None:
    """Two Coordinator instances (each its own engine, view and queue pump) on one
    PostgreSQL, as two replicas: waiters on both, releases on both."""
    first = make_client(pg_url)
    second = make_client(pg_url)
    small_swarm(first, count=3, memory_gb=4.0)
    second.app.state.coordinator.invalidate()  # type: ignore[attr-defined]
    booked = fill(first, input_tokens=5, output_tokens=5)
    assert len(booked) >= 16
    instances = [c.app.state.coordinator.sessions for c in (first, second)]  # type: ignore[attr-defined]
    _waiters_admitted_in_order(instances, [first, second], pg_url, booked)


def test_a_client_that_gives_up_leaves_the_queue_and_its_admitted_session_is_released(
    client: TestClient, database_url: str
) -> None:
    small_swarm(client, count=3, memory_gb=4.0)
    booked = fill(client)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    sessions.queue._stop.set()
    gone = sessions.start(BookingIn(**route_params(), wait_s=30))
    sessions.abandon(gone)
    assert queue_rows(database_url) == []
    admitted_then_gone = sessions.start(BookingIn(**route_params(), wait_s=30))
    release(client, booked[0])
    reserved = sum(r for r, _ in units_by_server(database_url).values())
    sessions.queue.run_round()  # admitted, but its client has gone
    sessions.abandon(admitted_then_gone)
    assert sum(r for r, _ in units_by_server(database_url).values()) == reserved
    status = client.get(f"/v1/sessions/{admitted_then_gone.session_id}", headers=admin())
    assert status.json()["state"] == "ended" and status.json()["end_reason"] == "abandoned"


@pytest.mark.postgres
@pytest.mark.slow
def test_two_processes_share_one_queue_never_over_admitted_in_order(
    two_instances: tuple[list[str], list[Any]],  # noqa: F811
    pg_url: str,
) -> None:
    """Two `uvicorn` coordinator processes on one PostgreSQL: the swarm filled, 8 waiting
    bookings on each, released one at a time on alternating processes: each release admits
    exactly one waiter, the oldest, whichever process holds it."""
    bases, _ = two_instances
    loaded = httpx.post(
        f"{bases[0]}/v1/scenario",
        params={"lease_s": 3600},
        json=example_scenario(),
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=60,
    )
    assert loaded.status_code == 201, loaded.text
    body = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 128}
    deadline = time.monotonic() + 10
    while httpx.get(f"{bases[1]}/v1/routes", params=body, timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    booked = []
    with httpx.Client(base_url=bases[0], timeout=30) as http:
        while (reply := http.post("/v1/sessions", json=body)).status_code == 201:
            booked.append(reply.json())
        assert reply.status_code == 503 and len(booked) >= 16
    done: list[str] = []
    lock = threading.Lock()

    def wait(i: int) -> int:
        with httpx.Client(base_url=bases[i % 2], timeout=120) as http:
            reply = http.post("/v1/sessions", json={**body, "wait_s": 100})
        if reply.status_code == 201:
            with lock:
                done.append(reply.json()["id"])
        return reply.status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(wait, i) for i in range(16)]
        wait_until(lambda: len(queue_rows(pg_url)) == 16, "not every booking queued", 60)
        order = [row.session_id for row in queue_rows(pg_url)]
        for n in range(16):
            session = booked[n]
            released = httpx.delete(
                f"{bases[n % 2]}/v1/sessions/{session['id']}",
                headers=bearer(session["token"]),
                timeout=30,
            )
            assert released.status_code == 204
            wait_until(lambda n=n: len(done) >= n + 1, f"release {n + 1} admitted nobody", 60)
            time.sleep(0.3)  # a second admission, if any, would show here
            assert len(done) == n + 1, "one release admitted more than one booking"
        assert [future.result(timeout=60) for future in futures] == [201] * 16
    assert done == order, "admitted out of arrival order"
    assert_within_capacity(pg_url)


def _hold_the_writer_lock(coordinator: Any, seconds: float) -> threading.Thread:
    """Another writer holds this process's SQLite writer lock for ``seconds``."""
    held = threading.Event()

    def hold() -> None:
        with coordinator.core._writer():
            held.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    return thread


def test_a_ticket_whose_key_booked_meanwhile_gets_that_session_and_the_queue_moves_on(
    client: TestClient, database_url: str
) -> None:
    """Two requests raced with one Idempotency-Key: one booked directly, the other queued.
    The ticket's admission hits the record's unique key: it gets the booked session (with
    its own token), the ticket behind it is admitted in the same round."""
    small_swarm(client, count=3, memory_gb=4.0)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    first = sessions.book(BookingIn(**route_params()), None, "K1")
    booked = fill(client)
    sessions.queue._stop.set()  # rounds run here only
    params = route_params()
    raced = QueuedRequest(
        uuid.uuid4().hex, "h" * 64, "internal", "K1", params["client_site"], 10, 10
    )
    raced_future = sessions.queue.enqueue(raced, 60)
    behind = sessions.start(BookingIn(**route_params(), wait_s=60))
    for session in booked[:3]:
        release(client, session)
    assert sessions.queue.run_round() == 2
    assert json.loads(raced_future.result(timeout=5))["id"] == first.id
    assert json.loads(behind.future.result(timeout=5))["id"] == behind.session_id
    assert queue_rows(database_url) == []


def test_a_second_ticket_with_one_key_is_a_409_not_a_second_ticket(
    client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race at enqueue: a request with the key of a waiting ticket that looked before
    that ticket was in (its replay found nothing) meets the unique index: a 409."""
    small_swarm(client, count=3, memory_gb=4.0)
    fill(client)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    sessions.queue._stop.set()
    waiting = sessions.start(BookingIn(**route_params(), wait_s=60), None, "K2")
    replay = sessions._replay
    looked: list[bool] = []

    def too_early(*args: Any) -> Any:
        if not looked:  # the first look ran before the waiting ticket was in
            looked.append(True)
            return None
        return replay(*args)

    monkeypatch.setattr(sessions, "_replay", too_early)
    with pytest.raises(Conflict):
        sessions.start(BookingIn(**route_params(), wait_s=60), None, "K2")
    assert [row.session_id for row in queue_rows(database_url)] == [waiting.session_id]


def test_a_disconnected_client_s_admitted_session_is_released_with_the_writer_lock_busy(
    make_client: AppFactory, sqlite_url: str
) -> None:
    """run_write on the event loop (SQLite's path): the release would block, so it is
    retried in a thread (it used to be swallowed as "orphan not released", the units held
    until expiry)."""
    database_url = sqlite_url
    client = make_client(sqlite_url)
    small_swarm(client, count=3, memory_gb=4.0)
    booked = fill(client)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    sessions = coordinator.sessions
    sessions.queue._stop.set()
    pending = sessions.start(BookingIn(**route_params(), wait_s=60))
    release(client, booked[0])
    assert sessions.queue.run_round() == 1
    assert pending.future.result(timeout=5)
    before = sum(units for units, _ in units_by_server(database_url).values())
    holder = _hold_the_writer_lock(coordinator, 0.3)
    try:
        asyncio.run(run_write(coordinator, sessions.abandon, pending))
    finally:
        holder.join()
    assert sum(units for units, _ in units_by_server(database_url).values()) < before
    status = client.get(f"/v1/sessions/{pending.session_id}", headers=bearer(ADMIN)).json()
    assert status["state"] == "ended" and status["end_reason"] == "abandoned"
