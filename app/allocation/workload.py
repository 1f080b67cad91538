"""The workload a plan is made for: arrival rate and the distribution of request lengths.

Caps (``requests.max_input_tokens`` / ``max_output_tokens``) are the most a request may ask
for; a WorkloadProfile says what requests typically ask for. Plans are sized from the profile
(the design concurrency, the chains' service times, WS-RR's costs); memory is still checked
per request at run time, so a long request never over-commits a server.

Sources of a profile:
- a trace workload: its measured lengths, capped at the caps (as the simulator replays them);
- a Poisson workload: its optional ``input_tokens`` / ``output_tokens`` length distributions
  (docs/SCENARIO.md), else every request at the caps (the paper's setting);
- the coordinator: measured from the bookings it sees (``from_samples``).

Sampling lengths from the five numbers of a LengthStats (``LengthStats.quantile``): the
quantile function is piecewise linear through (0, q0), (0.5, p50), (0.9, p90), (0.99, p99),
(1, max), where q0 in [0, p50] is chosen so that the distribution's mean is the given mean as
far as that range allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.allocation.scenario import PoissonWorkload, Scenario, TraceWorkload

__all__ = ["LengthStats", "WorkloadProfile"]

STAT_FIELDS = ("mean", "p50", "p90", "p99", "max")
_KNOTS = np.array([0.0, 0.5, 0.9, 0.99, 1.0])


def _check_number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: must be finite, not {number}")
    if number < 0:
        raise ValueError(f"{where}: must be >= 0, not {number}")
    return number


@dataclass(frozen=True)
class LengthStats:
    """Token counts of requests: mean and quantiles (all finite, >= 0, ordered)."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    # Names the field in error messages; not part of the value.
    field_name: str = field(default="tokens", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in STAT_FIELDS:
            _check_number(getattr(self, name), f"{self.field_name}.{name}")
        if not self.p50 <= self.p90 <= self.p99 <= self.max:
            raise ValueError(
                f"{self.field_name}: quantiles must satisfy p50 <= p90 <= p99 <= max "
                f"(got {self.p50}, {self.p90}, {self.p99}, {self.max})"
            )
        if self.mean > self.max:
            raise ValueError(f"{self.field_name}.mean: {self.mean} exceeds max {self.max}")

    @classmethod
    def constant(cls, value: float, field_name: str = "tokens") -> LengthStats:
        return cls(value, value, value, value, value, field_name)

    @classmethod
    def from_samples(cls, samples: Sequence[float] | NDArray[Any], field_name: str) -> LengthStats:
        values = np.asarray(samples, dtype=float)
        if values.size == 0:
            raise ValueError(f"{field_name}: no samples")
        if not np.isfinite(values).all():
            raise ValueError(f"{field_name}: samples must be finite")
        if (values < 0).any():
            raise ValueError(f"{field_name}: samples must be >= 0")
        p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
        return cls(float(values.mean()), p50, p90, p99, float(values.max()), field_name)

    @classmethod
    def from_json(cls, data: Any, field_name: str) -> LengthStats:
        if not isinstance(data, dict):
            raise ValueError(f"{field_name}: must be an object with {', '.join(STAT_FIELDS)}")
        missing = [name for name in STAT_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{field_name}.{missing[0]}: required")
        mean, p50, p90, p99, top = (
            _check_number(data[name], f"{field_name}.{name}") for name in STAT_FIELDS
        )
        return cls(mean, p50, p90, p99, top, field_name)

    def to_json(self) -> dict[str, float]:
        return {name: round(float(getattr(self, name)), 6) for name in STAT_FIELDS}

    def capped(self, cap: float) -> LengthStats:
        """The same distribution with every value capped at ``cap`` (the mean kept <= cap)."""
        mean, p50, p90, p99, top = (min(float(getattr(self, n)), cap) for n in STAT_FIELDS)
        return LengthStats(mean, p50, p90, p99, top, self.field_name)

    def knots(self) -> NDArray[np.float64]:
        """Values of the piecewise-linear quantile function at 0, 0.5, 0.9, 0.99, 1."""
        upper = (
            0.4 * (self.p50 + self.p90) / 2
            + 0.09 * (self.p90 + self.p99) / 2
            + 0.01 * (self.p99 + self.max) / 2
        )
        # mean = 0.25 (q0 + p50) + upper  =>  q0 = 4 (mean - upper) - p50, kept in [0, p50].
        q0 = min(max(4.0 * (self.mean - upper) - self.p50, 0.0), self.p50)
        return np.array([q0, self.p50, self.p90, self.p99, self.max])

    def quantile(self, u: NDArray[np.float64]) -> NDArray[np.float64]:
        """Inverse CDF at ``u`` in [0, 1] (see the module docstring)."""
        return np.interp(u, _KNOTS, self.knots())


@dataclass(frozen=True)
class WorkloadProfile:
    """The load a plan is made for."""

    rate_per_s: float
    input_tokens: LengthStats
    output_tokens: LengthStats

    def __post_init__(self) -> None:
        rate = _check_number(self.rate_per_s, "rate_per_s")
        if rate <= 0:
            raise ValueError(f"rate_per_s: must be > 0, not {rate}")

    # --- constructors --------------------------------------------------------------------

    @classmethod
    def from_samples(
        cls,
        rate_per_s: float,
        inputs: Sequence[float] | NDArray[Any],
        outputs: Sequence[float] | NDArray[Any],
    ) -> WorkloadProfile:
        return cls(
            rate_per_s,
            LengthStats.from_samples(inputs, "input_tokens"),
            LengthStats.from_samples(outputs, "output_tokens"),
        )

    @classmethod
    def at_caps(cls, scenario: Scenario, rate_per_s: float) -> WorkloadProfile:
        """Every request at the caps: the paper's setting."""
        return cls(
            rate_per_s,
            LengthStats.constant(scenario.requests.max_input_tokens, "input_tokens"),
            LengthStats.constant(scenario.requests.max_output_tokens, "output_tokens"),
        )

    @classmethod
    def from_scenario(cls, scenario: Scenario, rate_per_s: float | None = None) -> WorkloadProfile:
        """The scenario's workload as a profile (``rate_per_s`` overrides its rate).

        Trace: measured lengths capped at the caps (outputs at least 1), rate = requests over
        the replayed time span. Poisson: its length distributions capped at the caps, else the
        caps. No workload: the caps, one request per second unless ``rate_per_s`` is given.
        """
        caps = scenario.requests
        spec = scenario.workload
        if isinstance(spec, TraceWorkload):
            from app.allocation.scenario import resolve_trace
            from app.allocation.traces import read_trace

            arrival, inputs, outputs = read_trace(resolve_trace(spec.trace), spec.limit)
            inputs = np.clip(inputs, 0, caps.max_input_tokens)
            outputs = np.clip(outputs, 1, caps.max_output_tokens)
            rate = rate_per_s if rate_per_s is not None else trace_rate(arrival, spec.time_scale)
            return cls.from_samples(rate, inputs, outputs)
        if isinstance(spec, PoissonWorkload):
            rate = rate_per_s if rate_per_s is not None else spec.rate_per_s
            profile = cls.at_caps(scenario, rate)
            if spec.input_tokens is not None:
                stats = LengthStats.from_json(spec.input_tokens.model_dump(), "input_tokens")
                profile = cls(rate, stats.capped(caps.max_input_tokens), profile.output_tokens)
            if spec.output_tokens is not None:
                stats = LengthStats.from_json(spec.output_tokens.model_dump(), "output_tokens")
                capped = stats.capped(caps.max_output_tokens)
                profile = cls(rate, profile.input_tokens, capped)
            return profile
        return cls.at_caps(scenario, rate_per_s if rate_per_s is not None else 1.0)

    # --- JSON (the optional scenario fields) ----------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The optional fields of a Poisson workload: rate and length distributions."""
        return {
            "rate_per_s": round(self.rate_per_s, 9),
            "input_tokens": self.input_tokens.to_json(),
            "output_tokens": self.output_tokens.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> WorkloadProfile:
        if not isinstance(data, dict):
            raise ValueError(
                "profile: must be an object with rate_per_s, input_tokens, output_tokens"
            )
        for name in ("rate_per_s", "input_tokens", "output_tokens"):
            if name not in data:
                raise ValueError(f"{name}: required")
        return cls(
            _check_number(data["rate_per_s"], "rate_per_s"),
            LengthStats.from_json(data["input_tokens"], "input_tokens"),
            LengthStats.from_json(data["output_tokens"], "output_tokens"),
        )

    # --- what plans use ------------------------------------------------------------------

    @property
    def mean_input_tokens(self) -> float:
        return self.input_tokens.mean

    @property
    def mean_output_tokens(self) -> float:
        """Mean output tokens, at least one (a request produces its first token)."""
        return max(1.0, self.output_tokens.mean)

    @property
    def mean_tokens(self) -> float:
        """Mean cache tokens a request holds per block: input + output."""
        return self.input_tokens.mean + self.mean_output_tokens

    def design_tokens(self) -> int:
        """Cache tokens per job that chain capacities are sized for (the mean, rounded up)."""
        return max(1, math.ceil(self.mean_tokens - 1e-9))


def trace_rate(arrival_ms: NDArray[np.float64], time_scale: float = 1.0) -> float:
    """Mean arrival rate of a replayed trace (requests per second)."""
    n = int(arrival_ms.size)
    if n <= 1:
        return 1.0
    span_s = float(arrival_ms[-1] - arrival_ms[0]) * time_scale / 1000.0
    return (n - 1) / span_s if span_s > 0 else float(n)
