"""Who is booking: client identity (a client token, or the network address in anonymous
mode), its quotas, and the per-client booking rate limiter.

A client token (BPRR_CLIENT_TOKENS, name -> token) names the client; a request without a
token is the anonymous client of its address, allowed only while BPRR_ANONYMOUS_CLIENTS is
on. Each identity has a bound on concurrent sessions (checked against the database, so it
holds across replicas) and a booking rate (a token bucket per process: with n replicas behind
a balancer a client gets up to n times the rate).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

from app.service.errors import Forbidden, Unauthorized
from app.service.session_settings import SessionSettings

MAX_TRACKED_CLIENTS = 10_000


@dataclass(frozen=True)
class ClientIdentity:
    # "token:<name>", "anonymous:<address>" or "admin"
    name: str
    max_sessions: int  # 0: no bound
    rate_per_s: float  # 0: no bound
    burst: int

    @property
    def anonymous(self) -> bool:
        return self.name.startswith("anonymous:")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ClientDirectory:
    def __init__(self, config: SessionSettings) -> None:
        self.config = config
        # By the token's hash: a dict lookup reveals nothing about other tokens' prefixes.
        self._by_hash = {
            _digest(secret.get_secret_value()): name
            for name, secret in config.client_tokens.items()
        }

    def identify(self, token: str | None, address: str | None, admin: bool) -> ClientIdentity:
        config = self.config
        if token is not None:
            name = self._by_hash.get(_digest(token))
            if name is not None:
                return ClientIdentity(
                    f"token:{name}",
                    config.client_max_sessions,
                    config.client_rate_per_s,
                    config.client_burst,
                )
            if admin:
                return ClientIdentity("admin", 0, 0.0, 1)
            raise Forbidden("the bearer token is not a client token")
        if not config.anonymous_clients:
            raise Unauthorized(
                "missing bearer token: bookings need a client token "
                "(anonymous clients are off: BPRR_ANONYMOUS_CLIENTS=false)"
            )
        return ClientIdentity(
            f"anonymous:{(address or 'unknown')[:200]}",
            config.anonymous_max_sessions,
            config.anonymous_rate_per_s,
            config.anonymous_burst,
        )


class RateLimiter:
    """Token buckets per client name (the least recently seen forgotten beyond a bound)."""

    def __init__(self, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_clients = max_clients

    def take(self, client: ClientIdentity, now: float) -> float:
        """0 when the booking may go ahead (one token taken), else the seconds until the
        client's next token."""
        rate = client.rate_per_s
        if rate <= 0:
            return 0.0
        with self._lock:
            tokens, at = self._buckets.pop(client.name, (float(client.burst), now))
            tokens = min(float(client.burst), tokens + max(0.0, now - at) * rate)
            if tokens >= 1.0:
                self._buckets[client.name] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[client.name] = (tokens, now)
                wait = (1.0 - tokens) / rate
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait if math.isfinite(wait) else 1.0

    def give_back(self, client: ClientIdentity) -> None:
        """Return the token a booking took when it could not run here after all (it is
        retried, and charged, elsewhere)."""
        if client.rate_per_s <= 0:
            return
        with self._lock:
            found = self._buckets.get(client.name)
            if found is not None:
                tokens, at = found
                self._buckets[client.name] = (min(float(client.burst), tokens + 1.0), at)
