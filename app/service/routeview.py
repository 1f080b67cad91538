"""The in-memory index that answers route queries without touching the database.

Built from the published placement, the servers' leases and loaded spans, the RTTs and the
live reservations; rebuilt when any of them changes (and at least every ``refresh_s`` so
that other coordinator processes' writes show up).

Dispatch is app.allocation.dispatch, the one implementation the simulator runs too:
- placements published with ``dispatcher`` "jffc" and their chains: JFFC, the fastest chain
  with a free job slot and room for this request's tokens on every hop (else none: the
  request waits in the central queue);
- otherwise WS-RR: a shortest path over block boundaries whose costs come from the request's
  own lengths, plus each server's waiting time until the request's units are free.

Memory is counted in cache token-block units (one token's kv cache on one block): a request
of T = input + output tokens running k blocks on a server holds k x T units there, and a
server has ``capacity_units`` of them (app.allocation.instance.cache_token_capacity).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.allocation import dispatch
from app.allocation.chains import Chain
from app.allocation.instance import Instance, Span, cache_token_capacity
from app.allocation.perf import Hop, RequestTiming, request_timing
from app.allocation.routing import RouteIndex
from app.allocation.scenario import cache_gb_per_block
from app.service.state import LiveState
from app.store.models import ModelRow, ServerRow

MAX_SLOTS = 2**31 - 1
# The reservation columns are 32-bit: a server's units are capped there (2.1e9 token-blocks,
# e.g. 80 GB of 37-byte kv entries; real models have kilobytes per token and block).
MAX_UNITS = 2**31 - 1


@dataclass(frozen=True)
class RoutePlan:
    hops: tuple[Hop, ...]
    timing: RequestTiming
    wait_ms: float
    client: int
    chain: int | None = None  # JFFC: the chain's index in the placement's chain plan


@dataclass
class ServerEntry:
    id: str
    address: str
    span: Span
    lease_expires_at: float
    peer_id: str | None = None
    multiaddrs: tuple[str, ...] = ()


def multiaddrs_of(row: ServerRow) -> list[str]:
    """The server's multiaddrs (stored as a JSON list)."""
    if not row.multiaddrs:
        return []
    value = json.loads(row.multiaddrs)
    return [str(v) for v in value] if isinstance(value, list) else []


def model_cache_gb(model: ModelRow) -> float:
    """s_c of the served model (one request at the caps on one block, GB)."""
    return cache_gb_per_block(
        model.kv_bytes_per_token_per_block, model.max_input_tokens, model.max_output_tokens
    )


def cache_slots(memory_gb: float, block_gb: float, cache_gb: float, blocks: int) -> int:
    """Cache slots (requests at the caps) left after the weights, capped to 32 bits."""
    free = memory_gb - block_gb * blocks
    if cache_gb <= 0 or free <= 0:
        return 0
    return min(MAX_SLOTS, max(0, math.floor(free / cache_gb + 1e-9)))


def capacity_units(model: ModelRow | None, server: ServerRow) -> int:
    """Cache token-block units the server's loaded span leaves free (what bookings take)."""
    if model is None or server.loaded_start is None or server.loaded_end is None:
        return 0
    blocks = server.loaded_end - server.loaded_start
    units = cache_token_capacity(
        server.memory_gb, model.block_memory_gb, model.kv_bytes_per_token_per_block, blocks
    )
    return min(MAX_UNITS, units)


class RouteView:
    def __init__(self, state: LiveState, default_rtt_ms: float, built_at: float) -> None:
        self.built_at = built_at
        self.generation = state.generation
        self.spans = state.assigned_spans()
        self.model = state.model
        self.sites = list(state.sites)
        self.site_index = {site: i for i, site in enumerate(self.sites)}
        self.entries: list[ServerEntry] = []
        # What a quiet heartbeat of each registered server must repeat to renew its lease
        # without a database read: token hash, boot epoch, state, loaded span.
        self.heartbeat_keys: dict[str, tuple[str, int, str, int | None, int | None]] = {
            row.id: (row.token_hash, row.boot_epoch, row.state, row.loaded_start, row.loaded_end)
            for row in state.servers
        }
        rows = []
        # Until the re-plan after a model change publishes, the current placement is for the
        # old model: its spans beyond the new model's blocks serve nothing.
        num_blocks = state.model.num_blocks if state.model is not None else None
        for row in state.servers:
            span = self.spans.get(row.id)
            if (
                span is None
                or row.state != "online"
                or row.loaded_start != span.start
                or row.loaded_end != span.end
                or (num_blocks is not None and span.end > num_blocks)
            ):
                continue
            rows.append(row)
            self.entries.append(
                ServerEntry(
                    row.id,
                    row.address,
                    span,
                    row.lease_expires_at,
                    row.peer_id,
                    tuple(multiaddrs_of(row)),
                )
            )
        self.position = {entry.id: i for i, entry in enumerate(self.entries)}
        self.lease = np.array([e.lease_expires_at for e in self.entries], dtype=float)
        self.capacity = np.array([capacity_units(state.model, r) for r in rows], dtype=np.int64)
        self.reserved = np.array([r.reserved_slots for r in rows], dtype=np.int64)
        self.reservations: list[list[tuple[float, int]]] = [
            sorted(state.reservations.get(r.id, [])) for r in rows
        ]
        # The routable chains, and each one's index in the published plan (what session
        # records keep: stable across rebuilds of one generation).
        self.chain_ids, self.chains = _chains(state, self.position, self.sites)
        self.chain_position = {k: i for i, k in enumerate(self.chain_ids)}
        self._orders: dict[int, list[int]] = {}
        # Jobs in service per chain (JFFC's slots): filled by the sessions service from the
        # live sessions of this generation, then kept up to date by its bookings/releases.
        self.chain_in_service: list[int] | None = None if self.chains else []
        self.instance: Instance | None = None
        self.index: RouteIndex | None = None
        model = state.model
        if model is None or not rows or not self.sites:
            return
        rtt = np.array(
            [
                [state.client_server_rtt(site, r, default_rtt_ms) for r in rows]
                for site in self.sites
            ],
            dtype=float,
        )
        self.instance = Instance(
            num_blocks=model.num_blocks,
            block_gb=model.block_memory_gb,
            cache_gb=model_cache_gb(model),
            memory_gb=np.array([r.memory_gb for r in rows], dtype=float),
            decode_ms=np.array([r.decode_ms_per_block for r in rows], dtype=float),
            prefill_fixed_ms=np.array([r.prefill_fixed_ms for r in rows], dtype=float),
            prefill_per_token_ms=np.array([r.prefill_per_token_ms for r in rows], dtype=float),
            rtt_ms=rtt,
            per_token_overhead_ms=model.per_token_ms,
            prefill_fixed_overhead_ms=model.prefill_fixed_ms,
            prefill_per_token_overhead_ms=model.prefill_per_token_ms,
            per_request_ms=model.per_request_ms,
            input_tokens=model.max_input_tokens,
            output_tokens=model.max_output_tokens,
            client_shares=np.full(len(self.sites), 1.0 / len(self.sites)),
            server_ids=tuple(r.id for r in rows),
            client_ids=tuple(self.sites),
        )
        self.index = RouteIndex(tuple(e.span for e in self.entries), model.num_blocks)

    # --- queries ---------------------------------------------------------------------------

    @property
    def dispatcher(self) -> str:
        return "jffc" if self.chains else "wsrr"

    def live_count(self, now: float) -> int:
        return int((self.lease > now).sum())

    def coverage(self, now: float) -> float:
        """Fraction of blocks hosted by at least one usable server with a live lease."""
        if self.model is None or self.model.num_blocks == 0:
            return 0.0
        covered = np.zeros(self.model.num_blocks, dtype=bool)
        for entry, expires in zip(self.entries, self.lease, strict=True):
            if expires > now and entry.span.end <= self.model.num_blocks:
                covered[entry.span.start : entry.span.end] = True
        return float(covered.mean())

    def query(
        self, client_site: str, input_tokens: int, output_tokens: int, now: float
    ) -> RoutePlan | None:
        """The dispatcher's choice for one request: wait_ms 0 when it can start now; > 0 (an
        estimate for JFFC, WS-RR's own waiting time) when it must wait; None when no chain
        of live servers could ever serve it."""
        instance, index = self.instance, self.index
        if instance is None or index is None:
            return None
        client = self.site_index[client_site]
        tokens = dispatch.tokens_of(input_tokens, output_tokens)
        alive = (self.lease > now).tolist()
        if self.chains:
            return self._jffc(instance, client, tokens, input_tokens, output_tokens, alive, now)
        hop_fixed, per_block = dispatch.wsrr_costs(instance, client, input_tokens, output_tokens)
        choice = dispatch.wsrr_route(
            index,
            hop_fixed,
            per_block,
            tokens,
            self.capacity,
            self.reserved,
            self.reservations,
            now,
            alive=alive,
            ms_per_time_unit=1000.0,
        )
        if choice is None:
            return None
        timing = request_timing(instance, client, choice.hops, input_tokens, output_tokens)
        return RoutePlan(choice.hops, timing, choice.wait_ms, client)

    def _jffc(
        self,
        instance: Instance,
        client: int,
        tokens: int,
        input_tokens: int,
        output_tokens: int,
        alive: list[bool],
        now: float,
    ) -> RoutePlan | None:
        in_service = self.chain_in_service or [0] * len(self.chains)
        free = self.capacity - self.reserved
        order = self._order(client)
        picked = dispatch.jffc_pick(self.chains, in_service, free, tokens, alive, order)
        if picked is not None:
            hops = self.chains[picked].hops
            timing = request_timing(instance, client, hops, input_tokens, output_tokens)
            return RoutePlan(hops, timing, 0.0, client, self.chain_ids[picked])
        # No free chain: the fastest one that could ever take this request (live hops, the
        # capacity for its tokens), with the time its first session ends, for Retry-After.
        for k in order:
            chain = self.chains[k]
            needed = dispatch.units_needed(chain.hops, tokens)
            if all(alive[s] and self.capacity[s] >= units for s, units in needed.items()):
                timing = request_timing(instance, client, chain.hops, input_tokens, output_tokens)
                wait_ms = (self._first_release(chain, now) - now) * 1000.0
                # Must wait, however little; inf: no session to end (the plan's slots).
                wait_ms = max(wait_ms, 1.0) if math.isfinite(wait_ms) else 1000.0
                return RoutePlan(chain.hops, timing, wait_ms, client, self.chain_ids[k])
        return None

    def _order(self, client: int) -> list[int]:
        """Chains fastest first for the client: by their per-client times when the plan
        carries them (as the simulator orders them), else the plan's order (fastest on the
        clients' mean). Computed once per client per view."""
        order = self._orders.get(client)
        if order is None:
            order = dispatch.client_order(self.chains, client)
            self._orders[client] = order
        return order

    def _first_release(self, chain: Chain, now: float) -> float:
        releases = [items[0][0] for s, _, _ in chain.hops if (items := self.reservations[s])]
        return max(now, min(releases)) if releases else math.inf

    # --- local bookkeeping between rebuilds -----------------------------------------------

    def add_reservation(self, server_id: str, units: int, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is None:
            return
        self.reserved[position] += units
        bisect.insort(self.reservations[position], (expires_at, units))

    def remove_reservation(self, server_id: str, units: int, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is None:
            return
        self.reserved[position] = max(0, int(self.reserved[position]) - units)
        items = self.reservations[position]
        with contextlib.suppress(ValueError):
            items.remove((expires_at, units))

    def chain_started(self, chain: int | None) -> None:
        """A session booked on the plan's chain ``chain`` (its published index)."""
        position = self.chain_position.get(chain) if chain is not None else None
        if position is not None and self.chain_in_service is not None:
            self.chain_in_service[position] += 1

    def chain_ended(self, chain: int | None) -> None:
        position = self.chain_position.get(chain) if chain is not None else None
        if position is not None and self.chain_in_service is not None:
            self.chain_in_service[position] = max(0, self.chain_in_service[position] - 1)

    def renew(self, server_id: str, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is not None:
            self.lease[position] = expires_at

    def earliest_expiry(self) -> float:
        firsts = [items[0][0] for items in self.reservations if items]
        return min(firsts) if firsts else math.inf


def _chains(
    state: LiveState, position: dict[str, int], sites: list[str]
) -> tuple[list[int], list[Chain]]:
    """The published plan's chains (fastest first, as published) in view positions, with
    their indices in the plan, when its dispatcher is JFFC. A chain through a server the view
    cannot route (not online with its span loaded) is left out: JFFC uses the rest, and none
    left means WS-RR until the next plan. Each chain's per-client times are the plan's
    per-site ones in the view's site order (none when a site is missing: then every client
    takes the chains in the plan's order)."""
    placement = state.placement
    if placement is None or getattr(placement, "dispatcher", None) != "jffc":
        return [], []
    raw: Any = getattr(placement, "chains", None)
    try:
        specs = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return [], []
    ids: list[int] = []
    chains: list[Chain] = []
    for k, spec in enumerate(specs or []):
        try:
            hops = tuple(Hop(position[str(s)], int(a), int(b)) for s, a, b in spec["hops"])
            by_site = spec.get("client_ms")
            per_client: tuple[float, ...] = ()
            if isinstance(by_site, dict) and all(site in by_site for site in sites):
                per_client = tuple(float(by_site[site]) for site in sites)
            chain = Chain(hops, int(spec["capacity"]), float(spec["service_ms"]), per_client)
        except (KeyError, TypeError, ValueError):
            continue  # a hop on a server not routable now
        ids.append(k)
        chains.append(chain)
    return ids, chains
