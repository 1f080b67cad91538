"""The policies the simulator compares: placement + cache budget + online routing.

=============== ======================================= ================= =====================
name            placement                               cache per server  routing
=============== ======================================= ================= =====================
auto            the best candidate for the workload     memory - weights  JFFC over GCA chains,
                (app.allocation.auto)                                     central FIFO queue
chains          GBP-CR at the best c, GCA               memory - weights  JFFC, central queue
petals          PETALS 2.2 (its counts, join order)     PETALS' fixed     PETALS (fail, ban,
                                                        budget            back off, retry)
petals-order    PETALS, servers join in CG's order      PETALS' fixed     PETALS
petals-number   PETALS windows with CG's block counts   PETALS' fixed     PETALS
petals-rr       PETALS 2.2                              PETALS' fixed     WS-RR
cg-sp           CG-BP for |R| from the arrival rate     memory - weights  shortest path, waits
cg-wsrr         CG-BP for |R| from the arrival rate     memory - weights  WS-RR
cg-wsrr-profile CG-BP sized for the profile's typical   memory - weights  WS-RR priced at each
                request (|R| and s_c from its means)                      request's own lengths
milp-wsrr       MILP-BPRR (time limit), CG hint         memory - weights  WS-RR
=============== ======================================= ================= =====================

Cache is counted in token-block units (the engine's docstring): every request reserves its own
input + output tokens on every block it runs. "memory - weights": all memory left after the
span's weights (instance.cache_tokens); PETALS' fixed budget: petals_cache_tokens x m units,
inside which each session reserves its own tokens, as PETALS 2.2 allocates per session. The
paper's baselines (cg-*, milp-wsrr, petals*) keep their papers' placement and routing rules:
CG-BP sizes for the caps and WS-RR costs use l_max, as WS_RR.m does.

Waiting (cg-sp and the WS-RR policies): a request whose route lacks cache books the route at
the earliest instant from which all its units are free (the engine's ``earliest_start``) and
starts then; nothing else can take those units meanwhile. Chain policies wait in the engine's
central FIFO queue and start on the fastest free chain as soon as one frees (JFFC). PETALS
does not wait: the request fails, the servers that lacked cache are banned for that client
for 15 s x 2^f (f: earlier failures of that server for that client, reset by a success), and
the client retries after min(2^(n-1), 60) s, n being the request's failures so far (PETALS'
client backoff).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from app.allocation import cg, dispatch
from app.allocation.chains import Chain
from app.allocation.instance import Instance, IntArray, Placement
from app.allocation.perf import Hop
from app.allocation.routing import Route, RouteIndex
from app.allocation.scenario import Scenario
from app.allocation.workload import WorkloadProfile
from app.simulation.engine import Decision, Retry, SimulationError, Simulator, Start, Wait

POLICIES = (
    "auto",
    "chains",
    "cg-wsrr-profile",
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
    return min(2.0 ** min(failures - 1, 64), BACKOFF_CAP_S) * 1000.0


def ban_ms(previous_failures: int) -> float:
    """How long a server is banned after a failure: 15 s x 2^f."""
    return BAN_BASE_MS * 2.0**previous_failures


class Router(Protocol):
    def route(
        self, client: int, free_slots: IntArray | None = None, banned: Sequence[int] = ()
    ) -> Route | None: ...


def _lacking(sim: Simulator, hops: Sequence[Hop], tokens: int) -> list[int]:
    return [s for s, units in dispatch.units_needed(hops, tokens).items() if sim.free(s) < units]


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
        at = sim.earliest_start(hops, sim.tokens_of(request), now)
        if not math.isfinite(at):
            raise SimulationError(f"{self.name}: the route of request {request} can never fit")
        return Start(hops, at)


class WsrrPolicy:
    """WS-RR (app.allocation.dispatch.wsrr_route): shortest path where entering server j for
    k blocks costs its waiting time (until k x T units free up, its bookings scanned in
    completion order) plus t^I_cj + k tau^I_j + (l - 1)(t_cj + k tau_j). The paper's policies
    price every request at the caps (l_in, l_max), as WS_RR.m does; ``own_lengths`` prices
    each request at its own lengths (as the coordinator's route view does). Either way each
    request holds only its own tokens.
    """

    def __init__(
        self,
        name: str,
        instance: Instance,
        placement: Placement,
        capacity: Sequence[int],
        own_lengths: bool = False,
    ) -> None:
        self.name = name
        self.placement = placement
        self.capacity = list(capacity)
        self.instance = instance
        self.own_lengths = own_lengths
        self.index = RouteIndex(placement, instance.num_blocks)
        self.costs = [
            dispatch.wsrr_costs(instance, c, instance.input_tokens, instance.output_tokens)
            for c in range(instance.num_clients)
        ]
        # Each client's zero-wait route: while all its servers have room, none is cheaper.
        self.cached: list[tuple[Hop, ...]] = []
        for hop_fixed, per_block in self.costs:
            route = self.index.shortest(hop_fixed, per_block)
            if route is None:
                raise SimulationError(f"{name}: no chain of servers covers every block")
            self.cached.append(route.hops)
        self.recomputed = 0

    def decide(self, sim: Simulator, request: int, now: float) -> Decision:
        client = sim.client_of(request)
        tokens = sim.tokens_of(request)
        if self.own_lengths:
            hop_fixed, per_block = dispatch.wsrr_costs(
                self.instance, client, *sim.lengths_of(request)
            )
        else:
            hops = self.cached[client]
            if not _lacking(sim, hops, tokens):
                return Start(hops, now)
            hop_fixed, per_block = self.costs[client]
        self.recomputed += 1
        choice = dispatch.wsrr_route(
            self.index,
            hop_fixed,
            per_block,
            tokens,
            sim.capacity,
            sim.committed,
            sim.bookings,
            now,
        )
        if choice is None:
            raise SimulationError(f"{self.name}: request {request} can never fit anywhere")
        return Start(choice.hops, choice.start_at)


class ChainsPolicy:
    """JFFC over fixed chains (dispatch.jffc_pick) with the engine's central FIFO queue."""

    def __init__(
        self,
        name: str,
        placement: Placement,
        capacity: Sequence[int],
        chains: Sequence[Chain],
        client_aware: bool = False,
        num_clients: int = 1,
    ) -> None:
        if not chains:
            raise SimulationError(f"{name}: no chain covers every block")
        self.name = name
        self.placement = placement
        self.capacity = list(capacity)
        self.chains = list(chains)
        # Client-aware JFFC: each client tries its own fastest chains first.
        self.orders: list[list[int]] | None = None
        if client_aware and num_clients > 1 and self.chains[0].client_ms:
            self.orders = [dispatch.client_order(self.chains, c) for c in range(num_clients)]
        self.in_service = [0] * len(self.chains)
        self.chain_of: dict[int, int] = {}
        # The most tokens any chain could ever take (every hop's whole capacity).
        self._largest = max(
            min(self.capacity[h.server] // h.blocks for h in chain.hops) for chain in self.chains
        )

    def decide(self, sim: Simulator, request: int, now: float) -> Decision:
        tokens = sim.tokens_of(request)
        if tokens > self._largest:
            raise SimulationError(
                f"{self.name}: request {request} needs {tokens} tokens per block, more than "
                f"any chain's servers hold ({self._largest})"
            )
        order = None if self.orders is None else self.orders[sim.client_of(request)]
        k = dispatch.jffc_pick(self.chains, self.in_service, sim.free_units, tokens, order=order)
        if k is None:
            return Wait()
        self.in_service[k] += 1
        self.chain_of[request] = k
        return Start(self.chains[k].hops, now)

    def finished(self, request: int) -> None:
        self.in_service[self.chain_of.pop(request)] -= 1


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
        tokens = sim.tokens_of(request)
        if hops is None or banned or _lacking_span(sim, hops, self.placement, tokens):
            free = self._capacity_array - np.array(sim.committed, dtype=np.int64)
            # PETALS' router judges free cache in sessions of this request's size.
            route = self.router.route(client, free // tokens, sorted(banned))
            hops = None if route is None else route.hops
        if hops is None:
            return self._fail(request, now)
        lacking = _lacking(sim, hops, tokens)
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


def _lacking_span(sim: Simulator, hops: Sequence[Hop], placement: Placement, tokens: int) -> bool:
    """Would PETALS' router penalise a server of this route (free cache < T x its span)?"""
    for server, _, _ in hops:
        span = placement[server]
        if span is not None and sim.free(server) < span.length * tokens:
            return True
    return False


# --- building a policy for a scenario ----------------------------------------------------


@dataclass
class BuiltPolicy:
    policy: FixedRoutePolicy | WsrrPolicy | PetalsPolicy | ChainsPolicy
    placement_seconds: float
    concurrency: int | None
    details: dict[str, object] = field(default_factory=dict)


def cg_capacity(instance: Instance, placement: Placement) -> list[int]:
    """Cache units when a server gives all memory left after its weights to caches."""
    return [
        0 if span is None else instance.cache_tokens(j, span.length)
        for j, span in enumerate(placement)
    ]


def build_policy(
    name: str,
    scenario: Scenario,
    instance: Instance,
    rate_per_s: float,
    milp_time_limit_s: float = 10.0,
    profile: WorkloadProfile | None = None,
) -> BuiltPolicy:
    """Place blocks for ``name`` and return the online policy, timing the placement.

    ``profile``: the workload the chain policies plan for (default: the scenario's lengths at
    ``rate_per_s``); the paper's baselines size from the arrival rate and the caps.
    """
    from app.allocation import petals

    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r} (choose from {', '.join(POLICIES)})")
    began = time.perf_counter()
    if name in ("auto", "chains"):
        return _build_chain_policy(name, scenario, instance, rate_per_s, profile, began)
    if name == "cg-wsrr-profile":
        return _build_profile_wsrr(name, scenario, instance, rate_per_s, profile, began)
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
    units = petals.petals_cache_units(scenario, result.block_counts)
    if name == "petals-rr":
        policy = WsrrPolicy(name, instance, result.placement, units)
    else:
        router = petals.PetalsRouter(scenario, instance, result.placement)
        policy = PetalsPolicy(name, instance.num_clients, result.placement, units, router)
    return BuiltPolicy(policy, seconds, design, {"block_counts": list(result.block_counts)})


def _build_profile_wsrr(
    name: str,
    scenario: Scenario,
    instance: Instance,
    rate_per_s: float,
    profile: WorkloadProfile | None,
    began: float,
) -> BuiltPolicy:
    """The paper's CG-BP + WS-RR with the workload's typical request instead of the caps
    (../shared/CHAINS.md: |R| from T1 of the mean request, route costs from each request's
    own lengths): an ablation of what the caps cost the paper's policy."""
    from app.allocation.auto import profile_concurrency, profile_instance
    from app.allocation.chains import job_costs

    if profile is None:
        profile = WorkloadProfile.from_scenario(scenario, rate_per_s)
    costs = job_costs(instance, profile)
    single = cg.place(profile_instance(instance, profile), 1).placement
    typical_ms = RouteIndex(single, instance.num_blocks).shortest(costs.tau_c, costs.tau_p)
    if typical_ms is None:  # pragma: no cover - CG-BP covers every block
        raise SimulationError(f"{name}: no chain covers every block")
    concurrency = profile_concurrency(instance, profile, typical_ms.cost + costs.per_request_ms)
    placement = cg.place(profile_instance(instance, profile), concurrency).placement
    seconds = time.perf_counter() - began
    policy = WsrrPolicy(
        name, instance, placement, cg_capacity(instance, placement), own_lengths=True
    )
    return BuiltPolicy(policy, seconds, concurrency, {})


def _build_chain_policy(
    name: str,
    scenario: Scenario,
    instance: Instance,
    rate_per_s: float,
    profile: WorkloadProfile | None,
    began: float,
) -> BuiltPolicy:
    from app.allocation.auto import plan_auto
    from app.allocation.chain_search import plan_chains

    if profile is None:
        profile = WorkloadProfile.from_scenario(scenario, rate_per_s)
    details: dict[str, object] = {}
    if name == "chains":
        plan = plan_chains(instance, profile)
        placement, chains, bounds = plan.placement, plan.chains, plan.bounds
        details["c"] = plan.c
    else:
        auto = plan_auto(scenario, instance, profile)
        placement, chains, bounds = auto.best.placement, auto.best.chains, auto.best.bounds
        details["candidate"] = auto.best.name
        details["candidate_scores"] = {
            c.name: round(c.score_s, 6) if math.isfinite(c.score_s) else None
            for c in auto.candidates
        }
    seconds = time.perf_counter() - began
    details["lower_bound_ms"] = bounds.lower_s * 1000.0 if bounds.stable else None
    details["upper_bound_ms"] = bounds.upper_s * 1000.0 if bounds.stable else None
    policy = ChainsPolicy(
        name,
        placement,
        cg_capacity(instance, placement),
        chains,
        client_aware=name == "auto",
        num_clients=instance.num_clients,
    )
    return BuiltPolicy(policy, seconds, None, details)
