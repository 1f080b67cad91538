"""The demo's client stream: seeded Poisson arrivals, shares, releases after the predicted
duration (time-compressed), refusals and failures; driven through ``step(now)`` with an
injected clock."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
from bprr_harness.demo.stream import Booked, ClientStream, DemoClient, PoissonArrivals


class Recorder:
    """A fake coordinator: books every request (or refuses/fails on demand), remembers when."""

    def __init__(self, clock: list[float], duration_s: float = 8.0) -> None:
        self.clock = clock
        self.duration_s = duration_s
        self.booked: list[tuple[float, str, str]] = []  # (time, site, id)
        self.released: dict[str, float] = {}
        self.refuse_every = 0
        self.fail_every = 0
        self.calls = 0

    def book(self, site: str, input_tokens: int, output_tokens: int) -> Booked | None:
        assert (input_tokens, output_tokens) == (20, 128)
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("coordinator unreachable")
        if self.refuse_every and self.calls % self.refuse_every == 0:
            return None
        session_id = f"s{self.calls}"
        self.booked.append((self.clock[0], site, session_id))
        return Booked(session_id, self.duration_s)

    def release(self, session_id: str) -> None:
        assert session_id not in self.released, "released twice"
        self.released[session_id] = self.clock[0]


def make_stream(
    recorder: Recorder,
    *,
    rate: float = 2.0,
    speed: float = 1.0,
    seed: int = 7,
    clients: list[DemoClient] | None = None,
) -> ClientStream:
    return ClientStream(
        clients or [DemoClient("c0", "cluster0", 1.0)],
        rate,
        recorder.book,
        recorder.release,
        input_tokens=20,
        output_tokens=128,
        speed=speed,
        seed=seed,
        clock=lambda: recorder.clock[0],
    )


def drive(stream: ClientStream, clock: list[float], until: float, dt: float = 0.01) -> None:
    """Advance the injected clock in steps of ``dt``, stepping the stream at each."""
    steps = round(until / dt)
    for i in range(steps + 1):
        clock[0] = i * dt
        stream.step(clock[0])


def test_arrivals_respect_the_rate_times_the_speed() -> None:
    clock = [0.0]
    recorder = Recorder(clock, duration_s=1.0)
    stream = make_stream(recorder, rate=2.0, speed=5.0)  # 10 arrivals per second
    drive(stream, clock, until=400.0, dt=0.05)
    expected = 10.0 * 400.0
    # Poisson: standard deviation sqrt(4000) ~ 63; 5% is more than 3 of them.
    assert abs(stream.stats.arrivals - expected) < 0.05 * expected
    assert stream.stats.booked == stream.stats.arrivals


def test_poisson_gaps_are_exponential() -> None:
    arrivals = PoissonArrivals(4.0, random.Random(11))
    gaps = [arrivals.next_gap() for _ in range(20_000)]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.25) < 0.01  # 1 / rate
    # The share of gaps above the mean of an exponential law is e^-1 ~ 0.368.
    above = sum(1 for g in gaps if g > 0.25) / len(gaps)
    assert abs(above - math.exp(-1)) < 0.015


def test_the_same_seed_gives_the_same_stream_and_another_seed_another() -> None:
    runs = []
    for seed in (3, 3, 4):
        clock = [0.0]
        recorder = Recorder(clock)
        drive(make_stream(recorder, seed=seed), clock, until=30.0)
        runs.append([(round(t, 6), site) for t, site, _ in recorder.booked])
    assert runs[0] == runs[1]
    assert len(runs[0]) > 20
    assert runs[0] != runs[2]


def test_clients_are_picked_by_share() -> None:
    clock = [0.0]
    recorder = Recorder(clock)
    clients = [DemoClient("a", "site-a", 3.0), DemoClient("b", "site-b", 1.0)]
    drive(make_stream(recorder, rate=20.0, clients=clients), clock, until=200.0, dt=0.05)
    sites = [site for _, site, _ in recorder.booked]
    share_a = sites.count("site-a") / len(sites)
    assert len(sites) > 3000
    assert abs(share_a - 0.75) < 0.03


def test_sessions_are_released_after_the_predicted_duration_over_the_speed() -> None:
    clock = [0.0]
    recorder = Recorder(clock, duration_s=8.0)
    stream = make_stream(recorder, rate=1.0, speed=4.0)  # held 2 s each
    drive(stream, clock, until=60.0, dt=0.01)
    booked_at = {session_id: t for t, _, session_id in recorder.booked}
    finished = [s for s in booked_at if booked_at[s] + 2.0 <= 59.9]
    assert len(finished) > 100
    for session_id in finished:
        held = recorder.released[session_id] - booked_at[session_id]
        assert 2.0 - 0.011 <= held <= 2.0 + 0.011, (session_id, held)
    # Little's law: about rate x speed x held = 8 sessions outstanding at any time.
    assert 2 <= stream.outstanding <= 20
    outstanding = stream.outstanding
    assert stream.release_all() == outstanding
    assert set(recorder.released) == set(booked_at)
    assert stream.stats.active == 0


def test_refusals_and_failures_are_counted_and_never_released() -> None:
    clock = [0.0]
    recorder = Recorder(clock, duration_s=0.5)
    recorder.refuse_every = 3
    recorder.fail_every = 5
    stream = make_stream(recorder, rate=5.0)
    drive(stream, clock, until=100.0)
    stats = stream.stats
    assert stats.arrivals == recorder.calls
    assert stats.failed == recorder.calls // 5
    refused = sum(1 for i in range(1, recorder.calls + 1) if i % 3 == 0 and i % 5 != 0)
    assert stats.rejected == refused
    assert stats.booked == stats.arrivals - stats.failed - stats.rejected
    stream.release_all()
    assert len(recorder.released) == stats.booked


def test_step_returns_the_next_event_time() -> None:
    clock = [0.0]
    recorder = Recorder(clock, duration_s=1.0)
    stream = make_stream(recorder, rate=0.5)
    first = stream.step(0.0)
    assert first > 0.0 and recorder.calls == 0
    clock[0] = first
    after = stream.step(first)
    assert recorder.calls == 1 and stream.outstanding == 1
    # Next: the release at first + 1 s, unless another arrival comes before it.
    assert first < after <= first + 1.0 + 1e-9
    before = (recorder.calls, len(recorder.released))
    stream.step(after - 1e-6)
    assert (recorder.calls, len(recorder.released)) == before  # nothing is due early
    stream.step(after)
    assert (recorder.calls, len(recorder.released)) != before


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        PoissonArrivals(0.0, random.Random(0))
    clock = [0.0]
    recorder = Recorder(clock)
    with pytest.raises(ValueError, match="speed"):
        make_stream(recorder, speed=0.0)
    with pytest.raises(ValueError, match="clients"):
        ClientStream([], 1.0, recorder.book, recorder.release, input_tokens=1, output_tokens=1)


def test_run_on_a_thread_books_and_stop_releases_everything() -> None:
    booked: list[str] = []
    released: list[str] = []
    lock = threading.Lock()

    def book(site: str, input_tokens: int, output_tokens: int) -> Booked:
        with lock:
            booked.append(f"s{len(booked)}")
            return Booked(booked[-1], 3600.0)

    def release(session_id: str) -> None:
        with lock:
            released.append(session_id)

    stream = ClientStream(
        [DemoClient("c0", "cluster0", 1.0)],
        200.0,
        book,
        release,
        input_tokens=1,
        output_tokens=1,
        seed=1,
    )
    stream.start()
    deadline = time.monotonic() + 5
    while len(booked) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.stop() >= 5
    assert sorted(released) == sorted(booked)
