"""A seeded Poisson stream of simulated clients that book sessions and release them.

Arrivals come at ``rate_per_s x speed`` (exponential gaps from a seeded ``random.Random``);
each arrival picks a client by its share, books a session for that client's site, and
releases it once the performance model's predicted duration (the booking's ``total_ms``)
divided by ``speed`` has passed. With ``speed`` > 1 the scenario runs time-compressed: the
load (arrival rate x duration) is the scenario's, only faster.

``step(now)`` handles every event due at ``now`` and returns the time of the next one, so
tests drive the stream with an injected clock; ``run()`` loops it on a thread.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("bprr.demo.stream")


@dataclass(frozen=True)
class Booked:
    """A booked session: its id and its predicted duration in (uncompressed) seconds."""

    id: str
    duration_s: float


# (client_site, input_tokens, output_tokens) -> the booked session, or None when refused (503).
Book = Callable[[str, int, int], Booked | None]
Release = Callable[[str], None]


@dataclass(frozen=True)
class DemoClient:
    id: str
    site: str
    share: float


@dataclass
class StreamStats:
    arrivals: int = 0
    booked: int = 0
    rejected: int = 0
    failed: int = 0
    released: int = 0

    @property
    def active(self) -> int:
        return self.booked - self.released


class PoissonArrivals:
    """Exponential inter-arrival gaps at ``rate_per_s`` from ``rng``."""

    def __init__(self, rate_per_s: float, rng: random.Random) -> None:
        if not math.isfinite(rate_per_s) or rate_per_s <= 0:
            raise ValueError(f"rate_per_s: must be a positive number, got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self._rng = rng

    def next_gap(self) -> float:
        return self._rng.expovariate(self.rate_per_s)


class ClientStream:
    def __init__(
        self,
        clients: Sequence[DemoClient],
        rate_per_s: float,
        book: Book,
        release: Release,
        *,
        input_tokens: int,
        output_tokens: int,
        speed: float = 1.0,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError("clients: the stream needs at least one client")
        if not math.isfinite(speed) or speed <= 0:
            raise ValueError(f"speed: must be a positive number, got {speed}")
        if input_tokens < 0 or output_tokens < 1:
            raise ValueError("input_tokens must be >= 0 and output_tokens >= 1")
        self.clients = list(clients)
        self._weights = [c.share for c in self.clients]
        self.speed = speed
        self._rng = random.Random(seed)
        self.arrivals = PoissonArrivals(rate_per_s * speed, self._rng)
        self._book = book
        self._release = release
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self._clock = clock
        self.stats = StreamStats()
        self._next_arrival: float | None = None
        self._releases: list[tuple[float, str]] = []  # heap of (release time, session id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def outstanding(self) -> int:
        """Sessions booked and not yet released."""
        with self._lock:
            return len(self._releases)

    def step(self, now: float) -> float:
        """Release every session due by ``now``, then carry out every arrival due by ``now``;
        returns the time of the next event."""
        if self._next_arrival is None:
            self._next_arrival = now + self.arrivals.next_gap()
        while True:
            with self._lock:
                due = self._releases and self._releases[0][0] <= now
                session_id = heapq.heappop(self._releases)[1] if due else None
            if session_id is None:
                break
            self._release_one(session_id)
        while self._next_arrival <= now:
            at = self._next_arrival
            self._next_arrival = at + self.arrivals.next_gap()
            self._arrive(at)
        with self._lock:
            next_release = self._releases[0][0] if self._releases else math.inf
        return min(self._next_arrival, next_release)

    def _arrive(self, at: float) -> None:
        client = self._rng.choices(self.clients, weights=self._weights)[0]
        self.stats.arrivals += 1
        try:
            booked = self._book(client.site, self.input_tokens, self.output_tokens)
        except Exception as error:
            self.stats.failed += 1
            log.warning("booking for %s failed: %s", client.id, error)
            return
        if booked is None:
            self.stats.rejected += 1
            return
        self.stats.booked += 1
        # The session ends its predicted duration after it arrived (compressed by speed).
        with self._lock:
            heapq.heappush(self._releases, (at + booked.duration_s / self.speed, booked.id))

    def _release_one(self, session_id: str) -> None:
        try:
            self._release(session_id)
        except Exception as error:
            log.warning("releasing session %s failed: %s", session_id, error)
            self.stats.failed += 1
        self.stats.released += 1

    def release_all(self) -> int:
        """Release every outstanding session now (at shutdown); returns how many."""
        with self._lock:
            pending = [session_id for _, session_id in self._releases]
            self._releases.clear()
        for session_id in pending:
            self._release_one(session_id)
        return len(pending)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Step until ``request_stop()``, sleeping until the next event."""
        while not self._stop.is_set():
            next_at = self.step(self._clock())
            self._stop.wait(max(0.0, min(next_at - self._clock(), 1.0)))

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the stream is already started")
        self._thread = threading.Thread(target=self.run, name="bprr-demo-clients", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout_s: float = 10.0) -> int:
        """Stop the loop and release what is still booked; returns how many were released."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        return self.release_all()
