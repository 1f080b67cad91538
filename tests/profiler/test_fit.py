"""The profile fits on synthetic timings with known speeds."""

from __future__ import annotations

import math
import random

import pytest

from app.profiler.fit import (
    FitError,
    Timing,
    fit_decode,
    fit_prefill,
    fit_profile,
    least_squares,
)

BLOCKS = (1, 2, 4, 8)
CONTEXTS = (64, 256, 1024)


def synthetic(
    tau: dict[int, float],
    tau_per_token: float,
    fixed: float,
    per_token: float,
    overhead: float,
    noise: float,
    seed: int = 1,
) -> list[Timing]:
    """Timings from the model itself, with multiplicative noise of relative size ``noise``."""
    rng = random.Random(seed)
    out = []
    for n in BLOCKS:
        for context in CONTEXTS:
            for batch, t in tau.items():
                ms = overhead + n * (t + tau_per_token * context)
                out.append(Timing("decode", n, batch, context, ms * (1 + rng.gauss(0, noise))))
            ms = overhead + n * (fixed + per_token * context)
            out.append(Timing("prefill", n, 1, context, ms * (1 + rng.gauss(0, noise))))
    return out


def test_known_speeds_are_recovered_from_noisy_timings() -> None:
    timings = synthetic({1: 3.2, 2: 3.5, 4: 4.4}, 0.0005, 33.0, 0.074, overhead=0.8, noise=0.01)
    fit = fit_profile(timings)
    mean_context = sum(CONTEXTS) / len(CONTEXTS)
    expected_tau = 3.2 + 0.0005 * mean_context
    assert fit.decode.ms_per_block == pytest.approx(expected_tau, rel=0.03)
    assert fit.decode.ms_per_block_per_context_token == pytest.approx(0.0005, rel=0.3)
    assert fit.decode.mean_context == pytest.approx(mean_context)
    assert fit.prefill.fixed_ms == pytest.approx(33.0, rel=0.05)
    assert fit.prefill.per_token_ms == pytest.approx(0.074, rel=0.05)
    assert fit.decode.r2 > 0.99
    assert fit.prefill.r2 > 0.99
    ratios = {e.batch: e.ratio_vs_batch_1 for e in fit.batches}
    assert ratios[1] == 1.0
    assert ratios[2] == pytest.approx((3.5 + 0.0005 * mean_context) / expected_tau, rel=0.03)
    assert ratios[4] == pytest.approx((4.4 + 0.0005 * mean_context) / expected_tau, rel=0.03)
    per_request = {e.batch: e.ms_per_request_per_block for e in fit.batches}
    assert per_request[4] == pytest.approx(fit.batches[2].decode_ms_per_block / 4)
    fields = fit.scenario_fields()
    assert fields["decode_ms_per_block"] == fit.decode.ms_per_block
    assert fields["prefill_ms_per_block"] == {
        "fixed": fit.prefill.fixed_ms,
        "per_token": fit.prefill.per_token_ms,
    }


def test_exact_timings_give_exact_fit_and_overhead() -> None:
    timings = synthetic({1: 2.0}, 0.0, 10.0, 0.1, overhead=1.5, noise=0.0)
    fit = fit_profile(timings)
    assert fit.decode.ms_per_block == pytest.approx(2.0, abs=1e-9)
    assert fit.decode.overhead_ms == pytest.approx(1.5, abs=1e-9)
    assert fit.prefill.overhead_ms == pytest.approx(1.5, abs=1e-9)
    assert fit.prefill.fixed_ms == pytest.approx(10.0, abs=1e-9)
    assert fit.prefill.per_token_ms == pytest.approx(0.1, abs=1e-12)
    assert fit.decode.r2 == pytest.approx(1.0)
    assert fit.prefill.r2 == pytest.approx(1.0)


def test_noise_lowers_r2() -> None:
    clean = fit_profile(synthetic({1: 2.0}, 0.0, 10.0, 0.1, overhead=0.0, noise=0.002))
    noisy = fit_profile(synthetic({1: 2.0}, 0.0, 10.0, 0.1, overhead=0.0, noise=0.4))
    assert noisy.decode.r2 < clean.decode.r2
    assert noisy.prefill.r2 < clean.prefill.r2


def test_one_block_count_fits_through_the_origin() -> None:
    timings = [t for t in synthetic({1: 2.0}, 0.0, 10.0, 0.1, 0.0, 0.0) if t.blocks == 2]
    fit = fit_profile(timings)
    assert fit.decode.overhead_ms is None and fit.prefill.overhead_ms is None
    assert fit.decode.ms_per_block == pytest.approx(2.0)
    assert fit.prefill.per_token_ms == pytest.approx(0.1)


def test_r2_of_constant_data() -> None:
    fit = least_squares([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], [5.0, 5.0, 5.0], ["a", "b"])
    assert fit["a"] == pytest.approx(5.0) and fit["b"] == pytest.approx(0.0, abs=1e-12)
    assert fit.r2 == 1.0


@pytest.mark.parametrize(
    ("timings", "message"),
    [
        ([], "no decode timings"),
        ([Timing("prefill", 1, 1, 8, 1.0), Timing("prefill", 1, 1, 16, 2.0)], "batch 1"),
        (
            [Timing("decode", 1, 1, 8, 1.0), Timing("prefill", 1, 1, 8, 2.0)],
            "two prompt lengths",
        ),
        (
            [Timing("decode", 1, 1, 8, math.nan), Timing("prefill", 1, 1, 8, 2.0)],
            "nan",
        ),
        (
            [Timing("decode", 1, 1, 8, -1.0), Timing("prefill", 1, 1, 8, 2.0)],
            "-1.0 ms",
        ),
    ],
)
def test_degenerate_input_is_a_clear_error(timings: list[Timing], message: str) -> None:
    with pytest.raises(FitError, match=message):
        fit_profile(timings)


def test_rank_deficient_design_is_refused() -> None:
    # Two block counts but one point per block count and three unknowns.
    timings = [Timing("prefill", 1, 1, 8, 1.0), Timing("prefill", 2, 1, 16, 2.0)]
    with pytest.raises(FitError, match="cannot determine 3 coefficients"):
        fit_prefill(timings)
    # blocks x context = 8 + 2 x blocks at every point: the columns are collinear.
    collinear = [Timing("prefill", n, 1, c, float(n)) for n, c in ((1, 10), (2, 6), (4, 4))] * 2
    with pytest.raises(FitError, match="do not determine"):
        fit_prefill(collinear)


def test_decode_fit_refuses_mixed_batches() -> None:
    timings = [Timing("decode", 1, 1, 8, 1.0), Timing("decode", 2, 2, 8, 2.0)]
    with pytest.raises(FitError, match="several batch sizes"):
        fit_decode(timings)


def test_non_positive_tau_is_refused() -> None:
    timings = [Timing("decode", n, 1, 8, 10.0 - n) for n in (1, 2, 3)]
    timings += [Timing("prefill", 1, 1, c, 1.0 + c) for c in (8, 16)]
    with pytest.raises(FitError, match="not positive"):
        fit_profile(timings)
