"""The numeric form of a scenario that the algorithms work on.

A Scenario is what people write; an Instance is the same swarm as arrays indexed by server
and client position, with every derived constant of the paper computed once:
L, s_m, s_c, M_j, tau_j, tau^I_j(l_in), t_cj (per-token hop cost) and t^I_cj (prefill hop cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from app.allocation.scenario import Scenario

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Floating-point slack when turning memory into whole blocks or cache slots, so that a server
# sized exactly for k slots is not rounded down to k-1 by representation error.
MEMORY_EPSILON = 1e-9


GB = 1e9
MAX_CACHE_UNITS = 2**62


def cache_token_capacity(
    memory_gb: float, block_gb: float, kv_bytes_per_token_per_block: float, blocks: int
) -> int:
    """Cache token-block units a server hosting ``blocks`` blocks has left after the weights.

    One unit is the kv cache of one token on one block; a request of T = input + output
    tokens that runs k blocks on the server reserves k x T units. Capped to 2**62.
    """
    if kv_bytes_per_token_per_block <= 0 or blocks < 0:
        raise ValueError("kv_bytes_per_token_per_block must be > 0 and blocks >= 0")
    free_bytes = (memory_gb - block_gb * blocks) * GB
    if free_bytes <= 0:
        return 0
    units = np.floor(free_bytes / kv_bytes_per_token_per_block + MEMORY_EPSILON)
    return int(min(MAX_CACHE_UNITS, units))


class Span(NamedTuple):
    """Blocks [start, end) hosted by one server (0-based, half-open as in PETALS)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def hosts(self, block: int) -> bool:
        return self.start <= block < self.end


# One entry per server, in scenario order; None: the server hosts nothing.
Placement = tuple[Span | None, ...]


@dataclass(frozen=True, eq=False)
class Instance:
    num_blocks: int
    block_gb: float
    cache_gb: float
    memory_gb: FloatArray
    decode_ms: FloatArray
    prefill_fixed_ms: FloatArray
    prefill_per_token_ms: FloatArray
    rtt_ms: FloatArray  # [client, server]
    per_token_overhead_ms: float
    prefill_fixed_overhead_ms: float
    prefill_per_token_overhead_ms: float
    per_request_ms: float
    input_tokens: int
    output_tokens: int
    client_shares: FloatArray  # normalised to sum 1
    server_ids: tuple[str, ...]
    client_ids: tuple[str, ...]
    # None: derived from cache_gb and the caps (instances built by hand before it existed).
    kv_bytes_per_token_per_block: float | None = None

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Instance:
        shares = np.array([c.share for c in scenario.clients], dtype=float)
        return cls(
            num_blocks=scenario.model.num_blocks,
            block_gb=scenario.model.block_memory_gb,
            cache_gb=scenario.cache_gb_per_block,
            memory_gb=np.array([s.memory_gb for s in scenario.servers], dtype=float),
            decode_ms=np.array([s.decode_ms_per_block for s in scenario.servers], dtype=float),
            prefill_fixed_ms=np.array(
                [s.prefill_ms_per_block.fixed for s in scenario.servers], dtype=float
            ),
            prefill_per_token_ms=np.array(
                [s.prefill_ms_per_block.per_token for s in scenario.servers], dtype=float
            ),
            rtt_ms=np.array(scenario.client_server_rtt(), dtype=float),
            per_token_overhead_ms=scenario.overheads.per_token_ms,
            prefill_fixed_overhead_ms=scenario.overheads.prefill_fixed_ms,
            prefill_per_token_overhead_ms=scenario.overheads.prefill_per_token_ms,
            per_request_ms=scenario.overheads.per_request_ms,
            input_tokens=scenario.requests.max_input_tokens,
            output_tokens=scenario.requests.max_output_tokens,
            client_shares=shares / shares.sum(),
            server_ids=tuple(s.id for s in scenario.servers),
            client_ids=tuple(c.id for c in scenario.clients),
            kv_bytes_per_token_per_block=scenario.model.kv_bytes_per_token_per_block,
        )

    @property
    def num_servers(self) -> int:
        return len(self.server_ids)

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    # --- the paper's per-hop constants ---------------------------------------------------

    @cached_property  # derived once: route queries read it on every call
    def token_hop_ms(self) -> FloatArray:
        """t_cj: network + system cost of one decode step at server j for client c."""
        return self.rtt_ms + self.per_token_overhead_ms

    def prefill_hop_ms(self, input_tokens: int | None = None) -> FloatArray:
        """t^I_cj: network + system cost of the prefill step at server j for client c."""
        tokens = self.input_tokens if input_tokens is None else input_tokens
        return (
            self.rtt_ms
            + self.prefill_fixed_overhead_ms
            + self.prefill_per_token_overhead_ms * tokens
        )

    def prefill_ms(self, input_tokens: int | None = None) -> FloatArray:
        """tau^I_j(l): prefill time of one block at server j for a prompt of l tokens."""
        tokens = self.input_tokens if input_tokens is None else input_tokens
        return self.prefill_fixed_ms + self.prefill_per_token_ms * tokens

    @property
    def kv_bytes(self) -> float:
        """Bytes of attention cache of one token on one block (one cache token-block unit)."""
        if self.kv_bytes_per_token_per_block is not None:
            return self.kv_bytes_per_token_per_block
        return self.cache_gb * GB / max(1, self.input_tokens + self.output_tokens)

    def cache_tokens(self, server: int, span_length: int) -> int:
        """Cache token-block units left on ``server`` after the weights of its span."""
        return cache_token_capacity(
            float(self.memory_gb[server]), self.block_gb, self.kv_bytes, span_length
        )

    def cache_slots(self, server: int, span_length: int) -> int:
        """Attention-cache slots (one request, one block each) left after the weights."""
        free = self.memory_gb[server] - self.block_gb * span_length
        return max(0, int(np.floor(free / self.cache_gb + MEMORY_EPSILON)))
