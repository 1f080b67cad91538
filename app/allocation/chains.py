"""Chains: GBP-CR placement, GCA cache allocation and the Theorem-4 response-time bounds.

From Sun, He, Hou (MobiHoc '26, arXiv 2604.14993; ../shared/CHAINS.md), in the project's
0-based half-open spans. Per server j and per job (the profile's mean lengths, perf.py's model):

    tau_c_j = prefill hop + (mean_out - 1) x token hop      (communication, once per hop)
    tau_p_j = prefill of one block + (mean_out - 1) x decode (computation, per block)

- GBP-CR(c): m_j(c) = min(floor(M_j / (s_m + s_c c)), L); servers by amortised time
  t_j / m_j ascending fill one chain at a time from block 0 (the last server of a chain shifts
  back to host its full m_j); stop once c x (sum of the chains' rates) >= lambda / rho. Servers
  past the stop stay idle; running out of servers first is reported (``rate_target_met``).
- GCA: on any placement, repeatedly take the fastest chain (a shortest path over block
  boundaries, Lemma 1) whose every hop has m_ij free cache slots, give it capacity
  c_k = min_j floor(residual_j / m_ij), subtract, until no chain remains.
- Theorem 4: birth-death bounds on the number in system under JFFC; mean response = E[Z] / lambda.

s_c (one job on one block) is sized for the profile's mean request (``design_tokens`` cache
tokens); at run time every request still reserves its own tokens (dispatch.jffc_pick checks).

Choosing c (the search over c): app/allocation/chain_search.py.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.allocation.instance import (
    GB,
    MAX_CACHE_UNITS,
    MEMORY_EPSILON,
    FloatArray,
    Instance,
    IntArray,
    Placement,
    Span,
)
from app.allocation.perf import Hop
from app.allocation.workload import WorkloadProfile

DEFAULT_RHO = 0.7


class ChainsInfeasible(ValueError):
    """No c lets the servers hold the model with room for one job's cache."""


@dataclass(frozen=True)
class Chain:
    """A fixed path over all blocks with ``capacity`` job slots; a job takes ``service_ms``."""

    hops: tuple[Hop, ...]
    capacity: int
    service_ms: float
    # Service time for a job of each client (the profile's mean lengths); service_ms is their
    # share-weighted mean. Empty when not computed.
    client_ms: tuple[float, ...] = ()

    @property
    def rate_per_s(self) -> float:
        """mu_k: jobs per second one slot completes."""
        return 1000.0 / self.service_ms if self.service_ms > 0 else math.inf

    def to_json(
        self, server_ids: Sequence[str] | None = None, client_sites: Sequence[str] | None = None
    ) -> dict[str, object]:
        """Hops by server id; with ``client_sites`` (the clients' sites, in client order) also
        the service time of each site's requests, so that a reader with another client list
        (the coordinator's route view, by site) orders the chains for its own clients."""
        hops = [
            [server_ids[h.server] if server_ids is not None else h.server, h.start, h.end]
            for h in self.hops
        ]
        data: dict[str, object] = {
            "hops": hops,
            "capacity": self.capacity,
            "service_ms": round(self.service_ms, 6),
        }
        if client_sites is not None and len(self.client_ms) == len(client_sites):
            by_site: dict[str, float] = {}
            for site, ms in zip(client_sites, self.client_ms, strict=True):
                by_site.setdefault(site, round(ms, 6))  # a site's clients share its times
            data["client_ms"] = by_site
        return data


@dataclass(frozen=True)
class Bounds:
    """Theorem 4: mean response time (s) under JFFC is within [lower_s, upper_s]."""

    lower_s: float
    upper_s: float
    stable: bool
    total_rate_per_s: float  # nu = sum c_k mu_k
    slots: int  # C = sum c_k

    @property
    def mid_s(self) -> float:
        return (self.lower_s + self.upper_s) / 2


@dataclass(frozen=True)
class JobCosts:
    """tau_c (per hop) and tau_p (per block) for one job of the profile, ms; per server."""

    tau_c: FloatArray
    tau_p: FloatArray
    per_request_ms: float
    tau_c_clients: FloatArray | None = None  # [client, server]: tau_c of each client

    def service_ms(self, hops: Sequence[Hop]) -> float:
        return self.per_request_ms + float(
            sum(self.tau_c[h.server] + self.tau_p[h.server] * h.blocks for h in hops)
        )

    def client_ms(self, hops: Sequence[Hop], service_ms: float | None = None) -> tuple[float, ...]:
        if self.tau_c_clients is None:
            return ()
        if len(self.tau_c_clients) == 1 and service_ms is not None:
            return (service_ms,)  # one client: its costs are the mean
        compute = sum(float(self.tau_p[h.server]) * h.blocks for h in hops)
        servers = [h.server for h in hops]
        per_client = self.tau_c_clients[:, servers].sum(axis=1)
        return tuple(float(v) + compute + self.per_request_ms for v in per_client.tolist())


def job_costs(instance: Instance, profile: WorkloadProfile) -> JobCosts:
    """Mean per-job costs of each server, averaged over clients by share."""
    mean_in = profile.mean_input_tokens
    later = profile.mean_output_tokens - 1.0
    prefill_hop = (
        instance.rtt_ms
        + instance.prefill_fixed_overhead_ms
        + instance.prefill_per_token_overhead_ms * mean_in
    )
    per_client = prefill_hop + later * instance.token_hop_ms  # [client, server]
    tau_c = instance.client_shares @ per_client
    tau_p = instance.prefill_fixed_ms + instance.prefill_per_token_ms * mean_in
    tau_p = tau_p + later * instance.decode_ms
    return JobCosts(
        np.asarray(tau_c, dtype=float),
        np.asarray(tau_p, dtype=float),
        instance.per_request_ms,
        np.asarray(per_client, dtype=float),
    )


# --- GBP-CR ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GbpResult:
    c: int
    placement: Placement
    chains: tuple[tuple[Hop, ...], ...]  # GBP-CR's own chains, in the order completed
    rate_target_met: bool
    block_counts: tuple[int, ...]


def block_counts(instance: Instance, s_c_gb: float, c: int) -> list[int]:
    """m_j(c) = min(floor(M_j / (s_m + s_c c)), L)."""
    per_block = instance.block_gb + s_c_gb * c
    counts = np.minimum(
        np.floor(instance.memory_gb / per_block + MEMORY_EPSILON), instance.num_blocks
    )
    return [int(m) for m in counts.tolist()]


def gbp_cr(
    instance: Instance,
    costs: JobCosts,
    s_c_gb: float,
    c: int,
    rate_per_s: float,
    rho: float = DEFAULT_RHO,
    counts: Sequence[int] | None = None,
) -> GbpResult:
    """Greedy block placement with cache reservation c (Algorithm 1 of the follow-up)."""
    if c < 1:
        raise ValueError("c: must be at least 1")
    if not 0 < rho <= 1:
        raise ValueError("rho: must be in (0, 1]")
    L = instance.num_blocks
    m = list(counts) if counts is not None else block_counts(instance, s_c_gb, c)
    if sum(m) < L:
        raise ChainsInfeasible(
            f"c={c}: the servers hold {sum(m)} of {L} blocks with room for {c} jobs' caches"
        )
    order = gbp_order(costs, m)
    target = rate_per_s / rho
    tau_c = costs.tau_c.tolist()
    tau_p = costs.tau_p.tolist()
    placed: list[tuple[int, int, int]] = []  # (server, span start, chain entry)
    ends: list[int] = []  # index into placed where each chain ends
    a = 0
    service = costs.per_request_ms
    rate = 0.0
    met = False
    for j in order:
        mj = m[j]
        placed.append((j, min(a, L - mj), a))
        service += tau_c[j] + tau_p[j] * mj
        a += mj
        if a >= L:
            ends.append(len(placed))
            rate += 1000.0 / service
            a, service = 0, costs.per_request_ms
            if c * rate >= target:
                met = True
                break
    spans: list[Span | None] = [None] * instance.num_servers
    for j, start, _ in placed:
        spans[j] = Span(start, start + m[j])
    chains = tuple(
        tuple(Hop(j, entry, start + m[j]) for j, start, entry in placed[begin:end])
        for begin, end in zip([0, *ends[:-1]], ends, strict=True)
    )
    return GbpResult(c, tuple(spans), chains, met, tuple(m))


def gbp_order(costs: JobCosts, m: Sequence[int]) -> list[int]:
    """Servers with m_j > 0 by amortised time (tau_c + tau_p m) / m ascending, ties by index."""
    counts = np.asarray(m, dtype=float)
    usable = np.flatnonzero(counts > 0)
    amortised = (costs.tau_c[usable] + costs.tau_p[usable] * counts[usable]) / counts[usable]
    return [int(j) for j in usable[np.lexsort((usable, amortised))].tolist()]


# --- GCA -------------------------------------------------------------------------------


def residual_slots(instance: Instance, placement: Placement, design_tokens: int) -> list[int]:
    """floor((M_j - s_m m_j) / s_c): job slots per server with s_c for ``design_tokens``."""
    lengths = np.array([0 if s is None else s.length for s in placement], dtype=float)
    free_bytes = (instance.memory_gb - instance.block_gb * lengths) * GB
    units = np.floor(np.maximum(free_bytes, 0.0) / instance.kv_bytes + MEMORY_EPSILON)
    slots = np.minimum(units, MAX_CACHE_UNITS) // design_tokens
    return [
        0 if span is None else int(v) for span, v in zip(placement, slots.tolist(), strict=True)
    ]


GcaStop = Callable[[Sequence[Chain], int], bool]


def gca(
    instance: Instance,
    costs: JobCosts,
    placement: Placement,
    residual: Sequence[int],
    stop: GcaStop | None = None,
) -> tuple[Chain, ...]:
    """Greedy cache allocation: chains fastest first, each with its capacity c_k.

    The shortest path runs over block boundaries (state b: blocks [0, b) done); entering
    server j at boundary b is Lemma 1's edge into j with m_ij = end_j - b blocks. Edges are
    only ever removed, so after a chain only boundaries from the first affected span end on
    are recomputed. ``stop(chains so far, slot-blocks left)``, asked after chains 1, 2, 4, 8,
    ..., may end the allocation early (the search over c prunes with it).
    """
    L = instance.num_blocks
    left = [int(r) for r in residual]
    # Pairs (server, entry) grouped by the span end they lead to.
    placed = [j for j, span in enumerate(placement) if span is not None and left[j] >= 1]
    for j in placed:
        span = placement[j]
        assert span is not None
        if not 0 <= span.start < span.end <= L:
            raise ValueError(f"server {j}: span [{span.start}, {span.end}) is out of range")
    starts = np.array([placement[j].start for j in placed], dtype=np.int64)  # type: ignore[union-attr]
    ends = np.array([placement[j].end for j in placed], dtype=np.int64)  # type: ignore[union-attr]
    lengths = ends - starts
    total = int(lengths.sum())
    pair_server = np.repeat(np.array(placed, dtype=np.int64), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pair_entry = np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - first)
    pair_end = np.repeat(ends, lengths)
    # Only boundary 0 and the span ends can be reached: other entries never start an edge.
    reachable = np.zeros(L + 1, dtype=bool)
    reachable[0] = True
    reachable[ends] = True
    keep = reachable[pair_entry]
    pair_server, pair_entry, pair_end = pair_server[keep], pair_entry[keep], pair_end[keep]
    order = np.argsort(pair_end, kind="stable")
    pair_server, pair_entry, pair_end = pair_server[order], pair_entry[order], pair_end[order]
    bounds = np.searchsorted(pair_end, np.arange(L + 2))
    left_array = np.array(left, dtype=np.int64)
    entries: list[IntArray] = []
    servers: list[IntArray] = []
    blocks: list[IntArray] = []
    cost: list[FloatArray] = []
    for e in range(L + 1):
        srv = pair_server[bounds[e] : bounds[e + 1]]
        ent = pair_entry[bounds[e] : bounds[e + 1]]
        k = e - ent
        servers.append(srv)
        entries.append(ent)
        blocks.append(k)
        usable = left_array[srv] >= k  # an edge needs m_ij free slots at its target
        cost.append(np.where(usable, costs.tau_c[srv] + costs.tau_p[srv] * k, np.inf))
    dist = np.full(L + 1, np.inf)
    dist[0] = 0.0
    choice = np.full(L + 1, -1, dtype=np.int64)
    nonempty = [e for e in range(1, L + 1) if servers[e].size]

    # Boundaries no pair leads to keep dist = inf for good; only the others are relaxed.
    def relax(first_end: int) -> None:
        for e in nonempty[bisect.bisect_left(nonempty, first_end) :]:
            candidates = dist[entries[e]] + cost[e]
            best = int(candidates.argmin())
            dist[e] = candidates[best]
            choice[e] = best

    # A server's live pairs (positions in its end's slice, block counts), found when first hit.
    own: dict[int, tuple[IntArray, IntArray]] = {}
    tau_c = costs.tau_c.tolist()
    tau_p = costs.tau_p.tolist()
    relax(1)
    chains: list[Chain] = []
    while np.isfinite(dist[L]):
        hops: list[Hop] = []
        b = L
        while b > 0:
            i = int(choice[b])
            entry = int(entries[b][i])
            hops.append(Hop(int(servers[b][i]), entry, b))
            b = entry
        hops.reverse()
        capacity = min(left[h.server] // h.blocks for h in hops)
        if capacity < 1:  # pragma: no cover - unusable edges carry infinite cost
            raise AssertionError("GCA picked an edge without free slots")
        service = costs.per_request_ms + sum(
            tau_c[h.server] + tau_p[h.server] * h.blocks for h in hops
        )
        chains.append(Chain(tuple(hops), capacity, service, costs.client_ms(hops, service)))
        if stop is not None and len(chains) & (len(chains) - 1) == 0 and stop(chains, sum(left)):
            break
        first_end = L
        for h in hops:
            j = h.server
            left[j] -= capacity * h.blocks
            e = h.end
            # Every edge into this server ends at its span end; drop those now too wide.
            if j not in own:
                positions = np.flatnonzero(servers[e] == j)
                own[j] = (positions, blocks[e][positions])
            positions, ks = own[j]
            dead = ks > left[j]
            if dead.any():
                cost[e][positions[dead]] = np.inf
                own[j] = (positions[~dead], ks[~dead])
                first_end = min(first_end, e)
        relax(first_end)
    return tuple(chains)


# --- Theorem 4 -------------------------------------------------------------------------


def response_bounds(rate_per_s: float, chains: Sequence[Chain]) -> Bounds:
    """Lower and upper bounds on the mean response time (s) of JFFC over ``chains``."""
    if rate_per_s <= 0:
        raise ValueError("rate_per_s: must be positive")
    rates = np.array([ch.rate_per_s for ch in chains], dtype=float)
    caps = np.array([ch.capacity for ch in chains], dtype=np.int64)
    slots = int(caps.sum())
    nu = float((rates * caps).sum())
    if slots == 0 or rate_per_s >= nu:
        return Bounds(math.inf, math.inf, False, nu, slots)
    slot_rates = np.repeat(rates, caps)
    fast_first = np.sort(slot_rates)[::-1]
    lower = _mean_in_system(rate_per_s, np.cumsum(fast_first), nu) / rate_per_s
    upper = _mean_in_system(rate_per_s, np.cumsum(fast_first[::-1]), nu) / rate_per_s
    return Bounds(lower, upper, True, nu, slots)


def _mean_in_system(lam: float, death: FloatArray, nu: float) -> float:
    """E[Z] of a birth-death chain: birth lam, death death[n-1] for n <= C, nu beyond."""
    capacity = death.size
    log_phi = np.concatenate(([0.0], np.cumsum(np.log(lam / death))))  # n = 0..C
    r = lam / nu
    top = float(log_phi.max())
    phi = np.exp(log_phi - top)
    n = np.arange(capacity + 1, dtype=float)
    tail_mass = phi[-1] * r / (1 - r)
    tail_mean = phi[-1] * (capacity * r / (1 - r) + r / (1 - r) ** 2)
    return float(((n * phi).sum() + tail_mean) / (phi.sum() + tail_mass))


def erlang_bound(lam: float, mu: float, slots: int) -> float:
    """A lower bound (s) on the mean response of M/M/C with C = slots servers of rate mu.

    Exact up to n = lambda / mu + 10 sqrt(lambda / mu) + 50 in system; beyond, every state
    dies at the full rate mu C (never below the truth, so the mean can only shrink), which
    keeps the cost independent of C for large swarms.
    """
    if slots < 1 or mu <= 0 or lam >= mu * slots:
        return math.inf
    load = lam / mu
    cut = min(slots, math.ceil(load + 10 * math.sqrt(load) + 50))
    death = mu * np.arange(1, cut + 1, dtype=float)
    return _mean_in_system(lam, death, mu * slots) / lam


# --- chains of a placement -----------------------------------------------------------


def chains_for_placement(
    instance: Instance,
    profile: WorkloadProfile,
    placement: Placement,
    costs: JobCosts | None = None,
) -> tuple[tuple[Chain, ...], Bounds]:
    """GCA chains of any placement and their Theorem-4 bounds for the profile."""
    costs = costs or job_costs(instance, profile)
    tokens = profile.design_tokens()
    residual = residual_slots(instance, placement, tokens)
    chains = gca(instance, costs, placement, residual)
    return chains, response_bounds(profile.rate_per_s, chains)


def client_costs(costs: JobCosts, client: int) -> JobCosts:
    """The same costs with tau_c of one client instead of the clients' mean."""
    if costs.tau_c_clients is None:
        return costs
    return dataclasses.replace(costs, tau_c=np.asarray(costs.tau_c_clients[client]))


def client_lower_bound(
    rate_per_s: float, per_client: Sequence[Sequence[Chain]], shares: Sequence[float]
) -> float:
    """Share-weighted Theorem-4 lower bound (s): client c alone on its own GCA chains
    ``per_client[c]`` with its own service times (what client-aware JFFC aims at)."""
    total = 0.0
    for client, (chains, share) in enumerate(zip(per_client, shares, strict=True)):
        own = [
            Chain(c.hops, c.capacity, c.client_ms[client] if c.client_ms else c.service_ms)
            for c in chains
        ]
        total += float(share) * response_bounds(rate_per_s, own).lower_s
    return total
