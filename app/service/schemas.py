"""Request and response bodies of the coordinator (pydantic v2).

Every number is bounded and finite, so that bad input is a 422 naming the field and never
reaches the database as NaN, infinity or an integer that overflows a column.
"""

from __future__ import annotations

import math
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


def _tenth_ms_in_s(value: float) -> float:
    # down, never up: a lease or a session is never promised longer than it lasts
    return math.floor(value * 1e4) / 1e4 if math.isfinite(value) else value


# A time in a reply: rounded to 0.1 ms (the model's precision; no 2198.2799999999997).
Millis = Annotated[float, PlainSerializer(_tenth_ms, return_type=float)]
# A duration in seconds in a reply, to the same 0.1 ms, rounded down (no 14.81291651725769).
Seconds = Annotated[float, PlainSerializer(_tenth_ms_in_s, return_type=float)]


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
    detail: str = Field(
        description="What went wrong, naming the field or the token at fault",
        examples=["missing bearer token (admin token required)"],
    )


class ValidationErrorOut(BaseModel):
    """422: a message naming the field, or FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]] = Field(
        description="A message naming the field, or one entry per field error (its `loc`, "
        "`msg`, `type` and the `input`)",
        examples=["boot_epoch: 5 is more than one hour ahead of the coordinator's clock"],
    )


class Overheads(Body):
    per_token_ms: NonNegative = Field(
        0.0, description="Added to every decode step, per server on the path (ms)"
    )
    prefill_fixed_ms: NonNegative = Field(
        0.0, description="Added to the prefill step, per server on the path (ms)"
    )
    prefill_per_token_ms: NonNegative = Field(
        0.0, description="Added to the prefill step per input token, per server (ms)"
    )
    per_request_ms: NonNegative = Field(0.0, description="Paid once per request (ms)")


_MODEL_EXAMPLE: dict[str, Any] = {
    "name": "bloom-176b",
    "num_blocks": 70,
    "block_memory_gb": 1.3234,
    "kv_bytes_per_token_per_block": 57344,
    "max_input_tokens": 20,
    "max_output_tokens": 128,
    "overheads": {
        "per_token_ms": 100,
        "prefill_fixed_ms": 67,
        "prefill_per_token_ms": 0.7049,
        "per_request_ms": 70,
    },
}


class ModelIn(Body):
    model_config = ConfigDict(json_schema_extra={"examples": [_MODEL_EXAMPLE]})

    name: Name = Field(description="The model's name (as PETALS knows it)")
    num_blocks: _Int2 = Field(description="Transformer blocks, served as spans [start, end)")
    block_memory_gb: Positive = Field(description="GPU memory one block's weights take (GB)")
    kv_bytes_per_token_per_block: Annotated[float, Field(ge=1, le=1e12, allow_inf_nan=False)] = (
        Field(description="Attention (kv) cache of one token on one block (bytes): one cache unit")
    )
    max_input_tokens: Tokens = Field(description="The longest prompt a request may have")
    max_output_tokens: _Int3 = Field(description="The most tokens a request may generate")
    hidden_size: _Int3 | None = Field(
        None,
        description="The model's hidden size (PETALS' memory reserve and wire size; default "
        "kv_bytes_per_token_per_block / 4)",
    )
    petals_cache_tokens: _Int3 | None = Field(
        None,
        description="The attention cache PETALS reserves per hosted block, in tokens (the "
        "PETALS baseline; default 4096, or 16384 with grouped-query attention)",
    )
    overheads: Overheads = Field(
        Overheads(), description="Times added to the servers' own (network stack, framework)"
    )
    concurrency: _Int4 | None = Field(
        None,
        description="The concurrency |R| to plan for (concurrent requests); default: the "
        "design concurrency for rate_per_s, or the coordinator's BPRR_DEFAULT_CONCURRENCY",
    )
    rate_per_s: Annotated[float, Field(ge=SMALLEST, le=1e6, allow_inf_nan=False)] | None = Field(
        None,
        description="Expected request arrival rate (per s), to derive the concurrency from",
    )


class ModelOut(ModelIn):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{**_MODEL_EXAMPLE, "updated_at": 1764530000.0}]},
    )
    updated_at: float = Field(description="When the model was last set (Unix time, s)")


class PrefillSpeed(Body):
    fixed: NonNegative = Field(0.0, description="Prefill time per block, fixed part (ms)")
    per_token: NonNegative = Field(0.0, description="Prefill time per block and input token (ms)")


class SpanModel(Body):
    start: _Int5 = Field(description="The first block (0-based)")
    end: _Int2 = Field(description="One past the last block (the span is [start, end))")

    @model_validator(mode="after")
    def _ordered(self) -> SpanModel:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


# One server in the examples: what it registers with, and then how it is listed.
_SERVER_EXAMPLE: dict[str, Any] = {
    "id": "a100-0",
    "site": "cluster1",
    "gpu": "A100-80GB",
    "memory_gb": 86.13,
    "decode_ms_per_block": 3.2197,
    "prefill_ms_per_block": {"fixed": 32.99, "per_token": 0.0743},
    "network_mbps": 10000.0,
    "address": "10.0.1.5:31337",
    "boot_epoch": 1764530000000,
}


class ServerRegistration(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_SERVER_EXAMPLE,
                    "peer_id": "12D3KooWQp7xmnWy3dE7oDphP1HKvv9J6CqKv5Wq5z3gQ3N1nMaZ",
                    "multiaddrs": ["/ip4/10.0.1.5/tcp/31337"],
                }
            ]
        }
    )

    id: Name | None = Field(
        None, description="The server's id (default: `srv-` and 12 random hex digits)"
    )
    site: Name = Field(description="Where the server runs (RTTs are per site by default)")
    gpu: Annotated[str, Field(max_length=200)] | None = Field(
        None, description="The GPU, for people (e.g. A100-80GB)"
    )
    memory_gb: Positive = Field(description="GPU memory for blocks and cache (GB)")
    decode_ms_per_block: Positive = Field(
        description="Measured time of one decode step on one block (ms)"
    )
    prefill_ms_per_block: PrefillSpeed = Field(
        PrefillSpeed(), description="Measured prefill time per block (ms)"
    )
    network_mbps: Positive | None = Field(
        None, description="Network bandwidth (Mbit/s; the PETALS baseline assumes 100)"
    )
    address: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="Where clients reach the server (host:port)"
    )
    boot_epoch: Epoch = Field(
        description="Grows with each start of the server process (e.g. its start time in "
        "ms): a newer run may take over an expired id; at most one hour ahead of the "
        "coordinator's clock"
    )
    peer_id: PeerId | None = Field(
        None, description="The PETALS server's libp2p peer id (base58), when it runs one"
    )
    multiaddrs: Multiaddrs = Field(
        [], description="The PETALS server's libp2p multiaddrs (at most 16)"
    )
    state: Literal["joining", "draining"] = Field(
        "joining",
        description="`draining`: a server that hosts nothing (an agent without a host) is never "
        "placed, not even for the moment before its first heartbeat",
    )


class RegistrationOut(BaseModel):
    id: str = Field(description="The server's id")
    token: str = Field(
        description="The server's own token (Authorization: Bearer) for heartbeats, leaving "
        "and re-registering; returned once, the coordinator keeps only its hash"
    )
    lease_ttl_s: float = Field(description="How long a lease lasts without a heartbeat (s)")
    heartbeat_interval_s: float = Field(description="How often to send heartbeats (s)")


class Heartbeat(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "boot_epoch": 1764530000000,
                    "state": "online",
                    "loaded_span": {"start": 0, "end": 35},
                    "free_cache_slots": 1200000,
                },
                {
                    "boot_epoch": 1764530000000,
                    "state": "online",
                    "loaded_span": {"start": 0, "end": 35},
                    "decode_ms_per_block": 3.1,
                    "prefill_ms_per_block": {"fixed": 33.5, "per_token": 0.074},
                    "rtts": {"cluster0": 98.4, "a100-1": 4.9},
                },
            ]
        }
    )

    boot_epoch: Epoch = Field(
        description="The epoch the server registered with (an older one is refused: 409)"
    )
    state: Literal["joining", "online", "draining"] = Field(
        description="joining: loading its span; online: serving it; draining: leaving soon "
        "(no new sessions)"
    )
    loaded_span: SpanModel | None = Field(None, description="The blocks it has loaded")
    free_cache_slots: _Int6 | None = Field(
        None, description="Free cache units the server itself reports (informational)"
    )
    decode_ms_per_block: Positive | None = Field(
        None, description="A fresh decode measurement (ms per block), when re-measured"
    )
    prefill_ms_per_block: PrefillSpeed | None = Field(
        None, description="A fresh prefill measurement, when re-measured"
    )
    rtts: Annotated[dict[Name, NonNegative], Field(max_length=10_000)] = Field(
        {}, description="Measured RTTs (ms) to other servers, sites or clients, by their id"
    )


class HeartbeatOut(BaseModel):
    server_id: str = Field(description="The server's id")
    generation: int = Field(description="The published placement's generation (0: none)")
    assigned_span: SpanModel | None = Field(
        description="The blocks that placement assigns this server (load them); null: none"
    )
    lease_expires_in_s: Seconds = Field(description="Time left on the renewed lease (s)")
    heartbeat_interval_s: float = Field(description="When to send the next heartbeat (s)")


class ServerOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_SERVER_EXAMPLE,
                    "state": "online",
                    "lease": "live",
                    "lease_expires_in_s": 12.5,
                    "loaded_span": {"start": 0, "end": 35},
                    "assigned_span": {"start": 0, "end": 35},
                    "cache_slots": 39168000,
                    "reserved_slots": 10360,
                    "free_cache_slots": 39157640,
                    "multiaddrs": [],
                }
            ]
        }
    )

    id: str = Field(description="The server's id")
    site: str = Field(description="Its site")
    gpu: str | None = Field(description="Its GPU, as registered")
    memory_gb: float = Field(description="GPU memory for blocks and cache (GB)")
    decode_ms_per_block: float = Field(description="Decode time per block (ms), latest")
    prefill_ms_per_block: PrefillSpeed = Field(description="Prefill time per block, latest")
    network_mbps: float | None = Field(description="Network bandwidth (Mbit/s), if given")
    address: str = Field(description="Where clients reach it (host:port)")
    boot_epoch: int = Field(description="The epoch of its current run")
    state: str = Field(description="joining, online or draining, as last reported")
    lease: Literal["live", "expired"] = Field(description="Whether its lease is live")
    lease_expires_in_s: Seconds = Field(description="Time left on its lease (s; 0 if expired)")
    loaded_span: SpanModel | None = Field(description="The blocks it reports loaded")
    assigned_span: SpanModel | None = Field(
        description="The blocks the published placement assigns it"
    )
    cache_slots: int = Field(description="Its attention cache, in units (token x block)")
    reserved_slots: int = Field(description="Cache units held by active sessions")
    free_cache_slots: int | None = Field(
        description="Free cache units the server last reported itself (null: none)"
    )
    peer_id: str | None = Field(None, description="Its PETALS peer id, if registered")
    multiaddrs: list[str] = Field([], description="Its PETALS multiaddrs, if registered")


class RttEntry(Body):
    a: Name = Field(description="One end: a server id, a site or a client id")
    b: Name = Field(description="The other end")
    rtt_ms: NonNegative = Field(description="The measured round-trip time (ms)")


class RttsIn(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entries": [
                        {"a": "cluster0", "b": "cluster1", "rtt_ms": 98.5},
                        {"a": "a100-0", "b": "a100-1", "rtt_ms": 0.4},
                    ]
                }
            ]
        }
    )

    entries: Annotated[list[RttEntry], Field(min_length=1, max_length=100_000)] = Field(
        description="The pairs to record (1 to 100000; a pair is unordered)"
    )


class RttsOut(BaseModel):
    updated: int = Field(description="How many pairs were written")


class PlacementRequest(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"algorithm": "auto"},
                {"algorithm": "cg", "concurrency": 8, "time_limit_s": 30},
            ]
        }
    )

    algorithm: Literal["auto", "chains", "cg", "milp", "petals"] = Field(
        "auto",
        description="The placement algorithm: auto (the best of the candidates), chains, cg "
        "(column generation), milp, or petals (PETALS' own greedy rule, a baseline)",
    )
    concurrency: _Int2 | None = Field(
        None, description="The concurrency |R| to plan for (default: the model's)"
    )
    time_limit_s: Annotated[float, Field(ge=0.01, le=3600, allow_inf_nan=False)] | None = Field(
        None, description="The solver's time limit (s; default: the coordinator's)"
    )


class PlacedSpan(BaseModel):
    server_id: str = Field(description="The server")
    start: int = Field(description="Its first block (0-based)")
    end: int = Field(description="One past its last block")


class PlacementOut(BaseModel):
    generation: int = Field(description="The placement's generation (1, 2, ...)")
    algorithm: str = Field(description="The algorithm that produced it")
    concurrency: int = Field(description="The concurrency |R| it was planned for")
    objective_ms_per_token: Millis = Field(
        description="The predicted mean per-token time at that concurrency (ms)"
    )
    bound_ms_per_token: Millis | None = Field(
        description="The solver's lower bound on it (ms), when it proves one"
    )
    status: str = Field(description="The solver's status: optimal, feasible or heuristic")
    solve_seconds: Seconds = Field(description="Time the solver took (s)")
    reason: str = Field(description="Why it was planned (a server joined, the model changed, …)")
    created_at: float = Field(description="When it was published (Unix time, s)")
    spans: list[PlacedSpan] = Field(description="Each placed server's span")
    inputs: dict[str, Any] = Field(
        description="The scenario it was solved from (docs/SCENARIO.md), for replaying it"
    )


# (OpenAPI drops null values, examples included: an example leaves out what would be null.)
ROUTE_EXAMPLE: dict[str, Any] = {
    "generation": 3,
    "client_site": "cluster0",
    "hops": [
        {
            "server_id": "a100-0",
            "address": "10.0.1.5:31337",
            "start": 0,
            "end": 35,
            "multiaddrs": [],
        },
        {
            "server_id": "a100-1",
            "address": "10.0.2.7:31337",
            "start": 35,
            "end": 70,
            "multiaddrs": [],
        },
    ],
    "first_token_ms": 1462.3,
    "per_token_ms": 593.4,
    "total_ms": 76823.1,
    "wait_ms": 0.0,
}


class RouteHop(BaseModel):
    server_id: str = Field(description="The server")
    address: str = Field(description="Where the client reaches it (host:port)")
    start: int = Field(description="The first block it runs for this request")
    end: int = Field(description="One past the last block it runs")
    peer_id: str | None = Field(
        None, description="The server's PETALS peer id (null when it registered none)"
    )
    multiaddrs: list[str] = Field([], description="The server's PETALS multiaddrs")


class RouteOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ROUTE_EXAMPLE]})

    generation: int = Field(description="The placement generation the route comes from")
    client_site: str = Field(description="The client's site, as asked")
    hops: list[RouteHop] = Field(description="The chain, in block order, covering every block")
    first_token_ms: Millis = Field(description="Predicted time to the first token (ms)")
    per_token_ms: Millis = Field(description="Predicted time per further token (ms)")
    total_ms: Millis = Field(description="Predicted time for the whole request (ms)")
    wait_ms: Millis = Field(
        description="Predicted wait for the chain's cache to free up (ms; 0: free now)"
    )


class SessionIn(Body):
    client_site: Name = Field(description="Where the client runs: a site or a client id")
    input_tokens: Tokens = Field(description="Prompt length (tokens)")
    output_tokens: _Int3 = Field(description="Tokens to generate")


class SessionOut(BaseModel):
    id: str = Field(description="The session's id")
    expires_in_s: Seconds = Field(
        description="Until the reservation ends by itself: the predicted end plus a grace "
        "period (s)"
    )
    route: RouteOut = Field(description="The booked route")


class LoadedServer(BaseModel):
    id: str = Field(description="A server of the scenario")
    token: str = Field(description="Its own token (returned once)")


class ScenarioLoadOut(BaseModel):
    servers: list[LoadedServer] = Field(description="The scenario's servers and their tokens")
    generation: int = Field(description="The published placement's generation (0: none)")


class Readiness(BaseModel):
    status: Literal["ready", "not ready"] = Field(description="The verdict")
    database: bool = Field(description="The database answers")
    schema_at_head: bool = Field(description="Its schema is at the migrations' head")
    detail: str | None = Field(None, description="What is wrong, when not ready")
