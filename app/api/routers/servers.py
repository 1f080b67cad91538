"""Servers: registration (join token), listing (public), leaving and heartbeats (the server's
own token, or admin to remove), RTT measurements (admin or a server's token)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import CoordinatorDep, IdPath, Measurer, RegistrationAuth, Token, errors
from app.service.schemas import (
    Heartbeat,
    HeartbeatOut,
    RegistrationOut,
    RttsIn,
    RttsOut,
    ServerOut,
    ServerRegistration,
)

router = APIRouter()


@router.post(
    "/v1/servers",
    tags=["servers"],
    status_code=201,
    response_model=RegistrationOut,
    responses=errors(401, 403, 409),
    dependencies=[RegistrationAuth],
)
def register_server(
    coordinator: CoordinatorDep, body: ServerRegistration, token: Token
) -> RegistrationOut:
    return coordinator.register_server(body, token)


@router.get("/v1/servers", tags=["servers"], response_model=list[ServerOut])
def list_servers(coordinator: CoordinatorDep) -> list[ServerOut]:
    return coordinator.list_servers()


@router.get(
    "/v1/servers/{server_id}", tags=["servers"], response_model=ServerOut, responses=errors(404)
)
def get_server(coordinator: CoordinatorDep, server_id: IdPath) -> ServerOut:
    return coordinator.get_server(server_id)


@router.delete(
    "/v1/servers/{server_id}",
    tags=["servers"],
    status_code=204,
    response_class=Response,
    responses=errors(401, 403, 404),
)
def leave(coordinator: CoordinatorDep, server_id: IdPath, token: Token) -> Response:
    coordinator.leave(server_id, token)
    return Response(status_code=204)


@router.post(
    "/v1/servers/{server_id}/heartbeat",
    tags=["servers"],
    response_model=HeartbeatOut,
    responses=errors(401, 403, 404, 409),
)
async def heartbeat(
    coordinator: CoordinatorDep, server_id: IdPath, body: Heartbeat, token: Token
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
    response_model=RttsOut,
    responses=errors(401, 403),
)
def put_rtts(coordinator: CoordinatorDep, writer: Measurer, body: RttsIn) -> RttsOut:
    return RttsOut(updated=coordinator.put_rtts(body.entries, writer))
