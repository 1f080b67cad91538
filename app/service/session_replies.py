"""What a booking answers: the booked reply (from the route view's plan, or from the JSON a
queue admission stored), and the two outcomes of starting a booking (booked now, or waiting
in the central queue)."""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass

from pydantic import BaseModel

from app.service.routeview import RoutePlan, RouteView
from app.service.schemas import RouteHop, RouteOut
from app.service.session_schemas import BookingOut


class _StoredReply(BaseModel):
    """A booking's reply without its token, as stored in its record (and a ticket)."""

    id: str
    expires_at: float
    route: RouteOut


def stored_reply(session_id: str, expires_at: float, route: RouteOut) -> str:
    return _StoredReply(id=session_id, expires_at=expires_at, route=route).model_dump_json()


@dataclass(frozen=True)
class Reserved:
    """What taking a plan's units came to: "booked" (``reply`` is the stored reply), or why
    not ("full", "queued", "quota")."""

    outcome: str
    reply: str
    route: RouteOut
    expires_at: float


@dataclass(frozen=True)
class Booked:
    out: BookingOut
    created: bool  # False: an Idempotency-Key retry returned the session booked before


@dataclass
class Pending:
    """A booking waiting in the central queue; ``future`` gets the admitted reply."""

    session_id: str
    token: str
    future: Future[str]
    client_site: str
    wait_s: float
    enqueued_at: float


def route_out(view: RouteView, client_site: str, plan: RoutePlan) -> RouteOut:
    return RouteOut(
        generation=view.generation,
        client_site=client_site,
        hops=[
            RouteHop(
                server_id=view.entries[h.server].id,
                address=view.entries[h.server].address,
                start=h.start,
                end=h.end,
                peer_id=view.entries[h.server].peer_id,
                multiaddrs=list(view.entries[h.server].multiaddrs),
            )
            for h in plan.hops
        ],
        first_token_ms=plan.timing.first_token_ms,
        per_token_ms=plan.timing.per_token_ms,
        total_ms=plan.timing.total_ms,
        wait_ms=plan.wait_ms,
    )


def reply_out(reply: str, token: str, now: float) -> BookingOut:
    data = json.loads(reply)
    return BookingOut(
        id=data["id"],
        expires_in_s=max(0.0, float(data["expires_at"]) - now),
        route=RouteOut(**data["route"]),
        token=token,
    )
