"""Settings of the sessions domain (bookings, the central queue, client identity and
quotas), read from the environment with the ``BPRR_`` prefix like app.settings.Settings.

    BPRR_QUEUE_MAX_WAIT_S=300       the largest wait_s a booking may ask for (422 beyond)
    BPRR_QUEUE_MAX_DEPTH=1000       bookings waiting at once in the central queue (429 beyond)
    BPRR_CLIENT_TOKENS='{"alice": "s3cret"}'   client name -> bearer token
    BPRR_ANONYMOUS_CLIENTS=true     false: bookings need a client token (401 without)
    BPRR_ANONYMOUS_MAX_SESSIONS=8   concurrent sessions per anonymous client (its address)
    BPRR_ANONYMOUS_RATE_PER_S=5     bookings per second per anonymous client
    BPRR_ANONYMOUS_BURST=10         bookings an anonymous client may make at once
    (BPRR_CLIENT_MAX_SESSIONS, BPRR_CLIENT_RATE_PER_S, BPRR_CLIENT_BURST: the same per named
    client.) 0 means no bound; every bound is off by default, as before these settings: a
    swarm open to the Internet should set the anonymous ones, or turn anonymous clients off.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SessionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BPRR_", extra="ignore")

    # The central FIFO queue (wait_s > 0 on POST /v1/sessions).
    queue_max_wait_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    queue_max_depth: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    # How often a waiting process looks at the queue when nothing woke it (other replicas'
    # releases), and how long a ticket outlives its holder's last renewal.
    queue_poll_s: Annotated[float, Field(gt=0, le=10)] = 0.2
    queue_stale_s: Annotated[float, Field(gt=0, le=600)] = 10.0

    # Client identity: a client token names the client; without one the client is its
    # network address, allowed only in anonymous mode and under the anonymous quotas.
    client_tokens: dict[str, SecretStr] = {}
    anonymous_clients: bool = True
    # 0: no limit.
    anonymous_max_sessions: Annotated[int, Field(ge=0)] = 0
    anonymous_rate_per_s: Annotated[float, Field(ge=0)] = 0.0
    anonymous_burst: Annotated[int, Field(ge=1)] = 10
    client_max_sessions: Annotated[int, Field(ge=0)] = 0
    client_rate_per_s: Annotated[float, Field(ge=0)] = 0.0
    client_burst: Annotated[int, Field(ge=1)] = 100

    # How long an ended session's record (GET /v1/sessions/{id}, idempotent retries) is kept.
    record_retention_s: Annotated[float, Field(gt=0)] = 3600.0
