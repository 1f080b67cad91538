"""Shortest-path routing as a dynamic programme over block boundaries.

State b means "blocks 0..b-1 are done". A server hosting block b moves the request from b to
its span's end e at cost  hop_fixed[j] + per_block[j] x (e - b)  (+ an optional extra cost,
e.g. WS-RR's waiting time). This never builds the server-by-server graph (O(n^2) edges):
the index lists, for each boundary e, the (server, entry boundary) pairs that end at e, so a
query costs O(sum of span lengths) and runs as a handful of vector operations per boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.allocation.instance import FloatArray, IntArray, Placement
from app.allocation.perf import Hop

# extra_cost(servers, blocks) -> additional cost of entering each server to process that many
# blocks; must be vectorised over the two equal-length arrays.
ExtraCost = Callable[[IntArray, IntArray], FloatArray]


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    cost: float

    @property
    def servers(self) -> tuple[int, ...]:
        return tuple(h.server for h in self.hops)


class RouteIndex:
    """All the ways to cross each block boundary for one placement; build once, query often."""

    def __init__(self, placement: Placement, num_blocks: int) -> None:
        self.placement = placement
        self.num_blocks = num_blocks
        by_end: list[list[tuple[int, int]]] = [[] for _ in range(num_blocks + 1)]
        for server, span in enumerate(placement):
            if span is None:
                continue
            if not 0 <= span.start < span.end <= num_blocks:
                raise ValueError(
                    f"server {server}: span [{span.start}, {span.end}) is out of range"
                )
            for entry in range(span.start, span.end):
                by_end[span.end].append((server, entry))
        pairs = [pair for bucket in by_end for pair in bucket]
        self.servers: IntArray = np.array([p[0] for p in pairs], dtype=np.int64)
        self.entries: IntArray = np.array([p[1] for p in pairs], dtype=np.int64)
        ends = np.repeat(np.arange(num_blocks + 1), [len(b) for b in by_end])
        self.blocks: IntArray = (ends - self.entries).astype(np.int64)
        offsets = np.zeros(num_blocks + 2, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in by_end])
        # Python ints for slicing in the hot loop.
        self._slices = [
            (e, int(offsets[e]), int(offsets[e + 1]))
            for e in range(1, num_blocks + 1)
            if offsets[e + 1] > offsets[e]
        ]
        self.covered = all(offsets[e + 1] > offsets[e] for e in range(1, num_blocks + 1))

    @property
    def size(self) -> int:
        """Number of (server, entry boundary) pairs: the sum of span lengths."""
        return int(self.servers.size)

    def shortest(
        self,
        hop_fixed: FloatArray,
        per_block: FloatArray,
        extra_cost: ExtraCost | None = None,
    ) -> Route | None:
        """Cheapest chain from boundary 0 to L, or None when none exists.

        hop_fixed[j] = inf excludes server j (e.g. its lease expired). Ties go to the pair
        listed first (lower server index), so answers are deterministic.
        """
        edge = hop_fixed[self.servers] + per_block[self.servers] * self.blocks
        if extra_cost is not None and edge.size:
            edge = edge + extra_cost(self.servers, self.blocks)
        dist = np.full(self.num_blocks + 1, np.inf)
        dist[0] = 0.0
        choice = np.full(self.num_blocks + 1, -1, dtype=np.int64)
        entries = self.entries
        for end, lo, hi in self._slices:
            candidates = dist[entries[lo:hi]] + edge[lo:hi]
            best = int(candidates.argmin())
            if candidates[best] < dist[end]:
                dist[end] = candidates[best]
                choice[end] = lo + best
        total = float(dist[self.num_blocks])
        if not np.isfinite(total):
            return None
        hops = []
        boundary = self.num_blocks
        while boundary > 0:
            pair = int(choice[boundary])
            entry = int(entries[pair])
            hops.append(Hop(int(self.servers[pair]), entry, boundary))
            boundary = entry
        hops.reverse()
        return Route(tuple(hops), total)
