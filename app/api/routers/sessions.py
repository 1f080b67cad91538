"""Routes and sessions: GET /v1/routes, POST /v1/sessions, GET and DELETE /v1/sessions/{id}.

Who may do what: anyone may ask for a route; a booking comes from a client (its client token,
or its address in anonymous mode, under that identity's quotas); a session is read or
released only with its own token (returned at booking) or the admin token.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from app.api.deps import CoordinatorDep, IdPath, Token, errors, run_write
from app.service.errors import Unauthorized
from app.service.schemas import RouteOut
from app.service.session_replies import Booked, Pending
from app.service.session_schemas import BookingIn, BookingOut, SessionStatusOut
from app.service.sessions import SessionService

router = APIRouter(tags=["routes"])
# While a booking waits in the queue, how often the connection is checked for a client that
# went away (it then leaves the queue).
DISCONNECT_POLL_S = 0.25
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[!-~]+$",
        description="A retry with the same key (and client) returns the same session",
    ),
]


# Optional on bookings (anonymous clients, when allowed), so a plain header rather than a
# security scheme, which OpenAPI would declare as required.
ClientAuthorization = Annotated[
    str | None,
    Header(
        alias="Authorization",
        max_length=1000,
        description="Bearer <client token>: the client's identity (optional in anonymous mode)",
    ),
]


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise Unauthorized("Authorization: expected 'Bearer <client token>'")
    return credentials.strip()


def _sessions(coordinator: CoordinatorDep) -> SessionService:
    sessions: SessionService = coordinator.sessions
    return sessions


@router.get("/v1/routes", response_model=RouteOut, responses=errors(409))
async def get_route(
    coordinator: CoordinatorDep,
    client_site: Annotated[str, Query(min_length=1, max_length=200)],
    input_tokens: Annotated[int, Query(ge=0, le=10_000_000)],
    output_tokens: Annotated[int, Query(ge=1, le=10_000_000)],
) -> RouteOut:
    # Runs on the event loop, not the thread pool: a route is ~0.2 ms of CPU on the
    # in-memory view (refreshed in the background), and the thread hop cost more than that.
    return _sessions(coordinator).route(client_site, input_tokens, output_tokens)


@router.post(
    "/v1/sessions",
    status_code=201,
    response_model=BookingOut,
    responses={
        **errors(401, 403, 409, 429),
        200: {"model": BookingOut, "description": "A retry (same Idempotency-Key)"},
    },
)
async def book(
    coordinator: CoordinatorDep,
    body: BookingIn,
    request: Request,
    response: Response,
    authorization: ClientAuthorization = None,
    idempotency_key: IdempotencyKey = None,
) -> BookingOut:
    sessions = _sessions(coordinator)
    address = request.client.host if request.client is not None else None
    client = sessions.identify(_bearer(authorization), address)
    started = await run_write(coordinator, sessions.start, body, client, idempotency_key)
    if isinstance(started, Booked):
        if not started.created:
            response.status_code = 200
        return started.out
    return await _wait(coordinator, sessions, started, request)


async def _wait(
    coordinator: CoordinatorDep, sessions: SessionService, pending: Pending, request: Request
) -> BookingOut:
    """Wait in the central queue without holding a thread: the admission sets the future;
    a client that disconnects leaves the queue (its session released if just admitted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + pending.wait_s
    admitted = asyncio.wrap_future(pending.future)
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        done, _ = await asyncio.wait({admitted}, timeout=min(remaining, DISCONNECT_POLL_S))
        if done:
            return sessions.finish(pending, admitted.result())
        if await request.is_disconnected():
            await run_write(coordinator, sessions.abandon, pending)
            raise sessions.timed_out(pending)
    reply = await run_write(
        coordinator, sessions.queue.withdraw, pending.session_id, pending.future
    )
    if reply is None:
        raise sessions.timed_out(pending)
    return sessions.finish(pending, reply)


@router.get(
    "/v1/sessions/{session_id}",
    response_model=SessionStatusOut,
    responses=errors(401, 403, 404),
)
def get_session(coordinator: CoordinatorDep, session_id: IdPath, token: Token) -> SessionStatusOut:
    """Active or ended, and why ("released", "expired", "server_lost", "abandoned")."""
    return _sessions(coordinator).status(session_id, token)


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses=errors(401, 403, 404),
)
async def release(coordinator: CoordinatorDep, session_id: IdPath, token: Token) -> Response:
    await run_write(coordinator, _sessions(coordinator).release, session_id, token)
    return Response(status_code=204)
