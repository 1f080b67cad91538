"""The central FIFO queue on its own (app.service.queue over the booking_queue table), on
SQLite and PostgreSQL: 16 threads, two queue instances (replicas) on one database, expiry,
the depth bound. Capacity here is a counter the admission callback takes from; the tests
through the coordinator (test_queue_sessions.py) book real chains."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.service.queue import CentralQueue, TooManyRequests
from app.service.session_settings import SessionSettings
from app.store import db as store_db
from app.store.booking_queue import QueuedRequest, Ticket
from app.store.session_tables import QueueRow


class Slots:
    """Shared capacity: the admission callback books one slot per ticket while any is free
    (``free`` slots are added by the test, as releases would)."""

    def __init__(self) -> None:
        self.free = 0
        self.admitted: list[int] = []  # seqs, in the order admitted
        self.over_admitted = 0
        self.lock = threading.Lock()

    def admit(self, _db: Session, ticket: Ticket, _now: float) -> str | None:
        with self.lock:
            if self.free < 0:
                self.over_admitted += 1
            if self.free <= 0:
                return None
            self.free -= 1
            self.admitted.append(ticket.seq)
        return f'{{"id": "{ticket.request.session_id}"}}'


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = store_db.make_engine(database_url)
    QueueRow.__table__.create(engine)  # type: ignore[attr-defined]
    yield engine
    engine.dispose()


def make_queue(engine: Engine, slots: Slots, **settings: float) -> CentralQueue:
    @contextmanager
    def write_tx() -> Iterator[Session]:
        with Session(engine) as db, db.begin():
            yield db

    values = {"queue_poll_s": 0.02, **settings}
    return CentralQueue(
        write_tx, time.time, uuid.uuid4().hex, SessionSettings(**values), slots.admit
    )


def request(site: str = "east") -> QueuedRequest:
    return QueuedRequest(uuid.uuid4().hex, "0" * 64, "anonymous:test", None, site, 10, 10)


def seqs_of(engine: Engine) -> dict[str, int]:
    with Session(engine) as db:
        return {r.session_id: r.seq for r in db.scalars(select(QueueRow))}


def _wait_for_depth(queues: list[CentralQueue], engine: Engine, depth: int) -> None:
    deadline = time.monotonic() + 30
    while len(seqs_of(engine)) < depth:
        assert time.monotonic() < deadline, "tickets never arrived"
        time.sleep(0.01)


def test_sixteen_threads_are_admitted_in_order_never_beyond_capacity(
    engine: Engine, database_url: str
) -> None:
    sixteen_waiters_freed_one_slot_at_a_time(engine, database_url, replicas=1)


@pytest.mark.postgres
def test_two_replicas_admit_in_order_never_beyond_capacity(pg_url: str) -> None:
    """Two queue instances (each its own engine and holder id, as two processes) on one
    PostgreSQL: 8 waiters on each, slots freed one at a time on alternating replicas."""
    engine = store_db.make_engine(pg_url)
    QueueRow.__table__.create(engine)  # type: ignore[attr-defined]
    try:
        sixteen_waiters_freed_one_slot_at_a_time(engine, pg_url, replicas=2)
    finally:
        engine.dispose()


def sixteen_waiters_freed_one_slot_at_a_time(engine: Engine, url: str, replicas: int) -> None:
    slots = Slots()
    # Two replicas: two queue instances with their own connections and holders.
    engines = [engine] + [store_db.make_engine(url) for _ in range(replicas - 1)]
    queues = [make_queue(e, slots) for e in engines]
    results: dict[str, str | None] = {}

    def wait(i: int) -> None:
        ticket = request()
        results[ticket.session_id] = queues[i % replicas].wait(ticket, 60.0)

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(wait, i) for i in range(16)]
            _wait_for_depth(queues, engine, 16)
            order = seqs_of(engine)
            for released in range(1, 17):  # free one slot at a time, as releases do
                with slots.lock:
                    slots.free += 1
                queues[released % replicas].kick()
                deadline = time.monotonic() + 30
                while len(slots.admitted) < released:
                    assert time.monotonic() < deadline, "a freed slot was never taken"
                    time.sleep(0.005)
                assert len(slots.admitted) == released  # never more than the slots freed
            for future in futures:
                future.result(timeout=60)
    finally:
        for queue in queues:
            queue.close()
        for extra in engines[1:]:
            extra.dispose()
    assert all(reply is not None for reply in results.values())
    assert slots.admitted == sorted(order.values()), "admitted out of arrival order"
    assert slots.over_admitted == 0 and slots.free == 0 and len(slots.admitted) == 16
    assert seqs_of(engine) == {}  # every ticket picked up


def test_a_ticket_expires_and_leaves_the_queue(engine: Engine) -> None:
    slots = Slots()
    queue = make_queue(engine, slots)
    try:
        started = time.monotonic()
        assert queue.wait(request(), 0.3) is None
        assert time.monotonic() - started >= 0.3
        assert seqs_of(engine) == {}
        slots.free = 1
        queue.kick()
        time.sleep(0.1)
        assert slots.admitted == []  # nobody left to admit
    finally:
        queue.close()


def test_the_head_blocks_later_tickets_until_it_is_served(engine: Engine) -> None:
    """FIFO without skipping: a head the callback cannot serve stops the round."""
    served: list[str] = []

    def admit(_db: Session, ticket: Ticket, _now: float) -> str | None:
        if ticket.request.client_site == "big":
            return None
        served.append(ticket.request.client_site)
        return "{}"

    slots = Slots()
    queue = make_queue(engine, slots)
    queue.admit = admit
    try:
        big = queue.enqueue(request("big"), 5.0)
        small = queue.enqueue(request("small"), 5.0)
        assert queue.run_round() == 0
        assert served == [] and not small.done() and not big.done()
    finally:
        queue.close()


def test_the_queue_is_bounded(engine: Engine) -> None:
    queue = make_queue(engine, Slots(), queue_max_depth=2)
    try:
        queue.enqueue(request(), 5.0)
        queue.enqueue(request(), 5.0)
        with pytest.raises(TooManyRequests) as refused:
            queue.enqueue(request(), 5.0)
        assert refused.value.status_code == 429 and "Retry-After" in refused.value.headers
        assert len(seqs_of(engine)) == 2
    finally:
        queue.close()


def test_a_ticket_whose_holder_stopped_renewing_it_is_dropped(engine: Engine) -> None:
    slots = Slots()
    gone = make_queue(engine, slots, queue_stale_s=0.2)
    alive = make_queue(engine, slots, queue_stale_s=0.2)
    try:
        gone.enqueue(request("dead"), 60.0)
        gone._stop.set()  # its process died: nobody renews its ticket
        gone._kicked.set()
        time.sleep(0.4)
        ticket = request("live")
        slots.free = 1
        assert alive.wait(ticket, 5.0) is not None
        assert len(slots.admitted) == 1 and seqs_of(engine) == {}
    finally:
        gone.close()
        alive.close()


def test_a_withdrawal_after_admission_returns_the_reply(engine: Engine) -> None:
    slots = Slots()
    queue = make_queue(engine, slots)
    queue._stop.set()  # no pump: rounds run by hand
    try:
        ticket = request()
        future = queue.enqueue(ticket, 60.0)
        slots.free = 1
        with queue.write_tx() as db:  # admitted by "another replica", not yet picked up
            from app.store.booking_queue import BookingQueue

            head = BookingQueue(db).head(time.time(), 0.0)
            assert head is not None
            BookingQueue(db).admit(head.seq, '{"id": "x"}')
        assert queue.withdraw(ticket.session_id, future) == '{"id": "x"}'
        assert seqs_of(engine) == {}
    finally:
        queue.close()


def test_a_head_that_can_never_be_served_is_refused_and_the_next_one_admitted(
    engine: Engine,
) -> None:
    from app.service.errors import Unavailable
    from app.service.queue import HeadRefused

    def admit(_db: Session, ticket: Ticket, _now: float) -> str | None:
        if ticket.request.client_site == "gone":
            raise HeadRefused("client_site: unknown site 'gone'")
        return "{}"

    queue = make_queue(engine, Slots())
    queue.admit = admit
    try:
        doomed = queue.enqueue(request("gone"), 5.0)
        served = queue.enqueue(request("east"), 5.0)
        assert served.result(timeout=10) == "{}"
        with pytest.raises(Unavailable, match="unknown site"):
            doomed.result(timeout=10)
    finally:
        queue.close()
