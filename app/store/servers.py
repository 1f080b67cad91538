"""The servers repository: registration rows and leases (renewed in batches). The cache units
that bookings take and give back are app.store.bookings's. Never commits (see
app.store.common)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.orm import Session

from app.store.common import rowcount as _rowcount
from app.store.models import ServerRow
from app.store.reservations import Reservations

# Built once: constructing a statement costs more than running it.
_SERVERS = cast(Table, ServerRow.__table__)
_UNRESERVE = (
    update(_SERVERS)
    .where(_SERVERS.c.id == bindparam("b_id"))
    .values(
        reserved_slots=case(
            (_SERVERS.c.reserved_slots < bindparam("b_slots"), 0),
            else_=_SERVERS.c.reserved_slots - bindparam("b_slots"),
        )
    )
)

# --- servers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRenewal:
    """What a quiet heartbeat asserts about its server, and the lease it renews."""

    server_id: str
    token_hash: str
    boot_epoch: int
    state: str
    loaded: tuple[int | None, int | None]
    free_cache_slots: int | None
    now: float
    expires_at: float


class Servers:
    def __init__(self, db: Session) -> None:
        self.db = db

    def get(self, server_id: str) -> ServerRow | None:
        return self.db.get(ServerRow, server_id)

    def all(self) -> list[ServerRow]:
        """Every server in registration order (the order placements index them by)."""
        return list(
            self.db.scalars(select(ServerRow).order_by(ServerRow.registered_at, ServerRow.id))
        )

    def ids(self) -> list[str]:
        return list(self.db.scalars(select(ServerRow.id)))

    def exists_with_token_hash(self, token_hash: str) -> bool:
        return self.id_with_token_hash(token_hash) is not None

    def id_with_token_hash(self, token_hash: str) -> str | None:
        found: str | None = self.db.scalar(
            select(ServerRow.id).where(ServerRow.token_hash == token_hash).limit(1)
        )
        return found

    def add(self, row: ServerRow) -> None:
        self.db.add(row)

    def remove(self, row: ServerRow) -> None:
        """Delete the server and every reservation held on it."""
        Reservations(self.db).drop_for_server(row.id)
        self.db.delete(row)

    def renew_lease(
        self,
        server_id: str,
        token_hash: str,
        boot_epoch: int,
        state: str,
        loaded: tuple[int | None, int | None],
        free_cache_slots: int | None,
        now: float,
        expires_at: float,
    ) -> bool:
        """A heartbeat that changes nothing but the lease and the free-slot report. True when
        the row was updated (see ``renew_leases``)."""
        renewal = LeaseRenewal(
            server_id, token_hash, boot_epoch, state, loaded, free_cache_slots, now, expires_at
        )
        return self.renew_leases([renewal]) == 1

    def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Renew many leases in one statement (executemany). Each UPDATE is guarded by what
        the caller checked (token, epoch, state, loaded span), so that a row changed since
        then matches nothing and keeps its old lease. Returns the number of rows updated."""
        if not renewals:
            return 0
        table = cast(Table, ServerRow.__table__)  # Core table: a plain executemany
        statement = (
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                table.c.token_hash == bindparam("b_token_hash"),
                table.c.boot_epoch == bindparam("b_boot_epoch"),
                table.c.state == bindparam("b_state"),
                table.c.loaded_start.is_not_distinct_from(bindparam("b_start")),
                table.c.loaded_end.is_not_distinct_from(bindparam("b_end")),
            )
            .values(
                lease_expires_at=bindparam("b_expires_at"),
                last_heartbeat_at=bindparam("b_now"),
                free_cache_slots=bindparam("b_free"),
            )
        )
        result = self.db.execute(
            statement,
            [
                {
                    "b_id": r.server_id,
                    "b_token_hash": r.token_hash,
                    "b_boot_epoch": r.boot_epoch,
                    "b_state": r.state,
                    "b_start": r.loaded[0],
                    "b_end": r.loaded[1],
                    "b_expires_at": r.expires_at,
                    "b_now": r.now,
                    "b_free": r.free_cache_slots,
                }
                for r in sorted(renewals, key=lambda renewal: renewal.server_id)
            ],
        )
        return _rowcount(result)

    def unreserve(self, server_id: str, units: int) -> None:
        """Lower the server's reserved units (never below zero): a re-registration gives
        back what the reservations it dropped held."""
        self.db.execute(_UNRESERVE, {"b_id": server_id, "b_slots": units})
