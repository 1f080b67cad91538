"""The repositories (app.store.repositories): they never commit, their guarded updates hold,
and the store never imports the service layer."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.store import db as store_db
from app.store import repositories as repo
from app.store.booking_queue import BookingQueue, QueuedRequest
from app.store.bookings import BookingCheck, Bookings, Released
from app.store.models import ReservationRow, ServerRow, SessionRow
from app.store.session_tables import SessionRecordRow
from tests.api.helpers import hash_of, model_row, new_session, server_row

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = store_db.make_engine(database_url)
    store_db.upgrade(engine)
    yield engine
    engine.dispose()


def _seed(engine: Engine) -> None:
    """Server a: 4 units of cache (model_row), lease live until t=100."""
    with Session(engine) as db, db.begin():
        repo.Sites(db).add_all(["east"])
        db.add(model_row())
        repo.Servers(db).add(server_row("a"))
        repo.PlannerState(db).ensure(0.0)


def test_repositories_never_commit(engine: Engine) -> None:
    _seed(engine)
    with Session(engine) as db:
        db.begin()
        assert Bookings(db).book(new_session("x", [("a", 3)]), now=50.0).ok
        repo.PlannerState(db).request("test", 50.0)
        assert repo.Leader(db).acquire("me", 50.0, 60.0)
        repo.Rtts(db).smooth("east", "a", 12.0, 0.5, 50.0)
        db.rollback()  # everything above belongs to the caller's transaction
    with sessionmaker(engine)() as db:
        row = db.get(ServerRow, "a")
        assert row is not None and row.reserved_slots == 0
        assert db.scalar(select(func.count()).select_from(SessionRow)) == 0
        assert db.scalar(select(func.count()).select_from(SessionRecordRow)) == 0
        assert repo.PlannerState(db).requested() is None
        assert repo.Rtts(db).all() == {}


def _seed_chain(engine: Engine) -> None:
    """Servers a (4 units) and b (2 units: 6 GB), leases live until t=100."""
    _seed(engine)
    with Session(engine) as db, db.begin():
        repo.Servers(db).add(server_row("b", memory_gb=6.0))


def _held(engine: Engine) -> tuple[dict[str, int], dict[str, int], int]:
    """Reserved units per server, reservation units per server, number of live sessions."""
    with Session(engine) as db:
        reserved = select(ServerRow.id, ServerRow.reserved_slots)
        held = select(ReservationRow.server_id, func.sum(ReservationRow.slots)).group_by(
            ReservationRow.server_id
        )
        sessions = db.scalar(select(func.count()).select_from(SessionRow)) or 0
        return (
            {server_id: slots for server_id, slots in db.execute(reserved)},
            {server_id: slots for server_id, slots in db.execute(held)},
            sessions,
        )


def _book(
    engine: Engine,
    session_id: str,
    hops: list[tuple[str, int]],
    now: float,
    queue_stale_before: float | None = None,
    quota: int = 0,
) -> BookingCheck:
    """As the service does (app.service.sessions): one booking_tx, rolled back when refused
    (SQLite has taken the units already; PostgreSQL's one statement wrote nothing)."""
    postgres = engine.dialect.name == "postgresql"
    with Session(store_db.autocommit(engine) if postgres else engine) as db:
        if not postgres:
            db.begin()
        check = Bookings(db).book(
            new_session(session_id, hops), now, queue_stale_before=queue_stale_before, quota=quota
        )
        if not postgres:
            db.commit() if check.ok else db.rollback()
        return check


def _release(engine: Engine, session_id: str, token_hash: str | None) -> Released:
    with Session(engine) as db, db.begin():
        return Bookings(db).release(session_id, token_hash, 55.0, "released")


def test_booking_is_all_or_nothing_and_release_gives_back_once(engine: Engine) -> None:
    _seed_chain(engine)
    assert not _book(engine, "x", [("b", 3), ("a", 2)], now=50.0).free  # b has 2 units
    assert not _book(engine, "x", [("a", 2), ("b", 1)], now=150.0).free  # leases expired
    assert not _book(engine, "x", [("a", 2), ("gone", 1)], now=50.0).free  # no such server
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    assert _book(engine, "y", [("b", 2), ("a", 3)], now=50.0).ok
    assert _held(engine) == ({"a": 3, "b": 2}, {"a": 3, "b": 2}, 1)
    assert not _book(engine, "z", [("a", 1), ("b", 1)], now=50.0).free  # b is full now
    assert _held(engine) == ({"a": 3, "b": 2}, {"a": 3, "b": 2}, 1)
    # Only the session's own token (or trusted: None) ends and releases it.
    assert _release(engine, "y", hash_of("not y")) == Released(False, False, [])
    assert _held(engine) == ({"a": 3, "b": 2}, {"a": 3, "b": 2}, 1)
    released = _release(engine, "y", hash_of("y"))
    assert (released.ended, released.deleted, released.generation) == (True, True, 1)
    assert sorted((h.server_id, h.slots, h.expires_at) for h in released.held) == [
        ("a", 3, 60.0),
        ("b", 2, 60.0),
    ]
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    again = _release(engine, "y", None)  # already released: nothing given back twice
    assert (again.ended, again.deleted, again.held) == (False, False, [])
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    with Session(engine) as db:
        record = Bookings(db).record("y")
        assert record is not None and record.end_reason == "released"
    # A session whose reservations are gone (its server re-registered) is still released.
    assert _book(engine, "z", [("a", 1)], now=50.0).ok
    with Session(engine) as db, db.begin():
        assert repo.Reservations(db).drop_for_server("a") == 1
    gone = _release(engine, "z", None)
    assert (gone.ended, gone.deleted, gone.held) == (True, True, [])
    assert _release(engine, "z", None).deleted is False


def test_unreserve_never_goes_below_zero(engine: Engine) -> None:
    _seed(engine)
    assert _book(engine, "x", [("a", 3)], now=50.0).ok
    with Session(engine) as db, db.begin():
        repo.Servers(db).unreserve("a", 2)
    assert _held(engine)[0] == {"a": 1}
    with Session(engine) as db, db.begin():
        repo.Servers(db).unreserve("a", 10)
    assert _held(engine)[0] == {"a": 0}


def test_booking_waits_behind_a_live_ticket_and_within_the_quota(engine: Engine) -> None:
    """The queue check and the quota are part of the booking: a direct booking is refused
    while a live ticket waits (not a dead one: past its deadline or not renewed), and a
    client at its quota is refused; the check says why, and nothing is taken."""
    _seed_chain(engine)
    with Session(engine) as db, db.begin():
        queue = BookingQueue(db)
        request = QueuedRequest("t1", "h" * 64, "token:other", None, "east", 1, 1)
        queue.add(request, holder="elsewhere", now=50.0, deadline=80.0)
    refused = _book(engine, "x", [("a", 1)], now=55.0, queue_stale_before=45.0)
    assert (refused.ok, refused.clear, refused.within) == (False, False, True)
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    # The ticket's holder stopped renewing it (seen at 50, stale before 51): not waiting.
    assert _book(engine, "x", [("a", 1)], now=55.0, queue_stale_before=51.0).ok
    # Past its deadline (80): not waiting either.
    assert _book(engine, "y", [("a", 1)], now=85.0, queue_stale_before=45.0).ok
    over = _book(engine, "z", [("a", 1)], now=85.0, quota=2)  # token:c holds x and y
    assert (over.ok, over.clear, over.within) == (False, True, False)
    assert _book(engine, "z", [("a", 1)], now=85.0, quota=3).ok
    assert _held(engine) == ({"a": 3, "b": 0}, {"a": 3}, 3)
    # A full chain and a waiting ticket: the queue comes first in the verdict.
    full = _book(engine, "w", [("b", 3)], now=55.0, queue_stale_before=45.0)
    assert not full.ok and not full.clear


def test_a_second_booking_with_the_same_idempotency_key_raises(engine: Engine) -> None:
    _seed_chain(engine)
    first = replace(new_session("k1", [("a", 1)]), idempotency_key="key")
    second = replace(new_session("k2", [("a", 1)]), idempotency_key="key")
    with Session(engine) as db, db.begin():
        assert Bookings(db).book(first, 50.0).ok
    with pytest.raises(IntegrityError), Session(engine) as db, db.begin():
        Bookings(db).book(second, 50.0)
    assert _held(engine) == ({"a": 1, "b": 0}, {"a": 1}, 1)


@pytest.mark.postgres
def test_postgres_books_and_releases_in_one_statement_outside_a_transaction(
    pg_url: str,
) -> None:
    """In autocommit (as the service runs them), a refused booking writes nothing and an
    accepted one or a release is visible to other connections at once, with no commit."""
    engine = store_db.make_engine(pg_url)
    try:
        store_db.upgrade(engine)
        _seed_chain(engine)
        with Session(store_db.autocommit(engine)) as db:
            bookings = Bookings(db)
            assert not bookings.book(new_session("x", [("a", 4), ("b", 3)]), 50.0).ok
            assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
            assert bookings.book(new_session("y", [("a", 4), ("b", 2)]), 50.0).ok
            assert _held(engine) == ({"a": 4, "b": 2}, {"a": 4, "b": 2}, 1)
            released = bookings.release("y", hash_of("y"), 55.0, "released")
            assert released.deleted and len(released.held) == 2
            assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    finally:
        engine.dispose()


def test_lease_renewal_matches_only_an_unchanged_server(engine: Engine) -> None:
    _seed(engine)
    with Session(engine) as db, db.begin():
        servers = repo.Servers(db)
        same = ("h" * 64, 3, "online", (0, 2))
        assert servers.renew_lease("a", *same, free_cache_slots=5, now=90.0, expires_at=105.0)
        for token_hash, epoch, state, loaded in (
            ("x" * 64, 3, "online", (0, 2)),  # another server's token
            ("h" * 64, 4, "online", (0, 2)),  # a new boot epoch
            ("h" * 64, 3, "draining", (0, 2)),  # a state change
            ("h" * 64, 3, "online", (0, 3)),  # another span
            ("h" * 64, 3, "online", (None, None)),  # unloaded
        ):
            assert not servers.renew_lease(
                "a", token_hash, epoch, state, loaded, None, now=95.0, expires_at=110.0
            )
        assert not servers.renew_lease("b", *same, None, now=95.0, expires_at=110.0)
    with Session(engine) as db:
        row = db.get(ServerRow, "a")
        assert row is not None
        assert (row.lease_expires_at, row.last_heartbeat_at, row.free_cache_slots) == (
            105.0,
            90.0,
            5,
        )


def test_leader_lease_has_one_holder(engine: Engine) -> None:
    with Session(engine) as db, db.begin():
        leader = repo.Leader(db)
        assert leader.acquire("one", now=0.0, expires_at=10.0)
        assert not leader.acquire("two", now=5.0, expires_at=15.0)
        assert leader.acquire("one", now=5.0, expires_at=15.0)  # renewal
        assert leader.acquire("two", now=20.0, expires_at=30.0)  # after expiry
        leader.release("two")
        assert leader.acquire("one", now=21.0, expires_at=31.0)


def test_store_does_not_import_the_service_or_api_layers() -> None:
    for path in sorted((ROOT / "app" / "store").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("app.service", "app.api")), f"{path.name}: {name}"


def test_the_service_runs_no_sql_of_its_own() -> None:
    """SQL statements are built only in app/store (the service calls repositories)."""
    for path in sorted((ROOT / "app" / "service").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sqlalchemy":
                imported = {alias.name for alias in node.names}
                assert not imported & {"select", "update", "delete", "insert"}, path.name
