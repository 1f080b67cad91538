"""The client package's wire models (bprr_client.models, on the pydantic.v1 API) against the
coordinator's OpenAPI schema (issue 13): the same field names, compatible JSON types,
nullability and enumerations, the required fields sent, and no bound of the client's tighter
than the app's (numbers' minimum/maximum, strings' lengths and patterns). A field added to
either side without the other fails here.

Replies (the client parses them): whatever the coordinator may send, the client accepts.
Requests (the client sends them): whatever the client may send, the coordinator accepts, and
every field the coordinator requires is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from bprr_client import models
from bprr_client.models import WireModel
from pydantic.v1 import BaseModel as V1Model
from pydantic.v1 import Field

from app.api.app import create_app
from tests.api.conftest import make_settings

Schema = dict[str, Any]
Direction = Literal["reply", "request"]


@dataclass(frozen=True)
class Contract:
    """A client model and the app's component schema it mirrors."""

    app_schema: str
    direction: Direction
    # Fields the client adds to the body outside the model (the agent adds its boot epoch).
    added: frozenset[str] = frozenset()
    # A model that carries only some of the app schema's fields (a part of a body).
    fragment: bool = False
    # Nested models also travel the other way (a span is read and reported back).
    both_ways: bool = False
    # Sent with to_json(exclude_none=True): a None field is left out, never sent as null.
    omits_none: bool = False


# Every wire model of bprr_client.models -> the coordinator's schema (the explicit mapping).
CONTRACTS: dict[str, Contract] = {
    "Span": Contract("SpanModel", "reply", both_ways=True),
    "PrefillSpeed": Contract("PrefillSpeed", "reply", both_ways=True),
    "Registration": Contract("RegistrationOut", "reply"),
    "HeartbeatReply": Contract("HeartbeatOut", "reply"),
    "Server": Contract("ServerOut", "reply"),
    "RouteHop": Contract("RouteHop", "reply"),
    "Route": Contract("RouteOut", "reply"),
    "Session": Contract("BookingOut", "reply"),
    "ServerInfo": Contract(
        "ServerRegistration", "request", added=frozenset({"boot_epoch", "state"}), omits_none=True
    ),
    "Heartbeat": Contract("Heartbeat", "request", omits_none=True),
    "RttEntry": Contract("RttEntry", "request"),
    "SessionRequest": Contract("BookingIn", "request"),
    # A speeds file: the speed fields a heartbeat re-reports.
    "Speed": Contract("Heartbeat", "request", fragment=True),
}
_NUMBER = {"integer", "number"}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    url = f"sqlite:///{tmp_path_factory.mktemp('contract') / 'bprr.db'}"
    spec: Schema = create_app(make_settings(url), background=False).openapi()
    return spec


def _wire_models() -> dict[str, type[WireModel]]:
    return {
        name: value
        for name, value in vars(models).items()
        if isinstance(value, type)
        and issubclass(value, WireModel)
        and not name.startswith("_")
        and name != "WireModel"
    }


def _app_component(spec: Schema, name: str) -> Schema:
    schemas: Schema = spec["components"]["schemas"]
    for candidate in (name, f"{name}-Output", f"{name}-Input"):
        if candidate in schemas:
            found: Schema = schemas[candidate]
            return found
    raise KeyError(f"the app's OpenAPI schema has no component {name!r}")


def _kinds(schema: Schema) -> tuple[set[str], set[str]]:
    """The JSON types a schema admits ("ref:Name" for a model) and its enumeration (empty:
    any value of those types)."""
    kinds: set[str] = set()
    enum: set[str] = set()
    parts = [schema]
    while parts:
        part = parts.pop()
        for key in ("anyOf", "oneOf", "allOf"):
            parts.extend(part.get(key, []))
        if "$ref" in part:
            kinds.add("ref:" + part["$ref"].rsplit("/", 1)[-1].removesuffix("-Output"))
        kind = part.get("type")
        if isinstance(kind, list):
            kinds.update(kind)
        elif kind is not None:
            kinds.add(kind)
        enum.update(str(value) for value in part.get("enum", []))
        if "const" in part:
            enum.add(str(part["const"]))
    return kinds, enum


def _covers(wide: set[str], narrow: set[str]) -> set[str]:
    """The kinds of ``narrow`` that ``wide`` does not admit (an integer is a number)."""
    missing = set()
    for kind in narrow:
        if kind in wide or (kind == "integer" and "number" in wide):
            continue
        missing.add(kind)
    return missing


def _client_field(model: type[V1Model], schema: Schema, name: str) -> tuple[set[str], set[str]]:
    kinds, enum = _kinds(schema["properties"][name])
    kinds = {
        f"ref:{CONTRACTS[k[4:]].app_schema}" if k.startswith("ref:") and k[4:] in CONTRACTS else k
        for k in kinds
    }
    if model.__fields__[name].allow_none:
        kinds.add("null")
    return kinds, enum


def _items(schema: Schema) -> Schema | None:
    for part in [schema, *schema.get("anyOf", [])]:
        if part.get("type") == "array":
            items: Schema = part.get("items", {})
            return items
    return None


_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
_STRINGS = ("minLength", "maxLength", "pattern")


def _constraints(schema: Schema) -> Schema:
    """A field's bounds, from its schema or the non-null part of a union (an optional field:
    pydantic 1 writes the bounds on the field, pydantic 2 inside ``anyOf``)."""
    found: Schema = {}
    parts = [schema]
    while parts:
        part = parts.pop()
        for key in ("anyOf", "oneOf", "allOf"):
            parts.extend(part.get(key, []))
        found.update({key: part[key] for key in (*_BOUNDS, *_STRINGS) if key in part})
    return found


def _end(bounds: Schema, inclusive: str, exclusive: str) -> tuple[float, bool] | None:
    """One end of a number's range as (value, exclusive), the tighter when both are given."""
    ends = [
        (float(bounds[key]), key == exclusive) for key in (inclusive, exclusive) if key in bounds
    ]
    if not ends:
        return None
    if inclusive == "minimum":  # the largest lower end; exclusive wins a tie
        return max(ends, key=lambda end: (end[0], end[1]))
    return min(ends, key=lambda end: (end[0], not end[1]))


def bound_problems(client: Schema, app: Schema) -> list[str]:
    """Where the client declares a bound tighter than the app's: it would refuse a value the
    app accepts (a request the coordinator would serve, a reply it may send)."""
    c, a = _constraints(client), _constraints(app)
    problems = []
    c_low, a_low = _end(c, "minimum", "exclusiveMinimum"), _end(a, "minimum", "exclusiveMinimum")
    if c_low is not None and (
        a_low is None or c_low[0] > a_low[0] or (c_low == (a_low[0], True) and not a_low[1])
    ):
        problems.append(f"lower bound {c_low} is tighter than the app's {a_low}")
    c_high, a_high = _end(c, "maximum", "exclusiveMaximum"), _end(a, "maximum", "exclusiveMaximum")
    if c_high is not None and (
        a_high is None or c_high[0] < a_high[0] or (c_high == (a_high[0], True) and not a_high[1])
    ):
        problems.append(f"upper bound {c_high} is tighter than the app's {a_high}")
    if c.get("minLength", 0) > a.get("minLength", 0):
        problems.append(f"minLength {c['minLength']} > the app's {a.get('minLength', 0)}")
    if "maxLength" in c and c["maxLength"] < a.get("maxLength", float("inf")):
        problems.append(f"maxLength {c['maxLength']} < the app's {a.get('maxLength')}")
    if "pattern" in c and c["pattern"] != a.get("pattern"):
        problems.append(f"pattern {c['pattern']!r} is not the app's {a.get('pattern')!r}")
    return problems


def contract_problems(
    spec: Schema, client_name: str, model: type[V1Model], contract: Contract
) -> list[str]:
    """What breaks the contract between a client model and its app schema (empty: none)."""
    problems: list[str] = []
    app = _app_component(spec, contract.app_schema)
    app_fields: Schema = app.get("properties", {})
    client = model.schema()
    client_fields: Schema = client["properties"]
    where = f"{client_name} ~ {contract.app_schema}"
    for name in sorted(set(client_fields) - set(app_fields)):
        problems.append(f"{where}: the client has {name!r}, the app does not")
    if not contract.fragment:
        for name in sorted(set(app_fields) - set(client_fields) - contract.added):
            problems.append(f"{where}: the app has {name!r}, the client does not")
    directions = {"reply", "request"} if contract.both_ways else {contract.direction}
    for name in sorted(set(client_fields) & set(app_fields)):
        client_kinds, client_enum = _client_field(model, client, name)
        if contract.omits_none:
            client_kinds.discard("null")
        app_kinds, app_enum = _kinds(app_fields[name])
        pairs = [(client_kinds, app_kinds, client_enum, app_enum, "reply")]
        pairs.append((app_kinds, client_kinds, app_enum, client_enum, "request"))
        for wide, narrow, wide_enum, narrow_enum, direction in pairs:
            if direction not in directions:
                continue
            missing = _covers(wide, narrow)
            if missing:
                problems.append(f"{where}.{name} ({direction}): {sorted(missing)} not accepted")
            if wide_enum and not narrow_enum <= wide_enum:
                problems.append(
                    f"{where}.{name} ({direction}): values {sorted(narrow_enum - wide_enum)} "
                    "not accepted"
                )
        for problem in bound_problems(client_fields[name], app_fields[name]):
            problems.append(f"{where}.{name}: {problem}")
        client_items, app_items = _items(client_fields[name]), _items(app_fields[name])
        if client_items is not None and app_items is not None:
            item_kinds = {
                f"ref:{CONTRACTS[k[4:]].app_schema}" if k[4:] in CONTRACTS else k
                for k in _kinds(client_items)[0]
            }
            if item_kinds != _kinds(app_items)[0] and not (
                item_kinds <= _NUMBER and _kinds(app_items)[0] <= _NUMBER
            ):
                problems.append(f"{where}.{name}: items {item_kinds} ~ {_kinds(app_items)[0]}")
    if contract.direction == "request" and not contract.fragment:
        sent_always = set(client.get("required", [])) | contract.added
        for name in sorted(set(app.get("required", [])) - sent_always):
            problems.append(f"{where}: the app requires {name!r}, the client may not send it")
    if contract.direction == "reply":
        for name in sorted(set(client.get("required", [])) - set(app.get("required", []))):
            problems.append(f"{where}: the client requires {name!r}, the app may omit it")
    return problems


def test_every_client_wire_model_is_mapped_to_an_app_schema(openapi: Schema) -> None:
    assert set(_wire_models()) == set(CONTRACTS)
    for contract in CONTRACTS.values():
        assert _app_component(openapi, contract.app_schema)["type"] == "object"


@pytest.mark.parametrize("client_name", sorted(CONTRACTS))
def test_the_client_model_matches_the_app_schema(openapi: Schema, client_name: str) -> None:
    model = _wire_models()[client_name]
    assert contract_problems(openapi, client_name, model, CONTRACTS[client_name]) == []


def test_the_contract_check_finds_drift(openapi: Schema) -> None:
    """Not vacuous: the drift issue 13 found (Server without prefill_ms_per_block and
    network_mbps), a renamed request field and a narrower enumeration are all reported."""

    class OldServer(models._Reply):
        id: str
        site: str
        gpu: str | None = None
        memory_gb: float
        decode_ms_per_block: float
        address: str
        boot_epoch: int
        state: str
        lease: Literal["live"]
        lease_expires_in_s: float
        loaded_span: models.Span | None = None
        assigned_span: models.Span | None = None
        cache_slots: int = 0
        reserved_slots: int = 0
        free_cache_slots: int | None = None
        peer_id: str | None = None
        multiaddrs: list[str] = Field(default_factory=list)

    class RenamedRequest(models._Request):
        site: str  # the app calls it client_site
        input_tokens: int
        output_tokens: int

    old = contract_problems(openapi, "Server", OldServer, CONTRACTS["Server"])
    assert "Server ~ ServerOut: the app has 'prefill_ms_per_block', the client does not" in old
    assert "Server ~ ServerOut: the app has 'network_mbps', the client does not" in old
    assert any("lease (reply): values ['expired'] not accepted" in p for p in old), old
    renamed = contract_problems(
        openapi, "SessionRequest", RenamedRequest, CONTRACTS["SessionRequest"]
    )
    assert "SessionRequest ~ BookingIn: the client has 'site', the app does not" in renamed
    assert any("requires 'client_site'" in p for p in renamed), renamed


def test_the_contract_check_finds_tighter_bounds(openapi: Schema) -> None:
    """A client bound tighter than the app's is reported (the wait_s <= 300 the client had
    while the coordinator takes up to 3600); looser ones are not."""

    class TightRequest(models._Request):
        client_site: str = Field(..., max_length=100, regex=r"^[a-z]+$")
        input_tokens: int = Field(..., ge=1)  # the app: >= 0
        output_tokens: int = Field(..., gt=0)  # the app: >= 1; looser, not reported
        wait_s: float = Field(0.0, ge=-1, le=300)

    problems = contract_problems(
        openapi, "SessionRequest", TightRequest, CONTRACTS["SessionRequest"]
    )
    where = "SessionRequest ~ BookingIn"
    assert problems == [
        f"{where}.client_site: maxLength 100 < the app's 200",
        f"{where}.client_site: pattern '^[a-z]+$' is not the app's '^[A-Za-z0-9._:@-]+$'",
        f"{where}.input_tokens: lower bound (1.0, False) is tighter than the app's (0.0, False)",
        f"{where}.wait_s: upper bound (300.0, False) is tighter than the app's (3600.0, False)",
    ]


@pytest.mark.parametrize(
    ("client", "app", "tighter"),
    [
        ({"exclusiveMinimum": 0}, {"minimum": 1e-9}, False),
        ({"minimum": 0}, {"exclusiveMinimum": 0}, False),
        ({"exclusiveMinimum": 0}, {"minimum": 0}, True),
        ({"maximum": 10}, {}, True),
        ({"anyOf": [{"maximum": 10}, {"type": "null"}]}, {"maximum": 10}, False),
        ({"maximum": 10}, {"anyOf": [{"maximum": 20}, {"type": "null"}]}, True),
        ({"minLength": 1}, {"minLength": 1, "maxLength": 5}, False),
        ({"maxLength": 9}, {"maxLength": 5}, False),
    ],
)
def test_bound_comparison(client: Schema, app: Schema, tighter: bool) -> None:
    assert bool(bound_problems(client, app)) is tighter


def test_the_client_parses_a_real_server_listing(tmp_path: Path) -> None:
    """The mirrored fields carry the coordinator's values (not only their names)."""
    from fastapi.testclient import TestClient

    from tests.api.conftest import JOIN, bearer

    app = create_app(make_settings(f"sqlite:///{tmp_path / 'bprr.db'}"), background=False)
    info = models.ServerInfo(
        id="s0",
        site="east",
        memory_gb=80.0,
        decode_ms_per_block=3.2,
        prefill_ms_per_block=models.PrefillSpeed(fixed=33.0, per_token=0.07),
        network_mbps=10_000.0,
        address="10.0.0.1:31337",
    )
    body = {**info.to_json(exclude_none=True), "boot_epoch": 1}
    with TestClient(app) as http:
        assert http.post("/v1/servers", json=body, headers=bearer(JOIN)).status_code == 201
        (server,) = [models.Server.parse(item) for item in http.get("/v1/servers").json()]
    assert server.prefill_ms_per_block == models.PrefillSpeed(fixed=33.0, per_token=0.07)
    assert server.network_mbps == 10_000.0
