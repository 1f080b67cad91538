"""Property tests of the whole API against its own OpenAPI schema (schemathesis, in-process):
no 5xx, every response conforms to the declared status codes and models."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.api.app import create_app
from tests.api.conftest import ADMIN, FakeClock, admin, example_scenario, make_settings

_directory = Path(tempfile.mkdtemp(prefix="bprr-schemathesis-"))
app = create_app(
    make_settings(f"sqlite:///{_directory / 'bprr.db'}", solver_time_limit_s=5),
    clock=FakeClock(),
    background=False,
)
_coordinator = app.state.coordinator
_coordinator.start(background=False)
with TestClient(app) as _seed:
    assert (
        _seed.post(
            "/v1/scenario", json=example_scenario(), params={"lease_s": 1e7}, headers=admin()
        ).status_code
        == 201
    )

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    # Schema-valid requests may still be refused for business reasons (an unknown site, a full
    # swarm, an infeasible concurrency: 4xx naming the field), so positive_data_acceptance is
    # off. The documented examples (a known site, realistic lengths) fill the swarm's cache,
    # after which routes and bookings are refused with the documented 503 + Retry-After: the
    # only 5xx allowed, checked below instead of schemathesis' blanket "no 5xx"; so is a
    # placement whose solver ran past the time limit the request gave (on a busy machine a
    # second is not always enough to start the solver's process).
    # Removing a server is called without a token (its documented 401): with the admin token
    # it would remove one of the seeded servers, and later cases on that id (its unknown-id
    # 404, ids being public) would depend on the order hypothesis runs them in.
    removes_a_server = case.method == "DELETE" and case.path == "/v1/servers/{server_id}"
    # A generated placement may ask for up to an hour of solving: capped at this app's own
    # limit, so that a case takes seconds, not the hour the schema allows.
    if case.path == "/v1/placements" and isinstance(case.body, dict):
        limit = case.body.get("time_limit_s")
        if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 5:
            case.body["time_limit_s"] = 5
    response = case.call_and_validate(
        headers={} if removes_a_server else {"Authorization": f"Bearer {ADMIN}"},
        timeout=180,  # a hang guard: a placement starts a solver process (~10 s under load)
        excluded_checks=[
            schemathesis.checks.positive_data_acceptance,
            schemathesis.checks.not_a_server_error,
        ],
    )
    if response.status_code >= 500:
        assert response.status_code == 503, response.text
        assert "retry-after" in {name.lower() for name in response.headers}, response.text
        detail = response.json()["detail"]
        if case.path == "/v1/placements":
            assert "ran past its time limit" in detail, response.text
        else:
            assert case.path in {"/v1/routes", "/v1/sessions"}, (case.path, response.text)
            assert "no chain" in detail, response.text
