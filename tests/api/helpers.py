"""Small swarms for the coordinator tests, driven through the HTTP API, and rows for the
repository-level tests."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi.testclient import TestClient

from app.store.bookings import NewSession
from app.store.models import ModelRow, ServerRow
from tests.api.conftest import JOIN, admin, bearer

SMALL_MODEL: dict[str, Any] = {
    "name": "tiny",
    "num_blocks": 8,
    "block_memory_gb": 1.0,
    "kv_bytes_per_token_per_block": 1_000_000,  # s_c = 0.2 GB at 100 + 100 tokens
    "max_input_tokens": 100,
    "max_output_tokens": 100,
    "overheads": {"per_token_ms": 10},
}


def server_body(
    index: int, site: str = "east", memory_gb: float = 6.0, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"s{index}",
        "site": site,
        "gpu": "A100",
        "memory_gb": memory_gb,
        "decode_ms_per_block": 2.0 + index,
        "prefill_ms_per_block": {"fixed": 10.0, "per_token": 0.1},
        "address": f"10.0.0.{index}:31337",
        "boot_epoch": 1,
    }
    body.update(extra)
    return body


def register(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/servers", json=body, headers=bearer(JOIN))
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def heartbeat(
    client: TestClient, server_id: str, token: str, span: dict[str, int] | None, **extra: Any
) -> Any:
    body: dict[str, Any] = {"boot_epoch": 1, "state": "online", "loaded_span": span}
    body.update(extra)
    return client.post(f"/v1/servers/{server_id}/heartbeat", json=body, headers=bearer(token))


def small_swarm(client: TestClient, count: int = 3, memory_gb: float = 6.0) -> dict[str, str]:
    """Model, ``count`` servers registered, a placement published, every server loaded."""
    assert client.put("/v1/model", json=SMALL_MODEL, headers=admin()).status_code == 200
    tokens = {f"s{i}": register(client, server_body(i, memory_gb=memory_gb)) for i in range(count)}
    placed = client.post("/v1/placements", json={"algorithm": "cg"}, headers=admin())
    assert placed.status_code == 201, placed.text
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placed.json()["spans"]}
    for server_id, token in tokens.items():
        reply = heartbeat(client, server_id, token, spans.get(server_id))
        assert reply.status_code == 200, reply.text
    return tokens


def route_params(site: str = "east", inputs: int = 50, outputs: int = 50) -> dict[str, Any]:
    return {"client_site": site, "input_tokens": inputs, "output_tokens": outputs}


def server_row(
    server_id: str, cache_slots: int = 4, boot_epoch: int = 3, memory_gb: float = 10.0
) -> ServerRow:
    """An online server at site "east" serving blocks [0, 2), lease live until t=100."""
    return ServerRow(
        id=server_id,
        site="east",
        gpu=None,
        memory_gb=memory_gb,
        decode_ms_per_block=2.0,
        prefill_fixed_ms=1.0,
        prefill_per_token_ms=0.1,
        network_mbps=None,
        address="10.0.0.1:1",
        boot_epoch=boot_epoch,
        token_hash="h" * 64,
        state="online",
        loaded_start=0,
        loaded_end=2,
        free_cache_slots=None,
        cache_slots=cache_slots,
        reserved_slots=0,
        lease_expires_at=100.0,
        last_heartbeat_at=None,
        registered_at=0.0,
    )


def model_row(kv_bytes_per_token_per_block: float = 2e9) -> ModelRow:
    """A model of 1 GB blocks: a ``server_row`` (10 GB, 2 blocks loaded) holds 8 GB of cache,
    4 units at the default 2 GB per unit."""
    return ModelRow(
        id=1,
        name="tiny",
        num_blocks=2,
        block_memory_gb=1.0,
        kv_bytes_per_token_per_block=kv_bytes_per_token_per_block,
        max_input_tokens=100,
        max_output_tokens=100,
        updated_at=0.0,
    )


def new_session(
    session_id: str,
    holds: list[tuple[str, int]],
    created_at: float = 50.0,
    expires_at: float = 60.0,
    client: str = "token:c",
) -> NewSession:
    """A session from site "east" holding ``holds`` (server id, units), for ``Bookings.book``."""
    return NewSession(
        id=session_id,
        token_hash=hash_of(session_id),
        client=client,
        idempotency_key=None,
        client_site="east",
        input_tokens=1,
        output_tokens=1,
        generation=1,
        chain=None,
        created_at=created_at,
        expires_at=expires_at,
        first_token_ms=1.0,
        per_token_ms=1.0,
        path="[]",
        reply="{}",
        holds=tuple(holds),
    )


def hash_of(session_id: str) -> str:
    """The token hash ``new_session`` gives a session (a release with it is the owner's)."""
    return hashlib.sha256(session_id.encode()).hexdigest()
