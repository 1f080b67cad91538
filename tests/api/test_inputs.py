"""Bad input is a 4xx naming the field, never a 500 (issue 12): lone surrogates, NUL
characters (PostgreSQL), subnormal and overflowing numbers, booleans where numbers belong,
and a scenario load that fails changes nothing."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import JOIN, FakeClock, admin, bearer, example_scenario
from tests.api.helpers import SMALL_MODEL, register, server_body

BAD_TEXT = ["\ud800", "a\udfffb", "nul\x00byte"]


def _post_json(client: TestClient, path: str, body: Any, headers: dict[str, str]) -> Any:
    raw = json.dumps(body)  # escapes lone surrogates as \\udxxx, valid JSON text
    return client.post(path, content=raw, headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize("bad", BAD_TEXT)
@pytest.mark.parametrize("field", ["gpu", "address", "site", "id"])
def test_bad_text_in_a_registration_is_a_422_naming_the_field(
    client: TestClient, bad: str, field: str
) -> None:
    reply = _post_json(client, "/v1/servers", server_body(0, **{field: bad}), bearer(JOIN))
    assert reply.status_code == 422, reply.text
    assert field in reply.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_bytes_per_token_per_block", 5e-324),
        ("block_memory_gb", 5e-324),
        ("block_memory_gb", 1e308),
        ("rate_per_s", 1e300),
        ("num_blocks", True),
        ("max_input_tokens", 1.5),
    ],
)
def test_subnormal_overflowing_and_boolean_model_numbers_are_422(
    client: TestClient, field: str, value: Any
) -> None:
    reply = client.put("/v1/model", json={**SMALL_MODEL, field: value}, headers=admin())
    assert reply.status_code == 422 and field in reply.text, reply.text


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(st.characters(blacklist_categories=()), max_size=12),
    number=st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans(),
)
def test_any_text_or_number_in_a_registration_is_never_a_500(
    client: TestClient, text: str, number: Any
) -> None:
    body = server_body(0, gpu=text, memory_gb=number, address=text or "x")
    reply = _post_json(client, "/v1/servers", body, bearer(JOIN))
    assert reply.status_code < 500, reply.text


def _snapshot(client: TestClient) -> tuple[Any, Any, Any]:
    return (
        client.get("/v1/model").json(),
        sorted(s["id"] for s in client.get("/v1/servers").json()),
        client.get("/v1/placements/current").json().get("generation"),
    )


@pytest.mark.parametrize(
    "breakage",
    [
        ("model", "num_blocks", True),
        ("model", "name", "bad\x00name"),
        ("model", "kv_bytes_per_token_per_block", 5e-324),
        ("server", "gpu", "\ud800"),
        ("server", "memory_gb", 1e300),
        ("server", "decode_ms_per_block", 5e-324),
    ],
)
def test_a_failed_scenario_load_changes_nothing(
    client: TestClient, breakage: tuple[str, str, Any]
) -> None:
    loaded = _post_json(client, "/v1/scenario", example_scenario(), admin())
    assert loaded.status_code == 201, loaded.text
    before = _snapshot(client)
    where, field, value = breakage
    broken = example_scenario()
    (broken["model"] if where == "model" else broken["servers"][0])[field] = value
    reply = _post_json(client, "/v1/scenario", broken, admin())
    assert reply.status_code == 422 and field in reply.json()["detail"], reply.text
    assert _snapshot(client) == before


def test_the_model_on_postgres_refuses_nul(client: TestClient) -> None:
    reply = _post_json(client, "/v1/servers", server_body(0, gpu="A\x00100"), bearer(JOIN))
    assert reply.status_code == 422 and "gpu" in reply.text
    assert client.put("/v1/model", json=SMALL_MODEL, headers=admin()).status_code == 200


def test_durations_in_replies_are_whole_tenths_of_a_millisecond(
    client: TestClient, clock: FakeClock
) -> None:
    """Leases come back to 0.1 ms, rounded down (never promised longer than they last):
    no 14.81291651725769."""
    register(client, server_body(0))
    lease = client.get("/v1/servers/s0").json()["lease_expires_in_s"]
    clock.advance(0.123456789)
    later = client.get("/v1/servers/s0").json()["lease_expires_in_s"]
    assert later == math.floor((lease - 0.123456789) * 1e4) / 1e4  # 0.1 ms, down
