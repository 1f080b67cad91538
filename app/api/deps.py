"""What the routers share: the coordinator of the app, the bearer token, who may call a route
(as FastAPI dependencies, so that a caller without the right token gets its 401/403 before the
body is validated), the declared error responses and the id path parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.service.coordinator import Coordinator
from app.service.core import WouldBlock
from app.service.errors import Unauthorized
from app.service.schemas import ErrorOut, ValidationErrorOut

_T = TypeVar("_T")
bearer = HTTPBearer(auto_error=False, description="Admin, join or per-server token")
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


async def require_token_unless_open(coordinator: CoordinatorDep, token: Token) -> None:
    """Registration: a bearer token (the join token or the server's own) unless the
    coordinator runs in dev mode without a join token; which token may do what is decided by
    the service, which knows whether the id exists and its lease is live."""
    settings = coordinator.settings
    if token is None and not (settings.dev_mode and settings.join_token is None):
        raise Unauthorized("missing bearer token (the join token or the server's own token)")


AdminOnly = Depends(require_admin)
Measurer = Annotated[str | None, Depends(require_measurer)]
RegistrationAuth = Depends(require_token_unless_open)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a /v1 route: ``codes``, 422 for a malformed request, and 503
    (every route needs the database; an unreachable one is a 503 with Retry-After)."""
    declared: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in codes}
    declared[422] = {"model": ValidationErrorOut}
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
