"""Servers: registration (join token), listing (public), leaving and heartbeats (the server's
own token, or admin to remove), RTT measurements (admin or a server's token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import CoordinatorDep, Measurer, RegistrationAuth, Token, errors
from app.api.routers.params import UNAVAILABLE, ServerIdPath
from app.api.routing import AuthBeforeBodyRoute
from app.service.errors import Unauthorized
from app.service.schemas import (
    Heartbeat,
    HeartbeatOut,
    RegistrationOut,
    RttsIn,
    RttsOut,
    ServerOut,
    ServerRegistration,
)

router = APIRouter(route_class=AuthBeforeBodyRoute)


async def _token_present(token: Token) -> None:
    """Leaving: some bearer token (401 without one); whether it is the server's own or the
    admin token is the service's decision, in the same transaction as the removal."""
    if token is None:
        raise Unauthorized("missing bearer token (the server's own token or the admin token)")


async def _own_token(coordinator: CoordinatorDep, server_id: ServerIdPath, token: Token) -> None:
    """A heartbeat: the server's own token (401 without one, 403 for another, 404 for an
    unknown id) before the body is read; the route view vouches for it without a database
    read on the usual path (the full heartbeat checks it again against the row)."""
    if token is None:
        raise Unauthorized("missing bearer token (the server's own token is required)")
    servers = coordinator.servers
    if not servers.vouches_for(server_id, token):
        await run_in_threadpool(servers.check_own_token, server_id, token)


TokenPresent = Depends(_token_present)
OwnToken = Depends(_own_token)


@router.post(
    "/v1/servers",
    tags=["servers"],
    summary="Register a server (or re-register it)",
    description=(
        "A server joins the swarm: its site, GPU, memory and measured speeds, the address "
        "clients reach it at and, for a PETALS server, its peer id and multiaddrs. The reply "
        "carries the server's own token (keep it: heartbeats, leaving and re-registration "
        "need it), its lease and the heartbeat interval.\n\n"
        "**Token**: the join token (`BPRR_JOIN_TOKEN`) for a new id, or the server's own "
        "token to re-register it; none in dev mode without a join token. A live server's id "
        "cannot be taken over with the join token (403); an expired one can, with a larger "
        "`boot_epoch` (409 otherwise). 401 without a token, 403 with a token that is "
        "neither the join token nor a registered server's own (checked before the body), "
        "422 for a malformed body."
    ),
    response_description="The server's id, its own token, its lease and heartbeat interval",
    status_code=201,
    response_model=RegistrationOut,
    responses=errors(401, 403, 409, 422),
    dependencies=[RegistrationAuth],
)
def register_server(
    coordinator: CoordinatorDep, body: ServerRegistration, token: Token
) -> RegistrationOut:
    return coordinator.register_server(body, token)


@router.get(
    "/v1/servers",
    tags=["servers"],
    summary="List the registered servers",
    description=(
        "Every registered server with its lease (live or expired), its loaded and assigned "
        "spans and its cache slots. Public: no token."
    ),
    response_description="The servers, in id order",
    response_model=list[ServerOut],
    responses={503: UNAVAILABLE},
)
def list_servers(coordinator: CoordinatorDep) -> list[ServerOut]:
    return coordinator.list_servers()


@router.get(
    "/v1/servers/{server_id}",
    tags=["servers"],
    summary="Read one server",
    description="One registered server, as in the list. Public: no token. 404: unknown id.",
    response_description="The server",
    response_model=ServerOut,
    responses=errors(404, 422),
)
def get_server(coordinator: CoordinatorDep, server_id: ServerIdPath) -> ServerOut:
    return coordinator.get_server(server_id)


@router.delete(
    "/v1/servers/{server_id}",
    tags=["servers"],
    summary="Remove a server (it leaves the swarm)",
    description=(
        "The server leaves the swarm at once (rather than when its lease expires): it is no "
        "longer routable and the planner is asked for a new placement.\n\n"
        "**Token**: the server's own token, or the admin token. 401 without a token, 403 "
        "with another one, 404: unknown id."
    ),
    response_description="Removed (no body)",
    status_code=204,
    response_class=Response,
    responses=errors(401, 403, 404, 422),
    dependencies=[TokenPresent],
)
def leave(coordinator: CoordinatorDep, server_id: ServerIdPath, token: Token) -> Response:
    coordinator.leave(server_id, token)
    return Response(status_code=204)


@router.post(
    "/v1/servers/{server_id}/heartbeat",
    tags=["servers"],
    summary="Renew a server's lease and report its state",
    description=(
        "Sent every `heartbeat_interval_s`: renews the lease and reports the server's "
        "state, the span it has loaded, its free cache slots and, when re-measured, its "
        "speeds and RTTs. The reply names the span the published placement assigns it "
        "(load it, then report it as `loaded_span`).\n\n"
        "**Token**: the server's own token. 401 without a token, 403 with another one, 404: "
        "unknown id, 409: a stale `boot_epoch` (another process registered the id since), "
        "422: a malformed body or a span past the model's blocks."
    ),
    response_description="The assigned span, the lease's remaining time and the interval",
    response_model=HeartbeatOut,
    responses=errors(401, 403, 404, 409, 422),
    dependencies=[OwnToken],
)
async def heartbeat(
    coordinator: CoordinatorDep, server_id: ServerIdPath, body: Heartbeat, token: Token
) -> HeartbeatOut:
    # Most heartbeats only renew the lease: answered from memory on the event loop and
    # written behind in batches; the rest (state or span changes, RTTs, speeds, a token
    # the view does not know) go to the thread pool and the database.
    quick = coordinator.quiet_heartbeat(server_id, token, body)
    if quick is not None:
        return quick
    return await run_in_threadpool(coordinator.heartbeat, server_id, token, body)


@router.put(
    "/v1/rtts",
    tags=["measurements"],
    summary="Record measured round-trip times",
    description=(
        "Round-trip times (ms) between two endpoints, each a server id, a site or a client "
        "site; routes and placements use them in place of the site defaults.\n\n"
        "**Token**: the admin token (any pair), or a server's own token (only pairs that "
        "involve that server). 401 without a token, 403 for another token or a pair that "
        "does not involve the calling server, 422: a malformed body or an unknown id."
    ),
    response_description="How many pairs were written",
    response_model=RttsOut,
    responses=errors(401, 403, 422),
)
def put_rtts(coordinator: CoordinatorDep, writer: Measurer, body: RttsIn) -> RttsOut:
    return RttsOut(updated=coordinator.put_rtts(body.entries, writer))
