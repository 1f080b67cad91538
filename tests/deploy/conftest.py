"""The coordinator fixtures (fresh SQLite database, injected clock, TestClient)."""

from tests.api.conftest import (  # noqa: F401  (pytest finds fixtures by name)
    clock,
    make_client,
    sqlite_url,
)
