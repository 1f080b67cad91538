"""The central FIFO queue of bookings that found no free chain (POST /v1/sessions, wait_s > 0).

One queue for every coordinator process, in the database (table ``booking_queue``):

- **Arrival**: a ticket is inserted under the queue lock (PostgreSQL: an advisory transaction
  lock; SQLite: its single writer lock), so ``seq`` order is the order tickets became visible,
  and the depth bound (429 beyond it) is exact.
- **Admission**: whoever runs a round takes the lock, drops tickets past their deadline or
  whose holder stopped renewing them, and tries to book the HEAD only, one admission per
  transaction (so that the chain's row locks are never held across two bookings). The head
  that cannot be served stops the round: no later ticket is admitted before it (no skipping,
  even when a smaller request would fit). Any process may admit any process's ticket: the
  ticket carries the session id and token hash its holder chose, and the admitted reply.
- **Direct bookings** (wait_s = 0, or the first try of wait_s > 0) book only while no live
  ticket waits (the EXISTS in the booking statement, app.store.bookings), so they cannot take
  the slot the head waits for.
- **Wake-ups**: a release, a sweep or an arrival in this process kicks its pump thread; other
  processes' releases are seen by polling every ``queue_poll_s`` while a ticket waits.
- **Leaving**: a holder whose client gives up (deadline, disconnect) withdraws its ticket; if
  it was admitted meanwhile the caller gets the reply (returned at the deadline, released on a
  disconnect). A holder renews its tickets every round; a ticket not renewed for
  ``queue_stale_s`` (its process died) is dropped by the next round anywhere.

Transactions: ``enqueue``, every admission, ``withdraw`` and the pick-up of admitted tickets
are one write transaction each, the queue lock first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from app.logging import get_logger
from app.service.errors import ServiceError, Unavailable
from app.service.session_settings import SessionSettings
from app.store.booking_queue import (
    ADMITTED,
    OVER_QUOTA,
    REFUSED,
    BookingQueue,
    QueuedRequest,
    Ticket,
)
from app.store.bookings import Bookings

log = get_logger("bprr.queue")

WriteTx = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], float]
# Books the head inside the admission transaction: the reply (JSON, without the token) when
# booked, None when no chain can take it now (the round stops there); raises HeadRefused
# when it can never be served (its site or lengths no longer valid).
AdmitFn = Callable[[Session, Ticket, float], str | None]
MAX_ADMISSIONS_PER_ROUND = 256
# An idle pump still wakes this often (to notice a stop).
IDLE_WAKE_S = 1.0


class TooManyRequests(ServiceError):
    """429: the queue is full, or the client is over its quota or rate."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        seconds = max(1, int(-(-retry_after_s // 1)))
        super().__init__(message, {"Retry-After": str(seconds)})
        self.retry_after_s = retry_after_s


class QuotaHeld(TooManyRequests):
    """429: the client's live sessions and waiting tickets already fill its quota."""


class HeadRefused(Exception):
    """The head can never be served as asked; its client gets a 503 with this reason."""

    state = REFUSED


class HeadOverQuota(HeadRefused):
    """The head's client holds its quota of live sessions; its client gets a 429."""

    state = OVER_QUOTA


def replay_ticket(db: Session, request: QueuedRequest) -> str:
    """A ticket's answer when its Idempotency-Key already booked a session (two requests with
    one key raced): that session's reply, with the ticket's token (as a retried booking gets
    it); the queue moves on."""
    key = request.idempotency_key
    bookings = Bookings(db)
    record = None if key is None else bookings.by_key(request.client, key)
    if record is None:
        raise HeadRefused("the booking conflicts with another session; retry")
    bookings.rotate_token(record.id, request.token_hash)
    return record.reply


class CentralQueue:
    def __init__(
        self,
        write_tx: WriteTx,
        clock: Clock,
        holder: str,
        settings: SessionSettings,
        admit: AdmitFn,
        on_depth: Callable[[int], None] | None = None,
        on_orphan: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.write_tx = write_tx
        self.clock = clock
        self.holder = holder
        self.settings = settings
        self.admit = admit
        self.on_depth = on_depth
        # A session admitted for a ticket nobody here waits for any more: release it.
        self.on_orphan = on_orphan
        self._waiting: dict[str, Future[str]] = {}
        self._lock = threading.Lock()  # guards _waiting
        self._resolve_lock = threading.Lock()  # a pick-up and a withdrawal never interleave
        self._kicked = threading.Event()
        # Set when the coordinator closes (its own stop event): the pump ends.
        self._stop = stop or threading.Event()
        self._pump: threading.Thread | None = None
        self._pump_lock = threading.Lock()
        self.last_depth = 0

    # --- arrivals and departures -----------------------------------------------------------

    def stale_before(self, now: float) -> float:
        return now - self.settings.queue_stale_s

    def enqueue(self, request: QueuedRequest, wait_s: float) -> Future[str]:
        """Put the request at the tail; its future gets the reply once admitted.
        TooManyRequests when the queue already holds ``queue_max_depth`` tickets."""
        now = self.clock()
        future: Future[str] = Future()
        with self._lock:
            self._waiting[request.session_id] = future
        try:
            with self.write_tx() as db:
                queue = BookingQueue(db)
                queue.lock()
                depth = queue.depth(now, self.stale_before(now))
                if depth >= self.settings.queue_max_depth:
                    raise TooManyRequests(
                        f"the booking queue is full ({depth} waiting); retry later",
                        retry_after_s=max(1.0, self.settings.queue_poll_s * 5),
                    )
                quota = request.max_sessions
                if quota > 0:
                    held = Bookings(db).live_for(request.client) + queue.waiting_for(request.client)
                    if held >= quota:
                        raise QuotaHeld(
                            f"client {request.client!r} holds its quota of {quota} live "
                            "sessions (waiting bookings included); release one",
                            retry_after_s=max(1.0, self.settings.queue_poll_s * 5),
                        )
                queue.add(request, self.holder, now, now + wait_s)
        except BaseException:
            with self._lock:
                self._waiting.pop(request.session_id, None)
            raise
        self.last_depth = depth + 1
        self.kick()
        return future

    def withdraw(self, session_id: str, future: Future[str]) -> str | None:
        """Stop waiting: None if the ticket left the queue unserved, else the reply of the
        session it was admitted to just before (the caller returns or releases it).
        Raises Unavailable if it was refused."""
        with self._resolve_lock:
            with self._lock:
                self._waiting.pop(session_id, None)
            if future.done():
                return future.result()
            with self.write_tx() as db:
                answer = BookingQueue(db).withdraw(session_id)
            if answer is None:
                return None
            # Kept on the future: a caller retrying after a failure (a release that would
            # block on the event loop) gets the same answer, not a ticket already gone.
            self._answer(future, *answer)
        return future.result()

    def _answer(self, future: Future[str], state: str, reply: str) -> None:
        if state == ADMITTED:
            future.set_result(reply)
        elif state == OVER_QUOTA:
            future.set_exception(TooManyRequests(reply, retry_after_s=self.settings.queue_poll_s))
        else:
            future.set_exception(Unavailable(reply, retry_after_s=self.settings.queue_poll_s))

    def wait(self, request: QueuedRequest, wait_s: float) -> str | None:
        """Enqueue and block until admitted (the reply) or ``wait_s`` ran out (None)."""
        future = self.enqueue(request, wait_s)
        try:
            return future.result(timeout=wait_s)
        except TimeoutError:
            return self.withdraw(request.session_id, future)

    def local_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # --- admission ---------------------------------------------------------------------------

    def kick(self) -> None:
        """Something may have freed a slot (or a ticket arrived): run a round soon."""
        self._ensure_pump()
        self._kicked.set()

    def run_round(self) -> int:
        """Admit heads in order while they can be served; the number admitted."""
        admitted = 0
        depth = 0
        first = True
        while admitted < MAX_ADMISSIONS_PER_ROUND:
            now = self.clock()
            stale = self.stale_before(now)
            with self.write_tx() as db:
                queue = BookingQueue(db)
                queue.lock()
                if first:
                    queue.touch(self.holder, now)  # before the drop: ours are alive
                    queue.drop_stale(now, stale)
                    first = False
                head = queue.head(now, stale)
                if head is None:
                    depth = 0
                    break
                try:
                    reply = self.admit(db, head, now)
                except HeadRefused as refused:
                    queue.refuse(head.seq, str(refused), refused.state)
                    continue
                if reply is None:
                    depth = queue.depth(now, stale)
                    break
                queue.admit(head.seq, reply)
            admitted += 1
        self.last_depth = depth
        if self.on_depth is not None:
            self.on_depth(depth)
        self._pick_up()
        return admitted

    def _pick_up(self) -> None:
        """Hand this process's admitted tickets to their waiting clients."""
        with self._resolve_lock:
            with self._lock:
                if not self._waiting:
                    return
            with self.write_tx() as db:
                answers = BookingQueue(db).answered_for(self.holder)
            for session_id, (state, reply) in answers.items():
                with self._lock:
                    future = self._waiting.pop(session_id, None)
                if future is None:
                    if state == ADMITTED and self.on_orphan is not None:
                        self.on_orphan(session_id)
                else:
                    self._answer(future, state, reply)

    # --- the pump thread -----------------------------------------------------------------------

    def _ensure_pump(self) -> None:
        if self._pump is not None or self._stop.is_set():
            return
        with self._pump_lock:
            if self._pump is None:
                self._pump = threading.Thread(target=self._run, name="bprr-queue", daemon=True)
                self._pump.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.local_waiting() > 0 or self.last_depth > 0
            # Idle: sleep until kicked; someone waits: poll for other processes' releases.
            kicked = self._kicked.wait(timeout=self.settings.queue_poll_s if busy else IDLE_WAKE_S)
            self._kicked.clear()
            if self._stop.is_set():
                break
            if not kicked and not busy:
                continue
            try:
                self.run_round()
            except Exception as error:  # the next round retries (the database may be back)
                log.warning("queue round failed", error=f"{type(error).__name__}: {error}")
                self._stop.wait(self.settings.queue_poll_s)

    def close(self) -> None:
        self._stop.set()
        self._kicked.set()
        pump = self._pump
        if pump is not None:
            pump.join(timeout=10)
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for future in waiting:
            future.cancel()
