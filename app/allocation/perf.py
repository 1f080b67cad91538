"""The paper's performance model: memory use and inference time of a routed request.

Notation follows the paper. A route is a chain of hops; hop j processes k_j blocks at
server j, each block at the first server of the chain that hosts it (Lemma 1 for the chain to
be feasible: it starts at block 0, ends at block L, and every server hosts the boundary
where it enters).

    T(c, p) = sum_j (t^I_cj + k_j tau^I_j)  +  (l_max - 1) sum_j (t_cj + k_j tau_j)  +  per_request
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from app.allocation.instance import Instance, Placement
from app.allocation.scenario import cache_gb_per_block

__all__ = [
    "Hop",
    "InfeasiblePath",
    "RequestTiming",
    "blocks_processed",
    "cache_gb_per_block",
    "first_token_ms",
    "hops_for_path",
    "memory_used_gb",
    "per_token_ms",
    "request_timing",
    "total_ms",
]


class Hop(NamedTuple):
    """Server ``server`` processes blocks [start, end) of the request: k = end - start."""

    server: int
    start: int
    end: int

    @property
    def blocks(self) -> int:
        return self.end - self.start


class InfeasiblePath(ValueError):
    """A chain of servers that cannot process the blocks in order (violates Lemma 1)."""


def memory_used_gb(instance: Instance, span_length: int, cache_blocks: int) -> float:
    """Weights of the span plus one cache per block per request processed there."""
    return instance.block_gb * span_length + instance.cache_gb * cache_blocks


def hops_for_path(placement: Placement, path: Sequence[int], num_blocks: int) -> tuple[Hop, ...]:
    """The blocks each server of ``path`` processes (k_j), checking Lemma 1 on the way."""
    if not path:
        raise InfeasiblePath("empty path")
    boundary = 0
    hops = []
    for position, server in enumerate(path):
        span = placement[server]
        if span is None:
            raise InfeasiblePath(f"path[{position}]: server {server} hosts no blocks")
        if not span.start <= boundary < span.end:
            raise InfeasiblePath(
                f"path[{position}]: server {server} hosts [{span.start}, {span.end}) "
                f"but the request needs block {boundary} next"
            )
        hops.append(Hop(server, boundary, span.end))
        boundary = span.end
    if boundary != num_blocks:
        raise InfeasiblePath(f"path ends after block {boundary - 1}, the model has {num_blocks}")
    return tuple(hops)


def blocks_processed(placement: Placement, path: Sequence[int], num_blocks: int) -> list[int]:
    """k_j for every server on the path."""
    return [hop.blocks for hop in hops_for_path(placement, path, num_blocks)]


def per_token_ms(instance: Instance, client: int, hops: Sequence[Hop]) -> float:
    """One decode step: sum_j (t_cj + k_j tau_j)."""
    token_hop = instance.token_hop_ms[client]
    return float(sum(token_hop[h.server] + h.blocks * instance.decode_ms[h.server] for h in hops))


def prefill_ms(
    instance: Instance, client: int, hops: Sequence[Hop], input_tokens: int | None = None
) -> float:
    """The prefill step: sum_j (t^I_cj + k_j tau^I_j(l_in))."""
    hop_cost = instance.prefill_hop_ms(input_tokens)[client]
    block_cost = instance.prefill_ms(input_tokens)
    return float(sum(hop_cost[h.server] + h.blocks * block_cost[h.server] for h in hops))


def first_token_ms(
    instance: Instance, client: int, hops: Sequence[Hop], input_tokens: int | None = None
) -> float:
    """Time to first token: the per-request cost plus the prefill step."""
    return instance.per_request_ms + prefill_ms(instance, client, hops, input_tokens)


def total_ms(
    instance: Instance,
    client: int,
    hops: Sequence[Hop],
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> float:
    """T(c, p): first token, then (l_max - 1) further decode steps."""
    outputs = instance.output_tokens if output_tokens is None else output_tokens
    return first_token_ms(instance, client, hops, input_tokens) + (outputs - 1) * per_token_ms(
        instance, client, hops
    )


@dataclass(frozen=True)
class RequestTiming:
    first_token_ms: float
    per_token_ms: float
    total_ms: float


def request_timing(
    instance: Instance,
    client: int,
    hops: Sequence[Hop],
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> RequestTiming:
    outputs = instance.output_tokens if output_tokens is None else output_tokens
    first = first_token_ms(instance, client, hops, input_tokens)
    token = per_token_ms(instance, client, hops)
    return RequestTiming(first, token, first + (outputs - 1) * token)
