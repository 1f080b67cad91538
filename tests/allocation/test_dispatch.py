"""JFFC and WS-RR as pure functions of a snapshot (the simulator and the coordinator share them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.allocation import dispatch
from app.allocation.chains import Chain
from app.allocation.instance import Instance, Span
from app.allocation.perf import Hop
from app.allocation.routing import RouteIndex
from tests.scenarios import build, server

FAST = Chain((Hop(0, 0, 2), Hop(1, 2, 4)), capacity=2, service_ms=100.0)
SLOW = Chain((Hop(2, 0, 4),), capacity=1, service_ms=300.0)


def test_jffc_takes_the_fastest_chain_with_a_slot_and_room() -> None:
    free = [1000, 1000, 1000]
    assert dispatch.jffc_pick([FAST, SLOW], [0, 0], free, tokens=100) == 0
    assert dispatch.jffc_pick([FAST, SLOW], [1, 0], free, tokens=100) == 0
    # Fast chain full (2 jobs): the slow one.
    assert dispatch.jffc_pick([FAST, SLOW], [2, 0], free, tokens=100) == 1
    # Both full: None, i.e. the central queue.
    assert dispatch.jffc_pick([FAST, SLOW], [2, 1], free, tokens=100) is None


def test_jffc_checks_the_requests_own_tokens_on_every_hop() -> None:
    # The fast chain has a slot but server 1 has 199 units; 2 blocks x 100 tokens need 200.
    assert dispatch.jffc_pick([FAST, SLOW], [0, 0], [1000, 199, 1000], tokens=100) == 1
    # A shorter request fits: 2 x 99 = 198 units.
    assert dispatch.jffc_pick([FAST, SLOW], [0, 0], [1000, 199, 1000], tokens=99) == 0
    # A dead server takes its chains out.
    assert dispatch.jffc_pick([FAST, SLOW], [0, 0], [1000] * 3, 10, [True, False, True]) == 1


def test_jffc_rejects_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="in_service"):
        dispatch.jffc_pick([FAST], [0, 0], [1, 1, 1], 1)


def test_units_and_free_from_hand_computed() -> None:
    assert dispatch.tokens_of(30, 0) == 30
    assert dispatch.units_needed((Hop(0, 0, 2), Hop(1, 2, 3), Hop(0, 3, 4)), 10) == {0: 30, 1: 10}
    releases = [(5.0, 30), (9.0, 50)]
    # capacity 100, used 80: 20 free now; 40 free from 5; 90 free from 9; 101 never.
    assert dispatch.free_from(100, 80, releases, 20, 1.0) == 1.0
    assert dispatch.free_from(100, 80, releases, 40, 1.0) == 5.0
    assert dispatch.free_from(100, 80, releases, 90, 1.0) == 9.0
    assert dispatch.free_from(100, 80, releases, 101, 1.0) == math.inf


def swarm() -> tuple[Instance, RouteIndex]:
    scenario = build(
        servers=[
            server("near", "a", memory=6.0, decode=1.0),  # 10 ms away
            server("far", "b", memory=6.0, decode=1.0),  # 50 ms away
        ]
    )
    instance = Instance.from_scenario(scenario)
    return instance, RouteIndex((Span(0, 4), Span(0, 4)), instance.num_blocks)


def test_wsrr_uses_the_requests_lengths() -> None:
    instance, _ = swarm()
    hop_fixed, per_block = dispatch.wsrr_costs(instance, 0, input_tokens=10, output_tokens=3)
    # 2 further tokens: hop = RTT + 2 x RTT, block = 2 x decode (no prefill cost here).
    assert hop_fixed.tolist() == [30.0, 150.0]
    assert per_block.tolist() == [2.0, 2.0]


def test_wsrr_waits_when_waiting_is_cheaper_and_moves_when_not() -> None:
    instance, index = swarm()
    hop_fixed, per_block = dispatch.wsrr_costs(instance, 0, 50, 50)
    tokens = 100
    capacity = [instance.cache_tokens(0, 4), instance.cache_tokens(1, 4)]
    assert capacity == [2000, 2000]
    # Idle: the near server.
    choice = dispatch.wsrr_route(index, hop_fixed, per_block, tokens, capacity, [0, 0], [[], []], 0)
    assert choice is not None and choice.hops == (Hop(0, 0, 4),) and choice.wait_ms == 0
    # Near server full until t = 100 ms: waiting 100 ms beats 50 x 40 ms more on the far one.
    full = [[(100.0, 2000)], []]
    choice = dispatch.wsrr_route(index, hop_fixed, per_block, tokens, capacity, [2000, 0], full, 0)
    assert choice is not None and choice.hops == (Hop(0, 0, 4),)
    assert choice.start_at == 100.0 and choice.wait_ms == 100.0
    # Full for 10 s: the far server now. Times in seconds work with ms_per_time_unit.
    full = [[(10.0, 2000)], []]
    choice = dispatch.wsrr_route(
        index, hop_fixed, per_block, tokens, capacity, [2000, 0], full, 0.0, ms_per_time_unit=1000
    )
    assert choice is not None and choice.hops == (Hop(1, 0, 4),) and choice.wait_ms == 0
    # A dead server is never chosen; none alive: None.
    alive = [False, True]
    choice = dispatch.wsrr_route(
        index, hop_fixed, per_block, tokens, capacity, [0, 0], [[], []], 0, alive=alive
    )
    assert choice is not None and choice.hops == (Hop(1, 0, 4),)
    none = dispatch.wsrr_route(
        index, hop_fixed, per_block, tokens, capacity, [0, 0], [[], []], 0, alive=[False, False]
    )
    assert none is None


def test_earliest_start_counts_a_server_visited_twice() -> None:
    hops = (Hop(0, 0, 1), Hop(1, 1, 2), Hop(0, 2, 4))
    capacity = np.array([30, 100])
    # Server 0 needs 3 blocks x 10 tokens = 30 units: all of it, free only from t = 7.
    start = dispatch.earliest_start(hops, 10, capacity.tolist(), [10, 0], [[(7.0, 10)], []], 0.0)
    assert start == 7.0


def test_orders_per_client_and_per_request() -> None:
    instance, _ = swarm()  # client at site a: "near" 10 ms, "far" 50 ms
    far_first = [
        Chain((Hop(1, 0, 4),), 1, 100.0, client_ms=(900.0,)),
        Chain((Hop(0, 0, 4),), 1, 200.0, client_ms=(300.0,)),
    ]
    assert dispatch.client_order(far_first, 0) == [1, 0]
    assert dispatch.request_order(instance, far_first, 0, 5, 5) == [1, 0]
    no_times = [Chain(c.hops, c.capacity, c.service_ms) for c in far_first]
    assert dispatch.client_order(no_times, 0) == [0, 1]
    # The order steers JFFC: the near chain first, the far one when it is busy.
    assert dispatch.jffc_pick(far_first, [0, 0], [10**6] * 2, 10, order=[1, 0]) == 1
    assert dispatch.jffc_pick(far_first, [0, 1], [10**6] * 2, 10, order=[1, 0]) == 0
