"""MILP-BPRR and the routing-only ILP against brute force, CG-BPRR and each other."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ortools.sat.python import cp_model

from app.allocation import cg, milp
from app.allocation.instance import Instance, Placement, Span
from app.allocation.perf import Hop, per_token_ms
from app.allocation.scenario import load_scenario
from app.allocation.solve import PlannedRoute, mean_per_token_ms, solve, solve_cg
from tests.scenarios import CLUSTERED, build, server

# --- brute force ----------------------------------------------------------------------------


def span_options(instance: Instance, j: int) -> list[Span | None]:
    """Every span whose weights fit on server j, and no span at all."""
    L = instance.num_blocks
    options: list[Span | None] = [None]
    for start in range(L):
        for end in range(start + 1, L + 1):
            if instance.block_gb * (end - start) <= instance.memory_gb[j] + 1e-9:
                options.append(Span(start, end))
    return options


def chains(placement: Placement, L: int) -> list[tuple[Hop, ...]]:
    """Every server chain that processes blocks 0..L-1 in order (Lemma 1), by DFS."""
    found: list[tuple[Hop, ...]] = []

    def extend(boundary: int, hops: tuple[Hop, ...]) -> None:
        if boundary == L:
            found.append(hops)
            return
        for j, span in enumerate(placement):
            if span is not None and span.start <= boundary < span.end:
                extend(span.end, (*hops, Hop(j, boundary, span.end)))

    extend(0, ())
    return found


def best_routing(instance: Instance, placement: Placement, counts: Sequence[int]) -> float | None:
    """Min mean per-token time over all assignments of requests to chains (None: none fit)."""
    paths = chains(placement, instance.num_blocks)
    if not paths:
        return None
    slots = [
        instance.cache_slots(j, span.length) if span is not None else 0
        for j, span in enumerate(placement)
    ]
    per_client = []
    for client, count in enumerate(counts):
        options = []
        for multiset in itertools.combinations_with_replacement(range(len(paths)), count):
            cost = sum(per_token_ms(instance, client, paths[p]) for p in multiset)
            load = [0] * instance.num_servers
            for p in multiset:
                for hop in paths[p]:
                    load[hop.server] += hop.blocks
            options.append((cost, load))
        per_client.append(options)
    best = math.inf
    for choice in itertools.product(*per_client):
        load = [sum(parts) for parts in zip(*(c[1] for c in choice), strict=True)]
        if all(used <= free for used, free in zip(load, slots, strict=True)):
            best = min(best, sum(c[0] for c in choice))
    return None if math.isinf(best) else best / sum(counts)


def brute_force(instance: Instance, counts: Sequence[int]) -> float | None:
    options = [span_options(instance, j) for j in range(instance.num_servers)]
    best = math.inf
    for placement in itertools.product(*options):
        value = best_routing(instance, placement, counts)
        if value is not None:
            best = min(best, value)
    return None if math.isinf(best) else best


# --- tiny instances -------------------------------------------------------------------------


def tiny_instance(seed: int) -> tuple[Instance, list[int]]:
    """2-3 servers, L <= 4, 1-2 clients, |R| <= 3; tight memory (s_c = 0.1 GB, s_m = 1 GB)."""
    rng = random.Random(seed)
    L = rng.randint(2, 4)
    sites = ["a", "b", "c"]
    rtt = [[rng.choice([1, 5, 10]) if i == j else 0.0 for j in range(3)] for i in range(3)]
    for i, j in itertools.combinations(range(3), 2):
        rtt[i][j] = rtt[j][i] = float(rng.choice([20, 40, 100]))
    servers = [
        server(
            f"s{j}",
            rng.choice(sites),
            memory=rng.choice([1.1, 1.2, 1.3, 2.1, 2.2, 2.4, 3.2, 3.5, 4.3]),
            decode=rng.choice([1.0, 2.5, 3.2197, 16.2488]),
        )
        for j in range(rng.randint(2, 3))
    ]
    clients = [
        {"id": f"c{c}", "site": rng.choice(sites), "share": 1.0} for c in range(rng.randint(1, 2))
    ]
    scenario = build(
        num_blocks=L,
        servers=servers,
        clients=clients,
        sites=sites,
        site_rtt=rtt,
        overheads={"per_token_ms": rng.choice([0, 100])},
    )
    total = rng.randint(len(clients), 3)
    return Instance.from_scenario(scenario), scenario.client_request_counts(total)


def feasible_tiny(count: int) -> Iterator[tuple[int, Instance, list[int], float]]:
    seed = 0
    produced = 0
    while produced < count:
        instance, counts = tiny_instance(seed)
        optimum = brute_force(instance, counts)
        if optimum is not None:
            yield seed, instance, counts, optimum
            produced += 1
        seed += 1


TINY = list(feasible_tiny(10))


def test_tiny_instances_are_varied() -> None:
    """The brute-force cases include multi-server, multi-client and memory-bound ones."""
    assert any(len(counts) == 2 for _, _, counts, _ in TINY)
    assert any(inst.num_servers == 3 for _, inst, _, _ in TINY)
    assert any(sum(counts) == 3 for _, _, counts, _ in TINY)
    # Memory binds somewhere: the unconstrained best route is not attainable.
    bound_cases = 0
    for _, instance, counts, optimum in TINY:
        free = brute_force_unconstrained(instance, counts)
        bound_cases += optimum > free + 1e-9
    assert bound_cases >= 2


def brute_force_unconstrained(instance: Instance, counts: Sequence[int]) -> float:
    best = math.inf
    options = [span_options(instance, j) for j in range(instance.num_servers)]
    for placement in itertools.product(*options):
        paths = chains(placement, instance.num_blocks)
        if paths:
            cost = sum(
                n * min(per_token_ms(instance, c, p) for p in paths) for c, n in enumerate(counts)
            )
            best = min(best, cost / sum(counts))
    return best


def assert_valid(instance: Instance, placement: Placement, routes: Sequence[PlannedRoute]) -> None:
    """Independent check of Lemma 1 and memory on a returned solution."""
    load = [0] * instance.num_servers
    for route in routes:
        boundary = 0
        for hop in route.hops:
            span = placement[hop.server]
            assert span is not None and span.start <= boundary < span.end
            assert hop.start == boundary and hop.end == span.end
            load[hop.server] += route.requests * hop.blocks
            boundary = span.end
        assert boundary == instance.num_blocks
    for j, span in enumerate(placement):
        if span is not None:
            assert instance.block_gb * span.length <= instance.memory_gb[j] + 1e-9
            assert load[j] <= instance.cache_slots(j, span.length)


# --- MILP versus brute force ----------------------------------------------------------------


@pytest.mark.parametrize("linearization", milp.LINEARIZATIONS)
@pytest.mark.parametrize("aggregate", [True, False], ids=["per-client", "per-request"])
@pytest.mark.parametrize("case", TINY, ids=[f"seed{c[0]}" for c in TINY])
def test_milp_matches_brute_force(
    case: tuple[int, Instance, list[int], float], aggregate: bool, linearization: milp.Linearization
) -> None:
    _, instance, counts, optimum = case
    solution = milp.solve_milp(
        instance,
        sum(counts),
        counts,
        time_limit_s=20,
        aggregate=aggregate,
        linearization=linearization,
    )
    assert solution.details["linearization"] == linearization
    assert solution.status == "optimal" and solution.optimal
    assert solution.objective_ms_per_token == pytest.approx(optimum, rel=1e-6)
    assert solution.bound_ms_per_token is not None
    assert solution.bound_ms_per_token <= optimum * (1 + 1e-9)
    assert solution.bound_ms_per_token == pytest.approx(optimum, rel=1e-6)
    assert solution.gap is not None and solution.gap <= 1e-6
    assert sum(r.requests for r in solution.routes) == sum(counts)
    for client, count in enumerate(counts):
        assert sum(r.requests for r in solution.routes if r.client == client) == count
    assert mean_per_token_ms(instance, solution.routes) == solution.objective_ms_per_token
    assert_valid(instance, solution.placement, solution.routes)


@pytest.mark.parametrize("linearization", milp.LINEARIZATIONS)
@pytest.mark.parametrize("case", TINY[:6], ids=[f"seed{c[0]}" for c in TINY[:6]])
def test_milp_without_hint_matches_brute_force(
    case: tuple[int, Instance, list[int], float], linearization: milp.Linearization
) -> None:
    _, instance, counts, optimum = case
    solution = milp.solve_milp(
        instance,
        sum(counts),
        counts,
        time_limit_s=20,
        use_default_hint=False,
        linearization=linearization,
    )
    assert solution.details["hint"] == "none"
    assert solution.objective_ms_per_token == pytest.approx(optimum, rel=1e-6)


@pytest.mark.parametrize("linearization", milp.LINEARIZATIONS)
def test_memory_binds_and_milp_splits_traffic(linearization: milp.Linearization) -> None:
    """One fast server that cannot carry both requests: the MILP must split them."""
    scenario = build(
        num_blocks=2,
        servers=[
            server("fast", "a", memory=2.3, decode=1.0),  # 2 blocks, 3 slots: one request
            server("slow0", "a", memory=4.0, decode=5.0),
            server("slow1", "a", memory=4.0, decode=5.0),
        ],
        sites=["a"],
        site_rtt=[[10.0]],
    )
    instance = Instance.from_scenario(scenario)
    counts = [2]
    solution = milp.solve_milp(instance, 2, counts, time_limit_s=20, linearization=linearization)
    optimum = brute_force(instance, counts)
    assert optimum is not None
    assert solution.objective_ms_per_token == pytest.approx(optimum, rel=1e-6)
    assert len(solution.routes) == 2  # two different paths
    assert_valid(instance, solution.placement, solution.routes)
    # Alone, both requests would take the fast server: (10 + 2) ms; memory forbids it.
    assert solution.objective_ms_per_token > 12.0 + 1e-9


@pytest.mark.parametrize("aggregate", [True, False], ids=["per-client", "per-request"])
@pytest.mark.parametrize("linearization", milp.LINEARIZATIONS)
def test_no_request_enters_a_server_that_hosts_nothing(
    aggregate: bool, linearization: milp.Linearization
) -> None:
    """Regression: source -> j must make j process at least one block (13f on client links)."""
    scenario = build(
        num_blocks=2,
        servers=[server(f"s{j}", "a", memory=4.3, decode=1.0) for j in range(3)],
        sites=["a"],
        site_rtt=[[0.0]],
    )
    instance = Instance.from_scenario(scenario)
    counts = [2]
    assert milp.solve_milp(instance, 2, counts, time_limit_s=10).optimal
    for j in range(instance.num_servers):
        built = milp._BprrModel(instance, counts, aggregate, linearization)
        built.model.add(built.length[j] == 0)
        built.model.add(sum(c.flow[(milp.SOURCE, j)] for c in built.commodities) >= 1)
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        assert solver.solve(built.model) == cp_model.INFEASIBLE


# --- memory is never rounded, time scaling is stated and bounded ----------------------------


def test_memory_exactly_full_stays_feasible() -> None:
    """A server sized exactly for L blocks and |R| caches (awkward decimals) is usable."""
    block, kv, tokens = 1.3234, 57344.0, 148
    cache = kv * tokens / 1e9
    R, L = 5, 3
    memory = block * L + cache * R * L
    scenario = build(
        num_blocks=L,
        block_gb=block,
        kv_bytes=kv,
        input_tokens=20,
        output_tokens=128,
        servers=[server("exact", "a", memory=memory, decode=3.2197)],
        sites=["a"],
        site_rtt=[[5.0]],
    )
    instance = Instance.from_scenario(scenario)
    assert instance.cache_slots(0, L) == R * L
    solution = milp.solve_milp(instance, R, [R], time_limit_s=10)
    assert solution.placement == (Span(0, L),)
    assert solution.objective_ms_per_token == pytest.approx(5.0 + 3 * 3.2197, rel=1e-12)
    with pytest.raises(cg.InfeasibleError, match="infeasible"):
        milp.solve_milp(instance, R + 1, [R + 1], time_limit_s=10)


def test_unscaled_times_give_a_conservative_bound() -> None:
    """Times that TIME_SCALE cannot represent: the bound stays below the true optimum."""
    scenario = build(
        num_blocks=3,
        servers=[
            server("s0", "a", memory=3.3, decode=1 / 3),
            server("s1", "b", memory=2.2, decode=2 / 7),
            server("s2", "b", memory=1.4, decode=math.pi / 10),
        ],
        site_rtt=[[1 / 9, 10 / 3], [10 / 3, math.e]],
    )
    instance = Instance.from_scenario(scenario)
    counts = [3]
    optimum = brute_force(instance, counts)
    assert optimum is not None
    solution = milp.solve_milp(instance, 3, counts, time_limit_s=10)
    assert solution.bound_ms_per_token is not None
    assert solution.bound_ms_per_token <= optimum
    # Rounding to 0.1 us per coefficient moves the answer by less than a few ns per token.
    assert solution.objective_ms_per_token == pytest.approx(optimum, abs=1e-5)
    assert milp.TIME_SCALE == 10_000


# --- warm start -----------------------------------------------------------------------------


@pytest.mark.parametrize("linearization", milp.LINEARIZATIONS)
def test_cg_hint_is_complete_and_feasible(linearization: milp.Linearization) -> None:
    """Fixing every variable to its hinted value leaves a feasible model with CG's cost."""
    scenario = load_scenario(CLUSTERED)
    instance = Instance.from_scenario(scenario)
    for aggregate, R in [(True, 6), (True, 13), (False, 3)]:  # 13 = 0b1101: several flow bits
        counts = scenario.client_request_counts(R)
        warm = milp.default_hint(instance, R, counts)
        assert warm is not None
        built = milp._BprrModel(instance, counts, aggregate, linearization)
        built.hint(*warm)
        proto = built.model.proto
        hinted = set(proto.solution_hint.vars)
        assert hinted == set(range(len(proto.variables)))  # every variable has a value
        solver = cp_model.CpSolver()
        solver.parameters.fix_variables_to_their_hinted_value = True
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = 10
        assert solver.solve(built.model) == cp_model.OPTIMAL
        cg_cost = mean_per_token_ms(instance, warm[1])
        assert solver.objective_value / (milp.TIME_SCALE * R) == pytest.approx(cg_cost, rel=1e-12)


def test_given_placement_hint_is_used_and_routed() -> None:
    _, instance, counts, optimum = TINY[0]
    R = sum(counts)
    first = milp.solve_milp(instance, R, counts, time_limit_s=10)
    again = milp.solve_milp(instance, R, counts, time_limit_s=10, hint=first.placement)
    assert again.details["hint"] == "given"
    assert again.objective_ms_per_token == pytest.approx(optimum, rel=1e-6)
    with pytest.raises(ValueError, match="hint"):
        milp.solve_milp(instance, R, counts, hint=(None,) * (instance.num_servers + 1))


@st.composite
def cg_instances(draw: st.DrawFn) -> tuple[Instance, list[int]]:
    L = draw(st.integers(2, 6))
    n = draw(st.integers(2, 5))
    sites = ["a", "b", "c"]
    rtt = [[draw(st.integers(0, 10)) if i == j else 0 for j in range(3)] for i in range(3)]
    for i, j in itertools.combinations(range(3), 2):
        rtt[i][j] = rtt[j][i] = draw(st.integers(10, 120))
    servers = [
        server(
            f"s{j}",
            draw(st.sampled_from(sites)),
            memory=draw(st.integers(11, 60)) / 10,  # 1.1 .. 6 GB: 1 .. 5 blocks, tight caches
            decode=draw(st.integers(5000, 200000)) / 10_000,  # four decimals: exact scaling
        )
        for j in range(n)
    ]
    clients = [
        {"id": f"c{c}", "site": draw(st.sampled_from(sites)), "share": draw(st.integers(1, 3))}
        for c in range(draw(st.integers(1, 2)))
    ]
    scenario = build(
        num_blocks=L,
        servers=servers,
        clients=clients,
        sites=sites,
        site_rtt=[[float(x) for x in row] for row in rtt],
        overheads={"per_token_ms": draw(st.sampled_from([0, 100]))},
    )
    instance = Instance.from_scenario(scenario)
    R = draw(st.integers(1, 8))
    return instance, scenario.client_request_counts(R)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=cg_instances())
def test_milp_with_cg_hint_never_worse_than_cg(case: tuple[Instance, list[int]]) -> None:
    instance, counts = case
    R = sum(counts)
    try:
        cg_solution = solve_cg(instance, R, counts)
    except cg.InfeasibleError:
        cg_solution = None
    try:
        solution = milp.solve_milp(instance, R, counts, time_limit_s=5)
    except cg.InfeasibleError:
        assert cg_solution is None  # CG is conservative: MILP infeasible => CG infeasible
        return
    assert_valid(instance, solution.placement, solution.routes)
    if cg_solution is None:
        assert solution.details["hint"] == "none (cg infeasible)"
        return
    assert solution.details["hint"] == "cg"
    # CP-SAT itself improved on (or kept) the hint: times are exact at TIME_SCALE.
    assert solution.details["kept_hint"] is False
    assert solution.objective_ms_per_token <= cg_solution.objective_ms_per_token * (1 + 1e-12)
    assert solution.bound_ms_per_token is not None
    assert solution.bound_ms_per_token <= solution.objective_ms_per_token


# --- routing-only ILP -----------------------------------------------------------------------


def placements_with_routes(
    instance: Instance, counts: Sequence[int], limit: int, seed: int
) -> list[tuple[Placement, float | None]]:
    options = [span_options(instance, j) for j in range(instance.num_servers)]
    everything = list(itertools.product(*options))
    random.Random(seed).shuffle(everything)
    feasible: list[tuple[Placement, float | None]] = []
    infeasible: list[tuple[Placement, float | None]] = []
    for placement in everything:
        if not chains(placement, instance.num_blocks):
            continue
        value = best_routing(instance, placement, counts)
        if value is None and len(infeasible) < 2:
            infeasible.append((placement, value))
        elif value is not None:
            feasible.append((placement, value))
        if len(feasible) == limit:
            break
    return feasible + infeasible


@pytest.mark.parametrize("case", TINY[:6], ids=[f"seed{c[0]}" for c in TINY[:6]])
def test_route_ilp_matches_brute_force(case: tuple[int, Instance, list[int], float]) -> None:
    seed, instance, counts, _ = case
    checked = 0
    for placement, optimum in placements_with_routes(instance, counts, 6, seed):
        if optimum is None:
            with pytest.raises(cg.InfeasibleError, match="infeasible"):
                milp.route_ilp(instance, placement, counts, time_limit_s=10)
            continue
        routes = milp.route_ilp(instance, placement, counts, time_limit_s=10)
        assert mean_per_token_ms(instance, routes) == pytest.approx(optimum, rel=1e-6)
        for client, count in enumerate(counts):
            assert sum(r.requests for r in routes if r.client == client) == count
        assert_valid(instance, placement, routes)
        checked += 1
    assert checked >= 1


def test_route_ilp_detours_when_memory_binds() -> None:
    """Fixed placement where the shortest path has room for one request of two."""
    scenario = build(
        num_blocks=2,
        servers=[
            server("fast", "a", memory=2.3, decode=1.0),
            server("slow", "a", memory=2.5, decode=5.0),
        ],
        sites=["a"],
        site_rtt=[[10.0]],
    )
    instance = Instance.from_scenario(scenario)
    placement = (Span(0, 2), Span(0, 2))
    routes = milp.route_ilp(instance, placement, [2])
    assert sorted((r.hops[0].server, r.requests) for r in routes) == [(0, 1), (1, 1)]
    assert mean_per_token_ms(instance, routes) == pytest.approx((12.0 + 20.0) / 2)
    with pytest.raises(cg.InfeasibleError, match="infeasible"):
        milp.route_ilp(instance, placement, [5])
    with pytest.raises(cg.InfeasibleError, match="cover"):
        milp.route_ilp(instance, (Span(0, 1), None), [1])


# --- errors ---------------------------------------------------------------------------------


def test_bad_arguments_name_the_field() -> None:
    _, instance, counts, _ = TINY[0]
    R = sum(counts)
    with pytest.raises(ValueError, match="counts"):
        milp.solve_milp(instance, R, [*counts, 1])
    with pytest.raises(ValueError, match="counts"):
        milp.solve_milp(instance, R + 1, counts)
    with pytest.raises(ValueError, match="time_limit_s"):
        milp.solve_milp(instance, R, counts, time_limit_s=0)
    with pytest.raises(ValueError, match="workers"):
        milp.solve_milp(instance, R, counts, workers=0)
    with pytest.raises(ValueError, match="linearization"):
        milp.solve_milp(instance, R, counts, linearization="bigm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement"):
        milp.route_ilp(instance, (None,), counts)


def test_no_solution_in_time_is_an_error_not_garbage() -> None:
    scenario = load_scenario(CLUSTERED)
    instance = Instance.from_scenario(scenario)
    counts = scenario.client_request_counts(40)
    with pytest.raises(milp.MilpNoSolutionError, match="time limit"):
        milp.solve_milp(
            instance, 40, counts, time_limit_s=1e-4, use_default_hint=False, aggregate=False
        )


# --- the clustered scenario -----------------------------------------------------------------


def test_clustered_small_r_optimal_and_not_worse_than_cg() -> None:
    scenario = load_scenario(CLUSTERED)
    solution = solve(scenario, "milp", concurrency=10, time_limit_s=30)
    reference = solve(scenario, "cg", concurrency=10)
    assert solution.algorithm == "milp" and solution.optimal is True
    assert solution.objective_ms_per_token <= reference.objective_ms_per_token + 1e-9
    # Two A100 hops from cluster 0: 2 x (100 + 100) ms + 70 blocks x 3.2197 ms.
    assert solution.objective_ms_per_token == pytest.approx(2 * 200 + 70 * 3.2197, rel=1e-12)
    assert_valid(Instance.from_scenario(scenario), solution.placement, solution.routes)


@pytest.mark.parametrize("aggregate", [True, False], ids=["per-client", "per-request"])
def test_mccormick_model_is_linear(aggregate: bool) -> None:
    """McCormick: no enforcement literal and no product constraint; enforce uses both kinds."""
    scenario = load_scenario(CLUSTERED)
    instance = Instance.from_scenario(scenario)
    counts = scenario.client_request_counts(5)

    def kinds(linearization: milp.Linearization) -> tuple[int, int]:
        proto = milp._BprrModel(instance, counts, aggregate, linearization).model.proto
        enforced = sum(bool(c.enforcement_literal) for c in proto.constraints)
        products = sum(c.has_int_prod() for c in proto.constraints)
        return enforced, products

    assert kinds("mccormick") == (0, 0)
    enforced, products = kinds("enforce")
    assert enforced > 0 and (products > 0) == aggregate
