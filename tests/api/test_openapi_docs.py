"""The OpenAPI documentation is complete (issue 13): every operation has a written summary
(not the one FastAPI derives from the function's name), a description that says who may call
it, documented parameters; every property of every schema has a description; every request
body has an example, and the documented examples are accepted by the app itself."""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from sqlalchemy import event
from sqlalchemy.pool import Pool

from app.api.app import create_app
from app.service import schemas, session_schemas
from tests.api.conftest import ADMIN, JOIN, AppFactory, FakeClock, admin, bearer, make_settings

METHODS = {"get", "put", "post", "delete", "patch"}
Schema = dict[str, Any]


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    url = f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'bprr.db'}"
    spec: Schema = create_app(make_settings(url), background=False).openapi()
    return spec


def _operations(spec: Schema) -> list[tuple[str, str, Schema]]:
    return [
        (method, path, operation)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if method in METHODS
    ]


def _derived_summary(method: str, path: str, operation: Schema) -> str:
    """The summary FastAPI writes when none is given: the function's name, title-cased (the
    name is the operationId less its path-and-method suffix)."""
    suffix = re.sub(r"\W", "_", path) + "_" + method
    name = str(operation["operationId"]).removesuffix(suffix)
    return name.replace("_", " ").title()


def _resolve(spec: Schema, schema: Schema) -> Schema:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _properties(spec: Schema, schema: Schema) -> dict[str, Schema]:
    """A schema's properties, those of its allOf parts included."""
    schema = _resolve(spec, schema)
    found = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        found.update(_properties(spec, part))
    return found


def undocumented_fields(spec: Schema) -> list[str]:
    """``Schema.field`` for every property of a component schema without a description."""
    return [
        f"{name}.{field}"
        for name, schema in spec.get("components", {}).get("schemas", {}).items()
        for field, prop in _properties(spec, schema).items()
        if not str(prop.get("description", "")).strip()
    ]


def _examples_of(spec: Schema, schema: Schema) -> list[Any]:
    """Examples declared on a body schema (following $ref, anyOf and allOf)."""
    schema = _resolve(spec, schema)
    found = list(schema.get("examples", []))
    for key in ("anyOf", "oneOf", "allOf"):
        for part in schema.get(key, []):
            found.extend(_examples_of(spec, part))
    return found


def body_examples(spec: Schema, operation: Schema) -> list[Any]:
    """Every example of an operation's JSON request body: the media type's own and its
    schema's."""
    media = operation["requestBody"]["content"]["application/json"]
    found = [example["value"] for example in media.get("examples", {}).values()]
    if "example" in media:
        found.append(media["example"])
    return found + _examples_of(spec, media.get("schema", {}))


def test_every_operation_has_a_written_summary_and_description(openapi: Schema) -> None:
    operations = _operations(openapi)
    assert len(operations) >= 22
    for method, path, operation in operations:
        where = f"{method.upper()} {path}"
        summary = str(operation.get("summary", ""))
        assert summary.strip(), f"{where}: no summary"
        assert summary != _derived_summary(method, path, operation), f"{where}: {summary!r}"
        description = str(operation.get("description", ""))
        assert len(description) >= 40, f"{where}: no description"
        # Who may call it: the token it needs, or that it needs none.
        assert "**Token**:" in description or "Public: no token" in description, where
        if operation.get("security"):
            assert "**Token**:" in description, f"{where}: needs a token, says not which"
        assert operation["responses"], where
        for status, response in operation["responses"].items():
            assert str(response.get("description", "")).strip(), f"{where} {status}"


def test_every_parameter_is_described_and_non_trivial_queries_have_examples(
    openapi: Schema,
) -> None:
    seen = 0
    for method, path, operation in _operations(openapi):
        for parameter in operation.get("parameters", []):
            seen += 1
            where = f"{method.upper()} {path} {parameter['in']} {parameter['name']}"
            assert str(parameter.get("description", "")).strip(), f"{where}: no description"
            if parameter["in"] == "query" and parameter["schema"].get("type") != "boolean":
                declared = parameter.get("examples") or parameter["schema"].get("examples")
                assert declared, f"{where}: no example"
    assert seen >= 15


def test_every_field_of_every_schema_is_described(openapi: Schema) -> None:
    components = openapi["components"]["schemas"]
    assert {"ServerOut", "ServerRegistration", "BookingIn", "OverviewOut"} <= set(components)
    assert undocumented_fields(openapi) == []
    # FastAPI's own 422 shape (undocumented fields) appears for no route: each declares ours.
    assert "HTTPValidationError" not in components


class Inner(BaseModel):
    documented: int = Field(description="Has one")
    bare: str


class Outer(BaseModel):
    inner: Inner = Field(description="Nested")
    forgotten: float


def test_the_field_check_finds_a_new_undocumented_field() -> None:
    """The check above is not vacuous: a field added without a description is reported,
    nested in a reply and in a request body alike."""
    app = FastAPI()

    @app.post("/probe", response_model=Outer)
    def probe(body: Inner) -> Outer:
        raise NotImplementedError

    found = undocumented_fields(app.openapi())
    assert {"Inner.bare", "Outer.forgotten"} <= set(found)
    assert "Inner.documented" not in found and "Outer.inner" not in found


def _body_models() -> dict[str, type[BaseModel]]:
    models = {**vars(schemas), **vars(session_schemas)}
    return {
        name: value
        for name, value in models.items()
        if isinstance(value, type) and issubclass(value, BaseModel)
    }


def test_every_request_body_has_an_example_its_model_accepts(openapi: Schema) -> None:
    models = _body_models()
    checked = 0
    for method, path, operation in _operations(openapi):
        if "requestBody" not in operation:
            continue
        where = f"{method.upper()} {path}"
        examples = body_examples(openapi, operation)
        assert examples, f"{where}: its request body has no example"
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        refs = re.findall(r'"#/components/schemas/(\w+)"', json.dumps(schema))
        for ref in refs:
            for example in _examples_of(openapi, {"$ref": f"#/components/schemas/{ref}"}):
                models[ref].model_validate_json(json.dumps(example))
                checked += 1
    assert checked >= 6


def test_every_schema_example_is_accepted_by_its_model(openapi: Schema) -> None:
    """Replies' examples too: an example cannot drift from its model unnoticed."""
    models = _body_models()
    checked = set()
    for name, schema in openapi["components"]["schemas"].items():
        for example in schema.get("examples", []):
            models[name].model_validate_json(json.dumps(example))
            checked.add(name)
    assert {"ModelIn", "ModelOut", "BookingIn", "BookingOut", "RouteOut", "ServerOut"} <= checked


def test_the_documented_examples_work_against_the_app(
    openapi: Schema, make_client: AppFactory, tmp_path: Path
) -> None:
    """The scenario example loads; the route's query examples and the booking examples then
    get a route and a session; the model example is accepted by PUT /v1/model."""
    client: TestClient = make_client(f"sqlite:///{tmp_path / 'examples.db'}")
    paths = openapi["paths"]
    (scenario,) = body_examples(openapi, paths["/v1/scenario"]["post"])
    loaded = client.post("/v1/scenario", json=scenario, headers=admin())
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["generation"] >= 1
    query = {
        parameter["name"]: parameter["schema"]["examples"][0]
        for parameter in paths["/v1/routes"]["get"]["parameters"]
    }
    route = client.get("/v1/routes", params=query)
    assert route.status_code == 200, route.text
    assert route.json()["hops"]
    for booking in body_examples(openapi, paths["/v1/sessions"]["post"]):
        booked = client.post("/v1/sessions", json=booking)
        assert booked.status_code == 201, (booking, booked.text)
    for model in body_examples(openapi, paths["/v1/model"]["put"]):
        reply = client.put("/v1/model", json=model, headers=admin())
        assert reply.status_code == 200, reply.text


def test_only_operations_that_validate_input_declare_422(openapi: Schema) -> None:
    """422 is declared by the operations with a request body or parameters (those that can
    fail validation), and by no other: GET /v1/model cannot answer it."""
    without_input = []
    for method, path, operation in _operations(openapi):
        where = f"{method.upper()} {path}"
        takes_input = "requestBody" in operation or bool(operation.get("parameters"))
        assert ("422" in operation["responses"]) == takes_input, where
        if not takes_input:
            without_input.append(where)
    assert {"GET /v1/model", "GET /v1/servers", "GET /v1/overview"} <= set(without_input)


def test_tokens_are_declared_as_security_schemes_not_header_parameters(openapi: Schema) -> None:
    """Swagger UI sends a token only through a security scheme (OpenAPI ignores a header
    parameter named Authorization): every operation whose description asks for a token
    declares a scheme; the booking's client token is optional (an empty requirement too)."""
    schemes = openapi["components"]["securitySchemes"]
    assert {"HTTPBearer", "ClientBearer"} <= set(schemes)
    for scheme in schemes.values():
        assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    text = schemes["HTTPBearer"]["description"]
    for token in ("admin token", "join token", "server's own token", "session's token"):
        assert token in text, token
    secured = 0
    for method, path, operation in _operations(openapi):
        where = f"{method.upper()} {path}"
        headers = {
            p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"
        }
        assert "authorization" not in headers, where
        if "**Token**:" in operation["description"]:
            assert operation.get("security"), f"{where}: asks for a token, declares no scheme"
            secured += 1
    assert secured >= 10
    booking = openapi["paths"]["/v1/sessions"]["post"]["security"]
    assert {} in booking and {"ClientBearer": []} in booking


_IN_REQUEST: ContextVar[bool] = ContextVar("in_request", default=False)


def _example_request(
    method: str, path: str, operation: Schema, spec: Schema, ids: dict[str, str]
) -> dict[str, Any]:
    """A request to an operation from its documentation: path ids that exist, the required
    query parameters' examples, the request body's first example."""
    query = {
        p["name"]: (p.get("examples") or p["schema"]["examples"])[0]
        for p in operation.get("parameters", [])
        if p["in"] == "query" and p.get("required")
    }
    request: dict[str, Any] = {
        "method": method.upper(),
        "url": re.sub(r"\{([a-z_]+)\}", lambda m: ids[m.group(1)], path),
        "params": query,
    }
    if "requestBody" in operation:
        request["json"] = body_examples(spec, operation)[0]
    return request


def test_every_operation_that_opens_the_database_declares_503(
    make_client: AppFactory, clock: FakeClock, tmp_path: Path
) -> None:
    """An unreachable database is a 503 with Retry-After: every operation that takes a
    database connection while it is served (recorded at the connection pool, for this
    request only, not the app's background threads) declares that 503. Each operation is
    called as its documentation shows (its examples, ids that exist, the token it asks for)."""
    clock.now = 1_764_530_000.0  # the examples' boot epochs (ms) are not ahead of it
    client = make_client(f"sqlite:///{tmp_path / 'db.db'}")
    spec: Schema = client.app.openapi()  # type: ignore[attr-defined]
    (scenario,) = body_examples(spec, spec["paths"]["/v1/scenario"]["post"])
    loaded = client.post("/v1/scenario", json=scenario, headers=admin())
    assert loaded.status_code == 201, loaded.text
    server_tokens = {s["id"]: s["token"] for s in loaded.json()["servers"]}
    server_id = next(iter(server_tokens))
    booking = body_examples(spec, spec["paths"]["/v1/sessions"]["post"])[0]
    booked = client.post("/v1/sessions", json=booking)
    assert booked.status_code == 201, booked.text
    ids = {"server_id": server_id, "session_id": booked.json()["id"], "generation": "1"}
    tokens = {
        "/v1/servers/{server_id}/heartbeat": server_tokens[server_id],
        "/v1/servers": JOIN,
    }

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        marked = _IN_REQUEST.set(True)
        try:
            await client.app(scope, receive, send)
        finally:
            _IN_REQUEST.reset(marked)

    opened: list[bool] = []

    def checkout(*_: Any) -> None:
        if _IN_REQUEST.get():
            opened.append(True)

    # Destructive operations last: the swarm's servers and session must exist until then.
    def order(item: tuple[str, str, Schema]) -> tuple[bool, bool]:
        method, path, _ = item
        return method == "delete", (method, path) == ("post", "/v1/scenario")

    recorder = TestClient(recording)
    event.listen(Pool, "checkout", checkout)
    try:
        found = {}
        for method, path, operation in sorted(_operations(spec), key=order):
            request = _example_request(method, path, operation, spec, ids)
            token = tokens.get(path, ADMIN) if operation.get("security") else None
            if token is not None and "ClientBearer" not in json.dumps(operation["security"]):
                request["headers"] = bearer(token)
            opened.clear()
            reply = recorder.request(**request)
            assert reply.status_code != 500, (method, path, reply.text)
            found[f"{method.upper()} {path}"] = (bool(opened), operation)
    finally:
        event.remove(Pool, "checkout", checkout)
    reading = {where for where, (used, _) in found.items() if used}
    assert {"GET /v1/model", "GET /v1/overview", "PUT /v1/model", "POST /v1/servers"} <= reading
    assert {"GET /livez", "GET /v1/routes/recent"}.isdisjoint(reading)
    for where in sorted(reading):
        assert "503" in found[where][1]["responses"], f"{where} opens the database"
