"""Hand-computed checks of every formula of the performance model."""

import pytest

from app.allocation.instance import Instance, Span
from app.allocation.perf import (
    Hop,
    InfeasiblePath,
    blocks_processed,
    first_token_ms,
    hops_for_path,
    memory_used_gb,
    per_token_ms,
    prefill_ms,
    request_timing,
    total_ms,
)
from tests.scenarios import build, server

# Client c0 at site a; RTT a-a 10 ms, a-b 50 ms. s_m = 1 GB, s_c = 0.1 GB, l_in = l_max = 50.
SCENARIO = build(
    num_blocks=5,
    servers=[
        server("s0", "a", memory=5, decode=2, prefill_fixed=10, prefill_per_token=0.1),
        server("s1", "b", memory=5, decode=1, prefill_fixed=4, prefill_per_token=0.2),
        server("s2", "a", memory=5, decode=3),
    ],
    overheads={
        "per_token_ms": 5,
        "prefill_fixed_ms": 20,
        "prefill_per_token_ms": 0.5,
        "per_request_ms": 70,
    },
)
INSTANCE = Instance.from_scenario(SCENARIO)
PLACEMENT = (Span(0, 3), Span(2, 5), Span(3, 5))


def test_cache_size_and_memory_use() -> None:
    assert INSTANCE.cache_gb == pytest.approx(1e6 * 100 / 1e9)
    assert memory_used_gb(INSTANCE, span_length=3, cache_blocks=4) == pytest.approx(3.4)


def test_cache_slots_do_not_lose_a_slot_to_rounding() -> None:
    # 2.7 GB = 2 blocks of 1 GB + exactly 7 caches of 0.1 GB; (2.7 - 2) / 0.1 = 6.999... in floats
    scenario = build(servers=[server("s0", "a", memory=2.7, decode=1)], num_blocks=2)
    instance = Instance.from_scenario(scenario)
    assert instance.cache_slots(0, 2) == 7
    assert instance.cache_slots(0, 1) == 17


def test_blocks_are_processed_at_the_first_server_that_hosts_them() -> None:
    assert blocks_processed(PLACEMENT, [0, 1], 5) == [3, 2]  # s1 hosts 2 but s0 did it
    assert blocks_processed(PLACEMENT, [0, 2], 5) == [3, 2]
    assert hops_for_path(PLACEMENT, [0, 1], 5) == (Hop(0, 0, 3), Hop(1, 3, 5))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ([1], "needs block 0"),  # the first server must host block 0
        ([0], "ends after block 2"),  # the last server must host block L-1
        ([2, 1], "needs block 0"),
        ([0, 1, 2], "needs block 5"),  # s2 cannot continue after block 4
        ([], "empty"),
    ],
)
def test_lemma_1_rejects_infeasible_chains(path: list[int], reason: str) -> None:
    with pytest.raises(InfeasiblePath, match=reason):
        hops_for_path(PLACEMENT, path, 5)


def test_a_gap_between_spans_is_infeasible() -> None:
    with pytest.raises(InfeasiblePath, match="needs block 2"):
        hops_for_path((Span(0, 2), Span(3, 5)), [0, 1], 5)


def test_per_token_time() -> None:
    hops = hops_for_path(PLACEMENT, [0, 1], 5)
    # (10 + 5 + 3 x 2) + (50 + 5 + 2 x 1)
    assert per_token_ms(INSTANCE, 0, hops) == pytest.approx(78)
    assert per_token_ms(INSTANCE, 0, hops_for_path(PLACEMENT, [0, 2], 5)) == pytest.approx(42)


def test_prefill_first_token_and_total_time() -> None:
    hops = hops_for_path(PLACEMENT, [0, 1], 5)
    # t^I: 10 + 20 + 0.5 x 50 = 55 and 50 + 20 + 25 = 95; tau^I(50): 10 + 5 = 15, 4 + 10 = 14
    assert prefill_ms(INSTANCE, 0, hops) == pytest.approx(55 + 3 * 15 + 95 + 2 * 14)
    assert first_token_ms(INSTANCE, 0, hops) == pytest.approx(70 + 223)
    assert total_ms(INSTANCE, 0, hops) == pytest.approx(293 + 49 * 78)
    timing = request_timing(INSTANCE, 0, hops, input_tokens=10, output_tokens=3)
    # l_in = 10: t^I = 10 + 20 + 5 = 35 and 75; tau^I(10) = 11 and 6
    assert timing.first_token_ms == pytest.approx(70 + 35 + 3 * 11 + 75 + 2 * 6)
    assert timing.per_token_ms == pytest.approx(78)
    assert timing.total_ms == pytest.approx(timing.first_token_ms + 2 * 78)
