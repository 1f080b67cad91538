"""The sweep a booking does itself is bounded (it may run on the event loop); the planner's
full sweep ends the rest."""

from __future__ import annotations

from sqlalchemy import create_engine, func, select

from app.service.session_schemas import BookingIn
from app.service.session_sweep import BOOKING_SWEEP_LIMIT
from app.store.session_tables import SessionRecordRow
from tests.api.conftest import AppFactory, FakeClock
from tests.api.helpers import route_params, small_swarm


def _ended(url: str, reason: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).where(SessionRecordRow.end_reason == reason)
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_a_booking_ends_at_most_its_share_of_expired_sessions_and_the_sweep_the_rest(
    make_client: AppFactory, database_url: str, clock: FakeClock
) -> None:
    client = make_client(database_url, session_grace_s=0, lease_ttl_s=10_000)
    small_swarm(client, count=3, memory_gb=40.0)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    many = BOOKING_SWEEP_LIMIT + 12
    for _ in range(many):
        sessions.book(BookingIn(**route_params(inputs=1, outputs=1)))
    clock.advance(600)  # every session is past its expiry; the servers' leases are not
    sessions.book(BookingIn(**route_params(inputs=1, outputs=1)))
    assert _ended(database_url, "expired") == BOOKING_SWEEP_LIMIT
    assert sessions.sweep() == many - BOOKING_SWEEP_LIMIT
    assert _ended(database_url, "expired") == many
    assert sessions.active() == 1
