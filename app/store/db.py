"""Engines, transactions and schema migrations.

SQLite runs in WAL mode and every transaction starts with ``BEGIN IMMEDIATE`` so that two
writers never deadlock on a lock upgrade; PostgreSQL runs at READ COMMITTED, where the
conditional updates used for reservations re-check their condition under the row lock, and
books and releases sessions in one autocommitted statement each (``autocommit``).
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError


def _migrations_dir() -> Path:
    """``migrations/`` beside the package (a checkout or an editable install), else in the
    working directory: a non-editable install run from the project's directory, as the
    Docker image does (WORKDIR /app holds alembic.ini and migrations/)."""
    beside = Path(__file__).resolve().parents[2] / "migrations"
    return beside if beside.is_dir() else Path.cwd() / "migrations"


MIGRATIONS_DIR = _migrations_dir()
# Any constant works; it only has to be the same for every coordinator process.
MIGRATION_LOCK_ID = 0x62707272
READ_ONLY_OPTION = "bprr_read_only"
# A transaction marked so (``no_wait(engine)``) does not wait for SQLite's write lock: its
# BEGIN fails at once with "database is locked" when another connection holds it.
NO_WAIT_OPTION = "bprr_no_wait"


class SchemaBehindError(RuntimeError):
    """The database schema is older than the code and auto-migration is off."""


def make_engine(url: str, timeout_s: float = 30.0) -> Engine:
    """An engine whose every wait on the database is bounded by ``timeout_s``: SQLite's busy
    timeout (the write lock); PostgreSQL's statement_timeout and lock_timeout, the connect
    timeout and the wait for a pooled connection. What times out raises OperationalError
    (the service turns it into a 503)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": timeout_s},
            pool_size=20,
            max_overflow=20,
            pool_timeout=timeout_s,
            # The connection used last first: its page cache is still valid when it made the
            # last change itself; the least recently used one (the default) has to read
            # every page that another connection wrote since, again.
            pool_use_lifo=True,
        )
        _sqlite_setup(engine, int(timeout_s * 1000))
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        milliseconds = max(1, int(timeout_s * 1000))
        connect_args = {
            "connect_timeout": max(1, math.ceil(timeout_s)),
            "options": f"-c statement_timeout={milliseconds} -c lock_timeout={milliseconds} "
            f"-c idle_in_transaction_session_timeout={max(milliseconds * 4, 60_000)}",
        }
    return create_engine(
        url,
        pool_size=20,
        max_overflow=20,
        pool_pre_ping=True,
        pool_timeout=timeout_s,
        connect_args=connect_args,
    )


def _sqlite_setup(engine: Engine, busy_ms: int = 30_000) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Read-only work (``read_only(engine)``) may share the database with a writer. On the
        # driver's connection: every booking and release begins here, and three statements
        # through SQLAlchemy's execution path cost more than the booking's own statements.
        options = connection.get_execution_options()
        driver = connection.connection.driver_connection
        assert driver is not None
        try:
            if options.get(READ_ONLY_OPTION):
                driver.execute("BEGIN")
            elif options.get(NO_WAIT_OPTION):
                driver.execute("PRAGMA busy_timeout=0")
                try:
                    driver.execute("BEGIN IMMEDIATE")
                finally:
                    driver.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            else:
                driver.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:  # "database is locked": the service's 503 / WouldBlock
            raise DBAPIError.instance("BEGIN", None, error, sqlite3.Error) from error


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool), marked for read-only transactions."""
    return engine.execution_options(**{READ_ONLY_OPTION: True})


def no_wait(engine: Engine) -> Engine:
    """The same engine (and pool), for SQLite write transactions that must not wait for the
    write lock (those run on the event loop)."""
    return engine.execution_options(**{NO_WAIT_OPTION: True})


def autocommit(engine: Engine) -> Engine:
    """The same engine (and pool) with every statement its own transaction, for units of
    work that are one statement (PostgreSQL's bookings and releases)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """alembic upgrade, serialised across processes on PostgreSQL by an advisory lock."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def check(engine: Engine) -> None:
    """alembic check: raises if the models and the migrated schema differ."""
    with engine.begin() as connection:
        command.check(alembic_config(connection))


def ensure_schema(engine: Engine, auto_migrate: bool) -> None:
    """Bring the schema to head, or refuse to start with a clear message."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    if not auto_migrate:
        raise SchemaBehindError(
            f"database schema is at revision {current or 'none'} but the code needs {head}; "
            "run `alembic upgrade head` (or set BPRR_AUTO_MIGRATE=true)"
        )
    upgrade(engine)


def schema_at_head(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
