"""The repositories (app.store.repositories): they never commit, their guarded updates hold,
and the store never imports the service layer."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.store import db as store_db
from app.store import repositories as repo
from app.store.models import ReservationRow, ServerRow, SessionRow
from tests.api.helpers import server_row, session_row

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = store_db.make_engine(database_url)
    store_db.upgrade(engine)
    yield engine
    engine.dispose()


def _seed(engine: Engine) -> None:
    with Session(engine) as db, db.begin():
        repo.Sites(db).add_all(["east"])
        repo.Servers(db).add(server_row("a"))
        repo.PlannerState(db).ensure(0.0)


def test_repositories_never_commit(engine: Engine) -> None:
    _seed(engine)
    with Session(engine) as db:
        db.begin()
        servers = repo.Servers(db)
        assert servers.reserve("a", 3, now=50.0)
        repo.Sessions(db).add(session_row("x"), [("a", 3)])
        repo.PlannerState(db).request("test", 50.0)
        assert repo.Leader(db).acquire("me", 50.0, 60.0)
        repo.Rtts(db).smooth("east", "a", 12.0, 0.5, 50.0)
        db.rollback()  # everything above belongs to the caller's transaction
    with sessionmaker(engine)() as db:
        row = db.get(ServerRow, "a")
        assert row is not None and row.reserved_slots == 0
        assert db.scalar(select(func.count()).select_from(SessionRow)) == 0
        assert repo.PlannerState(db).requested() is None
        assert repo.Rtts(db).all() == {}


def test_reserve_never_exceeds_the_cache_and_release_gives_back(engine: Engine) -> None:
    _seed(engine)
    with Session(engine) as db, db.begin():
        servers = repo.Servers(db)
        assert servers.reserve("a", 3, now=50.0)
        assert not servers.reserve("a", 2, now=50.0)  # 3 + 2 > 4
        assert servers.reserve("a", 1, now=50.0)
        assert not servers.reserve("a", 1, now=150.0)  # the lease expired at 100
        servers.unreserve("a", 10)  # never below zero
    with Session(engine) as db:
        row = db.get(ServerRow, "a")
        assert row is not None and row.reserved_slots == 0


def _seed_chain(engine: Engine) -> None:
    """Servers a (4 cache slots) and b (2), leases live until t=100."""
    _seed(engine)
    with Session(engine) as db, db.begin():
        repo.Servers(db).add(server_row("b", cache_slots=2))


def _held(engine: Engine) -> tuple[dict[str, int], dict[str, int], int]:
    """Reserved slots per server, reservation slots per server, number of sessions."""
    with Session(engine) as db:
        reserved = select(ServerRow.id, ServerRow.reserved_slots)
        held = select(ReservationRow.server_id, ReservationRow.slots)
        sessions = db.scalar(select(func.count()).select_from(SessionRow)) or 0
        return (
            {server_id: slots for server_id, slots in db.execute(reserved)},
            {server_id: slots for server_id, slots in db.execute(held)},
            sessions,
        )


def _book(engine: Engine, session_id: str, hops: list[tuple[str, int]], now: float) -> bool:
    """As the service does on SQLite: a refused booking is rolled back."""
    with Session(engine) as db:
        db.begin()
        booked = repo.Sessions(db).book(session_row(session_id), hops, now)
        if booked:
            db.commit()
        else:
            db.rollback()
        return booked


def test_booking_is_all_or_nothing_and_release_gives_back_once(engine: Engine) -> None:
    _seed_chain(engine)
    assert not _book(engine, "x", [("b", 3), ("a", 2)], now=50.0)  # b has 2 slots
    assert not _book(engine, "x", [("a", 2), ("b", 1)], now=150.0)  # the leases expired
    assert not _book(engine, "x", [("a", 2), ("gone", 1)], now=50.0)  # no such server
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    assert _book(engine, "y", [("b", 2), ("a", 3)], now=50.0)
    assert _held(engine) == ({"a": 3, "b": 2}, {"a": 3, "b": 2}, 1)
    assert not _book(engine, "z", [("a", 1), ("b", 1)], now=50.0)  # b is full now
    assert _held(engine) == ({"a": 3, "b": 2}, {"a": 3, "b": 2}, 1)
    with Session(engine) as db, db.begin():
        released = repo.Sessions(db).release("y")
    assert released is not None
    assert sorted((h.server_id, h.slots, h.expires_at) for h in released) == [
        ("a", 3, 60.0),
        ("b", 2, 60.0),
    ]
    assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
    with Session(engine) as db, db.begin():
        assert repo.Sessions(db).release("y") is None  # already released
    # A session whose reservations are gone (its server re-registered) is still released.
    assert _book(engine, "z", [("a", 1)], now=50.0)
    with Session(engine) as db, db.begin():
        assert repo.Reservations(db).drop_for_server("a") == 1
    with Session(engine) as db, db.begin():
        assert repo.Sessions(db).release("z") == []
        assert repo.Sessions(db).release("z") is None


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
            sessions = repo.Sessions(db)
            assert not sessions.book(session_row("x"), [("a", 4), ("b", 3)], 50.0)
            assert _held(engine) == ({"a": 0, "b": 0}, {}, 0)
            assert sessions.book(session_row("y"), [("a", 4), ("b", 2)], 50.0)
            assert _held(engine) == ({"a": 4, "b": 2}, {"a": 4, "b": 2}, 1)
            released = sessions.release("y")
            assert released is not None and len(released) == 2
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
