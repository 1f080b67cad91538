"""Servers and their leases: registration, heartbeats, leaving, and RTT measurements.

Transaction boundaries:
- ``register``: one write transaction (site, server row, its dropped reservations, the
  re-plan request); a concurrent registration of the same id is a 409.
- ``heartbeat``: a quiet heartbeat (only the lease changes, and the route view vouches for the
  token, epoch, state and span) touches no database: its renewal is queued in the core's
  write-behind buffer and written, with every other pending one, by the next transaction of
  this process or the flusher within LEASE_FLUSH_S. Any other heartbeat is one write
  transaction (server row, RTTs, the re-plan request when it starts draining).
- ``leave``: one write transaction (the row, its reservations, the re-plan request).
- ``put_rtts``: one write transaction for the whole batch (all or nothing).
- ``list``/``get``/``check_measurer``/``check_own_token``: one read transaction each;
  ``check_registrant`` one unless the token is the join token.
Writes that change what routes depend on ``invalidate()`` the route view after the commit.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.allocation.instance import Span
from app.logging import get_logger
from app.service import auth
from app.service.audit import audit
from app.service.core import Core
from app.service.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from app.service.routeview import RouteView, cache_slots, model_cache_gb, multiaddrs_of
from app.service.schemas import (
    Heartbeat,
    HeartbeatOut,
    PrefillSpeed,
    RegistrationOut,
    RttEntry,
    ServerOut,
    ServerRegistration,
    SpanModel,
)
from app.service.state import placement_spans
from app.store import repositories as repo
from app.store.models import ModelRow, ServerRow

log = get_logger("bprr.coordinator")
# Boot epochs may run this far ahead of the coordinator's clock in milliseconds (agents use
# milliseconds since the Unix epoch; small counters are always below the bound).
EPOCH_AHEAD_MS = 3_600_000


def slots_for(model: ModelRow | None, server: ServerRow) -> int:
    """Cache slots of a server for its loaded span (0 when nothing is loaded)."""
    if model is None or server.loaded_start is None or server.loaded_end is None:
        return 0
    blocks = server.loaded_end - server.loaded_start
    return cache_slots(server.memory_gb, model.block_memory_gb, model_cache_gb(model), blocks)


class ServerService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.settings = core.settings

    # --- registration -----------------------------------------------------------------------

    def register(self, body: ServerRegistration, token: str | None) -> RegistrationOut:
        """Register a server, or re-register an id that exists.

        Who may: a new id with the join token (any caller in dev mode); an id whose lease is
        live only with that server's own token (a takeover otherwise: 403); an id whose lease
        expired with its own token or the join token. Boot epochs are bounded (at most
        EPOCH_AHEAD_MS past the coordinator's clock in milliseconds) and, with the join token,
        must grow; the server's own token re-registers with any bounded epoch, so nobody can
        lock the owner out with a huge epoch.
        """
        server_id = body.id or f"srv-{uuid.uuid4().hex[:12]}"
        now = self.core.clock()
        limit = max(0, int(now * 1000)) + EPOCH_AHEAD_MS
        if body.boot_epoch > limit:
            raise Invalid(
                f"boot_epoch: {body.boot_epoch} is more than one hour ahead of the coordinator's "
                f"clock ({limit - EPOCH_AHEAD_MS} ms since the Unix epoch)"
            )
        new_token = secrets.token_urlsafe(32)
        ttl = self.settings.lease_ttl_s
        takeover = False
        try:
            with self.core.tx() as db:
                servers = repo.Servers(db)
                row = servers.get(server_id)
                if row is None:
                    auth.check_join(self.settings, token)
                else:
                    takeover = not self._may_reregister(row, token, body.boot_epoch, now)
                repo.Sites(db).ensure(body.site)
                if row is not None:
                    # The reservations first, then the row (a release's order), and the count
                    # lowered by what was dropped rather than set to 0: a booking committed in
                    # between keeps its reservation counted.
                    dropped = repo.Reservations(db).drop_for_server(server_id)
                    _apply_registration(row, body, auth.hash_token(new_token), now, ttl)
                    servers.unreserve(server_id, dropped)
                else:
                    row = ServerRow(id=server_id, registered_at=now, reserved_slots=0)
                    servers.add(row)
                    _apply_registration(row, body, auth.hash_token(new_token), now, ttl)
                repo.PlannerState(db).request(f"server {server_id} joined", now)
        except IntegrityError:
            raise Conflict(f"id: server {server_id!r} registered concurrently; retry") from None
        self.core.lease_written(server_id, now + ttl)
        self.core.invalidate()
        log.info("server registered", server=server_id, site=body.site)
        audit(
            "server_registered",
            server=server_id,
            site=body.site,
            boot_epoch=body.boot_epoch,
            replaced_expired=takeover,
        )
        return RegistrationOut(
            id=server_id,
            token=new_token,
            lease_ttl_s=self.settings.lease_ttl_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )

    def _may_reregister(self, row: ServerRow, token: str | None, epoch: int, now: float) -> bool:
        """True when the caller is the server itself (its own token); False when it may take
        over an expired id (the join token, a larger epoch); raises otherwise."""
        if token is not None and hmac.compare_digest(auth.hash_token(token), row.token_hash):
            return True
        if row.lease_expires_at > now:
            audit("takeover_refused", server=row.id, reason="live lease")
            if token is None:
                raise Unauthorized(
                    f"missing bearer token: server {row.id!r} holds a live lease and only its "
                    "own token may re-register it"
                )
            raise Forbidden(
                f"id: server {row.id!r} holds a live lease; only its own token may re-register it"
            )
        auth.check_join(self.settings, token)
        if epoch <= row.boot_epoch:
            audit("takeover_refused", server=row.id, reason="boot epoch not newer")
            raise Conflict(
                f"boot_epoch: server {row.id!r} was registered with boot epoch "
                f"{row.boot_epoch}; re-register with a larger one (or with its own token)"
            )
        return False

    def check_registrant(self, token: str | None) -> None:
        """Registration's token, checked before the body (which names the id) is read: none
        only when registration is open (dev mode without a join token: 401 otherwise); a
        token must be the join token or a registered server's own (one read; 403 otherwise).
        ``register`` then decides what that token may do with the body's id."""
        expected = self.settings.join_token
        open_registration = self.settings.dev_mode and expected is None
        if token is None:
            if open_registration:
                return
            raise Unauthorized(
                "missing bearer token (the join token, or the server's own token to re-register it)"
            )
        if open_registration or (expected is not None and auth.same_secret(token, expected)):
            return
        with self.core.read_tx() as db:
            owner = repo.Servers(db).id_with_token_hash(auth.hash_token(token))
        if owner is not None:
            return
        if expected is None:
            raise Forbidden(
                "registration is closed: set BPRR_JOIN_TOKEN on the coordinator (or "
                "BPRR_DEV_MODE=true for an open development swarm); the bearer token is not "
                "a registered server's token"
            )
        raise Forbidden("the bearer token is neither the join token nor a server's own token")

    # --- heartbeats -------------------------------------------------------------------------

    def heartbeat(self, server_id: str, token: str | None, body: Heartbeat) -> HeartbeatOut:
        quick = self.quiet_heartbeat(server_id, token, body)
        if quick is not None:
            return quick
        now = self.core.clock()
        view = self.core.view()
        _check_loaded_span(view, body)
        with self.core.tx() as db:
            changed = self._heartbeat_update(db, server_id, token, body, view.model, now)
        self.core.lease_written(server_id, now + self.settings.lease_ttl_s)
        if changed:
            self.core.invalidate()
        else:
            # Fresh RTT or speed samples reach routes with the periodic refresh (at most
            # view_refresh_s later): rebuilding the view on every such heartbeat would cost a
            # full swarm read per heartbeat (~20 ms at 200 servers).
            with self.core.view_lock:
                view.renew(server_id, now + self.settings.lease_ttl_s)
        return self._heartbeat_out(view, server_id, self.settings.lease_ttl_s)

    def vouches_for(self, server_id: str, token: str) -> bool:
        """Whether the route view (no database) knows ``token`` as the server's own; False
        also when the view is not built or is older than a re-registration."""
        view = self.core.current_view()
        key = None if view is None else view.heartbeat_keys.get(server_id)
        return key is not None and hmac.compare_digest(key[0], auth.hash_token(token))

    def check_own_token(self, server_id: str, token: str) -> None:
        """The server's own token, from its row (one read): 404 for an unknown id, 403 for
        another token. A heartbeat's check before its body when the view cannot vouch."""
        with self.core.read_tx() as db:
            row = repo.Servers(db).get(server_id)
            if row is None:
                raise NotFound(f"server {server_id!r} is not registered")
            auth.check_server_token(row, token)

    def quiet_heartbeat(
        self, server_id: str, token: str | None, body: Heartbeat
    ) -> HeartbeatOut | None:
        """The fast path, without any database access: a heartbeat that changes nothing but
        the lease (and the free-slot report), when the route view vouches for its token,
        epoch, state and loaded span. None: take the full path (``heartbeat``).

        The renewal is written behind, with every other pending one, in one guarded
        executemany (group commit): by this process's next transaction or the flusher,
        within LEASE_FLUSH_S. A row changed meanwhile matches nothing and keeps its lease;
        the next heartbeat then takes the full path, as the refreshed view disagrees.
        """
        if token is None or body.rtts or body.decode_ms_per_block is not None:
            return None
        if body.prefill_ms_per_block is not None:
            return None
        view = self.core.current_view()
        if view is None:
            return None
        _check_loaded_span(view, body)
        span = body.loaded_span
        loaded = (None, None) if span is None else (span.start, span.end)
        token_hash = auth.hash_token(token)
        if view.heartbeat_keys.get(server_id) != (token_hash, body.boot_epoch, body.state, *loaded):
            return None
        durable = self.core.durable_lease(server_id)
        now = self.core.clock()
        if durable is None or durable <= now or self.core.flush_failing:
            return None  # write this one now (and learn whether the database takes writes)
        expires_at = now + self.settings.lease_ttl_s
        self.core.queue_renewal(
            repo.LeaseRenewal(
                server_id,
                token_hash,
                body.boot_epoch,
                body.state,
                loaded,
                body.free_cache_slots,
                now,
                expires_at,
            )
        )
        with self.core.view_lock:
            view.renew(server_id, expires_at)
        # Acknowledged before its renewal is durable (written behind within LEASE_FLUSH_S):
        # the reply promises only the lease already committed.
        return self._heartbeat_out(view, server_id, max(0.0, durable - now))

    def _heartbeat_out(self, view: RouteView, server_id: str, lease_s: float) -> HeartbeatOut:
        assigned = view.spans.get(server_id)
        return HeartbeatOut(
            server_id=server_id,
            generation=view.generation,
            assigned_span=None
            if assigned is None
            else SpanModel(start=assigned.start, end=assigned.end),
            lease_expires_in_s=lease_s,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
        )

    def _heartbeat_update(
        self,
        db: Session,
        server_id: str,
        token: str | None,
        body: Heartbeat,
        model: ModelRow | None,
        now: float,
    ) -> bool:
        """The full heartbeat (checks, state, speeds, RTTs); True when what routes depend
        on (state, loaded span, boot epoch) changed."""
        alpha = self.settings.rtt_ewma_alpha
        row = repo.Servers(db).get(server_id)
        if row is None:
            raise NotFound(f"server {server_id!r} is not registered")
        auth.check_server_token(row, token)
        if body.boot_epoch < row.boot_epoch:
            raise Conflict(
                f"boot_epoch: {body.boot_epoch} is older than the server's current boot "
                f"epoch {row.boot_epoch}; this heartbeat comes from a previous run"
            )
        if body.rtts:
            known = known_endpoints(db)
            for target in body.rtts:
                if target not in known:
                    raise Invalid(f"rtts.{target}: unknown server, site or client id")
        new_start = None if body.loaded_span is None else body.loaded_span.start
        new_end = None if body.loaded_span is None else body.loaded_span.end
        changed = (
            row.state != body.state
            or row.loaded_start != new_start
            or row.loaded_end != new_end
            or row.boot_epoch != body.boot_epoch
        )
        draining = row.state != body.state and body.state == "draining"
        row.boot_epoch = body.boot_epoch
        row.state = body.state
        row.loaded_start, row.loaded_end = new_start, new_end
        row.free_cache_slots = body.free_cache_slots
        row.cache_slots = slots_for(model, row)
        if body.decode_ms_per_block is not None:
            row.decode_ms_per_block = _ewma(
                row.decode_ms_per_block, body.decode_ms_per_block, alpha
            )
        if body.prefill_ms_per_block is not None:
            row.prefill_fixed_ms = _ewma(
                row.prefill_fixed_ms, body.prefill_ms_per_block.fixed, alpha
            )
            row.prefill_per_token_ms = _ewma(
                row.prefill_per_token_ms, body.prefill_ms_per_block.per_token, alpha
            )
        row.lease_expires_at = now + self.settings.lease_ttl_s
        row.last_heartbeat_at = now
        if draining:  # after the row's changes: the server row is locked first, as in `leave`
            repo.PlannerState(db).request(f"server {server_id} is draining", now)
        rtts = repo.Rtts(db)
        for target, value in body.rtts.items():
            rtts.smooth(server_id, target, value, alpha, now)
        return changed

    # --- leaving, reading -------------------------------------------------------------------

    def leave(self, server_id: str, token: str | None) -> None:
        now = self.core.clock()
        with self.core.tx() as db:
            servers = repo.Servers(db)
            row = servers.get(server_id)
            if row is None:
                raise NotFound(f"server {server_id!r} is not registered")
            by_admin = auth.is_admin(self.settings, token)
            if not by_admin:
                auth.check_server_token(row, token)
            servers.remove(row)
            repo.PlannerState(db).request(f"server {server_id} left", now)
        self.core.invalidate()
        log.info("server left", server=server_id)
        audit("server_left", server=server_id, by="admin" if by_admin else "itself")

    def list_all(self) -> list[ServerOut]:
        now = self.core.clock()
        with self.core.read_tx() as db:
            rows = repo.Servers(db).all()
            spans = placement_spans(repo.Placements(db).current())
        return [_server_out(r, spans.get(r.id), now) for r in rows]

    def get(self, server_id: str) -> ServerOut:
        now = self.core.clock()
        with self.core.read_tx() as db:
            row = repo.Servers(db).get(server_id)
            if row is None:
                raise NotFound(f"server {server_id!r} is not registered")
            spans = placement_spans(repo.Placements(db).current())
        return _server_out(row, spans.get(server_id), now)

    # --- measurements -----------------------------------------------------------------------

    def check_measurer(self, token: str | None) -> str | None:
        """Measurements come from the operator (admin token: returns None) or from a
        registered server (its token: returns its id; it may write only its own RTTs)."""
        if auth.is_admin(self.settings, token):
            return None
        if token is None:
            raise Unauthorized("missing bearer token (admin or a server's token is required)")
        with self.core.read_tx() as db:
            server_id = repo.Servers(db).id_with_token_hash(auth.hash_token(token))
        if server_id is None:
            raise Forbidden("the bearer token is neither the admin token nor a server's token")
        return server_id

    def put_rtts(self, entries: list[RttEntry], writer: str | None = None) -> int:
        """Fold RTT samples in (one transaction, all or nothing). ``writer``: the server whose
        token wrote them (None: the operator); a server writes only pairs that involve it."""
        if writer is not None:
            for i, entry in enumerate(entries):
                if writer not in (entry.a, entry.b):
                    audit("rtt_write_refused", server=writer, a=entry.a, b=entry.b)
                    raise Forbidden(
                        f"entries[{i}]: server {writer!r} may only write RTTs that involve "
                        f"itself, not {entry.a!r}-{entry.b!r}"
                    )
        now = self.core.clock()
        alpha = self.settings.rtt_ewma_alpha
        with self.core.tx() as db:
            known = known_endpoints(db)
            sites = set(repo.Sites(db).names())
            client_sites = {c.id: c.site for c in repo.Clients(db).all()}
            for i, entry in enumerate(entries):
                for end in ("a", "b"):
                    value = getattr(entry, end)
                    if value not in known:
                        raise Invalid(
                            f"entries[{i}].{end}: unknown site, server or client {value!r}"
                        )
            rtts = repo.Rtts(db)
            for entry in entries:
                # A client's RTT is stored for its site: routes are asked per client site.
                a = client_sites.get(entry.a, entry.a) if entry.a not in sites else entry.a
                b = client_sites.get(entry.b, entry.b) if entry.b not in sites else entry.b
                rtts.smooth(a, b, entry.rtt_ms, alpha, now)
        self.core.invalidate()
        audit("rtts_changed", by=writer or "admin", entries=len(entries))
        return len(entries)


def known_endpoints(db: Session) -> set[str]:
    known = set(repo.Sites(db).names())
    known.update(repo.Servers(db).ids())
    known.update(repo.Clients(db).ids())
    return known


def _check_loaded_span(view: RouteView, body: Heartbeat) -> None:
    model, span = view.model, body.loaded_span
    if span is not None and model is not None and span.end > model.num_blocks:
        raise Invalid(f"loaded_span.end: {span.end} is past the model's {model.num_blocks} blocks")


def _ewma(old: float, new: float, alpha: float) -> float:
    return alpha * new + (1 - alpha) * old


def _span(start: int | None, end: int | None) -> SpanModel | None:
    if start is None or end is None:
        return None
    return SpanModel(start=start, end=end)


def _apply_registration(
    row: ServerRow, body: ServerRegistration, token_hash: str, now: float, ttl: float
) -> None:
    row.site = body.site
    row.gpu = body.gpu
    row.memory_gb = body.memory_gb
    row.decode_ms_per_block = body.decode_ms_per_block
    row.prefill_fixed_ms = body.prefill_ms_per_block.fixed
    row.prefill_per_token_ms = body.prefill_ms_per_block.per_token
    row.network_mbps = body.network_mbps
    row.address = body.address
    row.boot_epoch = body.boot_epoch
    row.peer_id = body.peer_id
    row.multiaddrs = json.dumps(body.multiaddrs) if body.multiaddrs else None
    row.token_hash = token_hash
    row.state = body.state
    row.loaded_start = None
    row.loaded_end = None
    row.free_cache_slots = None
    row.cache_slots = 0
    row.lease_expires_at = now + ttl
    row.last_heartbeat_at = None


def _server_out(row: ServerRow, assigned: Span | None, now: float) -> ServerOut:
    return ServerOut(
        id=row.id,
        site=row.site,
        gpu=row.gpu,
        memory_gb=row.memory_gb,
        decode_ms_per_block=row.decode_ms_per_block,
        prefill_ms_per_block=PrefillSpeed(
            fixed=row.prefill_fixed_ms, per_token=row.prefill_per_token_ms
        ),
        network_mbps=row.network_mbps,
        address=row.address,
        boot_epoch=row.boot_epoch,
        state=row.state,
        lease="live" if row.lease_expires_at > now else "expired",
        lease_expires_in_s=max(0.0, row.lease_expires_at - now),
        loaded_span=_span(row.loaded_start, row.loaded_end),
        assigned_span=None
        if assigned is None
        else SpanModel(start=assigned.start, end=assigned.end),
        cache_slots=row.cache_slots,
        reserved_slots=row.reserved_slots,
        free_cache_slots=row.free_cache_slots,
        peer_id=row.peer_id,
        multiaddrs=multiaddrs_of(row),
    )
