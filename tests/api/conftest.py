"""Fixtures for the coordinator tests: a fresh database per test (SQLite file, or a
PostgreSQL database of this xdist worker with its schema dropped), an injected clock, and
TestClient (httpx) instances of the app."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from app.api.app import create_app
from app.settings import Settings

ADMIN = "admin-secret"
JOIN = "join-secret"
ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_DSN = os.environ.get("BPRR_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")


def pg_database_url(database: str, user: str = "postgres") -> str:
    """A SQLAlchemy URL for ``database`` on the server BPRR_TEST_PG names."""
    server = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_DSN)
    host, port = server.get("host", "127.0.0.1"), server.get("port", "5432")
    return f"postgresql+psycopg://{user}@{host}:{port}/{database}"


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def example_scenario() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "examples" / "paper-clustered-9.json").read_text())
    data.pop("workload", None)
    return data


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database for this xdist worker, created here and dropped at the end."""
    # The process id too: several test runs may share one PostgreSQL server at once.
    name = f"bprr_test_{_worker()}_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    yield pg_database_url(name)
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_user() -> str:
    with psycopg.connect(PG_ADMIN_DSN) as connection:
        row = connection.execute("SELECT current_user").fetchone()
        return str(row[0]) if row else "postgres"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bprr.db'}"
    return fresh_pg(request.getfixturevalue("pg_database"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bprr.db'}"


@pytest.fixture
def pg_url(pg_database: str) -> str:
    return fresh_pg(pg_database)


def fresh_pg(url: str) -> str:
    url = url.replace("postgres@", f"{_pg_user()}@", 1)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_settings(url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": url,
        "admin_token": SecretStr(ADMIN),
        "join_token": SecretStr(JOIN),
        "planner_interval_s": 0,
        # Leases follow the injected clock (tests advance it), not the database's.
        "database_clock": False,
        # The planner tests exercise CG's hysteresis (test_chain_plans.py: the default auto).
        "planner_algorithm": "cg",
    }
    values.update(overrides)
    return Settings(**values)


AppFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(clock: FakeClock) -> Iterator[AppFactory]:
    opened: list[TestClient] = []

    def factory(url: str, **overrides: Any) -> TestClient:
        app = create_app(make_settings(url, **overrides), clock=clock, background=False)
        client = TestClient(app)
        client.__enter__()
        opened.append(client)
        return client

    yield factory
    for client in reversed(opened):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: AppFactory, database_url: str) -> TestClient:
    return make_client(database_url)
