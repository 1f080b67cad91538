"""Request workloads for the simulator: seeded Poisson arrivals and Azure trace replay.

A workload is four equal-length arrays, sorted by arrival time: arrival (ms since the start),
client index (drawn by share), input tokens and output tokens. Poisson requests use the
scenario's maxima (l_in, l_max), as the paper does; trace requests carry their own token
counts, capped at the scenario's maxima (SCENARIO.md), so that one attention-cache slot (sized
for the maxima) always holds a request.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.allocation.scenario import PoissonWorkload, Scenario, TraceWorkload

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


class WorkloadError(ValueError):
    """A workload that cannot be built; the message names the field or the file."""


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
    inputs = np.full(num_requests, scenario.requests.max_input_tokens, dtype=np.int64)
    outputs = np.full(num_requests, scenario.requests.max_output_tokens, dtype=np.int64)
    return Workload(
        arrival_ms=arrival.astype(np.float64),
        client=client,
        input_tokens=inputs,
        output_tokens=outputs,
        description=f"poisson rate {rate_per_s:g}/s, {num_requests} requests, seed {seed}",
    )


def _draw_clients(scenario: Scenario, rng: np.random.Generator, count: int) -> IntArray:
    shares = np.array([c.share for c in scenario.clients], dtype=float)
    if shares.size == 1:
        return np.zeros(count, dtype=np.int64)
    return rng.choice(shares.size, size=count, p=shares / shares.sum()).astype(np.int64)


def read_trace(path: str | Path, limit: int | None = None) -> tuple[FloatArray, IntArray, IntArray]:
    """Read an Azure LLM inference trace: (arrival ms from the first request, inputs, outputs)."""
    path = Path(path)
    times: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(
                reader.fieldnames or []
            )
            if missing:
                raise WorkloadError(
                    f"{path}: trace lacks column(s) {', '.join(sorted(missing))} "
                    "(need TIMESTAMP, ContextTokens, GeneratedTokens)"
                )
            for line, row in enumerate(reader, start=2):
                if limit is not None and len(times) >= limit:
                    break
                try:
                    times.append(_parse_timestamp(row["TIMESTAMP"]))
                    inputs.append(int(row["ContextTokens"]))
                    outputs.append(int(row["GeneratedTokens"]))
                except (TypeError, ValueError):
                    raise WorkloadError(f"{path}, line {line}: malformed trace row") from None
    except OSError as error:
        raise WorkloadError(f"workload.trace: cannot read {path} ({error.strerror})") from None
    if not times:
        raise WorkloadError(f"workload.trace: {path} holds no requests")
    stamps = np.array(times, dtype=np.float64)
    order = np.argsort(stamps, kind="stable")
    stamps = stamps[order]
    return (
        (stamps - stamps[0]) * 1000.0,
        np.array(inputs, dtype=np.int64)[order],
        np.array(outputs, dtype=np.int64)[order],
    )


def _parse_timestamp(text: str) -> float:
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    # Azure's format has 7 fractional digits; datetime takes at most 6.
    if "." in value:
        head, fraction = value.split(".", 1)
        value = f"{head}.{fraction[:6]}"
    return datetime.fromisoformat(value).timestamp()


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
    trace = Path(spec.trace)
    if not trace.is_absolute() and not trace.exists() and (DATA_DIR / trace.name).exists():
        trace = DATA_DIR / trace.name  # shipped traces by bare name
    return trace_workload(scenario, trace, spec.time_scale, spec.limit, seed or 0)
