"""Client identity, the per-client booking rate limiter (app.service.clients) and the
client's session quota through the central queue."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import create_engine, func, select

from app.api.deps import run_write
from app.service.clients import ClientDirectory, ClientIdentity, RateLimiter
from app.service.errors import Forbidden, Unauthorized
from app.service.queue import TooManyRequests
from app.service.session_replies import Booked
from app.service.session_schemas import BookingIn
from app.service.session_settings import SessionSettings
from app.store.bookings import Bookings
from app.store.session_tables import SessionRecordRow
from tests.api.conftest import AppFactory
from tests.api.helpers import route_params, small_swarm
from tests.api.test_queue_sessions import fill, queue_rows, release


def directory(**values: object) -> ClientDirectory:
    return ClientDirectory(SessionSettings(**values))  # type: ignore[arg-type]


def test_a_client_token_names_the_client() -> None:
    clients = directory(client_tokens={"alice": SecretStr("a-secret")}, client_max_sessions=3)
    alice = clients.identify("a-secret", "10.0.0.1", admin=False)
    assert alice.name == "token:alice" and not alice.anonymous and alice.max_sessions == 3
    with pytest.raises(Forbidden):
        clients.identify("not-a-client-token", "10.0.0.1", admin=False)
    assert clients.identify("admin-token", None, admin=True).name == "admin"


def test_anonymous_clients_are_their_address_and_can_be_turned_off() -> None:
    anonymous = directory(anonymous_max_sessions=2).identify(None, "10.0.0.9", admin=False)
    assert anonymous.name == "anonymous:10.0.0.9" and anonymous.anonymous
    assert anonymous.max_sessions == 2
    with pytest.raises(Unauthorized, match="client token"):
        directory(anonymous_clients=False).identify(None, "10.0.0.9", admin=False)


def test_the_rate_limiter_allows_a_burst_then_the_rate() -> None:
    client = directory(anonymous_rate_per_s=2.0, anonymous_burst=3).identify(None, "x", False)
    limiter = RateLimiter()
    assert [limiter.take(client, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take(client, 100.0)
    assert wait == pytest.approx(0.5)
    assert limiter.take(client, 100.5) == 0.0  # one token back after 1/rate
    other = directory(anonymous_rate_per_s=2.0, anonymous_burst=3).identify(None, "y", False)
    assert limiter.take(other, 100.5) == 0.0  # buckets are per client


def test_no_rate_means_no_limit() -> None:
    client = directory(anonymous_rate_per_s=0).identify(None, "x", admin=False)
    limiter = RateLimiter()
    assert all(limiter.take(client, 1.0) == 0.0 for _ in range(1000))


def test_the_limiter_forgets_the_least_recent_clients_beyond_its_bound() -> None:
    limiter = RateLimiter(max_clients=2)
    settings = directory(anonymous_rate_per_s=1.0, anonymous_burst=1)
    first = settings.identify(None, "a", False)
    assert limiter.take(first, 0.0) == 0.0 and limiter.take(first, 0.0) > 0
    limiter.take(settings.identify(None, "b", False), 0.0)
    limiter.take(settings.identify(None, "c", False), 0.0)
    assert limiter.take(first, 0.0) == 0.0  # forgotten: a fresh bucket


def test_a_booking_retried_after_would_block_is_charged_once(
    make_client: AppFactory, sqlite_url: str
) -> None:
    """run_write tries a booking on the event loop, meets a busy writer lock (WouldBlock)
    and runs it again in a thread: one rate-limit token and one window sample, not two."""
    client = make_client(sqlite_url)
    small_swarm(client, count=3, memory_gb=4.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    sessions = coordinator.sessions
    who = ClientIdentity("token:c", 0, 0.01, 1)  # burst 1: one booking per 100 s
    samples = len(sessions.window._samples)
    held = threading.Event()

    def hold_the_writer_lock() -> None:
        with coordinator.core._writer():
            held.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold_the_writer_lock)
    holder.start()
    held.wait()
    try:
        started = asyncio.run(
            run_write(coordinator, sessions.start, BookingIn(**route_params()), who)
        )
    finally:
        holder.join()
    assert isinstance(started, Booked) and started.created
    assert len(sessions.window._samples) == samples + 1
    with pytest.raises(TooManyRequests):  # the one token is spent: the limit still holds
        sessions.start(BookingIn(**route_params()), who)


def _live_sessions(url: str, client_name: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).where(
                SessionRecordRow.client == client_name, SessionRecordRow.ended_at.is_(None)
            )
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_a_client_at_its_quota_cannot_queue_another_booking(
    client: TestClient, database_url: str
) -> None:
    """The quota counts live sessions and waiting tickets: a 429 at the queue's door."""
    small_swarm(client, count=3, memory_gb=4.0)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    sessions.queue._stop.set()
    who = ClientIdentity("token:q", 1, 0.0, 1)  # one live session at most
    sessions.start(BookingIn(**route_params()), who)
    fill(client)
    with pytest.raises(TooManyRequests, match="quota of 1"):
        sessions.start(BookingIn(**route_params(), wait_s=60), who)
    assert queue_rows(database_url) == []
    assert _live_sessions(database_url, "token:q") == 1


def test_the_queue_refuses_a_head_over_its_client_s_quota_and_moves_on(
    client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket that passed the door while its client's direct booking was still in flight
    (simulated: the door saw no live session) is refused at admission with a 429; the
    ticket behind it is admitted in the same round."""
    small_swarm(client, count=3, memory_gb=4.0)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    sessions.queue._stop.set()
    who = ClientIdentity("token:q", 1, 0.0, 1)
    sessions.start(BookingIn(**route_params()), who)
    booked = fill(client)
    with monkeypatch.context() as patched:
        patched.setattr(Bookings, "live_for", lambda self, client_name: 0)
        over = sessions.start(BookingIn(**route_params(), wait_s=60), who)
    behind = sessions.start(BookingIn(**route_params(), wait_s=60))
    for session in booked[:3]:
        release(client, session)
    assert sessions.queue.run_round() == 1
    with pytest.raises(TooManyRequests, match="quota of 1"):
        over.future.result(timeout=5)
    assert behind.future.result(timeout=5)
    assert _live_sessions(database_url, "token:q") == 1
