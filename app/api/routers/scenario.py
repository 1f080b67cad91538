"""The scenario snapshot: GET (public export), POST (admin: replace the swarm)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from app.api.deps import AdminOnly, CoordinatorDep, errors
from app.api.routing import AuthBeforeBodyRoute
from app.service.schemas import ScenarioLoadOut

router = APIRouter(tags=["scenario"], route_class=AuthBeforeBodyRoute)

# A small swarm in the scenario format (docs/SCENARIO.md): 2 sites, 3 servers, one client site.
EXAMPLE_SCENARIO: dict[str, Any] = {
    "name": "two-clusters",
    "model": {
        "name": "bloom-176b",
        "num_blocks": 70,
        "block_memory_gb": 1.3234,
        "kv_bytes_per_token_per_block": 57344,
    },
    "requests": {"max_input_tokens": 20, "max_output_tokens": 128},
    "sites": ["cluster0", "cluster1"],
    "site_rtt_ms": [[5, 80], [80, 5]],
    "servers": [
        {
            "id": "a100-0",
            "site": "cluster0",
            "gpu": "A100-80GB",
            "memory_gb": 86.13,
            "decode_ms_per_block": 3.2197,
            "prefill_ms_per_block": {"fixed": 32.99, "per_token": 0.0743},
        },
        {
            "id": "a100-1",
            "site": "cluster1",
            "gpu": "A100-80GB",
            "memory_gb": 86.13,
            "decode_ms_per_block": 3.2197,
            "prefill_ms_per_block": {"fixed": 32.99, "per_token": 0.0743},
        },
        {
            "id": "mig-0",
            "site": "cluster1",
            "gpu": "A100-MIG-3g.40gb",
            "memory_gb": 39.5,
            "decode_ms_per_block": 6.1,
            "prefill_ms_per_block": {"fixed": 60.0, "per_token": 0.14},
        },
    ],
    "clients": [{"id": "c0", "site": "cluster0", "share": 1.0}],
}


@router.get(
    "/v1/scenario",
    summary="Export the live swarm as a scenario",
    description=(
        "The model, sites, RTTs, servers (with a live lease, or all of them with "
        "`include_expired=true`) and client sites in the scenario format (docs/SCENARIO.md): "
        "save it and run `bprr solve` or `bprr simulate` on it offline. Public: no token. "
        "409: no model, or no live server."
    ),
    response_description="A scenario (docs/SCENARIO.md)",
    response_model=dict[str, Any],
    responses=errors(409, 422),
)
def get_scenario(
    coordinator: CoordinatorDep,
    include_expired: Annotated[
        bool,
        Query(
            description="Also export servers whose lease expired (default: live ones only)",
            examples=[False],
        ),
    ] = False,
) -> dict[str, Any]:
    return coordinator.export_scenario(include_expired)


@router.post(
    "/v1/scenario",
    summary="Replace the swarm with a scenario",
    description=(
        "Replaces the whole swarm by a scenario's (docs/SCENARIO.md): its model, sites, "
        "RTTs, client sites and servers. With `online=true` (for demos, tests and what-if "
        "runs) the placement is solved first and the servers start online, their spans "
        "loaded, with a lease of `lease_s` seconds; with `online=false` they start joining "
        "with an expired lease, for real agents to take over. Everything is checked "
        "before anything is written: a failed load changes nothing. Each server's token is "
        "returned once, in the reply.\n\n"
        "**Token**: the admin token. 401 without a token, 403 with another one, 409: the "
        "servers cannot hold the model; 422: not a valid scenario (the field is named)."
    ),
    response_description="The servers' ids and tokens, and the published generation",
    status_code=201,
    response_model=ScenarioLoadOut,
    responses=errors(401, 403, 409, 422),
    dependencies=[AdminOnly],
)
def post_scenario(
    coordinator: CoordinatorDep,
    scenario: Annotated[
        dict[str, Any],
        Body(
            description="A scenario (docs/SCENARIO.md)",
            openapi_examples={
                "two-clusters": {
                    "summary": "Two sites, three servers",
                    "description": "A BLOOM-176B swarm: two A100s and one MIG slice.",
                    "value": EXAMPLE_SCENARIO,
                }
            },
        ),
    ],
    online: Annotated[
        bool,
        Query(
            description="Start the servers online, their solved spans loaded (false: joining)",
            examples=[True],
        ),
    ] = True,
    lease_s: Annotated[
        float,
        Query(
            gt=0,
            le=31_536_000,
            allow_inf_nan=False,
            description="The online servers' lease (s): without heartbeats they expire after it",
            openapi_examples={
                "default": {"summary": "A normal lease", "value": 15.0},
                "walk-through": {"summary": "A lease for a person at a terminal", "value": 3600},
            },
        ),
    ] = 15.0,
) -> ScenarioLoadOut:
    return coordinator.load_scenario(scenario, online, lease_s)
