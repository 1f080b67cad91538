"""Limits (issue 12): request bodies, the database's timeouts off the event loop."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.service.core import database_errors
from app.service.errors import Unavailable
from tests.api.conftest import AppFactory, admin
from tests.api.helpers import route_params, small_swarm


def test_a_20_mb_body_is_a_413(client: TestClient) -> None:
    big = b'{"name": "' + b"x" * (20 * 2**20) + b'"}'
    reply = client.put(
        "/v1/model", content=big, headers={**admin(), "Content-Type": "application/json"}
    )
    assert reply.status_code == 413 and "body" in reply.json()["detail"]


def test_a_streamed_body_past_the_limit_is_a_413(make_client: AppFactory, sqlite_url: str) -> None:
    client = make_client(sqlite_url, max_body_bytes=4096)

    def chunks() -> Any:
        for _ in range(100):
            yield b" " * 1024

    reply = client.put(
        "/v1/model", content=chunks(), headers={**admin(), "Content-Type": "application/json"}
    )
    assert reply.status_code == 413


def _livez_and_book(client: TestClient) -> tuple[list[str], dict[str, Any]]:
    """Book in one thread and, while it waits on the held lock, ask /livez; the order in
    which they answered."""
    order: list[str] = []
    booked: dict[str, Any] = {}

    def book() -> None:
        booked["reply"] = client.post("/v1/sessions", json=route_params())
        order.append("booking")

    worker = threading.Thread(target=book)
    worker.start()
    time.sleep(0.5)  # let the booking reach the lock
    assert client.get("/livez").status_code == 200
    order.append("livez")
    booked["thread"] = worker
    return order, booked


def test_livez_answers_while_another_process_holds_the_sqlite_write_lock(
    make_client: AppFactory, sqlite_url: str
) -> None:
    client = make_client(sqlite_url, db_timeout_s=30.0)
    small_swarm(client)
    client.get("/v1/routes", params=route_params())  # the route view is built
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer
    try:
        order, booked = _livez_and_book(client)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    booked["thread"].join(timeout=60)
    assert order[0] == "livez", order
    assert booked["reply"].status_code == 201, booked["reply"].text


@pytest.mark.postgres
def test_a_held_postgres_lock_is_a_503_after_the_timeout_and_livez_answers(
    make_client: AppFactory, pg_url: str
) -> None:
    client = make_client(pg_url, db_timeout_s=1.0)
    small_swarm(client)
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE servers IN ACCESS EXCLUSIVE MODE")
        order, booked = _livez_and_book(client)
        booked["thread"].join(timeout=30)  # the lock is still held: only a timeout ends it
        assert not booked["thread"].is_alive()
        holder.rollback()
    assert order[0] == "livez", order
    reply = booked["reply"]
    assert reply.status_code == 503 and "Retry-After" in reply.headers, reply.text


@pytest.mark.parametrize(
    ("message", "busy"),
    [
        ("database is locked", True),
        ("database table is locked", True),
        ("disk I/O error", True),
        ("unable to open database file", True),
        ("no such column: servers.nope", False),
        ('near "SELEC": syntax error', False),
    ],
)
def test_only_a_busy_or_unreachable_sqlite_is_a_503(message: str, busy: bool) -> None:
    """A locked or unreachable database is a 503 to retry; a statement the database cannot
    run is a bug, raised as such (a 500, logged), never dressed up as "retry"."""
    error = OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))
    with pytest.raises(Unavailable if busy else OperationalError), database_errors():
        raise error
