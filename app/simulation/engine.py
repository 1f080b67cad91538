"""The discrete-event core: a heap of (time, priority, sequence) events and exact cache books.

Request lifecycle: ARRIVAL -> the policy decides (start now, start later on a booked route, or
fail and retry later) -> START: the attention cache the request needs (k_j slots on every
server j of its path, one slot = one request on one block) is taken -> END: it is released.
Prefill and the decode steps happen between START and END; because service times do not
depend on what else runs (the paper's model), a request needs only those events, never one per
token.

Two books per server keep memory exact:
- ``in_use``: slots held by running requests (checked against the capacity at every START,
  so the simulator can never overcommit: it raises instead);
- ``committed``: slots of running requests plus those booked to start later. A policy that
  books a future start only does so when its slots are free from that instant on
  (``earliest_start``), so a booked request never finds its slots taken.

Ordering is deterministic: events at the same instant run END, then START, then ARRIVAL/RETRY,
each group in the order it was scheduled. Time is in milliseconds.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from app.allocation.instance import Instance, Placement
from app.allocation.perf import Hop
from app.simulation.service import PaperServiceModel
from app.simulation.workload import Workload

END, START, RETRY = 0, 1, 2
# Safety net for a policy that can never place a request (e.g. a PETALS route through a
# server whose whole cache is smaller than the request needs): fail loudly, never spin.
MAX_ATTEMPTS = 10_000


class SimulationError(RuntimeError):
    """An invariant broke (overcommitted memory) or a request can never be served."""


@dataclass(frozen=True)
class Start:
    """Run the request on ``hops`` from ``at_ms`` (>= now); its slots must be free by then."""

    hops: tuple[Hop, ...]
    at_ms: float


@dataclass(frozen=True)
class Retry:
    """The attempt failed; the client tries again at ``at_ms``."""

    at_ms: float


Decision = Start | Retry


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def placement(self) -> Placement: ...

    @property
    def capacity(self) -> Sequence[int]:  # attention-cache slots per server
        ...

    def decide(self, sim: Simulator, request: int, now: float) -> Decision: ...


@dataclass
class SimResult:
    policy: str
    scenario: str
    workload: str
    service_model: str
    arrival_ms: NDArray[np.float64]
    start_ms: NDArray[np.float64]
    first_token_ms: NDArray[np.float64]
    end_ms: NDArray[np.float64]
    output_tokens: NDArray[np.int64]
    attempts: NDArray[np.int64]
    hops: NDArray[np.int64]
    capacity: list[int]
    peak_slots: list[int]
    completions: NDArray[np.int64]
    events: int
    wall_seconds: float
    routes: list[tuple[Hop, ...]] = field(default_factory=list)  # each request's hops
    placement_seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return int(self.arrival_ms.size)

    def summary(self) -> dict[str, object]:
        """The numbers ``bprr simulate --json`` prints (times in ms, throughput in req/s)."""
        e2e = self.end_ms - self.arrival_ms
        ttft = self.first_token_ms - self.arrival_ms
        wait = self.start_ms - self.arrival_ms
        per_token = e2e / self.output_tokens
        makespan_s = float(self.end_ms.max() - self.arrival_ms.min()) / 1000.0
        p50, p95, p99 = (float(v) for v in np.percentile(e2e, [50, 95, 99]))
        return {
            "policy": self.policy,
            "scenario": self.scenario,
            "workload": self.workload,
            "service_model": self.service_model,
            "requests": self.requests,
            "mean_ms_per_token": float(per_token.mean()),
            "mean_ttft_ms": float(ttft.mean()),
            "mean_e2e_ms": float(e2e.mean()),
            "p50_e2e_ms": p50,
            "p95_e2e_ms": p95,
            "p99_e2e_ms": p99,
            "mean_wait_ms": float(wait.mean()),
            "waited_fraction": float((wait > 0).mean()),
            "mean_attempts": float(self.attempts.mean()),
            "throughput_rps": self.requests / makespan_s if makespan_s > 0 else 0.0,
            "wall_seconds": self.wall_seconds,
            "placement_seconds": self.placement_seconds,
            "events": self.events,
            "events_per_second": self.events / self.wall_seconds if self.wall_seconds > 0 else 0.0,
            **self.extra,
        }


class Simulator:
    """One run: a workload through a policy on a swarm; ``run()`` returns a SimResult."""

    def __init__(
        self,
        instance: Instance,
        workload: Workload,
        policy: Policy,
        service: PaperServiceModel | None = None,
        scenario_name: str = "scenario",
    ) -> None:
        n = instance.num_servers
        if len(policy.capacity) != n or len(policy.placement) != n:
            raise ValueError("policy placement and capacity need one entry per server")
        self.instance = instance
        self.workload = workload
        self.policy = policy
        self.service = service or PaperServiceModel(instance)
        self.scenario_name = scenario_name
        self.capacity = [int(c) for c in policy.capacity]
        self.committed = [0] * n
        self.in_use = [0] * n
        self.peak = [0] * n
        self.active = [0] * n  # booked or running requests per server (the batch size)
        self.bookings: list[list[tuple[float, int, int]]] = [[] for _ in range(n)]
        self.now = 0.0
        count = len(workload)
        self._client = workload.client.tolist()
        self._inputs = workload.input_tokens.tolist()
        self._outputs = workload.output_tokens.tolist()
        self._start = [math.nan] * count
        self._first = [math.nan] * count
        self._end = [math.nan] * count
        self._attempts = [0] * count
        self._hops: list[tuple[Hop, ...]] = [()] * count
        self._completions = [0] * count
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self.events = 0

    # --- what policies read ----------------------------------------------------------------

    def client_of(self, request: int) -> int:
        return int(self._client[request])

    def attempts_of(self, request: int) -> int:
        return self._attempts[request]

    def free(self, server: int) -> int:
        """Slots on ``server`` neither used nor booked."""
        return self.capacity[server] - self.committed[server]

    def free_at_ms(self, server: int, slots: int, now: float) -> float:
        """The instant from which ``slots`` slots are free on ``server`` for good (inf: never).

        Scans the server's bookings in completion order, as WS-RR does; counting booked
        requests as held from now on makes the answer safe to book against. The answer is
        ``now`` or exactly a booking's completion time (never ``now + (end - now)``, which
        can round one ulp below ``end`` and start the request before that END event).
        """
        free = self.capacity[server] - self.committed[server]
        if free >= slots:
            return now
        if slots > self.capacity[server]:
            return math.inf
        for end, _, held in self.bookings[server]:  # kept sorted by completion time
            free += held
            if free >= slots:
                return max(now, end)
        return math.inf  # pragma: no cover - bookings always sum to committed

    def wait_ms(self, server: int, slots: int, now: float) -> float:
        """How long until ``slots`` slots are free on ``server`` for good (inf: never)."""
        return self.free_at_ms(server, slots, now) - now

    def earliest_start(self, hops: Sequence[Hop], now: float) -> float:
        """The first instant from which every hop's slots are free (a server visited twice
        needs the slots of both of its hops)."""
        needed: dict[int, int] = {}
        for server, start, end in hops:
            needed[server] = needed.get(server, 0) + end - start
        at = now
        for server, slots in needed.items():
            at = max(at, self.free_at_ms(server, slots, now))
        return at

    # --- the loop ------------------------------------------------------------------------

    def _push(self, at: float, kind: int, request: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, kind, self._seq, request))

    def run(self) -> SimResult:
        began = time.perf_counter()
        arrivals = self.workload.arrival_ms.tolist()
        total = len(arrivals)
        heap = self._heap
        policy = self.policy
        index = 0
        while index < total or heap:
            if heap and (index >= total or heap[0][0] <= arrivals[index]):
                at, kind, _, request = heapq.heappop(heap)
                self.now = at
                self.events += 1
                if kind == END:
                    self._finish(request, at)
                elif kind == START:
                    self._begin(request, at)
                else:
                    self._decide(policy, request, at)
            else:
                at = arrivals[index]
                self.now = at
                self.events += 1
                self._decide(policy, index, at)
                index += 1
        wall = time.perf_counter() - began
        return self._result(wall)

    def _decide(self, policy: Policy, request: int, now: float) -> None:
        self._attempts[request] += 1
        decision = policy.decide(self, request, now)
        if isinstance(decision, Retry):
            if self._attempts[request] >= MAX_ATTEMPTS:
                raise SimulationError(
                    f"request {request} failed {MAX_ATTEMPTS} times under {policy.name}"
                )
            if not decision.at_ms > now:
                raise SimulationError(f"{policy.name}: a retry must be scheduled in the future")
            self._push(decision.at_ms, RETRY, request)
            return
        at = decision.at_ms
        if at < now or not math.isfinite(at):
            raise SimulationError(
                f"{policy.name}: request {request} start {at} is not in [now, inf)"
            )
        hops = decision.hops
        self._hops[request] = hops
        batch = []
        for server, start, end in hops:
            self.committed[server] += end - start
            # A start now must fit now; a later start was checked by earliest_start (and the
            # START event checks the slots actually held).
            if at == now and self.committed[server] > self.capacity[server]:
                raise SimulationError(
                    f"{policy.name}: request {request} books {end - start} slots on server "
                    f"{server} beyond its capacity {self.capacity[server]}"
                )
            self.active[server] += 1
            batch.append(self.active[server])
        first, total = self.service.timing(
            self._client[request], hops, self._inputs[request], self._outputs[request], batch
        )
        self._first[request] = at + first
        self._end[request] = at + total
        for server, start, end in hops:
            bisect.insort(self.bookings[server], (at + total, request, end - start))
        if at == now:
            self.events += 1  # the START happens now; no need to queue it
            self._begin(request, at)
        else:
            self._push(at, START, request)

    def _begin(self, request: int, now: float) -> None:
        self._start[request] = now
        for server, start, end in self._hops[request]:
            used = self.in_use[server] + end - start
            if used > self.capacity[server]:
                raise SimulationError(
                    f"server {server} would hold {used} cache slots, capacity "
                    f"{self.capacity[server]} (request {request} at {now:.3f} ms)"
                )
            self.in_use[server] = used
            if used > self.peak[server]:
                self.peak[server] = used
        self._push(self._end[request], END, request)

    def _finish(self, request: int, now: float) -> None:
        self._completions[request] += 1
        for server, start, end in self._hops[request]:
            self.in_use[server] -= end - start
            self.committed[server] -= end - start
            self.active[server] -= 1
            books = self.bookings[server]
            done = bisect.bisect_right(books, (now, math.inf))
            if done:
                del books[:done]

    def _result(self, wall: float) -> SimResult:
        extra: dict[str, object] = {}
        return SimResult(
            policy=self.policy.name,
            scenario=self.scenario_name,
            workload=self.workload.description,
            service_model=self.service.name,
            arrival_ms=self.workload.arrival_ms.copy(),
            start_ms=np.array(self._start),
            first_token_ms=np.array(self._first),
            end_ms=np.array(self._end),
            output_tokens=self.workload.output_tokens.copy(),
            attempts=np.array(self._attempts, dtype=np.int64),
            hops=np.array([len(h) for h in self._hops], dtype=np.int64),
            capacity=list(self.capacity),
            peak_slots=list(self.peak),
            completions=np.array(self._completions, dtype=np.int64),
            events=self.events,
            wall_seconds=wall,
            routes=list(self._hops),
            extra=extra,
        )
