"""The scenario file (../shared/SCENARIO.md): one JSON document describing a swarm.

Every validation error names the offending field with a dotted path such as
``servers[2].memory_gb`` so that a person can fix the file without reading code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

GB = 1e9
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # shipped traces and tables

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Identifier = Annotated[str, Field(min_length=1, max_length=200)]


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the field."""


class _Strict(BaseModel):
    # Unknown keys are tolerated (the contract allows optional extras) but kept out of the model.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ModelSpec(_Strict):
    name: Identifier
    num_blocks: Annotated[int, Field(ge=1, le=100_000)]
    block_memory_gb: Positive
    kv_bytes_per_token_per_block: Positive
    # PETALS-only extras (see SCENARIO.md); defaults are derived in the properties below.
    hidden_size: Annotated[int, Field(ge=1)] | None = None
    petals_cache_tokens: Annotated[int, Field(ge=1)] | None = None

    @property
    def effective_hidden_size(self) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        # Multi-head attention in fp16: kv bytes = 2 (k and v) x hidden x 2 bytes.
        return max(1, round(self.kv_bytes_per_token_per_block / 4))

    @property
    def effective_petals_cache_tokens(self) -> int:
        if self.petals_cache_tokens is not None:
            return self.petals_cache_tokens
        grouped_query = self.effective_hidden_size * 4 > self.kv_bytes_per_token_per_block
        return 16384 if grouped_query else 4096


class RequestLimits(_Strict):
    max_input_tokens: Annotated[int, Field(ge=0, le=10_000_000)]
    max_output_tokens: Annotated[int, Field(ge=1, le=10_000_000)]


class PrefillSpeed(_Strict):
    fixed: NonNegative = 0.0
    per_token: NonNegative = 0.0

    def at(self, tokens: float) -> float:
        """tau^I(l): prefill time of one block for a prompt of ``tokens`` tokens (ms)."""
        return self.fixed + self.per_token * tokens


class ServerSpec(_Strict):
    id: Identifier
    site: Identifier
    gpu: str | None = None
    memory_gb: Positive
    decode_ms_per_block: Positive
    prefill_ms_per_block: PrefillSpeed
    network_mbps: Positive | None = None


class ClientSpec(_Strict):
    id: Identifier
    site: Identifier
    share: Positive = 1.0


class Overheads(_Strict):
    per_token_ms: NonNegative = 0.0
    prefill_fixed_ms: NonNegative = 0.0
    prefill_per_token_ms: NonNegative = 0.0
    per_request_ms: NonNegative = 0.0


class LengthDistribution(_Strict):
    """Token counts of the requests (mean and quantiles), e.g. measured by the coordinator."""

    mean: NonNegative
    p50: NonNegative
    p90: NonNegative
    p99: NonNegative
    max: NonNegative

    @model_validator(mode="after")
    def _ordered(self) -> LengthDistribution:
        if not self.p50 <= self.p90 <= self.p99 <= self.max:
            raise ValueError("quantiles must satisfy p50 <= p90 <= p99 <= max")
        if self.mean > self.max:
            raise ValueError(f"mean: {self.mean} exceeds max {self.max}")
        return self


class PoissonWorkload(_Strict):
    arrival: Literal["poisson"]
    rate_per_s: Positive
    num_requests: Annotated[int, Field(ge=1, le=100_000_000)]
    seed: int = 0
    # Optional length distributions (docs/SCENARIO.md); without them every request asks for
    # the caps, as the paper does.
    input_tokens: LengthDistribution | None = None
    output_tokens: LengthDistribution | None = None


class TraceWorkload(_Strict):
    trace: Annotated[str, Field(min_length=1)]
    time_scale: Positive = 1.0
    limit: Annotated[int, Field(ge=1)] | None = None


def _workload_kind(value: Any) -> str:
    # Pick the workload form by its keys so errors talk about the form the user meant.
    keys = value.keys() if isinstance(value, dict) else vars(value)
    return "trace" if "trace" in keys else "poisson"


RttTable = dict[str, dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]]]


class Scenario(_Strict):
    name: Identifier = "scenario"
    model: ModelSpec
    requests: RequestLimits
    sites: Annotated[list[Identifier], Field(min_length=1)]
    site_rtt_ms: list[list[Annotated[float, Field(ge=0, allow_inf_nan=False)]]] | RttTable
    rtt_ms: RttTable | None = None
    servers: Annotated[list[ServerSpec], Field(min_length=1)]
    clients: Annotated[list[ClientSpec], Field(min_length=1)]
    overheads: Overheads = Overheads()
    workload: (
        Annotated[
            Annotated[PoissonWorkload, Tag("poisson")] | Annotated[TraceWorkload, Tag("trace")],
            Discriminator(_workload_kind),
        ]
        | None
    ) = None

    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, sites: list[str]) -> list[str]:
        seen: set[str] = set()
        for index, site in enumerate(sites):
            if site in seen:
                raise ValueError(f"sites[{index}]: duplicate site {site!r}")
            seen.add(site)
        return sites

    @model_validator(mode="after")
    def _check_references(self) -> Scenario:
        known_sites = set(self.sites)
        _check_site_matrix(self.sites, self.site_rtt_ms)
        ids: dict[str, str] = {}
        members = [(f"servers[{i}]", s.id, s.site) for i, s in enumerate(self.servers)]
        members += [(f"clients[{i}]", c.id, c.site) for i, c in enumerate(self.clients)]
        for where, member_id, site in members:
            if site not in known_sites:
                raise ValueError(
                    f"{where}.site: unknown site {site!r} (known: {sorted(known_sites)})"
                )
            if member_id in ids:
                raise ValueError(
                    f"{where}.id: duplicate id {member_id!r} (already used by {ids[member_id]})"
                )
            ids[member_id] = where
        if self.rtt_ms is not None:
            for a, row in self.rtt_ms.items():
                for b in row:
                    for end in (a, b):
                        if end not in ids:
                            raise ValueError(f"rtt_ms.{a}.{b}: unknown server or client id {end!r}")
        return self

    # --- derived quantities used throughout the allocation code -------------------------

    @property
    def cache_gb_per_block(self) -> float:
        """s_c: the attention cache one request needs on one block (GB)."""
        return cache_gb_per_block(
            self.model.kv_bytes_per_token_per_block,
            self.requests.max_input_tokens,
            self.requests.max_output_tokens,
        )

    def too_small_servers(self) -> list[int]:
        """Servers that cannot hold one block and one request's cache: they stay idle."""
        one_block = self.model.block_memory_gb + self.cache_gb_per_block
        return [i for i, s in enumerate(self.servers) if s.memory_gb < one_block]

    def warnings(self) -> list[str]:
        """What a person should know about the swarm, without rejecting it."""
        one_block = self.model.block_memory_gb + self.cache_gb_per_block
        return [
            f"servers[{i}] ({self.servers[i].id}): {self.servers[i].memory_gb} GB cannot hold "
            f"one block with one request's cache ({one_block:.4f} GB needed); left idle"
            for i in self.too_small_servers()
        ]

    def site_rtt(self, a: str, b: str) -> float:
        return _site_matrix(self.sites, self.site_rtt_ms)[self.sites.index(a)][self.sites.index(b)]

    def site_matrix(self) -> list[list[float]]:
        """The site RTT matrix in square form, whichever form the file used."""
        return _site_matrix(self.sites, self.site_rtt_ms)

    def client_server_rtt(self) -> list[list[float]]:
        """RTT (ms) between each client (row) and each server (column), overrides applied."""
        matrix = self.site_matrix()
        index = {site: i for i, site in enumerate(self.sites)}
        rows = []
        for client in self.clients:
            row = []
            for server in self.servers:
                value = self.pair_override(client.id, server.id)
                if value is None:
                    value = matrix[index[client.site]][index[server.site]]
                row.append(value)
            rows.append(row)
        return rows

    def pair_override(self, a: str, b: str) -> float | None:
        if not self.rtt_ms:
            return None
        if b in self.rtt_ms.get(a, {}):
            return self.rtt_ms[a][b]
        if a in self.rtt_ms.get(b, {}):
            return self.rtt_ms[b][a]
        return None

    def client_request_counts(self, total: int) -> list[int]:
        """Split ``total`` requests over clients by share with the largest-remainder method."""
        return largest_remainder([c.share for c in self.clients], total)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


def cache_gb_per_block(
    kv_bytes_per_token_per_block: float, input_tokens: int, output_tokens: int
) -> float:
    """s_c = kv bytes per token per block x (l_in + l_max), in GB."""
    return kv_bytes_per_token_per_block * (input_tokens + output_tokens) / GB


def largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integer split of ``total`` proportional to ``weights``; ties go to the earlier entry."""
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    leftover = total - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return counts


def _check_site_matrix(sites: list[str], table: list[list[float]] | RttTable) -> None:
    n = len(sites)
    if isinstance(table, list):
        if len(table) != n:
            raise ValueError(f"site_rtt_ms: matrix has {len(table)} rows but there are {n} sites")
        for i, matrix_row in enumerate(table):
            if len(matrix_row) != n:
                raise ValueError(
                    f"site_rtt_ms[{i}]: row has {len(matrix_row)} entries, expected {n} "
                    "(the matrix must be square, one row and column per site)"
                )
        return
    known = set(sites)
    for a, targets in table.items():
        if a not in known:
            raise ValueError(f"site_rtt_ms.{a}: unknown site {a!r}")
        for b in targets:
            if b not in known:
                raise ValueError(f"site_rtt_ms.{a}.{b}: unknown site {b!r}")
    for i, a in enumerate(sites):
        for b in sites[i + 1 :]:
            if b not in table.get(a, {}) and a not in table.get(b, {}):
                raise ValueError(f"site_rtt_ms.{a}.{b}: missing RTT between {a!r} and {b!r}")


def _site_matrix(sites: list[str], table: list[list[float]] | RttTable) -> list[list[float]]:
    if isinstance(table, list):
        return [list(map(float, row)) for row in table]
    matrix: list[list[float]] = []
    for a in sites:
        row = []
        for b in sites:
            if b in table.get(a, {}):
                row.append(float(table[a][b]))
            elif a in table.get(b, {}):
                row.append(float(table[b][a]))
            else:  # only the diagonal can be missing here (checked above): same site, no delay
                row.append(0.0)
        matrix.append(row)
    return matrix


def format_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field as a dotted path (servers[2].memory_gb)."""
    items = error.errors()
    # A union (site_rtt_ms: matrix or object) reports a type mismatch for the form the user did
    # not write; drop it when the same field has a more specific complaint.
    specific = {item["loc"][:1] for item in items if not item["type"].endswith("_type")}
    items = [i for i in items if not (i["type"].endswith("_type") and i["loc"][:1] in specific)]
    lines = []
    for item in items:
        path = ""
        loc = item["loc"]
        for position, part in enumerate(loc):
            if isinstance(part, int):
                path += f"[{part}]"
            elif str(part).startswith(("list[", "dict[")) or (
                position == 1 and loc[0] == "workload" and part in {"poisson", "trace"}
            ):
                continue  # union branch and discriminator tags are not fields
            else:
                path += f".{part}" if path else str(part)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path and not message.startswith(path) else message)
    # Union members repeat the same complaint; keep each line once, in order.
    return "; ".join(dict.fromkeys(lines))


def parse_scenario(data: Any) -> Scenario:
    try:
        return Scenario.model_validate(data)
    except ValidationError as error:
        raise ScenarioError(format_validation_error(error)) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raises ScenarioError with a one-line reason."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError(f"{path}: cannot read scenario file ({error.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ScenarioError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario must be a JSON object")
    scenario = parse_scenario(data)
    if isinstance(scenario.workload, TraceWorkload):
        trace = resolve_trace(scenario.workload.trace, path.parent)
        workload = scenario.workload.model_copy(update={"trace": str(trace)})
        scenario = scenario.model_copy(update={"workload": workload})
    return scenario


def resolve_trace(trace: str, base: Path | None = None) -> Path:
    """Where a trace named in a scenario lives.

    A relative path is relative to the scenario file (so examples travel); a bare file name
    that is not there is the shipped copy in app/data, wherever the scenario file lives.
    """
    given = Path(trace)
    if given.is_absolute():
        return given
    if base is not None and (base / given).exists():
        return (base / given).resolve()
    if given.exists():
        return given.resolve()
    shipped = DATA_DIR / given.name
    if shipped.exists():
        return shipped
    return (base / given).resolve() if base is not None else given
