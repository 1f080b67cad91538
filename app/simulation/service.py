"""Service-time models: how long a routed request takes once its caches are allocated.

The simulator asks one question of a service model, at the moment a request starts:
"how long until its first token, and until its last?". Two models answer it:

- ``PaperServiceModel``: the paper's performance model (app.allocation.perf). A request's time
  does not depend on how many others run (memory, not compute, binds), so a request needs only
  a start and an end event.
- ``BatchedServiceModel``: a batching-aware variant. Each server's decode time per block is
  scaled by a slowdown factor f(b) = t(b) / t(1) taken from a measured per-layer decode profile
  (Helix, Llama-2-70B on an A100, ../shared/data/helix_per_layer_profile_ms.csv), where b is
  the number of requests the server is decoding when the request starts (itself included).
  The batch a request sees is frozen at its start, which keeps the event count per request at
  two; it over-estimates slightly when the batch later shrinks and under-estimates when it grows.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from app.allocation.instance import Instance
from app.allocation.perf import Hop

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class ServiceModel(Protocol):
    name: str

    def timing(
        self,
        client: int,
        hops: Sequence[Hop],
        input_tokens: int,
        output_tokens: int,
        batch: Sequence[int],
    ) -> tuple[float, float]:
        """(ms from start to first token, ms from start to last token).

        ``batch[i]`` is the number of requests active on hop i's server when this one starts,
        itself included; a concurrency-independent model ignores it.
        """
        ...


class PaperServiceModel:
    """T = per_request + sum_j (t^I_cj + k_j tau^I_j) + (l_out - 1) sum_j (t_cj + k_j tau_j)."""

    name = "paper"

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._token_hop = instance.token_hop_ms.tolist()
        self._decode = instance.decode_ms.tolist()
        self._rtt = instance.rtt_ms.tolist()
        self._prefill_fixed = instance.prefill_fixed_ms.tolist()
        self._prefill_per_token = instance.prefill_per_token_ms.tolist()

    def prefill_ms(self, client: int, hops: Sequence[Hop], input_tokens: int) -> float:
        inst = self.instance
        hop_extra = (
            inst.prefill_fixed_overhead_ms + inst.prefill_per_token_overhead_ms * input_tokens
        )
        rtt = self._rtt[client]
        total = 0.0
        for server, start, end in hops:
            block = self._prefill_fixed[server] + self._prefill_per_token[server] * input_tokens
            total += rtt[server] + hop_extra + (end - start) * block
        return total

    def decode_step_ms(self, client: int, hops: Sequence[Hop], batch: Sequence[int]) -> float:
        token_hop = self._token_hop[client]
        decode = self._decode
        return float(sum(token_hop[s] + (e - b) * decode[s] for s, b, e in hops))

    def timing(
        self,
        client: int,
        hops: Sequence[Hop],
        input_tokens: int,
        output_tokens: int,
        batch: Sequence[int],
    ) -> tuple[float, float]:
        first = self.instance.per_request_ms + self.prefill_ms(client, hops, input_tokens)
        return first, first + (output_tokens - 1) * self.decode_step_ms(client, hops, batch)


def load_decode_slowdown(
    model: str = "llama2_70b", machine: str = "a100", path: Path | None = None
) -> tuple[list[int], list[float]]:
    """Batch sizes and f(b) = t(b) / t(1) from the Helix per-layer decode profile."""
    path = path or DATA_DIR / "helix_per_layer_profile_ms.csv"
    points: list[tuple[int, float]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["model"] == model and row["machine"] == machine and row["phase"] == "decode":
                batch = int(row["batch_tokens"])
                if batch > 0:
                    points.append((batch, float(row["time_ms_per_layer"])))
    if not points:
        raise ValueError(f"{path}: no decode profile for {model} on {machine}")
    points.sort()
    sizes = [b for b, _ in points]
    times = np.array([t for _, t in points])
    # The profile is quantised to 0.1 ms and not monotone everywhere; a running maximum keeps
    # the slowdown non-decreasing in the batch size.
    times = np.maximum.accumulate(times)
    base = float(np.interp(1, sizes, times))
    return sizes, [float(t / base) for t in times]


class BatchedServiceModel(PaperServiceModel):
    """The paper's model with decode compute scaled by the batch the request joins."""

    name = "batched"

    def __init__(self, instance: Instance, sizes: list[int], slowdown: list[float]) -> None:
        super().__init__(instance)
        self._sizes = np.array(sizes, dtype=float)
        self._slowdown = np.array(slowdown, dtype=float)
        self._cache: dict[int, float] = {}

    @classmethod
    def from_profile(cls, instance: Instance) -> BatchedServiceModel:
        sizes, slowdown = load_decode_slowdown()
        return cls(instance, sizes, slowdown)

    def factor(self, batch: int) -> float:
        cached = self._cache.get(batch)
        if cached is None:
            cached = float(np.interp(batch, self._sizes, self._slowdown))
            self._cache[batch] = cached
        return cached

    def decode_step_ms(self, client: int, hops: Sequence[Hop], batch: Sequence[int]) -> float:
        token_hop = self._token_hop[client]
        decode = self._decode
        return float(
            sum(
                token_hop[s] + (e - b) * decode[s] * self.factor(n)
                for (s, b, e), n in zip(hops, batch, strict=True)
            )
        )


SERVICE_MODELS = ("paper", "batched")


def make_service_model(name: str, instance: Instance) -> PaperServiceModel:
    if name == "paper":
        return PaperServiceModel(instance)
    if name == "batched":
        return BatchedServiceModel.from_profile(instance)
    raise ValueError(f"unknown service model {name!r} (choose from {', '.join(SERVICE_MODELS)})")
