"""``ServerAgent``: a GPU server's side of the coordinator protocol.

It registers (join token), heartbeats at the lease's pace with its state, loaded span, fresh
speed and RTT measurements, follows the span the coordinator assigns (a callback, and an
optional ``SpanHost`` such as ``ProcessSupervisor`` running PETALS), survives coordinator
restarts and network blips (jittered exponential backoff, Retry-After, re-registration when
the registration was lost) and leaves gracefully (DELETE) on ``stop()`` or SIGTERM.

``tick()`` and ``probe()`` are single steps with no sleeping, so tests drive the agent
deterministically; ``run()`` / ``start()`` loop them on threads.

State changes (registered, assigned, loaded, unassigned, lease lost, left) are logged one line
each at ``NOTICE`` (between INFO and WARNING): ``bprr-agent`` shows them without ``-v``, and
the details stay at INFO.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, Protocol

import httpx

from bprr_client.http import (
    DEFAULT_TIMEOUT,
    BearerAuth,
    CoordinatorError,
    CoordinatorUnreachable,
    RetryPolicy,
    error_detail,
    raise_for_status,
    request,
    retry_after,
)
from bprr_client.models import (
    Heartbeat,
    HeartbeatReply,
    Registration,
    Server,
    ServerInfo,
    ServerState,
    Span,
    Speed,
)
from bprr_client.petals import HostFailed
from bprr_client.probes import Ewma, Prober, TcpProber

log = logging.getLogger("bprr_client.agent")
# One line per state change: above INFO's details, below WARNING's troubles.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
SpanCallback = Callable[[Span | None, Span | None], None]
# (PETALS peer id, multiaddrs) of the served process, None until it is known
Identity = Callable[[], tuple[str, list[str]] | None]


class SpanHost(Protocol):
    """What serves the blocks: told the span to load, asked what is loaded."""

    def apply(self, span: Span | None) -> None: ...

    def loaded_span(self) -> Span | None: ...

    def poll(self) -> None: ...

    def close(self) -> None: ...


class NoHost:
    """A ``SpanHost`` for an agent that serves nothing: it never loads a span, so the agent
    never reports one and is never routed through (``bprr-agent run`` without a host)."""

    def apply(self, span: Span | None) -> None:
        return None

    def loaded_span(self) -> Span | None:
        return None

    def poll(self) -> None:
        return None

    def close(self) -> None:
        return None


def span_text(span: Span | None) -> str:
    """``start:end`` (as PETALS' --block_indices), or ``none``."""
    return "none" if span is None else f"{span.start}:{span.end}"


class AgentError(Exception):
    """A condition retrying cannot fix: a wrong join token, invalid registration data, or
    another process now registered under this server's id (403/409). ``status_code``: the
    coordinator's refusal, None when the host failed."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _Transient(Exception):
    def __init__(self, message: str, hint_s: float | None = None) -> None:
        super().__init__(message)
        self.hint_s = hint_s


class _Waiting(_Transient):
    """Not ready to register yet (the PETALS server is starting)."""


class _Lost(Exception):
    """The coordinator no longer knows this registration (404, 401): register again."""


def default_epoch() -> int:
    """Boot epochs grow across restarts of a server: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class ServerAgent:
    """One server's agent. ``server`` describes it; ``server.id`` may be None (the
    coordinator then names it, and the agent keeps that id when it re-registers).

    ``site_targets`` maps client-site (or site) names to an address to probe; with
    ``probe_peers`` the other live servers (GET /v1/servers) are probed too. RTTs are
    EWMA-smoothed (``rtt_alpha``) and sent with the next heartbeat; ``speed`` and
    ``free_cache_slots`` are polled for fresh measurements. ``on_span_change(old, new)`` is
    called when the assignment changes; the new span counts as loaded when it returns (or,
    with a ``host``, when ``host.loaded_span()`` says so). ``identity`` gives the PETALS
    peer id and multiaddrs sent with the registration; the agent waits for it before it
    registers. A host whose ``poll()`` raises ``HostFailed`` stops the agent (AgentError).
    ``draining``: report ``draining`` from the first heartbeat (sent right after the
    registration), for an agent that will never load a span.
    """

    def __init__(
        self,
        coordinator_url: str,
        server: ServerInfo,
        *,
        join_token: str | None = None,
        host: SpanHost | None = None,
        on_span_change: SpanCallback | None = None,
        prober: Prober | None = None,
        site_targets: Mapping[str, str] | None = None,
        probe_peers: bool = True,
        probe_interval_s: float = 30.0,
        rtt_alpha: float = 0.3,
        speed: Callable[[], Speed | None] | None = None,
        free_cache_slots: Callable[[], int | None] | None = None,
        identity: Identity | None = None,
        backoff: RetryPolicy | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        epoch_source: Callable[[], int] = default_epoch,
        rng: random.Random | None = None,
        draining: bool = False,
    ) -> None:
        if probe_interval_s <= 0:
            raise ValueError("probe_interval_s: must be positive")
        self.server = server
        self._join_auth = BearerAuth(join_token) if join_token else None
        self._server_auth = BearerAuth("")
        self._host = host
        self._on_span_change = on_span_change
        self._prober: Prober = prober or TcpProber()
        self._site_targets = dict(site_targets or {})
        self._probe_peers = probe_peers
        self.probe_interval_s = probe_interval_s
        self._ewma = Ewma(rtt_alpha)
        self._speed = speed
        self._free_cache_slots = free_cache_slots
        self._identity = identity
        self._send_identity = True  # off after a coordinator refused the fields
        self.backoff = backoff or RetryPolicy(initial_s=0.5, max_s=15.0)
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(
            base_url=coordinator_url, timeout=timeout, transport=transport
        )
        self._epoch_source = epoch_source
        self._rng = rng or random.Random()

        self.server_id: str | None = server.id
        self.registration: Registration | None = None
        self.boot_epoch = -1
        self.registrations = 0
        self.last_reply: HeartbeatReply | None = None
        self.assigned_span: Span | None = None
        self.error: AgentError | None = None
        self.failures = 0
        self._applied: Span | None = None
        self._reported_loaded: Span | None = None
        self._hide_loaded = False
        self._draining = draining
        self._drain_said = False
        self._interval = 5.0
        self._lock = threading.Lock()
        self._pending_rtts: dict[str, float] = {}
        self._pending_speed: Speed | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._left = False

    # --- state ----------------------------------------------------------------------------

    @property
    def loaded_span(self) -> Span | None:
        if self._host is not None:
            return self._host.loaded_span()
        return self._applied

    @property
    def state(self) -> ServerState:
        if self._draining:
            return "draining"
        loaded = None if self._hide_loaded else self.loaded_span
        return "online" if loaded is not None and loaded == self.assigned_span else "joining"

    @property
    def rtts(self) -> dict[str, float]:
        """The smoothed RTTs (ms) measured so far."""
        with self._lock:
            return dict(self._ewma.values)

    def drain(self) -> None:
        """Report ``draining`` from now on: the coordinator re-plans without this server."""
        self._draining = True
        if self.registration is not None:
            self._say_draining()

    def _say_draining(self) -> None:
        """Once, when the coordinator is told (said after "registered", not before)."""
        if self._draining and not self._drain_said:
            self._drain_said = True
            log.log(NOTICE, "draining: the coordinator re-plans without this server")

    # --- protocol steps ----------------------------------------------------------------------

    def register(self) -> Registration:
        """POST /v1/servers with a boot epoch larger than any this agent used before, and
        the PETALS identity when there is one. A re-registration (lost lease) authenticates
        with this server's own token, falling back to the join token."""
        identity = None if self._identity is None else self._identity()
        if self._identity is not None and identity is None:
            raise _Waiting("waiting for the PETALS server to start", hint_s=0.5)
        self.boot_epoch = max(self.boot_epoch + 1, self._epoch_source())
        body = self.server.to_json(exclude_none=True)
        if self.server_id is not None:
            body["id"] = self.server_id
        body["boot_epoch"] = self.boot_epoch
        if identity is not None and self._send_identity:
            body["peer_id"], body["multiaddrs"] = identity
        if self._draining:  # never placed, not even before the first heartbeat
            body["state"] = "draining"
        kwargs: dict[str, Any] = {"json": body}
        if self._server_auth.token:
            kwargs["auth"] = BearerAuth(self._server_auth.token)
        elif self._join_auth is not None:
            kwargs["auth"] = self._join_auth
        response = self._call("POST", "/v1/servers", **kwargs)
        if response.status_code in (401, 403) and self._server_auth.token:
            self._server_auth.token = ""  # the old token is no good: use the join token
            return self.register()
        if response.status_code == 422 and "peer_id" in body and _unknown_identity(response):
            log.warning("the coordinator does not take PETALS peer ids; registering without")
            self._send_identity = False
            return self.register()
        if response.status_code != 201:
            detail, status = error_detail(response), response.status_code
            if status == 401 or ("token" in detail and "join" in detail):
                raise AgentError(f"registration refused (join token?): {detail}", status)
            raise AgentError(f"registration refused ({status}): {detail}", status)
        registration = Registration.parse(response.json())
        self.registration = registration
        self.server_id = registration.id
        self._server_auth.token = registration.token
        self._reported_loaded = None
        self.registrations += 1
        self._set_interval(registration.heartbeat_interval_s, registration.lease_ttl_s)
        again = "re-registered" if self.registrations > 1 else "registered"
        log.log(NOTICE, "%s as %s (boot epoch %d)", again, registration.id, self.boot_epoch)
        self._say_draining()
        return registration

    def heartbeat(self) -> HeartbeatReply:
        """One heartbeat with the current state, loaded span and pending measurements."""
        if self.registration is None or self.server_id is None:
            raise _Lost("not registered")
        with self._lock:
            rtts = dict(self._pending_rtts)
            speed = self._pending_speed
        loaded = None if self._hide_loaded else self.loaded_span
        body = Heartbeat(
            boot_epoch=self.boot_epoch,
            state=self.state,
            loaded_span=loaded,
            free_cache_slots=None if self._free_cache_slots is None else self._free_cache_slots(),
            decode_ms_per_block=None if speed is None else speed.decode_ms_per_block,
            prefill_ms_per_block=None if speed is None else speed.prefill_ms_per_block,
            rtts=rtts,
        )
        payload = body.to_json(exclude_none=True)
        if not rtts:
            del payload["rtts"]
        response = self._call(
            "POST",
            f"/v1/servers/{self.server_id}/heartbeat",
            json=payload,
            auth=self._server_auth,
        )
        status = response.status_code
        if status in (401, 404):
            raise _Lost(f"{status}: {error_detail(response)}")
        if status in (403, 409):
            raise AgentError(
                f"heartbeat refused ({status}): {error_detail(response)}; "
                "another process registered as this server",
                status,
            )
        if status == 422:
            self._rejected_heartbeat(error_detail(response), rtts)
            raise _Transient(f"422: {error_detail(response)}", hint_s=0.0)
        if status != 200:
            raise AgentError(f"heartbeat refused ({status}): {error_detail(response)}", status)
        reply = HeartbeatReply.parse(response.json())
        with self._lock:  # sent: forget what was reported (unless re-measured meanwhile)
            for key, value in rtts.items():
                if self._pending_rtts.get(key) == value:
                    del self._pending_rtts[key]
            if self._pending_speed is speed:
                self._pending_speed = None
        if loaded != self._reported_loaded:
            if loaded is not None:
                log.log(NOTICE, "loaded %s (%s)", span_text(loaded), self.state)
            elif self._reported_loaded is not None:
                log.log(NOTICE, "unloaded %s", span_text(self._reported_loaded))
        self._reported_loaded = loaded
        self.last_reply = reply
        self._set_interval(reply.heartbeat_interval_s, reply.lease_expires_in_s)
        return reply

    def _rejected_heartbeat(self, detail: str, rtts: Mapping[str, float]) -> None:
        unknown = [t for t in rtts if f"rtts.{t}:" in detail or detail.endswith(f"rtts.{t}")]
        if unknown:  # a peer left since it was probed: drop it and send the rest
            with self._lock:
                for target in unknown:
                    self._pending_rtts.pop(target, None)
                    self._ewma.forget(target)
            log.info("coordinator does not know %s; RTTs dropped", ", ".join(unknown))
            return
        if "loaded_span" in detail and not self._hide_loaded:
            # The model changed under the loaded span: report nothing loaded until the
            # assignment changes and the new span is loaded.
            self._hide_loaded = True
            return
        raise AgentError(f"heartbeat rejected (422): {detail}", 422)

    def tick(self) -> float:
        """One step: keep the host's process alive, (re-)register if needed, heartbeat,
        follow the assignment. Returns the seconds to wait before the next step. Raises
        AgentError for conditions retrying cannot fix."""
        if self._host is not None:
            try:
                self._host.poll()
            except HostFailed as error:
                raise AgentError(str(error)) from None
            except Exception:
                log.exception("the span host failed to poll")
        try:
            if self.registration is None:
                self.register()
            reply = self.heartbeat()
        except _Lost as lost:
            log.warning("lease lost (%s); registering again", lost)
            self.registration = None
            self.failures += 1
            return 0.0 if self.failures == 1 else self.backoff.backoff(self.failures - 1, self._rng)
        except _Waiting as error:
            log.debug("%s", error)
            return error.hint_s or 0.5
        except _Transient as error:
            self.failures += 1
            log.warning("coordinator unavailable: %s", error)
            if error.hint_s is not None:
                return min(error.hint_s, self.backoff.max_retry_after_s)
            return self.backoff.backoff(self.failures - 1, self._rng)
        self.failures = 0
        if reply.assigned_span != self.assigned_span:
            if reply.assigned_span is None:
                log.log(NOTICE, "unassigned (was %s)", span_text(self.assigned_span))
            else:
                log.log(NOTICE, "assigned span %s", span_text(reply.assigned_span))
            self.assigned_span = reply.assigned_span
        self._follow()
        if (None if self._hide_loaded else self.loaded_span) != self._reported_loaded:
            return 0.0  # tell the coordinator about the newly loaded span right away
        return self._interval

    def _follow(self) -> None:
        target = self.assigned_span
        if target == self._applied:
            return
        try:
            if self._on_span_change is not None:
                self._on_span_change(self._applied, target)
            if self._host is not None:
                self._host.apply(target)
        except Exception:
            log.exception("loading span %s failed; will retry", target)
            return
        self._applied = target
        self._hide_loaded = False

    def probe(self) -> dict[str, float]:
        """One measurement round: RTTs to the site targets and (optionally) to the live peers,
        smoothed, plus a speed measurement; all sent with the next heartbeat. Returns the
        smoothed RTTs of this round."""
        targets = dict(self._site_targets)
        if self._probe_peers and self.registration is not None:
            try:
                for peer in self.peers():
                    if peer.id != self.server_id and peer.lease == "live":
                        targets[peer.id] = peer.address
            except (CoordinatorError, CoordinatorUnreachable) as error:
                log.warning("could not list peers: %s", error)
        keys = list(targets)
        if len(keys) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
                samples = list(pool.map(self._prober, [targets[k] for k in keys]))
        else:
            samples = [self._prober(targets[k]) for k in keys]
        speed = self._speed() if self._speed is not None else None
        measured: dict[str, float] = {}
        with self._lock:
            for gone in set(self._ewma.values) - set(keys):
                self._ewma.forget(gone)
                self._pending_rtts.pop(gone, None)
            for key, sample in zip(keys, samples, strict=True):
                if sample is not None:
                    measured[key] = self._ewma.update(key, sample)
            self._pending_rtts.update(measured)
            if speed is not None:
                self._pending_speed = speed
        return measured

    def peers(self) -> list[Server]:
        response = self._call("GET", "/v1/servers", idempotent=True)
        raise_for_status(response)
        return [Server.parse(item) for item in response.json()]

    def leave(self) -> bool:
        """DELETE /v1/servers/{id}; True when the coordinator removed it (or it was gone)."""
        if self.registration is None or self.server_id is None or self._left:
            return False
        try:
            response = request(
                self._http,
                "DELETE",
                f"/v1/servers/{self.server_id}",
                policy=RetryPolicy(attempts=3, initial_s=0.2, max_s=1.0, max_retry_after_s=2.0),
                idempotent=True,
                rng=self._rng,
                auth=self._server_auth,
            )
        except CoordinatorUnreachable as error:
            log.warning("could not leave (the lease will expire): %s", error)
            return False
        if response.status_code not in (204, 404):
            log.warning("leave refused: %s", error_detail(response))
            return False
        self._left = True
        self.registration = None
        log.log(NOTICE, "left the swarm as %s", self.server_id)
        return True

    # --- loops ----------------------------------------------------------------------------

    def run(self) -> None:
        """Heartbeat until ``request_stop()`` (or a fatal error), probing on a second thread;
        then leave and stop the host. A fatal error is kept in ``self.error``."""
        prober = threading.Thread(target=self._probe_loop, name="bprr-probe", daemon=True)
        prober.start()
        try:
            while not self._stop.is_set():
                try:
                    delay = self.tick()
                except AgentError as error:
                    self.error = error
                    log.error("agent stopped: %s", error)
                    break
                self._stop.wait(delay)
        finally:
            self._stop.set()
            prober.join(timeout=5)
            self._shutdown()

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe()
            except Exception:
                log.exception("probe round failed")
            self._stop.wait(self.probe_interval_s)

    def start(self) -> None:
        """Run the agent on a background thread."""
        if self._thread is not None:
            raise RuntimeError("the agent is already started")
        self._thread = threading.Thread(target=self.run, name="bprr-agent", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop heartbeating, leave the swarm (DELETE) and stop the host's process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.error is None:
            self.leave()
        if self._host is not None:
            self._host.close()
        if self._owns_client:
            self._http.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent gracefully (call from the main thread)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: leaving", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # --- plumbing -------------------------------------------------------------------------

    def _call(
        self, method: str, url: str, *, idempotent: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One request; transport errors and 5xx/429 become _Transient (the loop backs off)."""
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as error:
            if idempotent:
                raise CoordinatorUnreachable(f"{type(error).__name__}: {error}") from error
            raise _Transient(f"{type(error).__name__}: {error}") from error
        if response.status_code >= 500 or response.status_code == 429:
            hint = retry_after(response, time.time)
            if idempotent:
                raise CoordinatorError(response.status_code, error_detail(response), hint)
            raise _Transient(f"{response.status_code}: {error_detail(response)}", hint)
        return response

    def _set_interval(self, interval_s: float, lease_s: float) -> None:
        base = min(interval_s, lease_s / 3) if lease_s > 0 else interval_s
        self._interval = max(0.05, base * (1.0 - 0.1 * self._rng.random()))


def _unknown_identity(response: httpx.Response) -> bool:
    """A 422 that names the PETALS fields: a coordinator from before they existed."""
    detail = error_detail(response)
    return "peer_id" in detail or "multiaddrs" in detail
