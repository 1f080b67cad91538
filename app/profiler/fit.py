"""Least-squares fits of a block profile (numpy only; no torch, no I/O).

Timings are medians in milliseconds of one forward pass through ``blocks`` consecutive blocks:

- a decode step of ``batch`` requests, each with a KV cache of ``context`` tokens, modelled as
  ``overhead + blocks * (tau_0 + tau_l * context)``; the scenario's ``decode_ms_per_block``
  (tau_j) is the per-block cost at the mean measured context, i.e. the slope over the number of
  blocks pooled over the contexts;
- a prefill of ``context`` tokens (one request), modelled as
  ``overhead + blocks * (fixed + per_token * context)``: the scenario's
  ``prefill_ms_per_block: {fixed, per_token}``.

``overhead`` is the part that does not grow with the number of blocks (Python dispatch, the
timer); it is only identified when at least two numbers of blocks were measured, otherwise the
fit goes through the origin and says so (``overhead_ms`` is None).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Kind = Literal["decode", "prefill"]


class FitError(ValueError):
    """The timings cannot determine the fit (too few or invalid points)."""


@dataclass(frozen=True)
class Timing:
    """The median time (ms) of one decode step or one prefill through ``blocks`` blocks."""

    kind: Kind
    blocks: int
    batch: int
    context: int
    ms: float


@dataclass(frozen=True)
class LinearFit:
    """``coefficients`` of ``names`` by least squares; ``r2`` is the coefficient of
    determination of the fit on its own points."""

    names: tuple[str, ...]
    coefficients: tuple[float, ...]
    r2: float
    points: int

    def __getitem__(self, name: str) -> float:
        return self.coefficients[self.names.index(name)]


@dataclass(frozen=True)
class DecodeFit:
    batch: int
    ms_per_block: float  # at the mean measured context
    ms_per_block_per_context_token: float
    overhead_ms: float | None
    mean_context: float
    r2: float
    points: int


@dataclass(frozen=True)
class PrefillFit:
    fixed_ms: float
    per_token_ms: float
    overhead_ms: float | None
    r2: float
    points: int


@dataclass(frozen=True)
class BatchEffect:
    """Decode at ``batch`` requests against batch 1: ``ratio_vs_batch_1`` is the step time
    every request of the batch waits for, relative to one request alone (the paper assumes 1);
    ``ms_per_request_per_block`` is the step time shared out over the batch."""

    batch: int
    decode_ms_per_block: float
    ratio_vs_batch_1: float
    ms_per_request_per_block: float


@dataclass(frozen=True)
class ProfileFit:
    decode: DecodeFit  # batch 1: the scenario's decode_ms_per_block
    prefill: PrefillFit
    batches: tuple[BatchEffect, ...]

    def scenario_fields(self) -> dict[str, object]:
        """The speed fields of a server in a scenario file (SCENARIO.md)."""
        return {
            "decode_ms_per_block": self.decode.ms_per_block,
            "prefill_ms_per_block": {
                "fixed": self.prefill.fixed_ms,
                "per_token": self.prefill.per_token_ms,
            },
        }


def least_squares(
    columns: Sequence[npt.ArrayLike], y: npt.ArrayLike, names: Sequence[str]
) -> LinearFit:
    """Fit ``y ~ sum(c_k * columns[k])`` with ``numpy.linalg.lstsq``; FitError when the
    design is rank-deficient (the coefficients are not determined) or the data not finite."""
    target = np.asarray(y, dtype=float)
    if target.ndim != 1 or target.size == 0:
        raise FitError("no timings to fit")
    design = np.column_stack(
        [np.broadcast_to(np.asarray(c, dtype=float), target.shape) for c in columns]
    )
    if not (np.isfinite(design).all() and np.isfinite(target).all()):
        raise FitError("timings must be finite numbers")
    if target.size < design.shape[1]:
        raise FitError(f"{target.size} timings cannot determine {design.shape[1]} coefficients")
    solution, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
    if rank < design.shape[1]:
        raise FitError(f"the timings do not determine {', '.join(names)} (rank {rank})")
    residual = target - design @ solution
    ss_res = float(residual @ residual)
    centred = target - target.mean()
    ss_tot = float(centred @ centred)
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # every timing equal: perfect if the fit reproduces them
        r2 = 1.0 if ss_res <= 1e-18 * max(1.0, float(target @ target)) else 0.0
    return LinearFit(tuple(names), tuple(float(v) for v in solution), r2, int(target.size))


def _check(timings: Sequence[Timing], kind: str) -> None:
    if not timings:
        raise FitError(f"no {kind} timings")
    for t in timings:
        if not (np.isfinite(t.ms) and t.ms > 0):
            raise FitError(f"{kind} timing for {t.blocks} blocks, context {t.context}: {t.ms!r} ms")
        if t.blocks < 1 or t.batch < 1 or t.context < 0:
            raise FitError(f"{kind} timing with {t.blocks} blocks, batch {t.batch}: invalid")


def fit_decode(timings: Sequence[Timing]) -> DecodeFit:
    """tau for one batch size: ``ms ~ overhead + blocks * (tau_0 + tau_l * context)``."""
    _check(timings, "decode")
    batches = {t.batch for t in timings}
    if len(batches) != 1:
        raise FitError(f"decode timings of several batch sizes: {sorted(batches)}")
    blocks = np.array([t.blocks for t in timings], dtype=float)
    context = np.array([t.context for t in timings], dtype=float)
    ms = np.array([t.ms for t in timings])
    with_overhead = len(set(blocks.tolist())) >= 2
    many_contexts = len(set(context.tolist())) >= 2
    columns: list[npt.ArrayLike] = [blocks]
    names = ["per_block"]
    if many_contexts:
        columns.append(blocks * context)
        names.append("per_block_per_context_token")
    if with_overhead:
        columns.insert(0, np.ones_like(ms))
        names.insert(0, "overhead")
    fit = least_squares(columns, ms, names)
    mean_context = float(context.mean())
    slope_l = fit["per_block_per_context_token"] if many_contexts else 0.0
    return DecodeFit(
        batch=next(iter(batches)),
        ms_per_block=fit["per_block"] + slope_l * mean_context,
        ms_per_block_per_context_token=slope_l,
        overhead_ms=fit["overhead"] if with_overhead else None,
        mean_context=mean_context,
        r2=fit.r2,
        points=fit.points,
    )


def fit_prefill(timings: Sequence[Timing]) -> PrefillFit:
    """The prefill line: ``ms ~ overhead + blocks * (fixed + per_token * context)``."""
    _check(timings, "prefill")
    if len({t.context for t in timings}) < 2:
        raise FitError("prefill timings need at least two prompt lengths to fit fixed + per_token")
    blocks = np.array([t.blocks for t in timings], dtype=float)
    context = np.array([t.context for t in timings], dtype=float)
    ms = np.array([t.ms for t in timings])
    with_overhead = len(set(blocks.tolist())) >= 2
    columns: list[npt.ArrayLike] = [blocks, blocks * context]
    names = ["fixed", "per_token"]
    if with_overhead:
        columns.insert(0, np.ones_like(ms))
        names.insert(0, "overhead")
    fit = least_squares(columns, ms, names)
    return PrefillFit(
        fixed_ms=fit["fixed"],
        per_token_ms=fit["per_token"],
        overhead_ms=fit["overhead"] if with_overhead else None,
        r2=fit.r2,
        points=fit.points,
    )


def fit_profile(timings: Iterable[Timing]) -> ProfileFit:
    """Fit every batch size's tau, the prefill line, and the batch effect."""
    all_timings = list(timings)
    decode = [t for t in all_timings if t.kind == "decode"]
    prefill = [t for t in all_timings if t.kind == "prefill"]
    by_batch: dict[int, list[Timing]] = {}
    for t in decode:
        by_batch.setdefault(t.batch, []).append(t)
    if 1 not in by_batch:
        raise FitError("no decode timings at batch 1")
    fits = {b: fit_decode(by_batch[b]) for b in sorted(by_batch)}
    base = fits[1].ms_per_block
    if base <= 0:
        raise FitError(f"decode time per block at batch 1 fitted as {base:.4g} ms (not positive)")
    effects = tuple(
        BatchEffect(
            batch=b,
            decode_ms_per_block=f.ms_per_block,
            ratio_vs_batch_1=f.ms_per_block / base,
            ms_per_request_per_block=f.ms_per_block / b,
        )
        for b, f in fits.items()
    )
    prefill_fit = fit_prefill(prefill)
    return ProfileFit(decode=fits[1], prefill=prefill_fit, batches=effects)
