"""Fixtures for the client package's tests: the real coordinator app in-process (a fresh
SQLite file, an injected clock, no background threads), reached through an httpx transport
that forwards to FastAPI's TestClient and can inject failures; and ``bprr serve`` as a process
on 127.0.0.1 (``coordinator``) for the tests that run ``bprr-agent`` as a process."""

from __future__ import annotations

import io
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bprr_client import PrefillSpeed, ServerAgent, ServerInfo
from bprr_client._cli_style import _CurrentStderr
from bprr_client.probes import Prober
from fastapi.testclient import TestClient

import app.logging as app_logging
from app.api.app import create_app

# The coordinator suite's tokens, clock, settings and model: one definition for both suites.
from tests.api.conftest import ADMIN, JOIN, FakeClock, admin, make_settings
from tests.api.helpers import SMALL_MODEL

BASE = "http://coordinator"
MODEL = SMALL_MODEL


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


@pytest.fixture(autouse=True)
def app_log(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The in-process coordinator's structlog lines (its audit log), kept apart from the
    stderr that the tests read for bprr-agent's own lines: app.logging writes to whatever
    sys.stderr is at each write, which is pytest's capture of the CLI's stderr."""
    stream = io.StringIO()
    monkeypatch.setattr(app_logging._CurrentStderr, "write", lambda _self, text: stream.write(text))
    monkeypatch.setattr(app_logging._CurrentStderr, "flush", lambda _self: None)
    return stream


@pytest.fixture(autouse=True)
def cli_logging_undone() -> Iterator[None]:
    """bprr-agent's log handlers (installed by main()) removed after each test: the agents a
    later test drives in-process must not write to that test's stderr."""
    yield
    for name in ("bprr_client", "httpx"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _CurrentStderr)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def make_app(url: str, clock: FakeClock, **overrides: Any) -> TestClient:
    client = TestClient(create_app(make_settings(url, **overrides), clock=clock, background=False))
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


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "BPRR_DATABASE_URL": f"sqlite:///{tmp_path / 'coordinator.db'}",
        "BPRR_ADMIN_TOKEN": ADMIN,
        "BPRR_JOIN_TOKEN": JOIN,
        "BPRR_HEARTBEAT_INTERVAL_S": "0.3",
        "BPRR_LEASE_TTL_S": "5",
        "BPRR_PLANNER_INTERVAL_S": "0.2",
    }
    log = (tmp_path / "coordinator.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "bprr"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is None and httpx.get(f"{url}/readyz").status_code == 200,
            "the coordinator's /readyz",
        )
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
