"""Suite-wide: the PostgreSQL tests are skipped, with the reason, when no PostgreSQL answers
(a machine without one still runs everything else; CI has one, so nothing is skipped there)."""

from __future__ import annotations

import functools
import os

import pytest

PG_DSN = os.environ.get("BPRR_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")
# fixtures that open PostgreSQL themselves (besides the `postgres` marker)
PG_FIXTURES = frozenset({"pg_database", "pg_url", "icu_database", "outage_database"})


@functools.cache
def postgres_missing() -> str | None:
    """Why the tests cannot use PostgreSQL, or None when it answers."""
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=5):
            return None
    except psycopg.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            f"PostgreSQL not reachable ({PG_DSN}; trust auth and a database `test` are needed): "
            f"{first}"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    needs_pg = [
        item
        for item in items
        if item.get_closest_marker("postgres")
        or PG_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    reason = postgres_missing() if needs_pg else None
    if reason:
        for item in needs_pg:
            item.add_marker(pytest.mark.skip(reason=reason))
