"""The model and the scenario snapshot: GET/PUT /v1/model, GET/POST /v1/scenario.

Transaction boundaries:
- ``get_model``/``export``: one read transaction each.
- ``set_model``: one write transaction (the model row, every server's cache slots, the re-plan
  request).
- ``load``: everything validated and (with ``online``) the placement solved first, without
  any transaction; then ONE write transaction replaces the swarm (model, sites, RTTs,
  clients, servers loaded with their spans, the placement): a failed load changes nothing.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from pydantic import ValidationError

from app.allocation.scenario import (
    Scenario,
    ScenarioError,
    ServerSpec,
    format_validation_error,
    parse_scenario,
)
from app.service import auth
from app.service.audit import audit
from app.service.core import Core
from app.service.errors import Conflict, Invalid, NotFound
from app.service.placements import PlacementService, Workload, no_workload, placement_out
from app.service.schemas import (
    LoadedServer,
    ModelIn,
    ModelOut,
    Overheads,
    ScenarioLoadOut,
    ServerRegistration,
    text_problem,
)
from app.service.servers import slots_for
from app.service.state import load_state, scenario_dict
from app.store import repositories as repo
from app.store.models import ModelRow, ServerRow


class ScenarioService:
    def __init__(
        self, core: Core, placements: PlacementService, workload: Workload = no_workload
    ) -> None:
        self.core = core
        self.settings = core.settings
        self.placements = placements
        self._workload = workload  # the measured load, exported as the scenario's workload

    # --- model -----------------------------------------------------------------------------------

    def get_model(self) -> ModelOut:
        with self.core.read_tx() as db:
            row = repo.Models(db).get()
            if row is None:
                raise NotFound("no model is set yet (PUT /v1/model)")
            return model_out(row)

    def set_model(self, body: ModelIn) -> ModelOut:
        now = self.core.clock()
        with self.core.tx() as db:
            row = repo.Models(db).get_or_new()
            apply_model(row, body, now)
            for server in repo.Servers(db).all():
                server.cache_slots = slots_for(row, server)
            repo.PlannerState(db).request("model changed", now)
            db.flush()
            out = model_out(row)
        self.core.invalidate()
        audit("model_changed", name=out.name, num_blocks=out.num_blocks)
        return out

    # --- scenario snapshot -----------------------------------------------------------------------

    def export(self, include_expired: bool) -> dict[str, Any]:
        now = self.core.clock()
        with self.core.read_tx() as db:
            state = load_state(db)
        if state.model is None:
            raise Conflict("no model is set yet (PUT /v1/model or POST /v1/scenario)")
        servers = [s for s in state.servers if include_expired or s.lease_expires_at > now]
        if not servers:
            raise Conflict("no server with a live lease (use include_expired=true for all)")
        data = scenario_dict(
            state, servers, self.settings.default_site_rtt_ms, workload=self._workload()
        )
        try:
            parse_scenario(data)  # what we export must read back
        except ScenarioError as error:
            raise Conflict(f"the live state is not a valid scenario: {error}") from None
        return data

    def load(self, raw: Any, online: bool, lease_s: float) -> ScenarioLoadOut:
        """Replace the swarm by a scenario's; ``online`` marks its servers as live and loaded
        with the placement computed for them (for demos, tests and benchmarks).

        Everything is checked first (strict types, the API's own bounds on the model and on
        every server, text a database stores) and the placement solved before anything is
        written; then one transaction swaps the swarm, so a failed load changes nothing."""
        scenario, model_in, servers_in = self._validated(raw)
        now = self.core.clock()
        plan = None
        if online:
            plan = self.placements.plan(
                scenario,
                self.settings.planner_algorithm,
                None,
                None,
                self.settings.planner_time_limit_s,
                "scenario loaded",
            )
        tokens: list[LoadedServer] = []
        with self.core.tx() as db:
            repo.clear_swarm(db)
            model = repo.Models(db).get_or_new()
            apply_model(model, model_in, now)
            repo.Sites(db).add_all(scenario.sites)  # first: clients and servers refer to them
            rtts = repo.Rtts(db)
            matrix = scenario.site_matrix()
            for i, a in enumerate(scenario.sites):
                for j, b in enumerate(scenario.sites):
                    if j >= i:
                        rtts.add(a, b, (matrix[i][j] + matrix[j][i]) / 2, now)
            repo.Clients(db).add_all((c.id, c.site, c.share) for c in scenario.clients)
            client_site = {c.id: c.site for c in scenario.clients}
            stored: dict[tuple[str, str], float] = {}
            for a, targets in (scenario.rtt_ms or {}).items():
                for b, value in targets.items():
                    key = repo.pair_key(client_site.get(a, a), client_site.get(b, b))
                    stored[key] = value
            for (a, b), value in stored.items():
                rtts.add(a, b, value, now)
            servers = repo.Servers(db)
            spans = {} if plan is None else plan.spans
            for i, (spec, address) in enumerate(servers_in):
                token = secrets.token_urlsafe(32)
                span = spans.get(spec.id)
                row = ServerRow(
                    id=spec.id,
                    site=spec.site,
                    gpu=spec.gpu,
                    memory_gb=spec.memory_gb,
                    decode_ms_per_block=spec.decode_ms_per_block,
                    prefill_fixed_ms=spec.prefill_ms_per_block.fixed,
                    prefill_per_token_ms=spec.prefill_ms_per_block.per_token,
                    network_mbps=spec.network_mbps,
                    address=address,
                    boot_epoch=0,
                    token_hash=auth.hash_token(token),
                    state="online" if online else "joining",
                    cache_slots=0,
                    reserved_slots=0,
                    lease_expires_at=now + lease_s if online else now,
                    registered_at=now + i * 1e-6,
                    loaded_start=None if span is None else span.start,
                    loaded_end=None if span is None else span.end,
                )
                row.cache_slots = slots_for(model, row)
                servers.add(row)
                tokens.append(LoadedServer(id=spec.id, token=token))
            generation = 0
            if plan is not None:
                db.flush()
                placement = self.placements.insert(db, plan, now)
                generation = placement.generation
                out = placement_out(placement)
                repo.PlannerState(db).clear(now)
            else:
                repo.PlannerState(db).request("scenario loaded", now)
        if plan is not None:
            self.placements.published(out)
        self.core.invalidate()
        audit("scenario_loaded", servers=len(tokens), online=online, generation=generation)
        return ScenarioLoadOut(servers=tokens, generation=generation)

    def _validated(self, raw: Any) -> tuple[Scenario, ModelIn, list[tuple[ServerSpec, str]]]:
        """The scenario, its model as the API takes it and its servers with their addresses;
        Invalid naming the field for anything the coordinator could not store or serve."""
        problem = text_problem(raw)
        if problem:
            raise Invalid(f"scenario.{problem}")
        try:
            # Strict JSON types first: the parser would coerce true into 1.
            Scenario.model_validate_json(json.dumps(raw), strict=True)
            scenario = parse_scenario(raw)
        except ValidationError as error:
            raise Invalid(format_validation_error(error)) from None
        except ScenarioError as error:
            raise Invalid(str(error)) from None
        m = scenario.model
        rate = getattr(scenario.workload, "rate_per_s", None)
        try:
            model_in = ModelIn(
                name=_safe_name(m.name),
                num_blocks=m.num_blocks,
                block_memory_gb=m.block_memory_gb,
                kv_bytes_per_token_per_block=m.kv_bytes_per_token_per_block,
                max_input_tokens=scenario.requests.max_input_tokens,
                max_output_tokens=scenario.requests.max_output_tokens,
                hidden_size=m.hidden_size,
                petals_cache_tokens=m.petals_cache_tokens,
                overheads=Overheads(**scenario.overheads.model_dump()),
                rate_per_s=rate,
            )
        except ValidationError as error:
            raise Invalid(_first_error("model", error)) from None
        raw_servers = raw.get("servers", []) if isinstance(raw, dict) else []
        servers: list[tuple[ServerSpec, str]] = []
        for i, spec in enumerate(scenario.servers):
            extra = (
                raw_servers[i] if i < len(raw_servers) and isinstance(raw_servers[i], dict) else {}
            )
            given = extra.get("address")
            address = given if isinstance(given, str) and given else f"{spec.id}:31337"
            try:
                # a scenario server's fields are the registration's, less address and epoch
                ServerRegistration(**spec.model_dump(), address=address, boot_epoch=0)
            except ValidationError as error:
                raise Invalid(_first_error(f"servers[{i}]", error)) from None
            servers.append((spec, address))
        for site in scenario.sites:
            if problem := _name_problem(site):
                raise Invalid(f"sites: {site!r} {problem}")
        for client in scenario.clients:
            if problem := _name_problem(client.id):
                raise Invalid(f"clients: {client.id!r} {problem}")
        return scenario, model_in, servers


def _first_error(prefix: str, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{prefix}.{where}: {first['msg']}" if where else f"{prefix}: {first['msg']}"


_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,200}$")


def _name_problem(name: str) -> str | None:
    """What the API's Name type would refuse (routes and RTTs name sites and clients)."""
    return None if _NAME.match(name) else "is not a name (1-200 of A-Z a-z 0-9 . _ : @ -)"


def apply_model(row: ModelRow, body: ModelIn, now: float) -> None:
    row.name = body.name
    row.num_blocks = body.num_blocks
    row.block_memory_gb = body.block_memory_gb
    row.kv_bytes_per_token_per_block = body.kv_bytes_per_token_per_block
    row.max_input_tokens = body.max_input_tokens
    row.max_output_tokens = body.max_output_tokens
    row.hidden_size = body.hidden_size
    row.petals_cache_tokens = body.petals_cache_tokens
    row.per_token_ms = body.overheads.per_token_ms
    row.prefill_fixed_ms = body.overheads.prefill_fixed_ms
    row.prefill_per_token_ms = body.overheads.prefill_per_token_ms
    row.per_request_ms = body.overheads.per_request_ms
    row.concurrency = body.concurrency
    row.rate_per_s = body.rate_per_s
    row.updated_at = now


def model_out(row: ModelRow) -> ModelOut:
    return ModelOut(
        name=row.name,
        num_blocks=row.num_blocks,
        block_memory_gb=row.block_memory_gb,
        kv_bytes_per_token_per_block=row.kv_bytes_per_token_per_block,
        max_input_tokens=row.max_input_tokens,
        max_output_tokens=row.max_output_tokens,
        hidden_size=row.hidden_size,
        petals_cache_tokens=row.petals_cache_tokens,
        overheads=Overheads(
            per_token_ms=row.per_token_ms,
            prefill_fixed_ms=row.prefill_fixed_ms,
            prefill_per_token_ms=row.prefill_per_token_ms,
            per_request_ms=row.per_request_ms,
        ),
        concurrency=row.concurrency,
        rate_per_s=row.rate_per_s,
        updated_at=row.updated_at,
    )


def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "._:@-" else "-" for ch in name)
    return cleaned[:200] or "model"
