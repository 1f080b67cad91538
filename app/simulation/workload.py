"""Request workloads for the simulator: seeded Poisson arrivals and Azure trace replay.

A workload is four equal-length arrays, sorted by arrival time: arrival (ms since the start),
client index (drawn by share), input tokens and output tokens. Poisson requests use the
scenario's maxima (l_in, l_max), as the paper does, unless the workload gives length
distributions (drawn from, capped at the maxima); trace requests carry their own token
counts, capped at the scenario's maxima (SCENARIO.md), so that one attention-cache slot (sized
for the maxima) always holds a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.allocation.scenario import PoissonWorkload, Scenario, TraceWorkload, resolve_trace
from app.allocation.traces import WorkloadError, read_trace
from app.allocation.workload import WorkloadProfile

__all__ = [
    "Workload",
    "WorkloadError",
    "poisson_workload",
    "read_trace",
    "scenario_workload",
    "trace_workload",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Workload:
    arrival_ms: FloatArray
    client: IntArray
    input_tokens: IntArray
    output_tokens: IntArray
    description: str

    def __len__(self) -> int:
        return int(self.arrival_ms.size)

    @property
    def rate_per_s(self) -> float:
        """The mean arrival rate (requests per second) the design concurrency is sized for."""
        n = len(self)
        if n <= 1:
            return 1.0
        span_s = float(self.arrival_ms[-1] - self.arrival_ms[0]) / 1000.0
        return (n - 1) / span_s if span_s > 0 else float(n)


def poisson_workload(
    scenario: Scenario, rate_per_s: float, num_requests: int, seed: int
) -> Workload:
    """Poisson arrivals at ``rate_per_s``; each request's client is drawn by share."""
    if rate_per_s <= 0:
        raise WorkloadError("workload.rate_per_s: must be positive")
    if num_requests < 1:
        raise WorkloadError("workload.num_requests: must be at least 1")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1000.0 / rate_per_s, size=num_requests)
    arrival = np.cumsum(gaps)
    client = _draw_clients(scenario, rng, num_requests)
    inputs, outputs = _lengths(scenario, rng, num_requests)
    return Workload(
        arrival_ms=arrival.astype(np.float64),
        client=client,
        input_tokens=inputs,
        output_tokens=outputs,
        description=f"poisson rate {rate_per_s:g}/s, {num_requests} requests, seed {seed}",
    )


def _lengths(scenario: Scenario, rng: np.random.Generator, count: int) -> tuple[IntArray, IntArray]:
    """Token counts: the caps, or draws from the workload's length distributions (capped)."""
    caps = scenario.requests
    inputs = np.full(count, caps.max_input_tokens, dtype=np.int64)
    outputs = np.full(count, caps.max_output_tokens, dtype=np.int64)
    spec = scenario.workload
    if isinstance(spec, PoissonWorkload) and (spec.input_tokens or spec.output_tokens):
        # A separate stream, so adding lengths leaves the arrivals and clients unchanged.
        draws = np.random.default_rng([spec.seed, 7]).random((2, count))
        profile = WorkloadProfile.from_scenario(scenario)
        if spec.input_tokens is not None:
            values = np.rint(profile.input_tokens.quantile(draws[0]))
            inputs = np.clip(values, 0, caps.max_input_tokens).astype(np.int64)
        if spec.output_tokens is not None:
            values = np.rint(profile.output_tokens.quantile(draws[1]))
            outputs = np.clip(values, 1, caps.max_output_tokens).astype(np.int64)
    return inputs, outputs


def _draw_clients(scenario: Scenario, rng: np.random.Generator, count: int) -> IntArray:
    shares = np.array([c.share for c in scenario.clients], dtype=float)
    if shares.size == 1:
        return np.zeros(count, dtype=np.int64)
    return rng.choice(shares.size, size=count, p=shares / shares.sum()).astype(np.int64)


def trace_workload(
    scenario: Scenario,
    path: str | Path,
    time_scale: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
) -> Workload:
    """Replay a trace: arrivals stretched by ``time_scale``, tokens capped at the maxima.

    A request asks for at least one output token and zero or more input tokens.
    """
    if time_scale <= 0:
        raise WorkloadError("workload.time_scale: must be positive")
    arrival, inputs, outputs = read_trace(path, limit)
    inputs = np.clip(inputs, 0, scenario.requests.max_input_tokens)
    outputs = np.clip(outputs, 1, scenario.requests.max_output_tokens)
    rng = np.random.default_rng(seed)
    return Workload(
        arrival_ms=arrival * time_scale,
        client=_draw_clients(scenario, rng, arrival.size),
        input_tokens=inputs.astype(np.int64),
        output_tokens=outputs.astype(np.int64),
        description=f"trace {Path(path).name} x{time_scale:g}, {arrival.size} requests",
    )


def scenario_workload(scenario: Scenario, seed: int | None = None) -> Workload:
    """The scenario's own workload; ``seed`` overrides the Poisson seed (or the client draw)."""
    spec = scenario.workload
    if spec is None:
        raise WorkloadError("workload: the scenario has no workload (needed by the simulator)")
    if isinstance(spec, PoissonWorkload):
        return poisson_workload(
            scenario, spec.rate_per_s, spec.num_requests, spec.seed if seed is None else seed
        )
    assert isinstance(spec, TraceWorkload)
    trace = resolve_trace(spec.trace)  # a bare name is the shipped copy in app/data
    return trace_workload(scenario, trace, spec.time_scale, spec.limit, seed or 0)
