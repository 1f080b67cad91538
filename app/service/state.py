"""The live state read from the database in one go, and its scenario form.

The planner solves, and ``GET /v1/scenario`` exports, a scenario built here from the rows, so
that what the coordinator plans on is exactly what ``bprr solve`` would read back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app.allocation.instance import Span
from app.allocation.scenario import Scenario, parse_scenario
from app.store import repositories as repo
from app.store.models import ClientRow, ModelRow, PlacementRow, ServerRow
from app.store.repositories import pair_key


@dataclass
class LiveState:
    model: ModelRow | None
    sites: list[str]
    clients: list[ClientRow]
    servers: list[ServerRow]
    rtts: dict[tuple[str, str], float]
    placement: PlacementRow | None
    # server id -> [(expires_at, slots)] of live reservations
    reservations: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    @property
    def generation(self) -> int:
        return 0 if self.placement is None else self.placement.generation

    def assigned_spans(self) -> dict[str, Span]:
        return placement_spans(self.placement)

    def rtt(self, a: str, b: str) -> float | None:
        return self.rtts.get(pair_key(a, b))

    def site_rtt(self, a: str, b: str, default_ms: float) -> float:
        value = self.rtt(a, b)
        if value is not None:
            return value
        return 0.0 if a == b else default_ms

    def client_server_rtt(self, site: str, server: ServerRow, default_ms: float) -> float:
        value = self.rtt(site, server.id)
        if value is not None:
            return value
        return self.site_rtt(site, server.site, default_ms)


def placement_spans(row: PlacementRow | None) -> dict[str, Span]:
    if row is None:
        return {}
    raw: dict[str, list[int]] = json.loads(row.spans)
    return {server: Span(int(s), int(e)) for server, (s, e) in raw.items()}


def load_state(db: Session, with_reservations: bool = False) -> LiveState:
    """Everything the planner and the route view need, read through the repositories in the
    caller's transaction."""
    return LiveState(
        model=repo.Models(db).get(),
        sites=repo.Sites(db).names(),
        clients=repo.Clients(db).all(),
        servers=repo.Servers(db).all(),
        rtts=repo.Rtts(db).all(),
        placement=repo.Placements(db).current(),
        reservations=repo.Reservations(db).by_server() if with_reservations else {},
    )


def client_list(state: LiveState) -> list[tuple[str, str, float]]:
    """(id, site, share) of every client; one per site when none were loaded."""
    if state.clients:
        return [(c.id, c.site, c.share) for c in state.clients]
    return [(f"client-{site}", site, 1.0) for site in state.sites]


def scenario_dict(
    state: LiveState,
    servers: list[ServerRow],
    default_rtt_ms: float,
    name: str = "live",
    workload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The scenario (../shared/SCENARIO.md) of ``servers`` under the current model and RTTs,
    with ``workload`` (the measured load, docs/SCENARIO.md) when there is one."""
    model = state.model
    if model is None:
        raise ValueError("no model is set")
    sites = state.sites
    clients = client_list(state)
    matrix = [[state.site_rtt(a, b, default_rtt_ms) for b in sites] for a in sites]
    ids = {s.id for s in servers}
    overrides: dict[str, dict[str, float]] = {}
    for (a, b), value in state.rtts.items():
        if a in ids and b in ids:
            overrides.setdefault(a, {})[b] = value
    for client_id, site, _ in clients:
        for server in servers:
            measured = state.rtt(site, server.id)
            if measured is not None:
                overrides.setdefault(client_id, {})[server.id] = measured
    model_dict: dict[str, Any] = {
        "name": model.name,
        "num_blocks": model.num_blocks,
        "block_memory_gb": model.block_memory_gb,
        "kv_bytes_per_token_per_block": model.kv_bytes_per_token_per_block,
    }
    if model.hidden_size is not None:
        model_dict["hidden_size"] = model.hidden_size
    if model.petals_cache_tokens is not None:
        model_dict["petals_cache_tokens"] = model.petals_cache_tokens
    data: dict[str, Any] = {
        "name": name,
        "model": model_dict,
        "requests": {
            "max_input_tokens": model.max_input_tokens,
            "max_output_tokens": model.max_output_tokens,
        },
        "sites": sites,
        "site_rtt_ms": matrix,
        "servers": [server_dict(s) for s in servers],
        "clients": [{"id": c, "site": site, "share": share} for c, site, share in clients],
        "overheads": {
            "per_token_ms": model.per_token_ms,
            "prefill_fixed_ms": model.prefill_fixed_ms,
            "prefill_per_token_ms": model.prefill_per_token_ms,
            "per_request_ms": model.per_request_ms,
        },
    }
    if overrides:
        data["rtt_ms"] = overrides
    if workload is None and model.rate_per_s:
        # Nothing measured yet: the load the operator declared is what the plan is made for,
        # so the export replays that (docs/SCENARIO.md; five minutes of arrivals).
        rate = float(model.rate_per_s)
        workload = {
            "arrival": "poisson",
            "rate_per_s": rate,
            "num_requests": max(1, round(rate * 300)),
        }
    if workload is not None:
        data["workload"] = workload
    return data


def server_dict(server: ServerRow) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": server.id,
        "site": server.site,
        "memory_gb": server.memory_gb,
        "decode_ms_per_block": server.decode_ms_per_block,
        "prefill_ms_per_block": {
            "fixed": server.prefill_fixed_ms,
            "per_token": server.prefill_per_token_ms,
        },
        # An extra the scenario contract tolerates; a loaded snapshot keeps the addresses.
        "address": server.address,
    }
    if server.gpu is not None:
        data["gpu"] = server.gpu
    if server.network_mbps is not None:
        data["network_mbps"] = server.network_mbps
    return data


def build_scenario(
    state: LiveState,
    servers: list[ServerRow],
    default_rtt_ms: float,
    name: str = "live",
    workload: dict[str, Any] | None = None,
) -> Scenario:
    return parse_scenario(scenario_dict(state, servers, default_rtt_ms, name, workload))
