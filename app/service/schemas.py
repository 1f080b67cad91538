"""Request and response bodies of the coordinator (pydantic v2).

Every number is bounded and finite, so that bad input is a 422 naming the field and never
reaches the database as NaN, infinity or an integer that overflows a column.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)


def _tenth_ms(value: float) -> float:
    return round(value, 1)


# A time in a reply: rounded to 0.1 ms (the model's precision; no 2198.2799999999997).
Millis = Annotated[float, PlainSerializer(_tenth_ms, return_type=float)]


def _integral(value: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0 are both integers; strings and booleans are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Int0 = Annotated[int, Field(ge=0, le=2**62), BeforeValidator(_integral)]
_Int1 = Annotated[int, Field(ge=0, le=10_000_000), BeforeValidator(_integral)]
_Int2 = Annotated[int, Field(ge=1, le=100_000), BeforeValidator(_integral)]
_Int3 = Annotated[int, Field(ge=1, le=10_000_000), BeforeValidator(_integral)]
_Int4 = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integral)]
_Int5 = Annotated[int, Field(ge=0, le=100_000), BeforeValidator(_integral)]
_Int6 = Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(_integral)]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$")]
SMALLEST = 1e-9  # below this (subnormals included) a measurement is noise that overflows sums


def _zero_or_normal(value: float) -> float:
    if 0 < value < SMALLEST:
        raise ValueError(f"must be 0 or at least {SMALLEST:g}")
    return value


NonNegative = Annotated[
    float, Field(ge=0, le=1e12, allow_inf_nan=False), AfterValidator(_zero_or_normal)
]
Positive = Annotated[float, Field(ge=SMALLEST, le=1e12, allow_inf_nan=False)]
Epoch = _Int0
# A libp2p peer id (base58, as PETALS prints it) and its multiaddrs ("/ip4/.../tcp/.../p2p/...").
PeerId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]
Multiaddr = Annotated[str, Field(min_length=2, max_length=500, pattern=r"^/[!-~]+$")]
Multiaddrs = Annotated[list[Multiaddr], Field(max_length=16)]
Tokens = _Int1


def text_problem(value: Any, path: str = "") -> str | None:
    """The first string (key or value) in ``value`` that no database stores faithfully: a
    lone surrogate (not UTF-8) or a NUL character (PostgreSQL text refuses it), named by its
    path; None when there is none."""
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path or 'body'}: contains a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path or 'body'}: contains a lone surrogate (not valid Unicode text)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            problem = text_problem(key, where) if isinstance(key, str) else None
            problem = problem or text_problem(item, where)
            if problem:
                return problem
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            problem = text_problem(item, f"{path}[{i}]")
            if problem:
                return problem
    return None


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any) -> Any:
        problem = text_problem(data)
        if problem:
            raise ValueError(problem)
        return data


class ErrorOut(BaseModel):
    detail: str


class ValidationErrorOut(BaseModel):
    """422: a message naming the field, or FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]]


class Overheads(Body):
    per_token_ms: NonNegative = 0.0
    prefill_fixed_ms: NonNegative = 0.0
    prefill_per_token_ms: NonNegative = 0.0
    per_request_ms: NonNegative = 0.0


class ModelIn(Body):
    name: Name
    num_blocks: _Int2
    block_memory_gb: Positive
    kv_bytes_per_token_per_block: Annotated[float, Field(ge=1, le=1e12, allow_inf_nan=False)]
    max_input_tokens: Tokens
    max_output_tokens: _Int3
    hidden_size: _Int3 | None = None
    petals_cache_tokens: _Int3 | None = None
    overheads: Overheads = Overheads()
    concurrency: _Int4 | None = None
    rate_per_s: Annotated[float, Field(ge=SMALLEST, le=1e6, allow_inf_nan=False)] | None = None


class ModelOut(ModelIn):
    model_config = ConfigDict(extra="ignore")
    updated_at: float


class PrefillSpeed(Body):
    fixed: NonNegative = 0.0
    per_token: NonNegative = 0.0


class SpanModel(Body):
    start: _Int5
    end: _Int2

    @model_validator(mode="after")
    def _ordered(self) -> SpanModel:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


class ServerRegistration(Body):
    id: Name | None = None
    site: Name
    gpu: Annotated[str, Field(max_length=200)] | None = None
    memory_gb: Positive
    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed = PrefillSpeed()
    network_mbps: Positive | None = None
    address: Annotated[str, Field(min_length=1, max_length=500)]
    boot_epoch: Epoch
    peer_id: PeerId | None = None
    multiaddrs: Multiaddrs = []


class RegistrationOut(BaseModel):
    id: str
    token: str
    lease_ttl_s: float
    heartbeat_interval_s: float


class Heartbeat(Body):
    boot_epoch: Epoch
    state: Literal["joining", "online", "draining"]
    loaded_span: SpanModel | None = None
    free_cache_slots: _Int6 | None = None
    decode_ms_per_block: Positive | None = None
    prefill_ms_per_block: PrefillSpeed | None = None
    rtts: Annotated[dict[Name, NonNegative], Field(max_length=10_000)] = {}


class HeartbeatOut(BaseModel):
    server_id: str
    generation: int
    assigned_span: SpanModel | None
    lease_expires_in_s: float
    heartbeat_interval_s: float


class ServerOut(BaseModel):
    id: str
    site: str
    gpu: str | None
    memory_gb: float
    decode_ms_per_block: float
    prefill_ms_per_block: PrefillSpeed
    network_mbps: float | None
    address: str
    boot_epoch: int
    state: str
    lease: Literal["live", "expired"]
    lease_expires_in_s: float
    loaded_span: SpanModel | None
    assigned_span: SpanModel | None
    cache_slots: int
    reserved_slots: int
    free_cache_slots: int | None
    peer_id: str | None = None
    multiaddrs: list[str] = []


class RttEntry(Body):
    a: Name
    b: Name
    rtt_ms: NonNegative


class RttsIn(Body):
    entries: Annotated[list[RttEntry], Field(min_length=1, max_length=100_000)]


class RttsOut(BaseModel):
    updated: int


class PlacementRequest(Body):
    algorithm: Literal["auto", "chains", "cg", "milp", "petals"] = "auto"
    concurrency: _Int2 | None = None
    time_limit_s: Annotated[float, Field(ge=0.01, le=3600, allow_inf_nan=False)] | None = None


class PlacedSpan(BaseModel):
    server_id: str
    start: int
    end: int


class PlacementOut(BaseModel):
    generation: int
    algorithm: str
    concurrency: int
    objective_ms_per_token: Millis
    bound_ms_per_token: Millis | None
    status: str
    solve_seconds: float
    reason: str
    created_at: float
    spans: list[PlacedSpan]
    inputs: dict[str, Any]


class RouteHop(BaseModel):
    server_id: str
    address: str
    start: int
    end: int
    # The server's PETALS identity (None / [] when it registered none).
    peer_id: str | None = None
    multiaddrs: list[str] = []


class RouteOut(BaseModel):
    generation: int
    client_site: str
    hops: list[RouteHop]
    first_token_ms: Millis
    per_token_ms: Millis
    total_ms: Millis
    wait_ms: Millis


class SessionIn(Body):
    client_site: Name
    input_tokens: Tokens
    output_tokens: _Int3


class SessionOut(BaseModel):
    id: str
    expires_in_s: float
    route: RouteOut


class LoadedServer(BaseModel):
    id: str
    token: str


class ScenarioLoadOut(BaseModel):
    servers: list[LoadedServer]
    generation: int


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    database: bool
    schema_at_head: bool
    detail: str | None = None
