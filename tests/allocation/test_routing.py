import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.allocation.instance import Span
from app.allocation.perf import Hop, InfeasiblePath, hops_for_path
from app.allocation.routing import RouteIndex

PLACEMENT = (Span(0, 3), Span(2, 5), Span(3, 5), Span(0, 5))


def test_shortest_chain_by_hand() -> None:
    index = RouteIndex(PLACEMENT, 5)
    assert index.size == 3 + 3 + 2 + 5
    hop_fixed = np.array([1.0, 1.0, 1.0, 100.0])
    per_block = np.ones(4)
    route = index.shortest(hop_fixed, per_block)
    assert route is not None
    # s0 then s1 or s2 (both cost 1 + 2); the lower server index wins the tie
    assert route.hops == (Hop(0, 0, 3), Hop(1, 3, 5))
    assert route.cost == pytest.approx(4 + 3)
    # the single big server becomes best when it is cheap
    hop_fixed[3] = 1.5
    route = index.shortest(hop_fixed, per_block)
    assert route is not None and route.hops == (Hop(3, 0, 5),)


def test_excluded_servers_and_extra_cost() -> None:
    index = RouteIndex(PLACEMENT, 5)
    hop_fixed = np.array([1.0, 1.0, 1.0, np.inf])
    per_block = np.ones(4)
    # make s1 expensive through the extra cost (e.g. waiting for cache): s2 takes over
    route = index.shortest(hop_fixed, per_block, lambda s, k: np.where(s == 1, 50.0, 0.0))
    assert route is not None and route.servers == (0, 2)
    hop_fixed[0] = np.inf
    assert index.shortest(hop_fixed, per_block) is None


def test_uncovered_block_has_no_route() -> None:
    index = RouteIndex((Span(0, 2), Span(3, 5)), 5)
    assert not index.covered
    assert index.shortest(np.ones(2), np.ones(2)) is None


def test_out_of_range_span_is_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        RouteIndex((Span(0, 6),), 5)


def brute_force(
    placement: tuple[Span, ...], num_blocks: int, fixed: list[float], per: list[float]
) -> float:
    best = np.inf
    servers = range(len(placement))
    for length in range(1, len(placement) + 1):
        for path in itertools.permutations(servers, length):
            try:
                hops = hops_for_path(placement, path, num_blocks)
            except InfeasiblePath:
                continue
            best = min(best, sum(fixed[h.server] + per[h.server] * h.blocks for h in hops))
    return float(best)


@st.composite
def placements(draw: st.DrawFn) -> tuple[int, tuple[Span, ...], list[float], list[float]]:
    num_blocks = draw(st.integers(1, 6))
    n = draw(st.integers(1, 5))
    spans = []
    for _ in range(n):
        start = draw(st.integers(0, num_blocks - 1))
        end = draw(st.integers(start + 1, num_blocks))
        spans.append(Span(start, end))
    fixed = draw(st.lists(st.floats(0, 100), min_size=n, max_size=n))
    per = draw(st.lists(st.floats(0.1, 20), min_size=n, max_size=n))
    return num_blocks, tuple(spans), fixed, per


@settings(max_examples=150, deadline=None)
@given(placements())
def test_dynamic_programme_matches_brute_force(
    case: tuple[int, tuple[Span, ...], list[float], list[float]],
) -> None:
    num_blocks, spans, fixed, per = case
    route = RouteIndex(spans, num_blocks).shortest(np.array(fixed), np.array(per))
    expected = brute_force(spans, num_blocks, fixed, per)
    if not np.isfinite(expected):
        assert route is None
        return
    assert route is not None
    assert route.cost == pytest.approx(expected)
    # the returned chain is feasible and its hops are exactly what Lemma 1 computes
    assert hops_for_path(spans, route.servers, num_blocks) == route.hops
