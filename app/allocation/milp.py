"""MILP-BPRR (paper eq. 13a-f) on OR-Tools CP-SAT; the routing-only ILP (eq. 19a-e) and the
CP-SAT helpers both models share live in app/allocation/milp_routing.py (re-exported here).

Graph. One source node and one sink node per client and every server in between; a request of
client c travels source -> servers -> sink on logical links (i, j). Server j hosts blocks
[s_j, e_j) (0-based half-open; the paper's a_j = s_j + 1 and a_j + m_j = e_j + 1, m_j = e_j - s_j).

Feasibility of a link used by a request (13e, 13f, Lemma 1), in project coordinates:
    source -> j : s_j = 0              (the first server hosts block 0)
    i -> j      : s_j <= e_i < e_j     (j hosts the block right after i's span and goes further)
    i -> sink   : e_i = L              (the last server hosts block L - 1)
and the request processes k = e_j - e_i blocks at j (e_source = 0). The paper linearises the
products f a and f m with McCormick inequalities; both are available (``linearization``):
  * "enforce" (default, faster, see DEFAULT_LINEARIZATION): CP-SAT enforcement literals
    (``only_enforce_if``): "link used => k = e_j - e_i" replaces alpha - beta + gamma - delta,
    the same set of integer solutions with a smaller model; aggregated flows y times the
    blocks d of a link are a CP-SAT multiplication.
  * "mccormick": explicit product variables f e_j, f e_i, f s_j with the four McCormick
    inequalities (big-M = L, the bound of e and s), and every constraint linear. An integer
    flow y in 0..n_c times d is not exact under McCormick, so y is written in binary and each
    bit times d is an exact McCormick product (big-M = the most blocks j holds).

Two equivalent ways to carry the requests (``aggregate``):
  * per request (the paper's literal model): one binary flow f^r_ij per request and
    link, k^r_j tied to the incoming link; requests of the same client are ordered by the
    index of their first server (symmetry breaking, valid since they are interchangeable).
  * per client (default): one integer flow y^c_ij in 0..n_c per client and link with a use
    literal and the product y (e_j - e_i) as a CP-SAT multiplication. Integer flows on this
    DAG (every used link strictly increases e) decompose into n_c paths with the same cost and
    memory,
    so the optimum is the same, and the model does not grow with |R|. Measured with
    bench/bench_milp.py (2 workers) on paper-clustered-9: at |R| = 10 the per-client model
    proves the optimum in 0.08 s, the per-request one has a 32% gap after 60 s; both agree
    with brute force on the tiny instances of the tests.

Memory (13b) is never rounded: the number of attention-cache slots left on server j for a span
of m blocks is the exact integer instance.cache_slots(j, m), and the model looks it up with an
element constraint over m in 0..L (m only where the weights fit). The only scaled quantities are
the times in the objective (``TIME_SCALE`` integer units per millisecond); the reported objective
is recomputed in floats by the performance model, and the reported bound subtracts the largest
possible rounding error so that it never exceeds the true optimum.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ortools.sat.python import cp_model

from app.allocation import cg
from app.allocation.instance import Instance, Placement, Span
from app.allocation.milp_routing import (
    SINK,
    SOURCE,
    TIME_SCALE,
    Link,
    MilpNoSolutionError,
    check_counts,
    check_solution,
    decompose_flow,
    make_solver,
    max_blocks_fitting,
    planned_routes,
    route_flows,
    route_ilp,
    scaled_costs,
)
from app.allocation.solve import PlannedRoute, Solution, mean_per_token_ms

__all__ = [
    "DEFAULT_LINEARIZATION",
    "TIME_SCALE",
    "Linearization",
    "MilpNoSolutionError",
    "check_solution",
    "route_ilp",
    "solve_milp",
]

# How the products of a link's use f with the span variables are linearised (module docstring).
Linearization = Literal["enforce", "mccormick"]
LINEARIZATIONS: tuple[Linearization, ...] = ("enforce", "mccormick")
# "enforce" is the faster one. `bench/bench_milp.py --quick --runs 3` (OR-Tools 9.15, 2 workers
# on 2 shared cores, medians of 3, wall time of solve_milp incl. the CG hint), per-client model:
#   paper-clustered-9, time to proven optimum, enforce vs mccormick:
#     R=1 0.15 s vs 0.17 s; R=10 0.48 s vs 0.85 s; R=48 0.12 s vs 0.47 s;
#     R=206 neither proves it in 10 s (objective 1586 vs 1709 ms/token, CG 2208; gap 61% vs 63%).
#   clustered-26, R=40, after 10 s: enforce 522.08 ms/token (= CG), gap 15%; mccormick no
#     solution (its model is 32k variables / 63k constraints against 8k / 19k, and presolve
#     alone outlasts 10 s even with the complete CG hint). After 30 s (1 run): 522.08, gap
#     14.5% vs 521.88, gap 93.8%.
DEFAULT_LINEARIZATION: Linearization = "enforce"


# --- MILP-BPRR ----------------------------------------------------------------------------


@dataclass
class _Commodity:
    """One request (multiplicity 1) or all requests of one client (aggregated)."""

    client: int
    size: int
    flow: dict[Link, cp_model.IntVar] = field(default_factory=dict)
    used: dict[Link, cp_model.IntVar] = field(default_factory=dict)  # == flow when size 1
    blocks_in: dict[Link, cp_model.IntVar] = field(default_factory=dict)  # d = e_j - e_i if used
    work: dict[Link, cp_model.IntVar] = field(default_factory=dict)  # flow * d (aggregated)
    # McCormick only: head = f e_j, tail = f e_i, lead = f s_j; bits (z_b, z_b d) of the flow.
    head: dict[Link, cp_model.IntVar] = field(default_factory=dict)
    tail: dict[Link, cp_model.IntVar] = field(default_factory=dict)
    lead: dict[Link, cp_model.IntVar] = field(default_factory=dict)
    bits: dict[Link, list[tuple[cp_model.IntVar, cp_model.IntVar]]] = field(default_factory=dict)
    blocks: dict[int, cp_model.IntVar] = field(default_factory=dict)  # k_j (per request)
    enters: dict[int, cp_model.IntVar] = field(default_factory=dict)  # request visits j


class _BprrModel:
    def __init__(
        self,
        instance: Instance,
        counts: Sequence[int],
        aggregate: bool,
        linearization: Linearization = DEFAULT_LINEARIZATION,
    ) -> None:
        if linearization not in LINEARIZATIONS:
            raise ValueError(
                f"linearization: {linearization!r} is not one of {', '.join(LINEARIZATIONS)}"
            )
        self.instance = instance
        self.aggregate = aggregate
        self.linearization = linearization
        L = instance.num_blocks
        n = instance.num_servers
        self.model = cp_model.CpModel()
        m = self.model
        self.max_blocks = [max_blocks_fitting(instance, j) for j in range(n)]
        self.slot_table = [
            [instance.cache_slots(j, k) for k in range(self.max_blocks[j] + 1)] for j in range(n)
        ]
        self.start = [m.new_int_var(0, L, f"s{j}") for j in range(n)]
        self.length = [m.new_int_var(0, self.max_blocks[j], f"m{j}") for j in range(n)]
        self.end = [m.new_int_var(0, L, f"e{j}") for j in range(n)]
        self.slots = [m.new_int_var(0, max(self.slot_table[j]), f"slots{j}") for j in range(n)]
        for j in range(n):
            m.add(self.end[j] == self.start[j] + self.length[j])  # (13d): e_j <= L by domain
            m.add_element(self.length[j], self.slot_table[j], self.slots[j])  # exact (13b)

        covered, self.min_hops = 0, 0
        for top in sorted(self.max_blocks, reverse=True):
            if covered >= L:
                break
            covered, self.min_hops = covered + top, self.min_hops + 1
        self.links: list[Link] = [(SOURCE, j) for j in range(n)]
        self.links += [(i, j) for i in range(n) for j in range(n) if i != j]
        self.links += [(i, SINK) for i in range(n)]

        self.commodities: list[_Commodity] = []
        for client, count in enumerate(counts):
            if count == 0:
                continue
            if aggregate:
                self.commodities.append(_Commodity(client, count))
            else:
                self.commodities.extend(_Commodity(client, 1) for _ in range(count))
        for q, commodity in enumerate(self.commodities):
            self._add_commodity(q, commodity)

        # (13b) memory in cache slots, exact integers.
        for j in range(n):
            m.add(sum(self._server_blocks(c, j) for c in self.commodities) <= self.slots[j])

        if not aggregate:  # interchangeable requests: first servers in non-decreasing order
            previous: tuple[int, cp_model.LinearExprT] | None = None
            for commodity in self.commodities:
                first = sum(j * commodity.flow[(SOURCE, j)] for j in range(n))
                if previous is not None and previous[0] == commodity.client:
                    m.add(previous[1] <= first)
                previous = (commodity.client, first)

        # (13a) per token (the paper's l_max factor is a constant and is left out).
        self.hop_cost, hop_error = scaled_costs(instance.token_hop_ms.ravel().tolist())
        self.block_cost, block_error = scaled_costs(instance.decode_ms.tolist())
        terms: list[cp_model.LinearExprT] = []
        for commodity in self.commodities:
            row = commodity.client * n
            for (_i, j), var in commodity.flow.items():
                if j >= 0 and self.hop_cost[row + j]:
                    terms.append(self.hop_cost[row + j] * var)
            for j in range(n):
                if self.block_cost[j]:
                    terms.append(self.block_cost[j] * self._server_blocks(commodity, j))
        m.minimize(sum(terms))
        # Largest |scaled objective - TIME_SCALE x true objective| per request: at most
        # min(n, L) hops and exactly L blocks.
        self.error_per_request = min(n, L) * hop_error + L * block_error

    def _add_commodity(self, q: int, c: _Commodity) -> None:
        m = self.model
        L = self.instance.num_blocks
        n = self.instance.num_servers
        for link in self.links:
            i, j = link
            if c.size == 1:
                f = m.new_bool_var(f"f{q}_{i}_{j}")
                c.flow[link] = f
                c.used[link] = f
            else:
                y = m.new_int_var(0, c.size, f"y{q}_{i}_{j}")
                u = m.new_bool_var(f"u{q}_{i}_{j}")
                m.add(y <= c.size * u)
                m.add(y >= u)
                c.flow[link] = y
                c.used[link] = u
            use = c.used[link]
            if self.linearization == "mccormick":
                self._link_mccormick(q, c, link)
                continue
            # (13e), (13f): Lemma 1 on every used link.
            if i == SOURCE:  # (13e) a_j <= 1 and (13f) 1 <= a_j + m_j - 1
                m.add(self.start[j] == 0).only_enforce_if(use)
                m.add(self.end[j] >= 1).only_enforce_if(use)
            elif j == SINK:
                m.add(self.end[i] == L).only_enforce_if(use)
            else:
                m.add(self.start[j] <= self.end[i]).only_enforce_if(use)
                m.add(self.end[i] + 1 <= self.end[j]).only_enforce_if(use)
            if c.size > 1 and j != SINK:
                top = self.max_blocks[j]  # k <= m_j: tightens the relaxation
                d = m.new_int_var(0, top, f"d{q}_{i}_{j}")
                entry = 0 if i == SOURCE else self.end[i]
                m.add(d == self.end[j] - entry).only_enforce_if(use)
                m.add(d == 0).only_enforce_if(~use)
                w = m.new_int_var(0, c.size * top, f"w{q}_{i}_{j}")
                m.add_multiplication_equality(w, [c.flow[link], d])
                m.add(w <= top * c.flow[link])  # linear McCormick side of the product
                m.add(w >= c.flow[link])  # a used link processes at least one block
                c.blocks_in[link] = d
                c.work[link] = w
        # (13c) flow conservation.
        m.add(sum(c.flow[(SOURCE, j)] for j in range(n)) == c.size)
        m.add(sum(c.flow[(i, SINK)] for i in range(n)) == c.size)
        for j in range(n):
            inflow = [c.flow[link] for link in self.links if link[1] == j]
            outflow = [c.flow[link] for link in self.links if link[0] == j]
            m.add(sum(inflow) == sum(outflow))
        if c.size == 1:
            for j in range(n):
                enters = m.new_bool_var(f"in{q}_{j}")
                k = m.new_int_var(0, self.max_blocks[j], f"k{q}_{j}")
                incoming = [link for link in self.links if link[1] == j]
                m.add(sum(c.flow[link] for link in incoming) == enters)
                if self.linearization == "mccormick":  # k_j = sum_i f (e_j - e_i)
                    m.add(k == sum(c.head[a] - c.tail.get(a, 0) for a in incoming))
                else:
                    for link in incoming:
                        entry = 0 if link[0] == SOURCE else self.end[link[0]]
                        m.add(k == self.end[j] - entry).only_enforce_if(c.flow[link])
                    m.add(k == 0).only_enforce_if(~enters)
                c.enters[j] = enters
                c.blocks[j] = k
        # Redundant but tightening: every request processes exactly L blocks, and needs at
        # least as many hops as it takes the largest spans that fit to cover L blocks.
        m.add(sum(self._server_blocks(c, j) for j in range(n)) == c.size * L)
        hops = sum(v for (_, j), v in c.flow.items() if j != SINK)
        m.add(hops >= c.size * self.min_hops)

    def _product(
        self, f: cp_model.IntVar, x: cp_model.IntVar, top: int, name: str
    ) -> cp_model.IntVar:
        """p = f x for a binary f and an integer x in 0..top: McCormick's four inequalities.

        At f in {0, 1} they pin p to 0 or x exactly (big-M = top, the bound of x).
        """
        m = self.model
        p = m.new_int_var(0, top, name)  # p >= 0
        m.add(p <= top * f)
        m.add(p <= x)
        m.add(p >= x - top * (1 - f))
        return p

    def _link_mccormick(self, q: int, c: _Commodity, link: Link) -> None:
        """(13e), (13f) and the blocks a link carries, linear in McCormick products.

        head = f e_j, tail = f e_i, lead = f s_j (the paper's alpha .. delta with e = s + m, one
        product per span end instead of two: the same integer points, an envelope at least as
        tight). Aggregated flows y in 0..n_c are not binary, and McCormick on an integer times
        an integer is not exact (y = 1, e = 1 with bounds 2, 2 allows p in 0..2), so the flow is
        written in binary, y = sum 2^b z_b, and each bit gets an exact product z_b d.
        """
        m = self.model
        L = self.instance.num_blocks
        i, j = link
        f = c.used[link]
        tag = f"{q}_{i}_{j}"
        if i >= 0:
            c.tail[link] = self._product(f, self.end[i], L, f"tail{tag}")
        if j == SINK:
            m.add(c.tail[link] >= L * f)  # f e_i = L f: the last server ends at L
            return
        c.head[link] = self._product(f, self.end[j], L, f"head{tag}")
        c.lead[link] = self._product(f, self.start[j], L, f"lead{tag}")
        if i == SOURCE:  # (13e) s_j = 0 and (13f) e_j >= 1 when used
            m.add(c.lead[link] == 0)
            m.add(c.head[link] >= f)
        else:
            m.add(c.lead[link] <= c.tail[link])  # (13e) s_j <= e_i when used
            m.add(c.tail[link] + f <= c.head[link])  # (13f) e_i + 1 <= e_j when used
        if c.size == 1:
            return
        top = self.max_blocks[j]
        d = m.new_int_var(0, top, f"d{tag}")  # f (e_j - e_i): k <= m_j by the domain
        m.add(d == c.head[link] - c.tail.get(link, 0))
        bits = []
        for b in range(c.size.bit_length()):
            z = m.new_bool_var(f"z{tag}_{b}")
            bits.append((z, self._product(z, d, top, f"p{tag}_{b}")))
        m.add(c.flow[link] == sum((1 << b) * z for b, (z, _) in enumerate(bits)))
        w = m.new_int_var(0, c.size * top, f"w{tag}")
        m.add(w == sum((1 << b) * p for b, (_, p) in enumerate(bits)))
        m.add(w <= top * c.flow[link])
        m.add(w >= c.flow[link])
        c.blocks_in[link] = d
        c.work[link] = w
        c.bits[link] = bits

    def _server_blocks(self, c: _Commodity, j: int) -> cp_model.LinearExprT:
        """Blocks processed at server j by the commodity (sum over its requests of k_j)."""
        if c.size == 1:
            return c.blocks[j]
        return sum(w for (_, b), w in c.work.items() if b == j)

    # --- warm start ---

    def hint(self, placement: Placement, routes: Sequence[PlannedRoute]) -> None:
        """A complete hint: a value for every variable of the model."""
        n = self.instance.num_servers
        L = self.instance.num_blocks
        m = self.model
        ends, starts = [], []
        for j, span in enumerate(placement):
            s, e = (0, 0) if span is None else (span.start, span.end)
            starts.append(s)
            m.add_hint(self.start[j], s)
            m.add_hint(self.length[j], e - s)
            m.add_hint(self.end[j], e)
            m.add_hint(self.slots[j], self.slot_table[j][e - s])
            ends.append(e)
        # Requests per client, one path each, in the order the symmetry breaking wants.
        per_client: dict[int, list[list[int]]] = {}
        for client, flows in route_flows(routes).items():
            paths = [path for path, count in flows for _ in range(count)]
            per_client[client] = sorted(paths, key=lambda p: p[0])
        taken: dict[int, int] = {}
        for commodity in self.commodities:
            paths = per_client[commodity.client]
            first = taken.get(commodity.client, 0)
            mine = paths[first : first + commodity.size]
            taken[commodity.client] = first + commodity.size
            flow: Counter[Link] = Counter()
            blocks = [0] * n
            for path in mine:
                nodes = [SOURCE, *path, SINK]
                for a, b in itertools.pairwise(nodes):
                    flow[(a, b)] += 1
                boundary = 0
                for j in path:
                    blocks[j] += ends[j] - boundary
                    boundary = ends[j]
                if boundary != L:  # pragma: no cover - routes come from hops_for_path
                    raise RuntimeError("hint route does not cover the model")
            for link, var in commodity.flow.items():
                m.add_hint(var, flow[link])
                use = 1 if flow[link] else 0
                a, b = link
                if link in commodity.tail:
                    m.add_hint(commodity.tail[link], use * ends[a])
                if link in commodity.head:
                    m.add_hint(commodity.head[link], use * ends[b])
                    m.add_hint(commodity.lead[link], use * starts[b])
                for bit, (z, product) in enumerate(commodity.bits.get(link, [])):
                    on = (flow[link] >> bit) & 1
                    m.add_hint(z, on)
                    m.add_hint(product, on * (ends[b] - (0 if a == SOURCE else ends[a])))
                if commodity.size > 1:
                    m.add_hint(commodity.used[link], 1 if flow[link] else 0)
                    if link in commodity.work:
                        d = (
                            (ends[link[1]] - (0 if link[0] == SOURCE else ends[link[0]]))
                            if (flow[link])
                            else 0
                        )
                        m.add_hint(commodity.blocks_in[link], d)
                        m.add_hint(commodity.work[link], flow[link] * d)
            if commodity.size == 1:
                for j in range(n):
                    m.add_hint(commodity.enters[j], 1 if blocks[j] else 0)
                    m.add_hint(commodity.blocks[j], blocks[j])

    # --- reading the answer ---

    def extract(self, solver: cp_model.CpSolver) -> tuple[Placement, tuple[PlannedRoute, ...]]:
        spans: list[Span | None] = []
        for j in range(self.instance.num_servers):
            length = solver.value(self.length[j])
            spans.append(
                Span(solver.value(self.start[j]), solver.value(self.end[j])) if length else None
            )
        placement: Placement = tuple(spans)
        paths: dict[int, list[list[int]]] = {}
        for commodity in self.commodities:
            flow = {link: int(solver.value(var)) for link, var in commodity.flow.items()}
            paths.setdefault(commodity.client, []).extend(decompose_flow(flow, commodity.size))
        return placement, planned_routes(self.instance, placement, paths)


def default_hint(
    instance: Instance, concurrency: int, counts: Sequence[int]
) -> tuple[Placement, tuple[PlannedRoute, ...]] | None:
    """CG-BPRR's placement and shortest routes, or None where CG is infeasible for |R|."""
    try:
        placement = cg.place(instance, concurrency).placement
        shortest = cg.shortest_routes(instance, placement)
    except cg.InfeasibleError:
        return None
    routes = tuple(
        PlannedRoute(client, count, shortest[client].hops)
        for client, count in enumerate(counts)
        if count > 0
    )
    return placement, routes


def solve_milp(
    instance: Instance,
    concurrency: int,
    counts: list[int],
    time_limit_s: float = 30.0,
    workers: int = 2,
    hint: Placement | None = None,
    *,
    aggregate: bool = True,
    use_default_hint: bool = True,
    linearization: Linearization = DEFAULT_LINEARIZATION,
) -> Solution:
    """Solve MILP-BPRR for |R| = ``concurrency`` requests split over clients as ``counts``.

    ``linearization``: "enforce" (enforcement literals) or "mccormick" (explicit product
    variables with McCormick inequalities); the same optimum, see DEFAULT_LINEARIZATION.
    ``hint``: a placement to warm-start from (its routes come from the routing ILP); by
    default CG-BPRR's placement and shortest routes when CG is feasible for |R|.
    Raises cg.InfeasibleError when CP-SAT proves the instance infeasible and
    MilpNoSolutionError when it finds no solution within the time limit.
    """
    started = time.perf_counter()
    check_counts(instance, counts)
    if concurrency < 1:
        raise ValueError(f"concurrency: must be at least 1, got {concurrency}")
    if sum(counts) != concurrency:
        raise ValueError(f"counts: they sum to {sum(counts)}, not to concurrency {concurrency}")
    if linearization not in LINEARIZATIONS:
        raise ValueError(
            f"linearization: {linearization!r} is not one of {', '.join(LINEARIZATIONS)}"
        )
    solver = make_solver(time_limit_s, workers)

    warm: tuple[Placement, tuple[PlannedRoute, ...]] | None = None
    hint_source = "none"
    if hint is not None:
        if len(hint) != instance.num_servers:
            raise ValueError(
                f"hint: {len(hint)} spans for {instance.num_servers} servers (one per server)"
            )
        try:
            warm = (hint, route_ilp(instance, hint, counts, time_limit_s=time_limit_s / 4))
            hint_source = "given"
        except (cg.InfeasibleError, MilpNoSolutionError):
            warm = None
            hint_source = "given placement unroutable"
        except ValueError as error:
            raise ValueError(f"hint: {error}") from None
    elif use_default_hint:
        warm = default_hint(instance, concurrency, counts)
        hint_source = "cg" if warm is not None else "none (cg infeasible)"

    built = _BprrModel(instance, counts, aggregate, linearization)
    if warm is not None:
        built.hint(*warm)
    build_seconds = time.perf_counter() - started
    status = solver.solve(built.model)
    if status == cp_model.INFEASIBLE:
        raise cg.InfeasibleError(
            f"infeasible: no placement and routing of {concurrency} concurrent requests fits the "
            "servers' memory (proven by CP-SAT)"
        )
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise MilpNoSolutionError(
            f"MILP-BPRR found no solution within {time_limit_s:g} s "
            f"(CP-SAT status {solver.status_name(status)}); raise the time limit or use cg"
        )
    placement, routes = built.extract(solver)
    check_solution(instance, placement, routes)
    objective = mean_per_token_ms(instance, routes)
    kept_hint = False
    if warm is not None:
        hint_objective = mean_per_token_ms(instance, warm[1])
        if hint_objective < objective:  # only possible through rounding of the objective
            placement, routes, objective, kept_hint = warm[0], warm[1], hint_objective, True
    optimal = status == cp_model.OPTIMAL
    scaled_bound = solver.best_objective_bound - concurrency * built.error_per_request
    bound = max(0.0, scaled_bound / (TIME_SCALE * concurrency))
    bound = min(bound * (1 - 1e-12), objective)
    gap = (objective - bound) / objective if objective > 0 else 0.0
    return Solution(
        algorithm="milp",
        concurrency=concurrency,
        placement=placement,
        routes=routes,
        objective_ms_per_token=objective,
        bound_ms_per_token=bound,
        optimal=optimal,
        status="optimal" if optimal else "feasible",
        solve_seconds=time.perf_counter() - started,
        gap=gap,
        details={
            "model": "per-client" if aggregate else "per-request",
            "linearization": linearization,
            "hint": hint_source,
            "kept_hint": kept_hint,
            "time_scale_per_ms": TIME_SCALE,
            "cp_sat_status": solver.status_name(status),
            "cp_sat_objective": solver.objective_value,
            "cp_sat_bound": solver.best_objective_bound,
            "build_seconds": build_seconds,
            "wall_seconds": solver.wall_time,
            "workers": workers,
        },
    )
