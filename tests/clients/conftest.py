"""Fixtures for the client package's tests: the real coordinator app in-process (a fresh
SQLite file, an injected clock, no background threads), reached through an httpx transport
that forwards to FastAPI's TestClient and can inject failures."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bprr_client import PrefillSpeed, ServerAgent, ServerInfo
from bprr_client.probes import Prober
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.api.app import create_app
from app.settings import Settings

ADMIN = "admin-secret"
JOIN = "join-secret"
BASE = "http://coordinator"
MODEL: dict[str, Any] = {
    "name": "tiny",
    "num_blocks": 8,
    "block_memory_gb": 1.0,
    "kv_bytes_per_token_per_block": 1_000_000,
    "max_input_tokens": 100,
    "max_output_tokens": 100,
    "overheads": {"per_token_ms": 10},
}


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Failure = Exception | tuple[int, dict[str, str]]


class Forward(httpx.BaseTransport):
    """Forwards every request to the in-process app; ``fail`` holds failures to inject first
    (an exception to raise, or a (status, headers) reply), ``requests`` what was sent."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.fail: list[Failure] = []
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if self.fail:
            failure = self.fail.pop(0)
            if isinstance(failure, Exception):
                raise failure
            status, headers = failure
            return httpx.Response(status, headers=headers, json={"detail": "injected"})
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        reply = self.client.request(
            request.method, request.url.raw_path.decode(), headers=headers, content=request.content
        )
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)


def make_app(url: str, clock: FakeClock, **overrides: Any) -> TestClient:
    values: dict[str, Any] = {
        "database_url": url,
        "admin_token": SecretStr(ADMIN),
        "join_token": SecretStr(JOIN),
        "planner_interval_s": 0,
    }
    values.update(overrides)
    client = TestClient(create_app(Settings(**values), clock=clock, background=False))
    client.__enter__()
    return client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bprr.db'}"


@pytest.fixture
def app(sqlite_url: str, clock: FakeClock) -> Iterator[TestClient]:
    client = make_app(sqlite_url, clock)
    yield client
    client.__exit__(None, None, None)


@pytest.fixture
def forward(app: TestClient) -> Forward:
    return Forward(app)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def put_model(app: TestClient) -> None:
    response = app.put("/v1/model", json=MODEL, headers=admin())
    assert response.status_code == 200, response.text


def publish(app: TestClient) -> dict[str, tuple[int, int]]:
    response = app.post("/v1/placements", json={"algorithm": "cg"}, headers=admin())
    assert response.status_code == 201, response.text
    return {s["server_id"]: (s["start"], s["end"]) for s in response.json()["spans"]}


def info(index: int, site: str = "east", memory_gb: float = 6.0) -> ServerInfo:
    return ServerInfo(
        id=f"s{index}",
        site=site,
        gpu="A100",
        memory_gb=memory_gb,
        decode_ms_per_block=2.0 + index,
        prefill_ms_per_block=PrefillSpeed(fixed=10.0, per_token=0.1),
        address=f"10.0.0.{index}:31337",
    )


def no_probe(_address: str) -> float | None:
    return None


def make_agent(
    forward: Forward, index: int, prober: Prober = no_probe, **kwargs: Any
) -> ServerAgent:
    epochs = iter(range(100 * (index + 1), 100 * (index + 2)))
    kwargs.setdefault("probe_peers", False)
    return ServerAgent(
        BASE,
        info(index, kwargs.pop("site", "east"), kwargs.pop("memory_gb", 6.0)),
        join_token=JOIN,
        prober=prober,
        transport=forward,
        epoch_source=lambda: next(epochs),
        rng=random.Random(index),
        **kwargs,
    )
