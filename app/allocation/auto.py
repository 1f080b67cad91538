"""``auto``: the plan bprr runs by default. Candidate placements, each scored for the workload.

Candidates (every one served by JFFC over GCA chains on its placement, with a central queue):
- ``chains``: GBP-CR at the c that minimises Theorem 4's lower bound (app.allocation.chains);
- ``cg-R<n>``: CG-BP placements sized for the PROFILE's typical request (s_c from its mean
  lengths) at |R| = round(lambda T1 + sqrt(lambda T1)) with T1 the typical request alone on the
  fastest chain, and at a quarter of that (wider spans, fewer hops);
- ``petals``: PETALS 2.2's own placement (widest spans, its join order) with our dispatcher.

Score: the predicted mean response time (s) for the profile, Theorem 4's lower bound on the
candidate's GCA chains (ties: the upper bound, then the order above). With several client
sites, each client gets the GCA chains it would get alone (GCA on its own hop costs, on the
candidate's whole memory); their union is served by client-aware JFFC (each client tries its
own fastest chains first) while every request's cache is checked against the servers' real
free memory, so the union never over-commits; the score is the share-weighted lower bound of
each client alone on its own chains (chains.client_lower_bound). A caller may inject
another ``score`` (e.g. a short simulation); this package never imports the simulator. The
best score wins; every candidate's score is kept for ``--json``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.allocation import cg
from app.allocation.chain_search import ChainPlan, plan_chains, pruner
from app.allocation.chains import (
    Bounds,
    Chain,
    ChainsInfeasible,
    client_costs,
    client_lower_bound,
    gca,
    job_costs,
    residual_slots,
    response_bounds,
)
from app.allocation.instance import GB, Instance, Placement
from app.allocation.perf import Hop
from app.allocation.scenario import Scenario
from app.allocation.workload import WorkloadProfile

__all__ = ["AutoPlan", "Candidate", "plan_auto", "profile_concurrency"]


@dataclass(frozen=True)
class Candidate:
    name: str
    placement: Placement
    chains: tuple[Chain, ...]
    bounds: Bounds
    score_s: float
    details: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "score_s": _finite(self.score_s),
            "lower_bound_s": _finite(self.bounds.lower_s),
            "upper_bound_s": _finite(self.bounds.upper_s),
            "chains": len(self.chains),
            "slots": self.bounds.slots,
            "service_rate_per_s": round(self.bounds.total_rate_per_s, 6),
            "servers_used": sum(1 for s in self.placement if s is not None),
            **self.details,
        }


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class AutoPlan:
    best: Candidate
    candidates: tuple[Candidate, ...]
    profile: WorkloadProfile
    chain_plan: ChainPlan | None
    seconds: float
    warnings: tuple[str, ...] = ()


Score = Callable[[Candidate], float]


def profile_instance(instance: Instance, profile: WorkloadProfile) -> Instance:
    """The instance with s_c, l_in and l_max of the profile's typical request."""
    tokens = profile.design_tokens()
    return dataclasses.replace(
        instance,
        cache_gb=instance.kv_bytes * tokens / GB,
        input_tokens=max(0, round(profile.mean_input_tokens)),
        output_tokens=max(1, round(profile.mean_output_tokens)),
        kv_bytes_per_token_per_block=instance.kv_bytes,
    )


def profile_concurrency(instance: Instance, profile: WorkloadProfile, typical_ms: float) -> int:
    """|R| = round(lambda T1 + sqrt(lambda T1)) with T1 the typical request alone, capped by
    what Corollary 1 admits with the typical request's cache."""
    expected = profile.rate_per_s * typical_ms / 1000.0
    target = round(expected + math.sqrt(expected))
    return max(1, min(target, cg.max_feasible_concurrency(profile_instance(instance, profile))))


def plan_auto(
    scenario: Scenario,
    instance: Instance,
    profile: WorkloadProfile,
    *,
    rho: float = 0.7,
    score: Score | None = None,
) -> AutoPlan:
    """Build the candidates, score them, keep the best (see the module docstring)."""
    from app.allocation import petals

    started = time.perf_counter()
    costs = job_costs(instance, profile)
    shares = instance.client_shares.tolist()
    # Several client sites: every client gets the GCA chains it would get alone (on its own
    # hop costs); the union is dispatched client-aware, the servers' memory arbitrated per
    # request at run time; the score weighs each client's own bound.
    per_client = len(shares) > 1
    tokens = profile.design_tokens()

    def client_chains(placement: Placement) -> tuple[tuple[Chain, ...], float]:
        residual = residual_slots(instance, placement, tokens)
        own = [
            gca(instance, client_costs(costs, c), placement, residual) for c in range(len(shares))
        ]
        union: dict[tuple[Hop, ...], Chain] = {}
        for chains in own:
            for chain in chains:
                known = union.get(chain.hops)
                if known is None or known.capacity < chain.capacity:
                    # Service times on the clients' mean, whoever found the chain.
                    union[chain.hops] = Chain(
                        chain.hops, chain.capacity, costs.service_ms(chain.hops), chain.client_ms
                    )
        merged = tuple(sorted(union.values(), key=lambda c: c.service_ms))
        return merged, client_lower_bound(profile.rate_per_s, own, shares)

    candidates: list[Candidate] = []
    order: list[str] = []  # names in the order added: the last tie-break
    warnings: list[str] = []

    def add(
        name: str,
        placement: Placement,
        details: dict[str, object],
        planned: tuple[tuple[Chain, ...], Bounds] | None = None,
    ) -> None:
        if per_client:
            chains, value = client_chains(placement)
            if not chains:
                return
            bounds = response_bounds(profile.rate_per_s, chains)
            candidate = Candidate(name, placement, chains, bounds, value, details)
            if score is not None:
                candidate = dataclasses.replace(candidate, score_s=score(candidate))
            candidates.append(candidate)
            order.append(name)
            return
        if planned is None:
            stop = None
            if score is None and candidates:  # the default score: prune what cannot win
                best = min(candidates, key=lambda c: _key(c.score_s))
                # Ties go on to the upper bound: only a strictly worse lower bound prunes.
                stop = pruner(instance.num_blocks, profile.rate_per_s, _rank(best), -1)
            residual = residual_slots(instance, placement, tokens)
            chains = gca(instance, costs, placement, residual, stop)
            if stop is not None and stop.fired:
                # Its lower bound is already above the best one's: recorded as pruned, with
                # the bound that proved it.
                optimistic = response_bounds(profile.rate_per_s, stop.optimistic)
                details = {**details, "pruned": True}
                pruned = Candidate(name, placement, (), optimistic, optimistic.lower_s, details)
                candidates.append(pruned)
                order.append(name)
                return
            bounds = response_bounds(profile.rate_per_s, chains)
        else:
            chains, bounds = planned
        if not chains:
            return
        candidate = Candidate(name, placement, chains, bounds, bounds.lower_s, details)
        value = score(candidate) if score is not None else bounds.lower_s
        candidates.append(dataclasses.replace(candidate, score_s=value))
        order.append(name)

    chain_plan: ChainPlan | None = None
    try:
        chain_plan = plan_chains(instance, profile, rho)
    except ChainsInfeasible as error:
        warnings.append(str(error))
    if chain_plan is not None:
        planned = None if per_client else (chain_plan.chains, chain_plan.bounds)
        add("chains", chain_plan.placement, {"c": chain_plan.c}, planned)
        warnings.extend(chain_plan.warnings)
        typical_ms = chain_plan.chains[0].service_ms if chain_plan.chains else 0.0
        sized = profile_instance(instance, profile)
        base = profile_concurrency(instance, profile, typical_ms)
        for concurrency in sorted({base, max(1, base // 4)}, reverse=True):
            try:
                placement = cg.place(sized, concurrency).placement
            except cg.InfeasibleError:
                continue
            add(f"cg-R{concurrency}", placement, {"concurrency": concurrency})
    result = petals.petals_place(scenario, instance)
    if _covers(result.placement, instance.num_blocks):
        add("petals", result.placement, {})
    if not candidates:
        raise ChainsInfeasible(
            "infeasible: no candidate placement covers every block with room for one request "
            + ("; ".join(warnings) if warnings else "")
        )
    usable = [c for c in candidates if c.chains]
    best = min(usable, key=lambda c: (_key(c.score_s), _key(c.bounds.upper_s), order.index(c.name)))
    return AutoPlan(
        best,
        tuple(candidates),
        profile,
        chain_plan,
        time.perf_counter() - started,
        tuple(warnings),
    )


def _rank(candidate: Candidate) -> tuple[float, float, int]:
    return (_key(candidate.score_s), 0.0, 0)


def _key(value: float) -> float:
    return round(value, 9) if math.isfinite(value) else math.inf


def _covers(placement: Placement, num_blocks: int) -> bool:
    covered = [False] * num_blocks
    for span in placement:
        if span is not None:
            for block in range(span.start, min(span.end, num_blocks)):
                covered[block] = True
    return all(covered)
