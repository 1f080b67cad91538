"""What the routers share: the coordinator of the app, the bearer tokens, who may call a route
(as FastAPI dependencies, so that a caller without the right token gets its 401/403 before the
body is validated; app.api.routing runs them before a body that does not even decode), the
declared error responses and the id path parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.service.coordinator import Coordinator
from app.service.core import WouldBlock
from app.service.schemas import ErrorOut, ValidationErrorOut

_T = TypeVar("_T")
bearer = HTTPBearer(
    auto_error=False,
    description=(
        "The admin token (the operator's routes, any session), the join token (registering "
        "a new server), a server's own token (its heartbeats, re-registration, leaving, its "
        "RTTs) or a session's token (reading and releasing that session; returned by the "
        "booking). A client token, for bookings, goes in `ClientBearer`."
    ),
)
# Bookings: optional (anonymous clients, when allowed), so the booking route declares it
# next to an empty security requirement; a scheme of its own keeps Swagger UI's client token
# apart from the admin or server token entered for the other routes.
client_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ClientBearer",
    description=(
        "A client token (`BPRR_CLIENT_TOKENS`) for POST /v1/sessions: the client's identity "
        "and quotas (optional while anonymous clients are allowed)"
    ),
)
IdPath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]


async def coordinator_of(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


async def bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str | None:
    return None if credentials is None else credentials.credentials


CoordinatorDep = Annotated[Coordinator, Depends(coordinator_of)]
Token = Annotated[str | None, Depends(bearer_token)]


async def require_admin(coordinator: CoordinatorDep, token: Token) -> None:
    """The operator's routes: the admin token (401 without a token, 403 with another)."""
    coordinator.check_admin(token)


def require_measurer(coordinator: CoordinatorDep, token: Token) -> str | None:
    """Measurements: the admin token (None) or a registered server's token (its id; one
    database read)."""
    return coordinator.check_measurer(token)


def require_registrant(coordinator: CoordinatorDep, token: Token) -> None:
    """Registration: the join token or a registered server's own token (none in dev mode
    without a join token); what that token may do with the body's id (a new one, a live or
    an expired one) is decided by the service once the body is read."""
    coordinator.servers.check_registrant(token)


AdminOnly = Depends(require_admin)
Measurer = Annotated[str | None, Depends(require_measurer)]
RegistrationAuth = Depends(require_registrant)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a /v1 route: ``codes`` (422 in them for a route with a body or
    parameters that can fail validation, in the validation error's shape) and 503 (these
    routes need the database; an unreachable one is a 503 with Retry-After)."""
    declared: dict[int | str, dict[str, Any]] = {
        code: {"model": ValidationErrorOut if code == 422 else ErrorOut} for code in codes
    }
    declared[503] = {"model": ErrorOut}
    return declared


async def run_write(coordinator: Coordinator, call: Callable[..., _T], *args: Any) -> _T:
    """Bookings and releases on the embedded SQLite are short library calls serialised by the
    coordinator's writer lock: run them on the event loop, where handing them to the thread
    pool cost more than the write, unless a lock is taken (another writer, another process):
    then nothing began and the call runs in the thread pool, where waiting is harmless. A
    networked database always gets the thread pool."""
    if coordinator.embedded_database:
        try:
            with coordinator.core.without_waiting():
                return call(*args)
        except WouldBlock:
            pass
    return await run_in_threadpool(call, *args)
