"""Client identity and the per-client booking rate limiter (app.service.clients)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from app.service.clients import ClientDirectory, RateLimiter
from app.service.errors import Forbidden, Unauthorized
from app.service.session_settings import SessionSettings


def directory(**values: object) -> ClientDirectory:
    return ClientDirectory(SessionSettings(**values))  # type: ignore[arg-type]


def test_a_client_token_names_the_client() -> None:
    clients = directory(client_tokens={"alice": SecretStr("a-secret")}, client_max_sessions=3)
    alice = clients.identify("a-secret", "10.0.0.1", admin=False)
    assert alice.name == "token:alice" and not alice.anonymous and alice.max_sessions == 3
    with pytest.raises(Forbidden):
        clients.identify("not-a-client-token", "10.0.0.1", admin=False)
    assert clients.identify("admin-token", None, admin=True).name == "admin"


def test_anonymous_clients_are_their_address_and_can_be_turned_off() -> None:
    anonymous = directory(anonymous_max_sessions=2).identify(None, "10.0.0.9", admin=False)
    assert anonymous.name == "anonymous:10.0.0.9" and anonymous.anonymous
    assert anonymous.max_sessions == 2
    with pytest.raises(Unauthorized, match="client token"):
        directory(anonymous_clients=False).identify(None, "10.0.0.9", admin=False)


def test_the_rate_limiter_allows_a_burst_then_the_rate() -> None:
    client = directory(anonymous_rate_per_s=2.0, anonymous_burst=3).identify(None, "x", False)
    limiter = RateLimiter()
    assert [limiter.take(client, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take(client, 100.0)
    assert wait == pytest.approx(0.5)
    assert limiter.take(client, 100.5) == 0.0  # one token back after 1/rate
    other = directory(anonymous_rate_per_s=2.0, anonymous_burst=3).identify(None, "y", False)
    assert limiter.take(other, 100.5) == 0.0  # buckets are per client


def test_no_rate_means_no_limit() -> None:
    client = directory(anonymous_rate_per_s=0).identify(None, "x", admin=False)
    limiter = RateLimiter()
    assert all(limiter.take(client, 1.0) == 0.0 for _ in range(1000))


def test_the_limiter_forgets_the_least_recent_clients_beyond_its_bound() -> None:
    limiter = RateLimiter(max_clients=2)
    settings = directory(anonymous_rate_per_s=1.0, anonymous_burst=1)
    first = settings.identify(None, "a", False)
    assert limiter.take(first, 0.0) == 0.0 and limiter.take(first, 0.0) > 0
    limiter.take(settings.identify(None, "b", False), 0.0)
    limiter.take(settings.identify(None, "c", False), 0.0)
    assert limiter.take(first, 0.0) == 0.0  # forgotten: a fresh bucket
