"""RouteClient against the real coordinator app in-process, plus its retry rules."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from bprr_client import (
    BearerAuth,
    CoordinatorError,
    CoordinatorUnreachable,
    RetryPolicy,
    RouteClient,
)
from bprr_client.http import DEFAULT_TIMEOUT, retry_after
from fastapi.testclient import TestClient

from tests.clients.conftest import BASE, Forward, make_agent, publish, put_model


def swarm(app: TestClient, forward: Forward, count: int = 3) -> None:
    put_model(app)
    agents = [make_agent(forward, i) for i in range(count)]
    for agent in agents:
        agent.tick()
    publish(app)
    for agent in agents:
        agent.tick()
        agent.tick()
    assert any(agent.state == "online" for agent in agents)


def reserved(app: TestClient) -> dict[str, int]:
    return {s["id"]: s["reserved_slots"] for s in app.get("/v1/servers").json()}


def client(forward: Forward, **kwargs: Any) -> tuple[RouteClient, list[float]]:
    sleeps: list[float] = []
    kwargs.setdefault("client_site", "east")
    route_client = RouteClient(
        BASE, transport=forward, sleep=sleeps.append, rng=random.Random(1), **kwargs
    )
    return route_client, sleeps


def test_route_then_a_session_that_reserves_and_releases(app: TestClient, forward: Forward) -> None:
    swarm(app, forward)
    routes, _ = client(forward)
    with routes:
        route = routes.route(input_tokens=20, output_tokens=30)
        assert route.hops[0].start == 0 and route.hops[-1].end == 8
        assert route.per_token_ms > 0 and route.first_token_ms > 0
        with routes.session(20, 30) as session:
            held = reserved(app)
            for hop in session.route.hops:
                assert held[hop.server_id] >= hop.end - hop.start
            assert session.expires_in_s > 0
        assert set(reserved(app).values()) == {0}
        assert routes.release(session) is False  # already released: 404 -> False


def test_a_session_is_released_when_the_block_raises(app: TestClient, forward: Forward) -> None:
    swarm(app, forward)
    routes, _ = client(forward)
    with pytest.raises(RuntimeError), routes.session(10, 10):
        assert sum(reserved(app).values()) > 0
        raise RuntimeError("inference failed")
    assert set(reserved(app).values()) == {0}


def test_busy_coordinator_is_retried_after_retry_after(app: TestClient, forward: Forward) -> None:
    swarm(app, forward)
    routes, sleeps = client(forward)
    forward.fail = [(503, {"Retry-After": "2"}), (429, {"Retry-After": "1"})]
    session = routes.book(10, 10)
    assert sleeps == [2.0, 1.0]
    assert routes.release(session.id) is True


def test_503_after_every_attempt_is_an_error_with_its_retry_after(forward: Forward) -> None:
    routes, sleeps = client(forward, retry=RetryPolicy(attempts=3))
    forward.fail = [(503, {"Retry-After": "1"})] * 3
    with pytest.raises(CoordinatorError) as caught:
        routes.book(10, 10)
    assert caught.value.status_code == 503 and caught.value.retry_after_s == 1.0
    assert len(forward.requests) == 3 and sleeps == [1.0, 1.0]


def test_a_retry_after_beyond_the_patience_is_not_waited_for(forward: Forward) -> None:
    routes, sleeps = client(forward, retry=RetryPolicy(max_retry_after_s=5))
    forward.fail = [(503, {"Retry-After": "30"})]
    with pytest.raises(CoordinatorError):
        routes.book(10, 10)
    assert sleeps == [] and len(forward.requests) == 1


def test_a_booking_is_retried_with_the_same_idempotency_key(
    app: TestClient, forward: Forward
) -> None:
    """A booking that may have been carried out (a read timeout) is sent again with the
    same Idempotency-Key, so the coordinator returns the session it booked, not a second."""
    swarm(app, forward)
    routes, _ = client(forward)
    forward.fail = [httpx.ReadTimeout("slow")]
    before = len(forward.requests)
    session = routes.book(10, 10)
    sent = forward.requests[before:]
    assert len(sent) == 2
    keys = {request.headers["Idempotency-Key"] for request in sent}
    assert len(keys) == 1 and len(keys.pop()) >= 16
    assert routes.release(session)
    # a caller's own key is used as given, and each booking gets a fresh one otherwise
    before = len(forward.requests)
    routes.release(routes.book(10, 10, idempotency_key="order-17"))
    routes.release(routes.book(10, 10))
    routes.release(routes.book(10, 10))
    booked = [r for r in forward.requests[before:] if r.method == "POST"]
    assert booked[0].headers["Idempotency-Key"] == "order-17"
    assert booked[1].headers["Idempotency-Key"] != booked[2].headers["Idempotency-Key"]
    forward.fail = [httpx.ReadTimeout("slow"), (502, {})]
    assert routes.route(10, 10).hops


def test_backoff_without_retry_after_grows_with_jitter(forward: Forward) -> None:
    policy = RetryPolicy(attempts=4, initial_s=1.0, multiplier=2.0, jitter=0.5)
    routes, sleeps = client(forward, retry=policy)
    forward.fail = [httpx.ConnectError("refused")] * 4
    with pytest.raises(CoordinatorUnreachable):
        routes.route(10, 10)
    assert len(sleeps) == 3
    for retry, pause in enumerate(sleeps):
        assert 0.5 * 2**retry <= pause <= 2**retry


def test_bad_input_is_an_error_naming_the_field(app: TestClient, forward: Forward) -> None:
    swarm(app, forward)
    routes, _ = client(forward)
    with pytest.raises(CoordinatorError) as caught:
        routes.route(10, 10, client_site="mars")
    assert caught.value.status_code == 422 and "client_site" in caught.value.detail
    with pytest.raises(CoordinatorError) as caught:
        routes.book(10, 10_000)
    assert "output_tokens" in caught.value.detail
    with pytest.raises(ValueError, match="client_site"):
        RouteClient(BASE, transport=forward).route(10, 10)


def test_bearer_token_is_sent_and_never_printed(forward: Forward) -> None:
    routes, _ = client(forward, token="s3cret")
    forward.fail = [(404, {})]
    assert routes.release("abc") is False
    assert forward.requests[0].headers["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in repr(BearerAuth("s3cret"))


def test_timeouts_are_explicit(forward: Forward) -> None:
    assert RouteClient(BASE, transport=forward)._http.timeout == DEFAULT_TIMEOUT
    assert DEFAULT_TIMEOUT.connect == 3.0 and DEFAULT_TIMEOUT.read == 10.0
    assert RouteClient(BASE, timeout=2.5, transport=forward)._http.timeout.read == 2.5


def test_an_injected_http_client_is_used_and_left_open(app: TestClient, forward: Forward) -> None:
    put_model(app)
    make_agent(forward, 0).tick()  # a site, but no placement yet
    sleeps: list[float] = []
    routes = RouteClient(http_client=app, client_site="east", sleep=sleeps.append)
    with pytest.raises(CoordinatorError) as caught:
        routes.route(1, 1)
    assert caught.value.status_code == 503
    assert sleeps == [5.0] * 3  # Retry-After: the heartbeat interval
    routes.close()
    assert app.get("/livez").status_code == 200


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    def reply(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(reply("3"), lambda: 0.0) == 3.0
    assert retry_after(reply("Wed, 21 Oct 2015 07:28:10 GMT"), lambda: 1445412480.0) == 10.0
    assert retry_after(reply("soon"), lambda: 0.0) is None
    assert retry_after(httpx.Response(503), lambda: 0.0) is None
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_the_same_idempotency_key_books_one_session(app: TestClient, forward: Forward) -> None:
    """The coordinator answers a repeated booking (same key) with the session it booked;
    the session token comes with the booking and authorises the release."""
    swarm(app, forward)
    routes, _ = client(forward)
    first = routes.book(10, 10, idempotency_key="retry-me")
    again = routes.book(10, 10, idempotency_key="retry-me")
    assert again.id == first.id
    assert first.token
    assert routes.release(first)
    assert not routes.release(first)  # already gone
