"""The coordinator's wire format (``/v1``), mirrored for clients.

Requests are strict (unknown fields are a bug in this package); replies ignore fields this
version does not know, so that a newer coordinator does not break an older agent.

Written against the pydantic 1 API as ``pydantic.v1``, which pydantic 2 ships and pydantic
1.10.17+ aliases: this package then runs beside the coordinator (pydantic 2) and inside a
PETALS process (pydantic 1.10), where the client plugin lives. Callers use ``to_json()`` and
``parse()``, never a version-specific method.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic.v1 import BaseModel, Extra, Field, ValidationError, root_validator

__all__ = ["ValidationError"]

Name = Annotated[str, Field(min_length=1, max_length=200, regex=r"^[A-Za-z0-9._:@-]+$")]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
ServerState = Literal["joining", "online", "draining"]
Model = TypeVar("Model", bound="WireModel")


class WireModel(BaseModel):
    class Config:
        frozen = True

    @classmethod
    def parse(cls: type[Model], data: Any) -> Model:
        """Validate a decoded JSON value (raises ``ValidationError``)."""
        return cls.parse_obj(data)

    def to_json(self, *, exclude_none: bool = False) -> dict[str, Any]:
        """The JSON object (nested models as objects)."""
        value: dict[str, Any] = json.loads(self.json(exclude_none=exclude_none))
        return value

    def dumps(self, indent: int | None = 2) -> str:
        return self.json(indent=indent)


class _Request(WireModel):
    class Config:
        extra = Extra.forbid
        frozen = True


class _Reply(WireModel):
    class Config:
        extra = Extra.ignore
        frozen = True


class Span(_Reply):
    """Blocks ``[start, end)`` (0-based, half-open), as the coordinator assigns them."""

    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=1)]

    @root_validator(skip_on_failure=True)
    def _ordered(cls, values: dict[str, Any]) -> dict[str, Any]:
        if values["end"] <= values["start"]:
            raise ValueError(
                f"end ({values['end']}) must be greater than start ({values['start']})"
            )
        return values

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class PrefillSpeed(_Reply):
    fixed: NonNegative = 0.0
    per_token: NonNegative = 0.0


class Speed(_Request):
    """A fresh speed measurement: decode and prefill time per block (ms)."""

    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed | None = None


class ServerInfo(_Request):
    """What a server tells the coordinator when it registers (POST /v1/servers), less the
    boot epoch, which the agent chooses. ``peer_id`` and ``multiaddrs``: the PETALS
    identity of the server, when it runs one (sent only when known)."""

    id: Name | None = None
    site: Name
    gpu: Annotated[str, Field(max_length=200)] | None = None
    memory_gb: Positive
    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed = PrefillSpeed()
    network_mbps: Positive | None = None
    address: Annotated[str, Field(min_length=1, max_length=500)]
    peer_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    multiaddrs: list[Annotated[str, Field(min_length=1, max_length=500)]] | None = None


class Registration(_Reply):
    id: str
    token: str
    lease_ttl_s: float
    heartbeat_interval_s: float


class Heartbeat(_Request):
    boot_epoch: Annotated[int, Field(ge=0)]
    state: ServerState
    loaded_span: Span | None = None
    free_cache_slots: Annotated[int, Field(ge=0)] | None = None
    decode_ms_per_block: Positive | None = None
    prefill_ms_per_block: PrefillSpeed | None = None
    rtts: dict[str, NonNegative] = {}


class HeartbeatReply(_Reply):
    server_id: str
    generation: int
    assigned_span: Span | None
    lease_expires_in_s: float
    heartbeat_interval_s: float


class Server(_Reply):
    """A registered server as GET /v1/servers lists it. Fields added to the coordinator's
    reply after this package's first release have defaults, so an older coordinator's reply
    still parses."""

    id: str
    site: str
    gpu: str | None = None
    memory_gb: float
    decode_ms_per_block: float
    prefill_ms_per_block: PrefillSpeed = PrefillSpeed()
    network_mbps: float | None = None
    address: str
    boot_epoch: int
    state: str
    lease: Literal["live", "expired"]
    lease_expires_in_s: float
    loaded_span: Span | None = None
    assigned_span: Span | None = None
    cache_slots: int = 0
    reserved_slots: int = 0
    free_cache_slots: int | None = None
    peer_id: str | None = None
    multiaddrs: list[str] = []


class RttEntry(_Request):
    a: Name
    b: Name
    rtt_ms: NonNegative


class RouteHop(_Reply):
    """One server of a chain and its blocks; ``peer_id``/``multiaddrs`` name its PETALS
    server (None on a coordinator that does not know them)."""

    server_id: str
    address: str
    start: int
    end: int
    peer_id: str | None = None
    multiaddrs: list[str] = []


class Route(_Reply):
    generation: int
    client_site: str
    hops: list[RouteHop]
    first_token_ms: float
    per_token_ms: float
    total_ms: float
    wait_ms: float


class SessionRequest(_Request):
    client_site: Name
    input_tokens: Annotated[int, Field(ge=0)]
    output_tokens: Annotated[int, Field(ge=1)]
    # The coordinator's hard ceiling; its configured one (BPRR_QUEUE_MAX_WAIT_S) answers 422.
    wait_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 0.0


class Session(_Reply):
    """A booked session. ``token`` (returned once) authorises its release; None from a
    coordinator that issues no session tokens."""

    id: str
    expires_in_s: float
    route: Route
    token: str | None = None
