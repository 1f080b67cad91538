"""The online dispatchers, once: JFFC over chains and WS-RR over a placement. Pure functions.

Both the simulator's engine (app/simulation) and the coordinator's route view
(app/service/routeview.py) call these with a plain snapshot of the swarm; neither keeps a copy
of a rule. Memory is counted in cache token-block units (CONTRACTS.md section 1): a request of
T = input + output tokens that runs k blocks on a server holds k x T units there.

Snapshot arguments (one entry per server, in the caller's server order):
- ``capacity[j]``: cache units of server j (app.allocation.instance.cache_token_capacity, or
  PETALS' fixed budget petals_cache_tokens x m);
- ``used[j]``: units held or booked on j now;
- ``releases[j]``: [(time, units), ...] sorted by time: when each holder of j's units lets
  them go (bookings included); the times are in the same unit as ``now``;
- ``alive[j]`` (optional): False excludes server j (lease expired, draining).

Signatures::

    tokens_of(input_tokens: int, output_tokens: int) -> int
    units_needed(hops: Sequence[Hop], tokens: int) -> dict[int, int]        # server -> units
    jffc_pick(chains: Sequence[Chain], in_service: Sequence[int],
              free_units: Sequence[int] | IntArray (any indexable), tokens: int,
              alive: Sequence[bool] | None = None,
              order: Sequence[int] | None = None) -> int | None
    client_order(chains: Sequence[Chain], client: int) -> list[int]
    request_order(instance: Instance, chains: Sequence[Chain], client: int,
                  input_tokens: int, output_tokens: int) -> list[int]
    free_from(capacity: int, used: int, releases: Sequence[tuple[float, int]],
              units: int, now: float) -> float                               # inf: never
    earliest_start(hops, tokens, capacity, used, releases, now) -> float
    wsrr_costs(instance: Instance, client: int, input_tokens: float,
               output_tokens: float) -> tuple[FloatArray, FloatArray]       # hop_fixed, per_block
    wsrr_route(index: RouteIndex, hop_fixed: FloatArray, per_block: FloatArray, tokens: int,
               capacity, used, releases, now: float, *, alive=None,
               ms_per_time_unit: float = 1.0) -> WsrrChoice | None

JFFC (join the fastest free chain): ``chains`` fastest first; the first chain with fewer than
``capacity`` jobs in service AND ``tokens`` x k free units on every hop (and every hop server
alive) wins; None means the request waits in the central FIFO queue.

WS-RR: the shortest path over block boundaries where entering server j for k blocks costs
    hop_fixed[j] + k per_block[j] + waiting time until k x T units are free on j for good,
with hop_fixed = prefill hop + (l_out - 1) x token hop and per_block = prefill of one block +
(l_out - 1) x decode, from the lengths given: the request's own (or the profile's mean); the
faithful paper baseline passes the caps, as WS_RR.m does. ``WsrrChoice.start_at`` is the first
instant (unit of ``now``) from which every hop's units are free for good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.allocation.chains import Chain
from app.allocation.instance import FloatArray, Instance, IntArray
from app.allocation.perf import Hop, total_ms
from app.allocation.routing import RouteIndex

__all__ = [
    "WsrrChoice",
    "client_order",
    "earliest_start",
    "free_from",
    "jffc_pick",
    "request_order",
    "tokens_of",
    "units_needed",
    "wsrr_costs",
    "wsrr_route",
]

Releases = Sequence[Sequence[tuple[float, int]]]


class UnitsLookup(Protocol):
    """Free units by server index: a list, an array, or a lazy view."""

    def __getitem__(self, server: int, /) -> Any: ...


def tokens_of(input_tokens: int, output_tokens: int) -> int:
    """T: the cache tokens a request holds on every block it runs (at least 1)."""
    return max(1, int(input_tokens) + int(output_tokens))


def units_needed(hops: Sequence[Hop], tokens: int) -> dict[int, int]:
    """Units per server for a request on ``hops`` (a server visited twice needs both)."""
    needed: dict[int, int] = {}
    for server, start, end in hops:
        needed[server] = needed.get(server, 0) + (end - start) * tokens
    return needed


def jffc_pick(
    chains: Sequence[Chain],
    in_service: Sequence[int],
    free_units: UnitsLookup,
    tokens: int,
    alive: Sequence[bool] | None = None,
    order: Sequence[int] | None = None,
) -> int | None:
    """Index of the fastest chain with a free job slot and room for this request, or None.

    ``order``: the chain indices to try, fastest first for this request's client (default:
    the chains' own order, fastest on the clients' mean).
    """
    if len(in_service) != len(chains):
        raise ValueError("in_service: one entry per chain")
    for k in order if order is not None else range(len(chains)):
        chain = chains[k]
        if in_service[k] >= chain.capacity:
            continue
        fits = True
        for server, units in units_needed(chain.hops, tokens).items():
            if (alive is not None and not alive[server]) or free_units[server] < units:
                fits = False
                break
        if fits:
            return k
    return None


def client_order(chains: Sequence[Chain], client: int) -> list[int]:
    """Chain indices fastest first for ``client`` (by its own service times when the chains
    carry them, else the chains' order); ties keep the chains' order."""
    if not chains or not chains[0].client_ms:
        return list(range(len(chains)))
    return sorted(range(len(chains)), key=lambda k: (chains[k].client_ms[client], k))


def request_order(
    instance: Instance, chains: Sequence[Chain], client: int, input_tokens: int, output_tokens: int
) -> list[int]:
    """Chain indices fastest first for one request of ``client`` with these lengths, by the
    performance model (perf.total_ms): for callers whose chains carry no per-client times."""
    times = [
        total_ms(instance, client, chain.hops, input_tokens, output_tokens) for chain in chains
    ]
    return sorted(range(len(chains)), key=lambda k: (times[k], k))


def free_from(
    capacity: int, used: int, releases: Sequence[tuple[float, int]], units: int, now: float
) -> float:
    """The instant from which ``units`` units are free on a server for good (inf: never).

    Scans the releases in time order, as WS-RR does; counting booked holders as held from
    now on makes the answer safe to book against. The answer is ``now`` or exactly a release
    time (never ``now + (t - now)``, which can round one ulp below t).
    """
    free = capacity - used
    if free >= units:
        return now
    if units > capacity:
        return math.inf
    for at, held in releases:
        free += held
        if free >= units:
            return max(now, at)
    return math.inf


def earliest_start(
    hops: Sequence[Hop],
    tokens: int,
    capacity: Sequence[int],
    used: Sequence[int],
    releases: Releases,
    now: float,
) -> float:
    """The first instant from which every hop's units are free for good (inf: never)."""
    at = now
    for server, units in units_needed(hops, tokens).items():
        at = max(at, free_from(capacity[server], used[server], releases[server], units, now))
    return at


def wsrr_costs(
    instance: Instance, client: int, input_tokens: float, output_tokens: float
) -> tuple[FloatArray, FloatArray]:
    """WS-RR's (hop_fixed, per_block) for one request of ``client`` with these lengths."""
    later = max(0.0, float(output_tokens) - 1.0)
    prefill_hop = (
        instance.rtt_ms[client]
        + instance.prefill_fixed_overhead_ms
        + instance.prefill_per_token_overhead_ms * input_tokens
    )
    hop_fixed = prefill_hop + later * instance.token_hop_ms[client]
    per_block = instance.prefill_fixed_ms + instance.prefill_per_token_ms * input_tokens
    return hop_fixed, per_block + later * instance.decode_ms


@dataclass(frozen=True)
class WsrrChoice:
    hops: tuple[Hop, ...]
    cost_ms: float  # the path's WS-RR cost, waiting included
    start_at: float  # when every hop's units are free (unit of ``now``)
    wait_ms: float  # (start_at - now) in ms


def wsrr_route(
    index: RouteIndex,
    hop_fixed: FloatArray,
    per_block: FloatArray,
    tokens: int,
    capacity: Sequence[int] | IntArray,
    used: Sequence[int] | IntArray,
    releases: Releases,
    now: float,
    *,
    alive: Sequence[bool] | None = None,
    ms_per_time_unit: float = 1.0,
) -> WsrrChoice | None:
    """WS-RR's route for one request (None: no chain of live servers covers the model)."""
    capacity_array = np.asarray(capacity, dtype=np.int64)
    free = capacity_array - np.asarray(used, dtype=np.int64)
    fixed = hop_fixed
    if alive is not None:
        fixed = np.where(np.asarray(alive, dtype=bool), hop_fixed, np.inf)

    def waiting(servers: IntArray, blocks: IntArray) -> FloatArray:
        cost = np.zeros(servers.size)
        short = np.flatnonzero(free[servers] < blocks * tokens)
        memo: dict[tuple[int, int], float] = {}
        for i in short.tolist():
            key = (int(servers[i]), int(blocks[i]))
            value = memo.get(key)
            if value is None:
                j = key[0]
                at = free_from(
                    int(capacity_array[j]),
                    int(capacity_array[j] - free[j]),
                    releases[j],
                    key[1] * tokens,
                    now,
                )
                value = (at - now) * ms_per_time_unit
                memo[key] = value
            cost[i] = value
        return cost

    # The zero-wait route first: while all its servers have room, nothing is cheaper.
    route = index.shortest(fixed, per_block)
    if route is None:
        return None
    if any(free[s] < units for s, units in units_needed(route.hops, tokens).items()):
        route = index.shortest(fixed, per_block, waiting)
        if route is None:
            return None
    start = earliest_start(
        route.hops, tokens, capacity_array.tolist(), (capacity_array - free).tolist(), releases, now
    )
    if not math.isfinite(start):
        return None
    return WsrrChoice(route.hops, route.cost, start, (start - now) * ms_per_time_unit)
