"""Every repository under one name (``from app.store import repositories as repo``).

The repositories live per domain: app.store.swarm (model, sites, clients, RTTs),
app.store.servers, app.store.reservations, app.store.sessions and app.store.placements (the
planner's rows); app.store.common holds what they share. Each takes the SQLAlchemy
``Session`` of the caller's transaction and NEVER commits, rolls back or begins: the service
layer owns the transaction (app.service.core).
"""

from __future__ import annotations

from app.store.common import (
    MODEL_ID,
    PLANNER_LEADER,
    PLANNER_STATE_ID,
    insert_ignore,
    pair_key,
)
from app.store.placements import Leader, Placements, PlannerState
from app.store.reservations import Held, Reservations
from app.store.servers import LeaseRenewal, Servers
from app.store.sessions import Sessions
from app.store.swarm import Clients, Models, Rtts, Sites, clear_swarm

__all__ = [
    "MODEL_ID",
    "PLANNER_LEADER",
    "PLANNER_STATE_ID",
    "Clients",
    "Held",
    "Leader",
    "LeaseRenewal",
    "Models",
    "Placements",
    "PlannerState",
    "Reservations",
    "Rtts",
    "Servers",
    "Sessions",
    "Sites",
    "clear_swarm",
    "insert_ignore",
    "pair_key",
]
