"""The coordinator: a thin facade over the domain services, one public method per API call.

The domains and their transaction boundaries (written down in each module):
- app.service.core: the engine, ``tx``/``read_tx``/``booking_tx``, the route view cache, the
  write-behind lease renewals, the clock;
- app.service.servers: registration, heartbeats and leases, leaving, RTTs;
- app.service.sessions: routes, bookings, releases, the sweep of expired sessions;
- app.service.placements: placements, the planner loop and its leader lease;
- app.service.scenario_io: the model and the scenario export/load.
Every method here delegates to exactly one of them (the data access lives in app.store; the
repositories never commit).
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.logging import get_logger
from app.service import auth
from app.service.activity import RouteLog
from app.service.core import Clock, Core, Counters
from app.service.placements import PlacementService
from app.service.routeview import RouteView
from app.service.scenario_io import ScenarioService
from app.service.schemas import (
    Heartbeat,
    HeartbeatOut,
    ModelIn,
    ModelOut,
    PlacementOut,
    PlacementRequest,
    RegistrationOut,
    RouteOut,
    RttEntry,
    ScenarioLoadOut,
    ServerOut,
    ServerRegistration,
    SessionIn,
    SessionOut,
)
from app.service.servers import ServerService
from app.service.sessions import SessionService
from app.settings import Settings
from app.store import repositories as repo

log = get_logger("bprr.coordinator")
hash_token = auth.hash_token


class Coordinator:
    def __init__(
        self,
        settings: Settings,
        clock: Clock = time.time,
        engine: Engine | None = None,
        view_refresh_s: float = 1.0,
    ) -> None:
        self.core = Core(settings, clock, engine, view_refresh_s)
        self.settings = settings
        self.clock = self.core.now  # the database's clock (see Core.now)
        self.engine = self.core.engine
        self.servers = ServerService(self.core)
        self.sessions = SessionService(self.core)
        self.placements = PlacementService(
            self.core, sweep=self.sessions.sweep, workload=self.sessions.profile_workload
        )
        self.scenario = ScenarioService(
            self.core, self.placements, workload=self.sessions.profile_workload
        )
        self._threads: list[threading.Thread] = []

    # --- life cycle --------------------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        from app.store import db as store_db

        store_db.ensure_schema(self.engine, self.settings.auto_migrate)
        self.core.sync_clock()
        with self.core.tx() as db:
            repo.PlannerState(db).ensure(self.clock())
        if self.settings.join_token is None and self.settings.dev_mode:
            log.warning(
                "dev mode: registration is open to anyone; set BPRR_JOIN_TOKEN (and drop "
                "BPRR_DEV_MODE) for a real swarm"
            )
        elif self.settings.join_token is None:
            log.warning("registration is closed: set BPRR_JOIN_TOKEN so that servers can join")
        if background and self.settings.planner_interval_s > 0:
            self._threads.append(threading.Thread(target=self.placements.loop, daemon=True))
        if background:
            self._threads.append(threading.Thread(target=self.core.flush_loop, daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.core.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for last_write in (self.flush_renewals, self.release_leadership):
            try:
                last_write()
            except Exception as error:  # the database is gone: leases expire by themselves
                log.warning("not written at shutdown", step=last_write.__name__, error=str(error))
        self.engine.dispose()

    # --- infrastructure (app.service.core) ------------------------------------------------------

    @property
    def embedded_database(self) -> bool:
        return self.core.embedded_database

    @property
    def counters(self) -> Counters:
        return self.core.counters

    @property
    def activity(self) -> RouteLog:
        return self.core.activity

    @property
    def view_refresh_s(self) -> float:
        return self.core.view_refresh_s

    @property
    def solver_grace_s(self) -> float:
        return self.placements.solver_grace_s

    @solver_grace_s.setter
    def solver_grace_s(self, value: float) -> None:
        self.placements.solver_grace_s = value

    def tx(self) -> AbstractContextManager[Session]:
        return self.core.tx()

    def read_tx(self) -> AbstractContextManager[Session]:
        return self.core.read_tx()

    def flush_renewals(self) -> None:
        self.core.flush_renewals()

    def invalidate(self) -> None:
        self.core.invalidate()

    def view(self) -> RouteView:
        return self.core.view()

    def current_view(self) -> RouteView | None:
        return self.core.current_view()

    def readiness(self) -> tuple[bool, bool, str | None]:
        return self.core.readiness()

    def stats(self) -> dict[str, float]:
        now = self.clock()
        view = self.view()
        return {
            "live_servers": float(view.live_count(now)),
            "coverage": view.coverage(now),
            "generation": float(view.generation),
            "reserved_slots": float(view.reserved.sum()) if view.reserved.size else 0.0,
        }

    # --- authentication ------------------------------------------------------------------------

    def check_admin(self, token: str | None) -> None:
        auth.check_admin(self.settings, token)

    def is_admin(self, token: str | None) -> bool:
        return auth.is_admin(self.settings, token)

    def check_measurer(self, token: str | None) -> str | None:
        return self.servers.check_measurer(token)

    # --- model and scenario (app.service.scenario_io) ------------------------------------------

    def get_model(self) -> ModelOut:
        return self.scenario.get_model()

    def set_model(self, body: ModelIn) -> ModelOut:
        return self.scenario.set_model(body)

    def export_scenario(self, include_expired: bool) -> dict[str, Any]:
        return self.scenario.export(include_expired)

    def load_scenario(self, raw: Any, online: bool, lease_s: float) -> ScenarioLoadOut:
        return self.scenario.load(raw, online, lease_s)

    # --- servers (app.service.servers) -----------------------------------------------------------

    def register_server(self, body: ServerRegistration, join_token: str | None) -> RegistrationOut:
        return self.servers.register(body, join_token)

    def heartbeat(self, server_id: str, token: str | None, body: Heartbeat) -> HeartbeatOut:
        return self.servers.heartbeat(server_id, token, body)

    def quiet_heartbeat(
        self, server_id: str, token: str | None, body: Heartbeat
    ) -> HeartbeatOut | None:
        return self.servers.quiet_heartbeat(server_id, token, body)

    def leave(self, server_id: str, token: str | None) -> None:
        self.servers.leave(server_id, token)

    def list_servers(self) -> list[ServerOut]:
        return self.servers.list_all()

    def get_server(self, server_id: str) -> ServerOut:
        return self.servers.get(server_id)

    def put_rtts(self, entries: list[RttEntry], writer: str | None = None) -> int:
        return self.servers.put_rtts(entries, writer)

    # --- placements and the planner (app.service.placements) -----------------------------------

    def compute_placement(self, request: PlacementRequest) -> PlacementOut:
        return self.placements.compute(request)

    def get_placement(self, generation: int | None) -> PlacementOut:
        return self.placements.get(generation)

    def current_generation(self) -> int:
        return self.view().generation

    def try_lead(self) -> bool:
        return self.placements.try_lead()

    def release_leadership(self) -> None:
        self.placements.release_leadership()

    def planner_tick(self) -> str:
        return self.placements.tick()

    # --- routes and sessions (app.service.sessions) ----------------------------------------------

    def route(self, client_site: str, input_tokens: int, output_tokens: int) -> RouteOut:
        return self.sessions.route(client_site, input_tokens, output_tokens)

    def book(self, body: SessionIn) -> SessionOut:
        return self.sessions.book(body)

    def release(self, session_id: str) -> None:
        self.sessions.release(session_id)

    def sweep_sessions(self) -> int:
        return self.sessions.sweep()

    def active_sessions(self) -> int:
        return self.sessions.active()


__all__ = ["Coordinator", "hash_token"]
