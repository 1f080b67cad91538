"""Routes and sessions: GET /v1/routes, POST /v1/sessions, GET and DELETE /v1/sessions/{id}.

Who may do what: anyone may ask for a route; a booking comes from a client (its client token,
or its address in anonymous mode, under that identity's quotas); a session is read or
released only with its own token (returned at booking) or the admin token.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials

from app.api.deps import CoordinatorDep, Token, client_bearer, errors, run_write
from app.api.routers.params import SessionIdPath
from app.api.routing import AuthBeforeBodyRoute
from app.service.clients import ClientIdentity
from app.service.errors import Unauthorized
from app.service.schemas import ErrorOut, RouteOut
from app.service.session_replies import Booked, Pending
from app.service.session_schemas import BookingIn, BookingOut, SessionStatusOut
from app.service.sessions import SessionService

router = APIRouter(tags=["routes"], route_class=AuthBeforeBodyRoute)
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


ClientCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(client_bearer)]
# The client token is optional (anonymous clients, when allowed): the booking's security
# requirements are the ClientBearer scheme or none (an empty requirement, appended here to
# the scheme FastAPI declares for the dependency).
OPTIONAL_CLIENT_TOKEN: dict[str, Any] = {"security": [{}]}


def _client_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The client token; an Authorization header that is not `Bearer <token>` is refused
    rather than taken for an anonymous client."""
    if credentials is not None:
        return credentials.credentials.strip()
    if request.headers.get("Authorization") is not None:
        raise Unauthorized("Authorization: expected 'Bearer <client token>'")
    return None


def _sessions(coordinator: CoordinatorDep) -> SessionService:
    sessions: SessionService = coordinator.sessions
    return sessions


async def _client(
    coordinator: CoordinatorDep, request: Request, credentials: ClientCredentials
) -> ClientIdentity:
    """Who books, decided before the body is read: a bad or missing client token is a
    401/403 before any 422."""
    address = request.client.host if request.client is not None else None
    return _sessions(coordinator).identify(_client_token(request, credentials), address)


@router.get(
    "/v1/routes",
    summary="Ask for a route (no booking)",
    description=(
        "The chain of servers a request from `client_site` would take now and its predicted "
        "times (first token, per token, total, and the wait for a free chain), from the "
        "in-memory view; nothing is reserved: book with POST /v1/sessions to hold the "
        "servers' cache. Public: no token. 409: no model yet; 422: an unknown site or more "
        "tokens than the model allows; 503: no chain of live servers covers every block."
    ),
    response_description="The chain of hops and the predicted times (ms)",
    response_model=RouteOut,
    responses={
        **errors(409, 422),
        503: {"model": ErrorOut, "description": "No chain covers every block (Retry-After)"},
    },
)
async def get_route(
    coordinator: CoordinatorDep,
    client_site: Annotated[
        str,
        Query(
            min_length=1,
            max_length=200,
            description="Where the client runs: a site or a client id of the swarm",
            examples=["cluster0"],
        ),
    ],
    input_tokens: Annotated[
        int,
        Query(ge=0, le=10_000_000, description="Prompt length (tokens)", examples=[20]),
    ],
    output_tokens: Annotated[
        int,
        Query(ge=1, le=10_000_000, description="Tokens to generate", examples=[128]),
    ],
) -> RouteOut:
    # Runs on the event loop, not the thread pool: a route is ~0.2 ms of CPU on the
    # in-memory view (refreshed in the background), and the thread hop cost more than that.
    return _sessions(coordinator).route(client_site, input_tokens, output_tokens)


@router.post(
    "/v1/sessions",
    summary="Book a session (reserve a chain's cache)",
    description=(
        "Books a route: reserves attention cache on every server of the chain until the "
        "predicted end of the generation (plus a grace period), and returns the route with "
        "the session's id and token (returned once: reading and releasing the session need "
        "it). With `wait_s` > 0 a booking that finds every chain full waits in the central "
        "FIFO queue up to that long. An `Idempotency-Key` makes retries safe (the same "
        "session, 200 instead of 201).\n\n"
        "**Token**: a client token (`BPRR_CLIENT_TOKENS`) as `Authorization: Bearer`, or none "
        "when anonymous clients are allowed (`BPRR_ANONYMOUS_CLIENTS`, the default). 401 "
        "without a token when anonymous clients are off, 403 with an unknown token, 409: no "
        "model yet, 422: a malformed body, an unknown site or too many tokens, 429: over the "
        "client's rate or session quota or the queue's depth (Retry-After), 503: every "
        "chain is full (Retry-After)."
    ),
    response_description="The booked session: its id, token, expiry and route",
    status_code=201,
    response_model=BookingOut,
    responses={
        **errors(401, 403, 409, 422, 429),
        200: {"model": BookingOut, "description": "A retry (same Idempotency-Key)"},
        503: {"model": ErrorOut, "description": "Every chain is full (Retry-After)"},
    },
    openapi_extra=OPTIONAL_CLIENT_TOKEN,
)
async def book(
    coordinator: CoordinatorDep,
    client: Annotated[ClientIdentity, Depends(_client)],
    body: BookingIn,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> BookingOut:
    sessions = _sessions(coordinator)
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
    summary="Read a session",
    description=(
        "Whether the session is active or ended, and why it ended (`released`, `expired`, "
        "`server_lost`, `abandoned`), with its route; ended sessions are kept for an hour "
        "(`BPRR_RECORD_RETENTION_S`).\n\n"
        "**Token**: the session's token (from the booking) or the admin token. 401 without "
        "a token, 403 with another one, 404: unknown session."
    ),
    response_description="The session's state and route",
    response_model=SessionStatusOut,
    responses=errors(401, 403, 404, 422),
)
def get_session(
    coordinator: CoordinatorDep, session_id: SessionIdPath, token: Token
) -> SessionStatusOut:
    return _sessions(coordinator).status(session_id, token)


@router.delete(
    "/v1/sessions/{session_id}",
    summary="Release a session",
    description=(
        "Ends the session now and frees its cache reservations (the next booking or "
        "queued request may take them).\n\n"
        "**Token**: the session's token or the admin token. 401 without a token, 403 with "
        "another one, 404: unknown or already ended session."
    ),
    response_description="Released (no body)",
    status_code=204,
    response_class=Response,
    responses=errors(401, 403, 404, 422),
)
async def release(coordinator: CoordinatorDep, session_id: SessionIdPath, token: Token) -> Response:
    await run_write(coordinator, _sessions(coordinator).release, session_id, token)
    return Response(status_code=204)
