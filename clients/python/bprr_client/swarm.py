"""The PETALS client plugin: generation through the chain the coordinator booked.

    model = AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, initial_peers=PEERS, dht_prefix=PREFIX, torch_dtype=torch.float32)
    with RouteClient(COORDINATOR, client_site="east") as routes:
        swarm = BookedSwarm(model, routes)
        output_ids = swarm.generate(input_ids, max_new_tokens=16)

``BookedSwarm`` replaces ``model.transformer.h.sequence_manager`` with ``BookedSequenceManager``,
a ``RemoteSequenceManager`` whose ``make_sequence`` returns the booked spans (peer ids from
the route's hops) instead of PETALS' own choice. ``generate()`` books a session with the
request's real token counts (prompt length, ``max_new_tokens``), runs greedy PETALS
generation on that chain and releases the session. When a server on the chain fails
mid-generation (PETALS 2.2 cannot recover by itself: its retries hit "Broken input cache",
upstream issue #587), the failure surfaces within ``request_timeout`` (one try per step:
``max_retries=1``), the session is released, a new chain without the failed peers is booked,
and the prompt plus the tokens generated so far are prefilled on it: greedy output is the
same token for token. ``session()`` is the context manager under ``generate()`` for callers
that drive PETALS themselves.

Runs inside the PETALS process (pydantic 1.10, torch, hivemind): imports PETALS lazily.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bprr_client.http import CoordinatorError
from bprr_client.models import RouteHop, Session
from bprr_client.routes import RouteClient

log = logging.getLogger("bprr_client.swarm")


class ChainUnavailable(Exception):
    """No chain without the failed servers could be booked in time."""


def hop_peer_id(hop: RouteHop) -> str | None:
    """The hop's PETALS peer id: the route's ``peer_id``, else a ``/p2p/ID`` multiaddr in
    its multiaddrs or address (a coordinator that does not store peer ids)."""
    if hop.peer_id:
        return hop.peer_id
    for maddr in [*hop.multiaddrs, hop.address]:
        if "/p2p/" in maddr:
            return maddr.rsplit("/p2p/", 1)[1].split("/", 1)[0] or None
    return None


def _manager_class() -> type[Any]:
    from petals.client.routing.sequence_manager import RemoteSequenceManager
    from petals.data_structures import RemoteSpanInfo, ServerInfo, ServerState

    class BookedSequenceManager(RemoteSequenceManager):  # type: ignore[misc]
        """``make_sequence`` returns the booked chain (fresh span objects: callers mutate
        them); without a chain it is PETALS' own manager. Failed peers are recorded."""

        chain: list[tuple[Any, int, int]] | None = None
        failed: set[str]

        def make_sequence(
            self,
            start_index: int = 0,
            end_index: int | None = None,
            *,
            mode: str,
            cache_tokens_needed: int | None = None,
        ) -> list[Any]:
            chain = self.chain
            if chain is None:
                return super().make_sequence(  # type: ignore[no-any-return]
                    start_index, end_index, mode=mode, cache_tokens_needed=cache_tokens_needed
                )
            end_index = len(self) if end_index is None else end_index
            spans = []
            for peer_id, start, end in chain:
                low, high = max(start, start_index), min(end, end_index)
                if low < high:
                    info = ServerInfo(state=ServerState.ONLINE, throughput=1.0)
                    spans.append(RemoteSpanInfo(peer_id, low, high, info))
            covered = sum(s.end - s.start for s in spans)
            if covered != end_index - start_index:
                raise RuntimeError(f"the booked chain does not cover {start_index}:{end_index}")
            return spans

        def on_request_failure(self, peer_id: Any) -> None:
            if peer_id is not None:
                self.failed.add(peer_id.to_base58())
            super().on_request_failure(peer_id)

    return BookedSequenceManager


@dataclass
class Attempt:
    """One booked session of a generation: its route and what it produced."""

    session_id: str
    hops: list[tuple[str, str, int, int]]  # (server id, peer id, start, end)
    tokens: int = 0
    failed_peers: list[str] = field(default_factory=list)
    booking_ms: float = 0.0  # POST /v1/sessions (and re-bookings around failed servers)


@dataclass
class GenerationReport:
    """What ``generate()`` did: one attempt per booked chain, the failover time (from the
    failure to the first token on the new chain) when there was one."""

    attempts: list[Attempt] = field(default_factory=list)
    failover_s: list[float] = field(default_factory=list)


class BookedSwarm:
    """Generate through booked chains (see the module docstring).

    ``request_timeout`` bounds how long a dead server can stall a step before it is
    noticed; ``failover_timeout_s`` how long to wait for a chain without the failed peers
    (the coordinator drops a server once its agent reports it gone or its lease expires);
    ``max_failovers`` how many chains one generation may go through.
    """

    def __init__(
        self,
        model: Any,
        routes: RouteClient,
        *,
        client_site: str | None = None,
        request_timeout: float = 10.0,
        failover_timeout_s: float = 60.0,
        max_failovers: int = 3,
        wait_s: float = 0.0,
    ) -> None:
        self.model = model
        self.routes = routes
        self.client_site = client_site
        self.failover_timeout_s = failover_timeout_s
        self.max_failovers = max_failovers
        self.wait_s = wait_s
        self.report = GenerationReport()
        self.last_booking_ms = 0.0
        old = model.transformer.h.sequence_manager
        old.config.max_retries = 1  # fail fast; the failover is ours (PETALS issue #587)
        old.config.request_timeout = request_timeout
        old.config.show_route = False
        manager = _manager_class()(old.config, old.block_uids, dht=old.dht, state=old.state)
        manager.failed = set()
        model.transformer.h.sequence_manager = manager
        self.manager = manager

    # --- one booked chain ---------------------------------------------------------------

    def _book(self, input_tokens: int, output_tokens: int, avoid: set[str]) -> Session:
        """Book a session whose chain avoids ``avoid`` (released and re-booked until the
        coordinator stops routing to them, up to ``failover_timeout_s``)."""
        deadline = time.monotonic() + (self.failover_timeout_s if avoid else 0.0)
        while True:
            try:
                booked = self.routes.book(
                    input_tokens, output_tokens, self.client_site, wait_s=self.wait_s
                )
            except CoordinatorError as error:
                if error.status_code != 503 or time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, error.retry_after_s or 0.5))
                continue
            peers = [hop_peer_id(hop) for hop in booked.route.hops]
            if None in peers:
                self.routes.release(booked)
                raise ChainUnavailable(
                    "the route's hops carry no PETALS peer id (agents without --petals-model?)"
                )
            if not avoid.intersection(p for p in peers if p):
                return booked
            self.routes.release(booked)
            if time.monotonic() >= deadline:
                raise ChainUnavailable(f"every chain still uses failed servers {sorted(avoid)}")
            time.sleep(0.25)

    @contextmanager
    def session(
        self, input_tokens: int, output_tokens: int, avoid: set[str] | None = None
    ) -> Iterator[Session]:
        """Book a session, make PETALS use exactly its chain, release it on exit."""
        from hivemind import PeerID

        began = time.monotonic()
        booked = self._book(input_tokens, output_tokens, avoid or set())
        self.last_booking_ms = (time.monotonic() - began) * 1000.0
        try:
            chain = []
            for hop in booked.route.hops:
                peer = hop_peer_id(hop)
                assert peer is not None  # checked by _book
                chain.append((PeerID.from_base58(peer), hop.start, hop.end))
            self.manager.chain = chain
            self.manager.failed.clear()
            yield booked
        finally:
            self.manager.chain = None
            try:
                self.routes.release(booked)
            except Exception as error:  # the session expires by itself
                log.warning("could not release session %s: %s", booked.id, error)

    # --- generation -----------------------------------------------------------------------

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Greedy generation of up to ``max_new_tokens`` after ``input_ids`` (one row):
        returns prompt + generated ids, as ``model.generate`` does. ``on_token(id)`` is
        called with every new token as it arrives."""
        import torch

        if input_ids.shape[0] != 1:
            raise ValueError("input_ids: one sequence at a time (batch size 1)")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be at least 1")
        kwargs.setdefault("do_sample", False)
        self.report = GenerationReport()
        produced: list[int] = []
        avoid: set[str] = set()
        failed_at: float | None = None
        while True:
            ids = torch.cat([input_ids, torch.tensor([produced], dtype=input_ids.dtype)], dim=1)
            remaining = max_new_tokens - len(produced)
            recorder = _Recorder(self._first_token_hook(failed_at), on_token)
            with self.session(ids.shape[1], remaining, avoid) as booked:
                attempt = Attempt(
                    booked.id,
                    [
                        (h.server_id, hop_peer_id(h) or "", h.start, h.end)
                        for h in booked.route.hops
                    ],
                )
                self.report.attempts.append(attempt)
                try:
                    with self.model.inference_session(max_length=ids.shape[1] + remaining) as s:
                        self.model.generate(
                            ids, max_new_tokens=remaining, session=s, streamer=recorder, **kwargs
                        )
                    failed: set[str] = set()
                except Exception:
                    failed = set(self.manager.failed)
                    if not failed or len(self.report.attempts) > self.max_failovers:
                        raise
                finally:
                    produced += recorder.tokens
                    attempt.tokens = len(recorder.tokens)
            if not failed:
                break
            # the broken sessions' finalizers here, not on hivemind's event-loop thread
            # (where closing a session through that same loop deadlocks it)
            gc.collect()
            attempt.failed_peers = sorted(failed)
            avoid |= failed
            failed_at = time.monotonic()
            log.warning(
                "server(s) %s failed after %d tokens; re-booking and re-prefilling",
                ", ".join(sorted(failed)),
                len(produced),
            )
            if len(produced) >= max_new_tokens:
                break
        return torch.cat([input_ids, torch.tensor([produced], dtype=input_ids.dtype)], dim=1)

    def _first_token_hook(self, failed_at: float | None) -> Callable[[], None] | None:
        if failed_at is None:
            return None

        def hook() -> None:
            self.report.failover_s.append(time.monotonic() - failed_at)

        return hook


class _Recorder:
    """A ``transformers`` streamer that keeps the generated token ids (the first ``put`` is
    the prompt), so the tokens made before a failure are not lost."""

    def __init__(
        self,
        on_first: Callable[[], None] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> None:
        self.tokens: list[int] = []
        self._prompt_seen = False
        self._on_first = on_first
        self._on_token = on_token

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if not self.tokens and self._on_first is not None:
            self._on_first()
        for token in value.reshape(-1).tolist():
            self.tokens.append(int(token))
            if self._on_token is not None:
                self._on_token(int(token))

    def end(self) -> None:
        pass
