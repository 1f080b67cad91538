"""The PETALS 2.2 baseline: how PETALS sizes, places and routes, as the paper compares against.

Sources (bigscience-workshop/petals 2.2) and the authors' MATLAB re-implementation
(TingyangSunJeff/LLM_inference_simulator); where the two differ we follow PETALS and say so.

Block counts (``server.py::Server._choose_num_blocks``)::

    num_blocks = floor((M - autograd) / (block + cache_per_block)),  capped at L
    autograd        = 2 GiB x hidden_size / 14336                 (bytes, GiB = 2^30)
    cache_per_block = 2 x hidden x cache_tokens x 2 bytes / kv_groups
                    = kv_bytes_per_token_per_block x cache_tokens  (4096, or 16384 with GQA)

Scenario memory is in GB (10^9 bytes), the reserve in GiB: everything is converted to bytes.
A server for which this is below 1 cannot start in PETALS (an assertion); here it holds nothing.

Throughput (``server/throughput.py::get_server_throughput``), in requests per second::

    throughput(n) = min(forward_rps / ((n + 1) / 2), network_rps)
    forward_rps   = 1024 x 1000 / tau^I(1024)        (a 1024-token forward pass of one block)
    network_rps   = network_mbps x 10^6 / (hidden x 16)

Placement (``server/block_selection.py``): servers join one at a time; each takes the window
of ``n`` blocks whose sorted per-block throughput vector is lexicographically smallest (ties:
the lowest start). Optional rebalancing (``should_choose_other_blocks``, balance_quality 0.75):
a server leaves and re-chooses when the swarm's bottleneck throughput could improve so much
that current / improved < 0.75.

Routing (``client/routing/sequence_manager.py``, min-latency mode): Dijkstra where entering a
server costs RTT/2 (capped at 5 s) + 18 ms, each block 1 / inference_rps (= tau_j), the hop to
the client after the last block RTT/2, and 10 s more when the server lacks free cache for the
request. The client relays every hop (the paper's fault-tolerant setting), so the RTT of every
hop is the client's RTT to that server. (PETALS itself uses server-to-server pings for middle
hops when servers push to each other directly; the authors' code uses server-to-server RTTs
too. The brief fixes the client-relay reading; see PetalsRouter.)

Differences from the authors' MATLAB (Petals_online.m and helpers), where we follow PETALS:
- they cap MIG slices at 4 blocks by hand; here the formula itself gives 4 on 9.1 GB;
- they add the 10 s penalty when a server's whole-span session count is used up
  (session_capacity - active == 0); PETALS compares free cache tokens with
  2 x tokens x span length, i.e. free slots >= span length, which is what we do;
- their middle hops use server-to-server RTTs (RTT_raw(i, j)); see above;
- retries, bans and waiting belong to the simulator, not to this module.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.allocation.cg import InfeasibleError
from app.allocation.instance import FloatArray, Instance, IntArray, Placement, Span
from app.allocation.perf import Hop
from app.allocation.routing import Route, RouteIndex
from app.allocation.scenario import Scenario
from app.allocation.solve import PlannedRoute, Solution, mean_per_token_ms

__all__ = [
    "ALLOC_PENALTY_MS",
    "BALANCE_QUALITY",
    "OVERHEAD_MS",
    "PetalsPlacement",
    "PetalsRouter",
    "autograd_reserve_bytes",
    "balance_quality_after_move",
    "cache_bytes_per_block",
    "choose_best_start",
    "petals_block_counts",
    "petals_cache_slots",
    "petals_place",
    "server_throughputs",
    "should_choose_other_blocks",
    "solve_petals",
    "throughput_rps",
]

GIB = 1024**3
GB = 1e9
BLOOM_HIDDEN = 14336  # PETALS scales its 2 GiB autograd reserve (measured on BLOOM) by hidden size
DEFAULT_NETWORK_MBPS = 100.0  # PETALS' fallback when speedtest fails
FORWARD_TOKENS = 1024  # forward_rps is measured with a 1024-token batch
OVERHEAD_MS = 18.0  # serialization overhead per hop, sequence_manager.py
ALLOC_PENALTY_MS = 10_000.0  # penalty for a server without enough free cache
MAX_DELAY_MS = 5_000.0  # _rtt_to_delay caps rtt / 2 at 5 s
BALANCE_QUALITY = 0.75
_EPS = 1e-3  # block_selection.py's eps (hysteresis and the "disjoint swarm" test)
# Rounding slack when flooring memory ratios, so that a server sized exactly for k blocks
# is not rounded down by representation error (the quantities are ~1e10 bytes).
_FLOOR_SLACK = 1e-9


# --- sizing ------------------------------------------------------------------------------


def autograd_reserve_bytes(scenario: Scenario) -> float:
    """2 GiB x hidden_size / 14336: PETALS' estimate of rpc_backward's memory, in bytes."""
    return 2 * GIB * scenario.model.effective_hidden_size / BLOOM_HIDDEN


def cache_bytes_per_block(scenario: Scenario) -> float:
    """The attention cache PETALS reserves for every block it hosts, in bytes.

    PETALS: 2 x hidden x attn_cache_tokens / num_key_value_groups x dtype bytes; with the
    key/value width written as kv_bytes_per_token_per_block this is kv_bytes x cache_tokens
    (for multi-head attention in fp16, kv_bytes = 4 x hidden, i.e. 2 x hidden x 2 bytes).
    """
    model = scenario.model
    return model.kv_bytes_per_token_per_block * model.effective_petals_cache_tokens


def petals_block_counts(scenario: Scenario) -> list[int]:
    """num_blocks = min(floor((M - autograd) / (block + cache per block)), L) for every server.

    A server that cannot hold one block gets 0 (PETALS refuses to start it).
    """
    reserve = autograd_reserve_bytes(scenario)
    per_block = scenario.model.block_memory_gb * GB + cache_bytes_per_block(scenario)
    counts = []
    for server in scenario.servers:
        fits = math.floor((server.memory_gb * GB - reserve) / per_block + _FLOOR_SLACK)
        counts.append(max(0, min(fits, scenario.model.num_blocks)))
    return counts


def petals_cache_slots(scenario: Scenario, block_counts: Sequence[int]) -> list[int]:
    """PETALS' fixed attention cache per server in (one request x one block) slots.

    The cache holds m x cache_tokens tokens of one block's keys and values; a request reserves
    l_in + l_max tokens on each block it runs there. (The authors' code counts the same
    slots, n_caches = floor(m x cache_bytes_per_block / s_c).)
    """
    tokens = scenario.requests.max_input_tokens + scenario.requests.max_output_tokens
    cache_tokens = scenario.model.effective_petals_cache_tokens
    return [m * cache_tokens // tokens for m in block_counts]


def petals_cache_units(scenario: Scenario, block_counts: Sequence[int]) -> list[int]:
    """PETALS' fixed attention cache per server in token-block units: cache_tokens x m.

    Each inference session reserves its own (prompt + max_new_tokens) x k inside it, as
    PETALS 2.2 allocates per session (CONTRACTS.md section 1).
    """
    cache_tokens = scenario.model.effective_petals_cache_tokens
    return [m * cache_tokens for m in block_counts]


# --- throughput --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Speeds:
    forward_rps: FloatArray
    network_rps: FloatArray
    inference_rps: FloatArray


def _speeds(scenario: Scenario) -> _Speeds:
    hidden = scenario.model.effective_hidden_size
    forward = []
    network = []
    inference = []
    for server in scenario.servers:
        forward_ms = server.prefill_ms_per_block.at(FORWARD_TOKENS)
        # A server with a zero prefill time is "infinitely fast": the network binds.
        forward.append(FORWARD_TOKENS * 1000.0 / forward_ms if forward_ms > 0 else math.inf)
        mbps = server.network_mbps if server.network_mbps is not None else DEFAULT_NETWORK_MBPS
        network.append(mbps * 1e6 / (hidden * 16))
        inference.append(1000.0 / server.decode_ms_per_block)
    return _Speeds(np.array(forward), np.array(network), np.array(inference))


def throughput_rps(forward_rps: float, network_rps: float, num_blocks: int) -> float:
    """min(forward_rps / ((n + 1) / 2), network_rps): a request uses (n + 1) / 2 blocks."""
    if num_blocks < 1:
        raise ValueError("num_blocks must be at least 1")
    return min(forward_rps / ((num_blocks + 1) / 2), network_rps)


def server_throughputs(scenario: Scenario, block_counts: Sequence[int]) -> list[float]:
    """The throughput each server announces for its block count (0 for a server with none)."""
    speeds = _speeds(scenario)
    return [
        throughput_rps(float(speeds.forward_rps[j]), float(speeds.network_rps[j]), m)
        if m > 0
        else 0.0
        for j, m in enumerate(block_counts)
    ]


# --- block selection ---------------------------------------------------------------------


def choose_best_start(throughputs: Sequence[float] | FloatArray, length: int) -> int:
    """The start of the window whose sorted throughputs are lexicographically smallest.

    Ties go to the lowest start (PETALS takes min over (sorted window, start)).
    """
    values = np.asarray(throughputs, dtype=float)
    if not 1 <= length <= values.size:
        raise ValueError(f"window length {length} does not fit {values.size} blocks")
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(values, length), axis=1)
    # lexsort's last key is primary and the sort is stable, so equal windows keep start order.
    return int(np.lexsort(windows.T[::-1])[0])


def _block_throughputs(
    spans: Sequence[Span | None], throughputs: Sequence[float], num_blocks: int
) -> FloatArray:
    total = np.zeros(num_blocks)
    for span, value in zip(spans, throughputs, strict=True):
        if span is not None:
            total[span.start : span.end] += value
    return total


def balance_quality_after_move(
    spans: Sequence[Span | None],
    throughputs: Sequence[float],
    local: int,
    num_blocks: int,
    rng: np.random.Generator | None = None,
) -> float | None:
    """PETALS' should_choose_other_blocks up to the final comparison.

    Returns current bottleneck / bottleneck after the local server and then everyone else
    re-chose their windows, or None when PETALS decides not to move before computing it
    (moving would disconnect the swarm, the server is already at its best start, or the
    simulated move would not improve the bottleneck).
    """
    span = spans[local]
    if span is None:
        raise ValueError(f"server {local} hosts no blocks")
    rng = rng if rng is not None else np.random.default_rng(0)
    current = list(spans)
    block_tp = _block_throughputs(current, throughputs, num_blocks)
    initial = float(block_tp.min())
    own = throughputs[local]
    block_tp[span.start : span.end] -= own * (1 + _EPS)
    if initial > _EPS and block_tp.min() <= 0:
        return None  # leaving would make the swarm disjoint
    new_start = choose_best_start(block_tp, span.length)
    if new_start == span.start:
        return None  # already at its best place
    block_tp[span.start : span.end] += own * _EPS
    current[local] = Span(new_start, new_start + span.length)
    block_tp[new_start : new_start + span.length] += own
    hosts = [j for j, s in enumerate(current) if s is not None]
    # PETALS loops until no server moves; the eps hysteresis makes this converge, the cap
    # only guards against float pathologies.
    for _ in range(100 * max(1, len(hosts))):
        moved = False
        for j in rng.permutation(hosts):
            server = int(j)
            old = current[server]
            assert old is not None
            tp = throughputs[server]
            block_tp[old.start : old.end] -= tp * (1 + _EPS)
            start = choose_best_start(block_tp, old.length)
            block_tp[old.start : old.end] += tp * _EPS
            if start != old.start:
                current[server] = old = Span(start, start + old.length)
                moved = True
            block_tp[old.start : old.end] += tp
        if not moved:
            break
    improved = float(block_tp.min())
    if improved < initial or improved < _EPS:
        return None
    return initial / improved


def should_choose_other_blocks(
    spans: Sequence[Span | None],
    throughputs: Sequence[float],
    local: int,
    num_blocks: int,
    balance_quality: float = BALANCE_QUALITY,
    rng: np.random.Generator | None = None,
) -> bool:
    """PETALS' rebalancing test: move when current / achievable bottleneck < balance_quality."""
    if balance_quality > 1.0:
        return True  # PETALS: forces rebalancing on every check
    quality = balance_quality_after_move(spans, throughputs, local, num_blocks, rng)
    return quality is not None and quality < balance_quality - _EPS


# --- placement ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PetalsPlacement:
    placement: Placement  # spans per server (None for servers that hold nothing)
    block_counts: tuple[int, ...]
    # PETALS' fixed attention cache per server, in slots of (one request x one block) for this
    # scenario's request length l_in + l_max; a request is admitted on a server only while
    # enough of these are free.
    cache_slots: tuple[int, ...]
    join_order: tuple[int, ...]
    throughputs: tuple[float, ...]  # requests/s each server announces
    moves: int = 0  # servers that re-chose their blocks while rebalancing


def _check_order(order: Sequence[int], n: int) -> tuple[int, ...]:
    result = tuple(int(j) for j in order)
    if sorted(result) != list(range(n)):
        raise ValueError(f"order: must list every server index 0..{n - 1} exactly once")
    return result


def _check_counts(counts: Sequence[int], n: int, num_blocks: int) -> tuple[int, ...]:
    result = tuple(int(m) for m in counts)
    if len(result) != n:
        raise ValueError(f"block_counts: expected {n} entries (one per server), got {len(result)}")
    for j, m in enumerate(result):
        if not 0 <= m <= num_blocks:
            raise ValueError(f"block_counts[{j}]: {m} is outside 0..{num_blocks}")
    return result


def petals_place(
    scenario: Scenario,
    instance: Instance,
    order: Sequence[int] | None = None,
    block_counts: Sequence[int] | None = None,
    rebalance: bool = False,
    *,
    balance_quality: float = BALANCE_QUALITY,
    seed: int = 0,
) -> PetalsPlacement:
    """PETALS' placement: servers join in ``order`` and each takes its best window.

    ``block_counts`` overrides PETALS' own sizing (the cache reserved is still PETALS' fixed
    cache for that many blocks). With ``rebalance``, after everyone joined, servers check in
    join order whether to move (should_choose_other_blocks) until none does; a server that
    moves leaves and re-joins at its best window, as a restarted PETALS server does. The
    simulated moves inside the check visit servers in a random order (seeded by ``seed``).
    """
    n = instance.num_servers
    L = instance.num_blocks
    join = _check_order(range(n) if order is None else order, n)
    counts = _check_counts(
        petals_block_counts(scenario) if block_counts is None else block_counts, n, L
    )
    tps = server_throughputs(scenario, counts)
    spans: list[Span | None] = [None] * n
    block_tp = np.zeros(L)
    for server in join:
        m = counts[server]
        if m == 0:
            continue
        start = choose_best_start(block_tp, m)
        spans[server] = Span(start, start + m)
        block_tp[start : start + m] += tps[server]
    moves = 0
    if rebalance:
        rng = np.random.default_rng(seed)
        hosts = [j for j in join if spans[j] is not None]
        for _ in range(10 * max(1, len(hosts))):
            moved = False
            for server in hosts:
                if not should_choose_other_blocks(spans, tps, server, L, balance_quality, rng):
                    continue
                spans[server] = None
                remaining = _block_throughputs(spans, tps, L)
                start = choose_best_start(remaining, counts[server])
                spans[server] = Span(start, start + counts[server])
                moves += 1
                moved = True
            if not moved:
                break
    return PetalsPlacement(
        placement=tuple(spans),
        block_counts=counts,
        cache_slots=tuple(petals_cache_slots(scenario, counts)),
        join_order=join,
        throughputs=tuple(tps),
        moves=moves,
    )


# --- routing -----------------------------------------------------------------------------


class PetalsRouter:
    """PETALS' min-latency routing (Dijkstra over block boundaries), costs in ms.

    Entering server j costs min(RTT_cj / 2, 5 s) + 18 ms, each block there tau_j
    (1 / inference_rps), and the last server adds min(RTT_cj / 2, 5 s) for the way back.
    ``free_slots[j]`` is server j's free cache in (request x block) slots. PETALS judges
    "free cache" pessimistically (``_has_cache_for``): the request must fit on *all* blocks
    the server hosts (cache_tokens_needed x 2 x span.length <= cache_tokens_left, i.e.
    free_slots[j] >= span length), whatever part of the span the route uses. That is the
    default ``cache_check="span"``; ``cache_check="hop"`` instead charges the 10 s penalty
    only when free_slots[j] < k, the blocks the hop actually runs there. (The authors' code
    charges it when the server's whole-span session count is used up: same as "span" when
    every request takes whole spans.)
    """

    def __init__(
        self,
        scenario: Scenario,
        instance: Instance,
        placement: Placement,
        *,
        cache_check: Literal["span", "hop"] = "span",
    ) -> None:
        if len(placement) != instance.num_servers:
            raise ValueError(
                f"placement: expected {instance.num_servers} entries, got {len(placement)}"
            )
        if cache_check not in ("span", "hop"):
            raise ValueError(f"cache_check: must be 'span' or 'hop', not {cache_check!r}")
        self.instance = instance
        self.placement = placement
        self.cache_check = cache_check
        L = instance.num_blocks
        self.index = RouteIndex(placement, L)
        half_rtt = np.minimum(instance.rtt_ms / 2.0, MAX_DELAY_MS)  # [client, server]
        ends_last = np.array([s is not None and s.end == L for s in placement], dtype=bool)
        self._hop_fixed: FloatArray = half_rtt + OVERHEAD_MS + np.where(ends_last, half_rtt, 0.0)
        speeds = _speeds(scenario)
        self._per_block: FloatArray = 1000.0 / speeds.inference_rps
        self.span_lengths: IntArray = np.array(
            [0 if s is None else s.length for s in placement], dtype=np.int64
        )

    def route(
        self,
        client: int,
        free_slots: IntArray | None = None,
        banned: Collection[int] = (),
    ) -> Route | None:
        """PETALS' route for one request of ``client``; None when no chain covers all blocks.

        A banned server is left out (PETALS' client skips temporarily banned peers).
        """
        n = self.instance.num_servers
        if not 0 <= client < self.instance.num_clients:
            raise ValueError(f"client: {client} is outside 0..{self.instance.num_clients - 1}")
        fixed = self._hop_fixed[client].copy()
        for server in banned:
            if not 0 <= server < n:
                raise ValueError(f"banned: server {server} is outside 0..{n - 1}")
            fixed[server] = math.inf
        extra: Callable[[IntArray, IntArray], FloatArray] | None = None
        if free_slots is not None:
            free = np.asarray(free_slots)
            if free.shape != (n,):
                raise ValueError(f"free_slots: expected {n} entries (one per server)")
            if self.cache_check == "span":
                fixed = fixed + np.where(free < self.span_lengths, ALLOC_PENALTY_MS, 0.0)
            else:

                def extra(servers: IntArray, blocks: IntArray) -> FloatArray:
                    return np.where(free[servers] < blocks, ALLOC_PENALTY_MS, 0.0)

        return self.index.shortest(fixed, self._per_block, extra)


# --- the offline solve -------------------------------------------------------------------


def _interleaved(counts: Sequence[int]) -> list[int]:
    """Clients in arrival order: round robin over those with requests left."""
    left = list(counts)
    sequence: list[int] = []
    while any(left):
        for client, remaining in enumerate(left):
            if remaining > 0:
                sequence.append(client)
                left[client] -= 1
    return sequence


def _uncovered_blocks(placement: Placement, num_blocks: int) -> list[int]:
    covered = np.zeros(num_blocks, dtype=bool)
    for span in placement:
        if span is not None:
            covered[span.start : span.end] = True
    return [int(b) for b in np.flatnonzero(~covered)]


def solve_petals(
    scenario: Scenario, instance: Instance, concurrency: int, counts: list[int]
) -> Solution:
    """PETALS' placement, then the |R| planned requests routed one after another.

    Each request takes its cache (k slots at each server of its route) as it is admitted; one
    routed onto a server without enough free cache still counts, on the route PETALS picks
    (with the 10 s penalty in its costs). Objective: mean per-token decode time of the routes.
    """
    started = time.perf_counter()
    result = petals_place(scenario, instance)
    uncovered = _uncovered_blocks(result.placement, instance.num_blocks)
    if uncovered:
        shown = ", ".join(map(str, uncovered[:10])) + (" ..." if len(uncovered) > 10 else "")
        raise InfeasibleError(
            f"infeasible: PETALS' placement leaves {len(uncovered)} of {instance.num_blocks} "
            f"blocks unserved (blocks {shown}); PETALS block counts per server: "
            f"{list(result.block_counts)}"
        )
    router = PetalsRouter(scenario, instance, result.placement)
    free = np.array(result.cache_slots, dtype=np.int64)
    tally: Counter[tuple[int, tuple[Hop, ...]]] = Counter()
    lacking_cache = 0
    for client in _interleaved(counts):
        route = router.route(client, free)
        if route is None:  # pragma: no cover - coverage was checked above
            raise InfeasibleError(f"client {instance.client_ids[client]!r}: no route")
        short = False
        for hop in route.hops:
            if free[hop.server] < hop.blocks:
                short = True
            free[hop.server] = max(0, int(free[hop.server]) - hop.blocks)
        lacking_cache += short
        tally[(client, route.hops)] += 1
    planned = tuple(PlannedRoute(client, number, hops) for (client, hops), number in tally.items())
    return Solution(
        algorithm="petals",
        concurrency=concurrency,
        placement=result.placement,
        routes=planned,
        objective_ms_per_token=mean_per_token_ms(instance, planned),
        bound_ms_per_token=None,
        optimal=None,
        status="heuristic",
        solve_seconds=time.perf_counter() - started,
        details={
            "block_counts": list(result.block_counts),
            "cache_slots": list(result.cache_slots),
            "order": list(result.join_order),
            "throughputs_rps": [round(t, 6) for t in result.throughputs],
            "requests_without_cache": lacking_cache,
        },
    )
