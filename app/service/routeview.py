"""The in-memory index that answers route queries without touching the database.

Built from the published placement, the servers' leases and loaded spans, the RTTs and the
live reservations; rebuilt when any of them changes (and at least every ``refresh_s`` so
that other coordinator processes' writes show up). A query is one dynamic programme over
block boundaries (app.allocation.routing.RouteIndex) with WS-RR's waiting time as extra cost.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
from dataclasses import dataclass

import numpy as np

from app.allocation.instance import FloatArray, Instance, IntArray, Span
from app.allocation.perf import Hop, RequestTiming, request_timing
from app.allocation.routing import RouteIndex
from app.allocation.scenario import cache_gb_per_block
from app.service.state import LiveState
from app.store.models import ModelRow, ServerRow

MAX_SLOTS = 2**31 - 1


@dataclass(frozen=True)
class RoutePlan:
    hops: tuple[Hop, ...]
    timing: RequestTiming
    wait_ms: float
    client: int


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
    """s_c of the served model (one request on one block, GB)."""
    return cache_gb_per_block(
        model.kv_bytes_per_token_per_block, model.max_input_tokens, model.max_output_tokens
    )


def cache_slots(memory_gb: float, block_gb: float, cache_gb: float, blocks: int) -> int:
    """Cache slots left after the weights, capped to fit a 32-bit column."""
    free = memory_gb - block_gb * blocks
    if cache_gb <= 0 or free <= 0:
        return 0
    return min(MAX_SLOTS, max(0, math.floor(free / cache_gb + 1e-9)))


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
        self.capacity = np.array([r.cache_slots for r in rows], dtype=np.int64)
        self.reserved = np.array([r.reserved_slots for r in rows], dtype=np.int64)
        self.reservations: list[list[tuple[float, int]]] = [
            sorted(state.reservations.get(r.id, [])) for r in rows
        ]
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

    def waiting_ms(self, server: int, blocks: int, now: float) -> float:
        """WS-RR: 0 if ``blocks`` cache slots are free on the server, else the time until
        enough of its sessions complete (scanned in completion order); inf if never."""
        free = int(self.capacity[server] - self.reserved[server])
        if blocks <= free:
            return 0.0
        if blocks > self.capacity[server]:
            return math.inf
        freed = 0
        for expires_at, slots in self.reservations[server]:
            freed += slots
            if free + freed >= blocks:
                return max(0.0, expires_at - now) * 1000.0
        return math.inf

    def query(
        self, client_site: str, input_tokens: int, output_tokens: int, now: float
    ) -> RoutePlan | None:
        instance, index = self.instance, self.index
        if instance is None or index is None:
            return None
        client = self.site_index[client_site]
        decode_steps = max(0, output_tokens - 1)
        hop_fixed = (
            instance.prefill_hop_ms(input_tokens)[client]
            + decode_steps * (instance.token_hop_ms[client])
        )
        hop_fixed = np.where(self.lease > now, hop_fixed, np.inf)
        per_block = instance.prefill_ms(input_tokens) + decode_steps * instance.decode_ms
        free = self.capacity - self.reserved

        def extra(servers: IntArray, blocks: IntArray) -> FloatArray:
            cost = np.zeros(servers.size, dtype=float)
            short = np.flatnonzero(blocks > free[servers])
            cache: dict[tuple[int, int], float] = {}
            for i in short:
                key = (int(servers[i]), int(blocks[i]))
                if key not in cache:
                    cache[key] = self.waiting_ms(key[0], key[1], now)
                cost[i] = cache[key]
            return cost

        route = index.shortest(hop_fixed, per_block, extra)
        if route is None:
            return None
        wait = max(self.waiting_ms(h.server, h.blocks, now) for h in route.hops)
        timing = request_timing(instance, client, route.hops, input_tokens, output_tokens)
        return RoutePlan(route.hops, timing, wait, client)

    # --- local bookkeeping between rebuilds -----------------------------------------------

    def add_reservation(self, server_id: str, slots: int, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is None:
            return
        self.reserved[position] += slots
        bisect.insort(self.reservations[position], (expires_at, slots))

    def remove_reservation(self, server_id: str, slots: int, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is None:
            return
        self.reserved[position] = max(0, int(self.reserved[position]) - slots)
        items = self.reservations[position]
        with contextlib.suppress(ValueError):
            items.remove((expires_at, slots))

    def renew(self, server_id: str, expires_at: float) -> None:
        position = self.position.get(server_id)
        if position is not None:
            self.lease[position] = expires_at

    def earliest_expiry(self) -> float:
        firsts = [items[0][0] for items in self.reservations if items]
        return min(firsts) if firsts else math.inf
