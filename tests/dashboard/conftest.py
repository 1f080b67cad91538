"""The coordinator fixtures (fresh SQLite / PostgreSQL database, injected clock, TestClient)."""

from tests.api.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    client,
    clock,
    database_url,
    make_client,
    pg_database,
    sqlite_url,
)
