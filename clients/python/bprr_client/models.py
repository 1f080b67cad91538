"""The coordinator's wire format (``/v1``), mirrored for clients.

Requests are strict (unknown fields are a bug in this package); replies ignore fields this
version does not know, so that a newer coordinator does not break an older agent.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
ServerState = Literal["joining", "online", "draining"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Span(BaseModel):
    """Blocks ``[start, end)`` (0-based, half-open), as the coordinator assigns them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    start: Annotated[int, Field(ge=0)]
    end: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class PrefillSpeed(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    fixed: NonNegative = 0.0
    per_token: NonNegative = 0.0


class Speed(_Request):
    """A fresh speed measurement: decode and prefill time per block (ms)."""

    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed | None = None


class ServerInfo(_Request):
    """What a server tells the coordinator when it registers (POST /v1/servers), less the
    boot epoch, which the agent chooses."""

    id: Name | None = None
    site: Name
    gpu: Annotated[str, Field(max_length=200)] | None = None
    memory_gb: Positive
    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed = PrefillSpeed()
    network_mbps: Positive | None = None
    address: Annotated[str, Field(min_length=1, max_length=500)]


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
    id: str
    site: str
    gpu: str | None = None
    memory_gb: float
    decode_ms_per_block: float
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


class RttEntry(_Request):
    a: Name
    b: Name
    rtt_ms: NonNegative


class RouteHop(_Reply):
    server_id: str
    address: str
    start: int
    end: int


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


class Session(_Reply):
    id: str
    expires_in_s: float
    route: Route
