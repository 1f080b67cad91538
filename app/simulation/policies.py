"""The policies the simulator compares: placement + cache budget + online routing.

=============== ======================================= ================= =====================
name            placement                               cache per server  routing
=============== ======================================= ================= =====================
petals          PETALS 2.2 (its counts, join order)     PETALS' fixed     PETALS (fail, ban,
                                                        reservation       back off, retry)
petals-order    PETALS, servers join in CG's order      PETALS' fixed     PETALS
petals-number   PETALS windows with CG's block counts   PETALS' fixed     PETALS
petals-rr       PETALS 2.2                              PETALS' fixed     WS-RR
cg-sp           CG-BP for |R| from the arrival rate     memory - weights  shortest path, waits
cg-wsrr         CG-BP for |R| from the arrival rate     memory - weights  WS-RR
milp-wsrr       MILP-BPRR (time limit), CG hint         memory - weights  WS-RR
=============== ======================================= ================= =====================

Waiting (cg-sp and the WS-RR policies): a request whose route lacks cache books the route at
the earliest instant from which all its slots are free (the engine's ``earliest_start``) and
starts then; nothing else can take those slots meanwhile. PETALS does not wait: the request
fails, the servers that lacked cache are banned for that client for 15 s x 2^f (f: earlier
failures of that server for that client, reset by a success), and the client retries after
min(2^(n-1), 60) s, n being the request's failures so far (PETALS' client backoff).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from app.allocation import cg
from app.allocation.instance import FloatArray, Instance, IntArray, Placement
from app.allocation.perf import Hop
from app.allocation.routing import Route, RouteIndex
from app.allocation.scenario import Scenario
from app.simulation.engine import Decision, Retry, SimulationError, Simulator, Start

POLICIES = (
    "petals",
    "cg-sp",
    "cg-wsrr",
    "milp-wsrr",
    "petals-order",
    "petals-number",
    "petals-rr",
)

BAN_BASE_MS = 15_000.0
BACKOFF_CAP_S = 60.0


def retry_delay_ms(failures: int) -> float:
    """PETALS' client backoff after the request's ``failures``-th failure: min(2^(n-1), 60) s."""
    if failures < 1:
        raise ValueError("failures: must be at least 1")
    return min(2.0 ** (failures - 1), BACKOFF_CAP_S) * 1000.0


def ban_ms(previous_failures: int) -> float:
    """How long a server is banned after a failure: 15 s x 2^f."""
    return BAN_BASE_MS * 2.0**previous_failures


class Router(Protocol):
    def route(
        self, client: int, free_slots: IntArray | None = None, banned: Sequence[int] = ()
    ) -> Route | None: ...


def _lacking(sim: Simulator, hops: Sequence[Hop]) -> list[int]:
    return [server for server, start, end in hops if sim.free(server) < end - start]


class FixedRoutePolicy:
    """Every request of a client takes the client's shortest path; it waits for its slots."""

    def __init__(
        self, name: str, placement: Placement, capacity: Sequence[int], routes: Sequence[Route]
    ) -> None:
        self.name = name
        self.placement = placement
        self.capacity = list(capacity)
        self.routes = [route.hops for route in routes]

    def decide(self, sim: Simulator, request: int, now: float) -> Decision:
        hops = self.routes[sim.client_of(request)]
        at = sim.earliest_start(hops, now)
        if not math.isfinite(at):
            raise SimulationError(f"{self.name}: the route of request {request} can never fit")
        return Start(hops, at)


class WsrrPolicy:
    """WS-RR: shortest path where entering server j for k blocks costs its waiting time
    (until k slots free up, its bookings scanned in completion order) plus the prefill and
    l_max - 1 decode terms: t^I_cj + k tau^I_j + (l_max - 1)(t_cj + k tau_j), as WS_RR.m.

    Each client's zero-wait route is cached: while all its servers have the slots, no route
    is cheaper (waiting only adds cost), so the dynamic programme runs only when one lacks.
    """

    def __init__(
        self, name: str, instance: Instance, placement: Placement, capacity: Sequence[int]
    ) -> None:
        self.name = name
        self.placement = placement
        self.capacity = list(capacity)
        self.index = RouteIndex(placement, instance.num_blocks)
        later = instance.output_tokens - 1
        self.hop_fixed: FloatArray = instance.prefill_hop_ms() + later * instance.token_hop_ms
        self.per_block: FloatArray = instance.prefill_ms() + later * instance.decode_ms
        self.cached: list[tuple[Hop, ...]] = []
        for client in range(instance.num_clients):
            route = self.index.shortest(self.hop_fixed[client], self.per_block)
            if route is None:
                raise SimulationError(f"{name}: no chain of servers covers every block")
            self.cached.append(route.hops)
        self.recomputed = 0

    def decide(self, sim: Simulator, request: int, now: float) -> Decision:
        client = sim.client_of(request)
        hops = self.cached[client]
        if not _lacking(sim, hops):
            return Start(hops, now)
        self.recomputed += 1
        route = self.index.shortest(self.hop_fixed[client], self.per_block, self._waits(sim, now))
        if route is None:
            raise SimulationError(f"{self.name}: request {request} can never fit anywhere")
        return Start(route.hops, sim.earliest_start(route.hops, now))

    def _waits(self, sim: Simulator, now: float) -> Callable[[IntArray, IntArray], FloatArray]:
        free = np.array(self.capacity, dtype=np.int64) - np.array(sim.committed, dtype=np.int64)

        def extra(servers: IntArray, blocks: IntArray) -> FloatArray:
            cost = np.zeros(servers.size)
            short = np.flatnonzero(free[servers] < blocks)
            memo: dict[tuple[int, int], float] = {}
            for i in short.tolist():
                key = (int(servers[i]), int(blocks[i]))
                value = memo.get(key)
                if value is None:
                    value = sim.wait_ms(key[0], key[1], now)
                    memo[key] = value
                cost[i] = value
            return cost

        return extra


class PetalsPolicy:
    """PETALS' client: its router; a request whose servers lack cache fails and retries."""

    def __init__(
        self,
        name: str,
        num_clients: int,
        placement: Placement,
        capacity: Sequence[int],
        router: Router,
    ) -> None:
        self.name = name
        self.placement = placement
        self.capacity = list(capacity)
        self.router = router
        self._capacity_array = np.array(self.capacity, dtype=np.int64)
        self.banned_until: list[dict[int, float]] = [{} for _ in range(num_clients)]
        self.fail_count: list[dict[int, int]] = [{} for _ in range(num_clients)]
        self.failures: dict[int, int] = {}
        # The route with every server free and none banned: valid while that stays true.
        self.cached: list[tuple[Hop, ...] | None] = []
        for client in range(num_clients):
            route = router.route(client, self._capacity_array, ())
            self.cached.append(None if route is None else route.hops)
        self.bans = 0

    def decide(self, sim: Simulator, request: int, now: float) -> Decision:
        client = sim.client_of(request)
        bans = self.banned_until[client]
        banned = [j for j, until in bans.items() if until > now]
        hops = self.cached[client]
        if hops is None or banned or _lacking_span(sim, hops, self.placement):
            free = self._capacity_array - np.array(sim.committed, dtype=np.int64)
            route = self.router.route(client, free, sorted(banned))
            hops = None if route is None else route.hops
        if hops is None:
            return self._fail(request, now)
        lacking = _lacking(sim, hops)
        if lacking:
            counts = self.fail_count[client]
            for server in lacking:
                previous = counts.get(server, 0)
                bans[server] = now + ban_ms(previous)
                counts[server] = previous + 1
                self.bans += 1
            return self._fail(request, now)
        counts = self.fail_count[client]
        for server, _, _ in hops:
            counts.pop(server, None)
        return Start(hops, now)

    def _fail(self, request: int, now: float) -> Retry:
        failures = self.failures.get(request, 0) + 1
        self.failures[request] = failures
        return Retry(now + retry_delay_ms(failures))


def _lacking_span(sim: Simulator, hops: Sequence[Hop], placement: Placement) -> bool:
    """Would PETALS' router penalise a server of this route (free cache < its span)?"""
    for server, _, _ in hops:
        span = placement[server]
        if span is not None and sim.free(server) < span.length:
            return True
    return False


# --- building a policy for a scenario ----------------------------------------------------


@dataclass
class BuiltPolicy:
    policy: FixedRoutePolicy | WsrrPolicy | PetalsPolicy
    placement_seconds: float
    concurrency: int | None
    details: dict[str, object] = field(default_factory=dict)


def cg_capacity(instance: Instance, placement: Placement) -> list[int]:
    """Cache slots when a server gives all memory left after its weights to caches."""
    return [
        0 if span is None else instance.cache_slots(j, span.length)
        for j, span in enumerate(placement)
    ]


def build_policy(
    name: str,
    scenario: Scenario,
    instance: Instance,
    rate_per_s: float,
    milp_time_limit_s: float = 10.0,
) -> BuiltPolicy:
    """Place blocks for ``name`` and return the online policy, timing the placement."""
    from app.allocation import petals

    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    began = time.perf_counter()
    if name in ("cg-sp", "cg-wsrr", "milp-wsrr"):
        concurrency = cg.design_concurrency(instance, rate_per_s)
        if name == "milp-wsrr":
            from app.allocation import milp

            counts = scenario.client_request_counts(concurrency)
            solution = milp.solve_milp(instance, concurrency, counts, milp_time_limit_s)
            placement = solution.placement
            details: dict[str, object] = {"milp_status": solution.status}
        else:
            placement = cg.place(instance, concurrency).placement
            details = {}
        capacity = cg_capacity(instance, placement)
        seconds = time.perf_counter() - began
        policy: FixedRoutePolicy | WsrrPolicy | PetalsPolicy
        if name == "cg-sp":
            policy = FixedRoutePolicy(
                name, placement, capacity, cg.shortest_routes(instance, placement)
            )
        else:
            policy = WsrrPolicy(name, instance, placement, capacity)
        return BuiltPolicy(policy, seconds, concurrency, details)

    order: list[int] | None = None
    counts_override: list[int] | None = None
    design: int | None = None
    if name in ("petals-order", "petals-number"):
        design = cg.design_concurrency(instance, rate_per_s)
        cg_placement = cg.place(instance, design)
        if name == "petals-order":
            placed = list(cg_placement.order)
            order = placed + [j for j in range(instance.num_servers) if j not in set(placed)]
        else:
            counts_override = list(cg_placement.block_counts)
    result = petals.petals_place(scenario, instance, order=order, block_counts=counts_override)
    seconds = time.perf_counter() - began
    if name == "petals-rr":
        policy = WsrrPolicy(name, instance, result.placement, result.cache_slots)
    else:
        router = petals.PetalsRouter(scenario, instance, result.placement)
        policy = PetalsPolicy(
            name, instance.num_clients, result.placement, result.cache_slots, router
        )
    return BuiltPolicy(policy, seconds, design, {"block_counts": list(result.block_counts)})
