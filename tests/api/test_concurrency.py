"""Over-admission: concurrent bookings (threads, one process) and two coordinator processes
sharing one PostgreSQL (leader election, bookings through both)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete, func, select

from app.service.errors import Unavailable
from app.service.schemas import SessionIn
from app.store.models import LeaderRow, ReservationRow, ServerRow
from tests.api.conftest import ADMIN, JOIN, example_scenario
from tests.api.helpers import route_params, small_swarm


def assert_not_overcommitted(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            servers = connection.execute(
                select(ServerRow.id, ServerRow.cache_slots, ServerRow.reserved_slots)
            ).all()
            held = dict(
                connection.execute(
                    select(ReservationRow.server_id, func.sum(ReservationRow.slots)).group_by(
                        ReservationRow.server_id
                    )
                ).all()
            )
    finally:
        engine.dispose()
    for server_id, capacity, reserved in servers:
        assert reserved <= capacity, f"{server_id} over-committed: {reserved} > {capacity}"
        assert reserved == (held.get(server_id) or 0), server_id
    return sum(reserved for _, _, reserved in servers)


def test_concurrent_bookings_never_overcommit(client: TestClient, database_url: str) -> None:
    small_swarm(client, count=4, memory_gb=5.0)
    coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
    body = SessionIn(**route_params(inputs=10, outputs=10))

    def book(_: int) -> bool:
        try:
            coordinator.book(body)
            return True
        except Unavailable:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(book, range(120)))
    assert any(results) and not all(results), "the swarm should fill up"
    reserved = assert_not_overcommitted(database_url)
    assert reserved == sum(results) * 8  # every booked session holds one slot per block


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def two_instances(pg_url: str) -> Iterator[tuple[list[str], list[subprocess.Popen[bytes]]]]:
    env = dict(
        os.environ,
        BPRR_DATABASE_URL=pg_url,
        BPRR_ADMIN_TOKEN=ADMIN,
        BPRR_JOIN_TOKEN=JOIN,
        BPRR_PLANNER_INTERVAL_S="0.2",
        BPRR_LEADER_LEASE_S="1.0",
    )
    ports = [_free_port(), _free_port()]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        for port in ports
    ]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 60
        for base in bases:
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "coordinator did not start"
                time.sleep(0.2)
        yield bases, processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_instances_one_leader_no_overadmission(
    two_instances: tuple[list[str], list[subprocess.Popen[bytes]]], pg_url: str
) -> None:
    bases, processes = two_instances
    headers = {"Authorization": f"Bearer {ADMIN}"}
    loaded = httpx.post(
        f"{bases[0]}/v1/scenario",
        params={"lease_s": 3600},
        json=example_scenario(),
        headers=headers,
        timeout=60,
    )
    assert loaded.status_code == 201, loaded.text
    # Instance B sees A's placement (within its index refresh period).
    body = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 128}
    deadline = time.monotonic() + 10
    while httpx.get(f"{bases[1]}/v1/routes", params=body, timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    def book(i: int) -> int:
        with httpx.Client(base_url=bases[i % 2], timeout=30) as http:
            return http.post("/v1/sessions", json=body).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(book, range(400)))
    assert set(codes) <= {201, 503}
    assert 201 in codes and 503 in codes
    reserved = assert_not_overcommitted(pg_url)
    assert reserved == codes.count(201) * 70  # one slot per block on each booked path

    engine = create_engine(pg_url)
    try:
        with engine.connect() as connection:
            holders = connection.execute(select(LeaderRow.holder)).scalars().all()
        assert len(holders) == 1  # one leader lease row, held by one process
        # Stop instance A: whoever led before, the lease must now be renewed by B alone,
        # i.e. its expiry moves past the moment A stopped plus one lease period.
        processes[0].terminate()
        processes[0].wait(timeout=30)
        stopped = time.time()
        deadline = time.monotonic() + 15
        while True:
            with engine.connect() as connection:
                row: Any = connection.execute(select(LeaderRow.holder, LeaderRow.expires_at)).one()
            if row.expires_at > stopped + 1.05:
                break
            assert time.monotonic() < deadline, "no live leader after one instance stopped"
            time.sleep(0.2)
        assert httpx.get(f"{bases[1]}/v1/routes", params=body, timeout=5).status_code in {200, 503}
    finally:
        engine.dispose()


def test_booking_over_a_server_gone_since_the_view_takes_another_chain(
    client: TestClient, database_url: str
) -> None:
    """Another process removed a server after this one built its route view: the booking's
    conditional reservation finds no row, rolls back, and the retry routes around it."""
    small_swarm(client, count=4, memory_gb=6.0)
    first = client.get("/v1/routes", params=route_params())
    assert first.status_code == 200, first.text
    gone = first.json()["hops"][0]["server_id"]
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(ServerRow).where(ServerRow.id == gone))
    finally:
        engine.dispose()
    booked = client.post("/v1/sessions", json=route_params())
    assert booked.status_code == 201, booked.text
    assert gone not in {hop["server_id"] for hop in booked.json()["route"]["hops"]}
    assert_not_overcommitted(database_url)
