"""bprr's client package: the server agent and the route/session client.

Depends on httpx and pydantic only; it speaks the coordinator's HTTP API (``/v1``) and never
imports the coordinator, the solver or a database.
"""

from bprr_client.agent import AgentError, ServerAgent, SpanHost
from bprr_client.http import (
    BearerAuth,
    CoordinatorError,
    CoordinatorUnreachable,
    RetryPolicy,
)
from bprr_client.models import (
    HeartbeatReply,
    PrefillSpeed,
    Registration,
    Route,
    RouteHop,
    Server,
    ServerInfo,
    Session,
    Span,
    Speed,
)
from bprr_client.petals import PetalsOptions, ProcessSupervisor, petals_command
from bprr_client.probes import Ewma, HttpProber, Prober, TcpProber
from bprr_client.routes import RouteClient

__all__ = [
    "AgentError",
    "BearerAuth",
    "CoordinatorError",
    "CoordinatorUnreachable",
    "Ewma",
    "HeartbeatReply",
    "HttpProber",
    "PetalsOptions",
    "PrefillSpeed",
    "Prober",
    "ProcessSupervisor",
    "Registration",
    "RetryPolicy",
    "Route",
    "RouteClient",
    "RouteHop",
    "Server",
    "ServerAgent",
    "ServerInfo",
    "Session",
    "Span",
    "SpanHost",
    "Speed",
    "TcpProber",
    "petals_command",
]
