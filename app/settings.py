"""Coordinator settings, read from the environment with the ``BPRR_`` prefix.

``BPRR_DATABASE_URL`` selects the database (SQLite file by default, PostgreSQL through
``postgresql+psycopg://...``); ``BPRR_ADMIN_TOKEN`` and ``BPRR_JOIN_TOKEN`` guard the operator
routes and server registration.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BPRR_", extra="ignore")

    database_url: str = "sqlite:///bprr.db"
    auto_migrate: bool = True
    admin_token: SecretStr | None = None
    # Servers register with this token. Without one, registration is closed, unless
    # dev_mode opens it to anyone (for demos and local tests; a warning is logged at start).
    join_token: SecretStr | None = None
    dev_mode: bool = False

    lease_ttl_s: Annotated[float, Field(gt=0)] = 15.0
    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # A session is released at its predicted completion plus this grace period.
    session_grace_s: Annotated[float, Field(ge=0)] = 30.0
    # RTT used between two sites nobody measured yet (PETALS assumes 150 ms when unknown).
    default_site_rtt_ms: Annotated[float, Field(ge=0)] = 150.0
    # Exponentially weighted moving average weight of a new RTT sample.
    rtt_ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3

    # Planner: how often the leader looks for a reason to re-plan (0 disables the thread).
    planner_interval_s: Annotated[float, Field(ge=0)] = 2.0
    # "auto" (the best-scored candidate plan for the measured load), "chains", "cg", "milp"
    # or "petals".
    planner_algorithm: str = "auto"
    planner_time_limit_s: Annotated[float, Field(gt=0)] = 30.0
    # Hysteresis: a re-plan replaces the current placement only when it improves the
    # predicted per-token time by at least this fraction (unless coverage is lost).
    replan_min_gain: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Measurements drifting by more than this fraction (RTT or speed) trigger a re-plan check.
    replan_drift: Annotated[float, Field(gt=0)] = 0.25
    # Design concurrency |R| when none is set on the model (0: one request per client site).
    default_concurrency: Annotated[int, Field(ge=0)] = 0
    leader_lease_s: Annotated[float, Field(gt=0)] = 10.0

    # Limits. A request body larger than this is refused with 413 before it is read whole.
    max_body_bytes: Annotated[int, Field(ge=1024, le=2**31)] = 8 * 2**20
    # Threads serving synchronous routes (database work); more requests wait their turn.
    thread_pool_size: Annotated[int, Field(ge=1, le=1000)] = 40
    # A database statement (PostgreSQL statement_timeout and lock_timeout) or a wait for
    # SQLite's write lock gives up after this long: the request gets a 503 with Retry-After.
    db_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    # Leases and session expiry follow the database server's clock (PostgreSQL), not this
    # replica's: the offset between the two is measured at start and every few seconds.
    database_clock: bool = True
    # HTTP server (``bprr serve``): idle keep-alive connections and requests whose headers do
    # not arrive in time are closed; at most max_connections are served at once (503 beyond).
    keep_alive_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 2048

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    log_json: bool = False
