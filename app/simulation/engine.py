"""The discrete-event core: a heap of (time, priority, sequence) events and exact cache books.

Request lifecycle: ARRIVAL -> the policy decides (start now, start later on a booked route,
wait in the central FIFO queue, or fail and retry later) -> START: the attention cache the
request needs is taken -> END: it is released, and the head of the central queue is offered
the freed room. Prefill and the decode steps happen between START and END; because service
times do not depend on what else runs (the paper's model), a request needs only those events,
never one per token.

Memory is token-granular (CONTRACTS.md section 1): one unit is the kv cache of one token on
one block; a request of T = input + output tokens running k blocks on server j holds k x T of
j's units (the policy's ``capacity``). Two books per server keep memory exact:
- ``in_use``: units held by running requests (checked against the capacity at every START,
  so the simulator can never overcommit: it raises instead);
- ``committed``: units of running requests plus those booked to start later. A policy that
  books a future start only does so when its units are free from that instant on
  (``earliest_start``), so a booked request never finds its units taken.

The central queue (``Wait``) is strictly FIFO: an arrival joins it behind anyone waiting, and
after every END the head is offered to the policy again until one cannot start.

Ordering is deterministic: events at the same instant run END, then START, then ARRIVAL/RETRY,
each group in the order it was scheduled. Time is in milliseconds.
"""

from __future__ import annotations

import bisect
import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from app.allocation import dispatch
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


@dataclass(frozen=True)
class Wait:
    """Nothing can take the request now: it waits in the central FIFO queue."""


Decision = Start | Retry | Wait


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def placement(self) -> Placement: ...

    @property
    def capacity(self) -> Sequence[int]:  # cache token-block units per server
        ...

    def decide(self, sim: Simulator, request: int, now: float) -> Decision: ...


class FreeUnits:
    """capacity - committed per server, read lazily (a policy reads only the hops it needs)."""

    def __init__(self, sim: Simulator) -> None:
        self._capacity = sim.capacity
        self._committed = sim.committed

    def __getitem__(self, server: int) -> int:
        return self._capacity[server] - self._committed[server]

    def __len__(self) -> int:
        return len(self._capacity)


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
    capacity: list[int]  # cache units per server
    peak_slots: list[int]  # most cache units held at once per server
    completions: NDArray[np.int64]
    events: int
    wall_seconds: float
    routes: list[tuple[Hop, ...]] = field(default_factory=list)  # each request's hops
    placement_seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    # T = input + output tokens per request: the units it holds on each block it runs.
    tokens: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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
        # Per server: (release time, units) of running and booked requests, by time.
        self.bookings: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        self.queue: deque[int] = deque()  # the central FIFO queue (policies that Wait)
        self.max_queue = 0
        self.free_units = FreeUnits(self)
        self.now = 0.0
        count = len(workload)
        self._client = workload.client.tolist()
        self._inputs = workload.input_tokens.tolist()
        self._outputs = workload.output_tokens.tolist()
        self._tokens = [
            dispatch.tokens_of(i, o) for i, o in zip(self._inputs, self._outputs, strict=True)
        ]
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

    def tokens_of(self, request: int) -> int:
        """T = input + output tokens: the units the request holds per block it runs."""
        return self._tokens[request]

    def lengths_of(self, request: int) -> tuple[int, int]:
        return int(self._inputs[request]), int(self._outputs[request])

    def free(self, server: int) -> int:
        """Units on ``server`` neither used nor booked."""
        return self.capacity[server] - self.committed[server]

    def free_at_ms(self, server: int, units: int, now: float) -> float:
        """The instant from which ``units`` units are free on ``server`` for good (inf: never);
        dispatch.free_from over the server's bookings."""
        return dispatch.free_from(
            self.capacity[server], self.committed[server], self.bookings[server], units, now
        )

    def wait_ms(self, server: int, units: int, now: float) -> float:
        """How long until ``units`` units are free on ``server`` for good (inf: never)."""
        return self.free_at_ms(server, units, now) - now

    def earliest_start(self, hops: Sequence[Hop], tokens: int, now: float) -> float:
        """The first instant from which every hop's units are free (a server visited twice
        needs the units of both of its hops)."""
        return dispatch.earliest_start(
            hops, tokens, self.capacity, self.committed, self.bookings, now
        )

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
        if self.queue:
            raise SimulationError(
                f"{policy.name}: {len(self.queue)} request(s) still queued at the end "
                f"(request {self.queue[0]} can never fit)"
            )
        wall = time.perf_counter() - began
        return self._result(wall)

    def _decide(self, policy: Policy, request: int, now: float) -> None:
        self._attempts[request] += 1
        if self.queue:  # FIFO: nobody overtakes a waiting request
            self._enqueue(request)
            return
        decision = policy.decide(self, request, now)
        if isinstance(decision, Wait):
            self._enqueue(request)
            return
        self._apply(policy, request, decision, now)

    def _enqueue(self, request: int) -> None:
        self.queue.append(request)
        if len(self.queue) > self.max_queue:
            self.max_queue = len(self.queue)

    def _drain(self, now: float) -> None:
        """Offer the freed room to the head of the central queue, in order."""
        policy = self.policy
        while self.queue:
            head = self.queue[0]
            decision = policy.decide(self, head, now)
            if isinstance(decision, Wait):
                return
            self.queue.popleft()
            self._apply(policy, head, decision, now)

    def _apply(self, policy: Policy, request: int, decision: Decision, now: float) -> None:
        if isinstance(decision, Wait):  # pragma: no cover - handled by the callers
            raise SimulationError("a waiting request cannot be applied")
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
        tokens = self._tokens[request]
        batch = []
        for server, start, end in hops:
            units = (end - start) * tokens
            self.committed[server] += units
            # A start now must fit now; a later start was checked by earliest_start (and the
            # START event checks the units actually held).
            if at == now and self.committed[server] > self.capacity[server]:
                raise SimulationError(
                    f"{policy.name}: request {request} books {units} units on server "
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
            bisect.insort(self.bookings[server], (at + total, (end - start) * tokens))
        if at == now:
            self.events += 1  # the START happens now; no need to queue it
            self._begin(request, at)
        else:
            self._push(at, START, request)

    def _begin(self, request: int, now: float) -> None:
        self._start[request] = now
        tokens = self._tokens[request]
        for server, start, end in self._hops[request]:
            used = self.in_use[server] + (end - start) * tokens
            if used > self.capacity[server]:
                raise SimulationError(
                    f"server {server} would hold {used} cache units, capacity "
                    f"{self.capacity[server]} (request {request} at {now:.3f} ms)"
                )
            self.in_use[server] = used
            if used > self.peak[server]:
                self.peak[server] = used
        self._push(self._end[request], END, request)

    def _finish(self, request: int, now: float) -> None:
        self._completions[request] += 1
        tokens = self._tokens[request]
        for server, start, end in self._hops[request]:
            units = (end - start) * tokens
            self.in_use[server] -= units
            self.committed[server] -= units
            self.active[server] -= 1
            books = self.bookings[server]
            done = bisect.bisect_right(books, (now, math.inf))
            if done:
                del books[:done]
        finished = getattr(self.policy, "finished", None)
        if finished is not None:
            finished(request)
        if self.queue:
            self._drain(now)

    def _result(self, wall: float) -> SimResult:
        extra: dict[str, object] = {"max_queue": self.max_queue}
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
            tokens=np.array(self._tokens, dtype=np.int64),
        )
