"""Over-admission: concurrent bookings (threads, one process) and two coordinator processes
sharing one PostgreSQL (leader election, bookings through both)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete, func, select, text
from sqlalchemy.orm import Session

from app.service.clients import ClientIdentity
from app.service.errors import Unavailable
from app.service.queue import TooManyRequests
from app.service.schemas import SessionIn
from app.store import db as store_db
from app.store import repositories as repo
from app.store.bookings import Bookings
from app.store.models import LeaderRow, ReservationRow, ServerRow
from tests.api.conftest import (
    ADMIN,
    JOIN,
    PG_ADMIN_DSN,
    AppFactory,
    FakeClock,
    bearer,
    example_scenario,
    pg_database_url,
)
from tests.api.helpers import (
    model_row,
    new_session,
    route_params,
    server_body,
    server_row,
    small_swarm,
)
from tests.api.test_session_security import units_by_server


def assert_not_overcommitted(url: str) -> int:
    """Every server's reserved cache units within its capacity in units (from its memory,
    loaded span and the model) and equal to its reservations; the units reserved in all."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            held = dict(
                connection.execute(
                    select(ReservationRow.server_id, func.sum(ReservationRow.slots)).group_by(
                        ReservationRow.server_id
                    )
                ).all()
            )
    finally:
        engine.dispose()
    units = units_by_server(url)
    for server_id, (reserved, capacity) in units.items():
        assert reserved <= capacity, f"{server_id} over-committed: {reserved} > {capacity}"
        assert reserved == (held.get(server_id) or 0), server_id
    return sum(reserved for reserved, _ in units.values())


def test_concurrent_bookings_never_overcommit(client: TestClient, database_url: str) -> None:
    small_swarm(client, count=4, memory_gb=5.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    body = SessionIn(**route_params(inputs=10, outputs=10))

    def book(_: int) -> bool:
        try:
            coordinator.book(body)
            return True
        except Unavailable:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(book, range(120)))
    assert any(results) and not all(results), "the swarm should fill up"
    reserved = assert_not_overcommitted(database_url)
    # Every booked session holds its own 10 + 10 tokens on each of the 8 blocks.
    assert reserved == sum(results) * 8 * 20


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def two_instances(pg_url: str) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    env = dict(
        os.environ,
        BPRR_DATABASE_URL=pg_url,
        BPRR_ADMIN_TOKEN=ADMIN,
        BPRR_JOIN_TOKEN=JOIN,
        BPRR_PLANNER_INTERVAL_S="0.2",
        BPRR_LEADER_LEASE_S="1.0",
    )
    ports = [_free_port(), _free_port()]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        for port in ports
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 60
        for base in bases:
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "coordinator did not start"
                time.sleep(0.2)
        yield bases, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_instances_one_leader_no_overadmission(
    two_instances: tuple[list[str], list[subprocess.Popen[bytes]]], pg_url: str
) -> None:
    bases, processes = two_instances
    headers = {"Authorization": f"Bearer {ADMIN}"}
    loaded = httpx.post(
        f"{bases[0]}/v1/scenario",
        params={"lease_s": 3600},
        json=example_scenario(),
        headers=headers,
        timeout=60,
    )
    assert loaded.status_code == 201, loaded.text
    # Instance B sees A's placement (within its index refresh period).
    body = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 128}
    deadline = time.monotonic() + 10
    while httpx.get(f"{bases[1]}/v1/routes", params=body, timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    def book(i: int) -> int:
        with httpx.Client(base_url=bases[i % 2], timeout=30) as http:
            return http.post("/v1/sessions", json=body).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(book, range(400)))
    assert set(codes) <= {201, 503}
    assert 201 in codes and 503 in codes
    reserved = assert_not_overcommitted(pg_url)
    # Each booked path holds 20 + 128 tokens on each of the 70 blocks.
    assert reserved == codes.count(201) * 70 * 148

    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            holders = connection.execute(select(LeaderRow.holder)).scalars().all()
        assert len(holders) == 1  # one leader lease row, held by one process
        # Stop instance A: whoever led before, the lease must now be renewed by B alone,
        # i.e. its expiry moves past the moment A stopped plus one lease period.
        processes[0].terminate()
        processes[0].wait(timeout=30)
        stopped = time.time()
        deadline = time.monotonic() + 15
        while True:
            with engine.connect() as connection:
                row: Any = connection.execute(select(LeaderRow.holder, LeaderRow.expires_at)).one()
            if row.expires_at > stopped + 1.05:
                break
            assert time.monotonic() < deadline, "no live leader after one instance stopped"
            time.sleep(0.2)
        assert httpx.get(f"{bases[1]}/v1/routes", params=body, timeout=5).status_code in {200, 503}
    finally:
        engine.dispose()


def test_booking_over_a_server_gone_since_the_view_takes_another_chain(
    client: TestClient, database_url: str
) -> None:
    """Another process removed a server after this one built its route view: the booking's
    conditional reservation finds no row, rolls back, and the retry routes around it."""
    small_swarm(client, count=4, memory_gb=6.0)
    first = client.get("/v1/routes", params=route_params())
    assert first.status_code == 200, first.text
    gone = first.json()["hops"][0]["server_id"]
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(ServerRow).where(ServerRow.id == gone))
    finally:
        engine.dispose()
    booked = client.post("/v1/sessions", json=route_params())
    assert booked.status_code == 201, booked.text
    assert gone not in {hop["server_id"] for hop in booked.json()["route"]["hops"]}
    assert_not_overcommitted(database_url)


@pytest.fixture
def icu_database() -> Iterator[str]:
    """A PostgreSQL database whose default collation (ICU en-US, like en_US.UTF-8 in the
    postgres image) sorts "a" before "B", where Python sorts "B" before "a"."""
    name = f"bprr_icu_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
        user = connection.execute("SELECT current_user").fetchone()
    yield pg_database_url(name, str(user[0]) if user else "postgres")
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_bookings_lock_rows_in_the_order_python_writes_them_whatever_the_collation(
    icu_database: str,
) -> None:
    """A transaction that updates servers "B" then "a" (Python's order, as lease renewals and
    ORM flushes do) holds "B"; a booking over both must queue on "B" holding nothing, so the
    transaction's update of "a" goes through. Locking in the database's collation ("a" first)
    deadlocks here."""
    engine = store_db.make_engine(icu_database)
    try:
        store_db.upgrade(engine)
        with Session(engine) as db, db.begin():
            repo.Sites(db).add_all(["east"])
            db.add(model_row())
            for server_id in ("B", "a"):
                repo.Servers(db).add(server_row(server_id))
        outcome: dict[str, Any] = {}

        def book() -> None:
            with Session(store_db.autocommit(engine)) as db:
                db.execute(text("SET application_name = 'bprr_booking'"))
                new = new_session("x", [("a", 1), ("B", 1)], created_at=1.0, expires_at=2.0)
                try:
                    outcome["booked"] = Bookings(db).book(new, 1.0).ok
                except Exception as error:  # a deadlock victim
                    outcome["error"] = repr(error)

        with engine.connect() as writer:
            renew = text("UPDATE servers SET last_heartbeat_at = 1 WHERE id = :id")
            writer.execute(renew, {"id": "B"})
            booking = threading.Thread(target=book)
            booking.start()
            _wait_until_waiting_on_a_lock(writer, "bprr_booking")
            writer.execute(renew, {"id": "a"})  # deadlocks if the booking holds "a"
            writer.commit()
            booking.join(timeout=30)
        assert outcome == {"booked": True}
    finally:
        engine.dispose()


def _wait_until_waiting_on_a_lock(connection: Any, application_name: str) -> None:
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = :name AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    with connection.engine.connect() as observer:
        while observer.execute(query, {"name": application_name}).scalar_one() == 0:
            assert time.monotonic() < deadline, "the booking never waited on the held row"
            observer.rollback()
            time.sleep(0.02)


@pytest.mark.postgres
def test_reregistration_keeps_a_booking_committed_meanwhile_counted(
    make_client: AppFactory, pg_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server re-registers (new boot epoch) while another process books a session on it,
    committed between the registration's drop of the old reservations and its update of the
    row: that reservation must stay counted (before, the count was reset to 0 and the release
    of that session later let the server be over-admitted)."""
    client = make_client(pg_url)  # PostgreSQL: SQLite has no second writer to interleave
    tokens = small_swarm(client, count=3, memory_gb=6.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    drop = repo.Reservations.drop_for_server

    def book_elsewhere(session_id: str, server_id: str) -> None:
        with Session(store_db.autocommit(coordinator.engine)) as other:
            new = new_session(
                session_id, [(server_id, 1)], created_at=clock.now, expires_at=clock.now + 60
            )
            assert Bookings(other).book(new, clock.now).ok

    def drop_then_book_elsewhere(self: repo.Reservations, server_id: str) -> int:
        dropped = drop(self, server_id)
        book_elsewhere("meanwhile", server_id)
        return dropped

    book_elsewhere("before", "s0")  # dropped by the re-registration

    monkeypatch.setattr(repo.Reservations, "drop_for_server", drop_then_book_elsewhere)
    again = client.post(
        "/v1/servers", json=server_body(0, boot_epoch=2), headers=bearer(tokens["s0"])
    )
    assert again.status_code == 201, again.text
    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            reserved = connection.execute(
                select(ServerRow.reserved_slots).where(ServerRow.id == "s0")
            ).scalar_one()
            held = connection.execute(
                select(func.sum(ReservationRow.slots)).where(ReservationRow.server_id == "s0")
            ).scalar_one()
    finally:
        engine.dispose()
    assert reserved == held == 1


def test_concurrent_bookings_of_one_client_never_pass_its_quota(
    make_client: AppFactory, pg_url: str
) -> None:
    """PostgreSQL: the quota's count is a snapshot; without the per-client lock two of one
    client's bookings at once both saw the other not yet committed. Eight at once, a few
    times over: exactly one is booked each time."""
    client = make_client(pg_url)
    small_swarm(client, count=3, memory_gb=40.0)
    sessions = client.app.state.coordinator.sessions  # type: ignore[attr-defined]
    who = ClientIdentity("token:one", 1, 0.0, 1)
    threads = 8

    def book(barrier: threading.Barrier) -> str | None:
        barrier.wait()
        try:
            return str(sessions.book(SessionIn(**route_params()), who).id)
        except TooManyRequests:
            return None

    for _ in range(5):
        barrier = threading.Barrier(threads)
        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(book, [barrier] * threads))
        booked = [s for s in answers if s is not None]
        assert len(booked) == 1, booked
        sessions.release(booked[0], ADMIN)
