"""Builders for small scenarios used across the test suite."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from app.allocation.scenario import Scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
CLUSTERED = ROOT / "examples" / "paper-clustered-9.json"


def scenario_dict(
    *,
    num_blocks: int = 4,
    block_gb: float = 1.0,
    kv_bytes: float = 1e6,
    input_tokens: int = 50,
    output_tokens: int = 50,
    servers: list[dict[str, Any]] | None = None,
    clients: list[dict[str, Any]] | None = None,
    sites: list[str] | None = None,
    site_rtt: Any = None,
    overheads: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A valid scenario as a plain dict. With the defaults s_c = 1e6 x 100 / 1e9 = 0.1 GB."""
    sites = sites or ["a", "b"]
    if site_rtt is None:
        site_rtt = [
            [10.0 if i == j else 50.0 for j in range(len(sites))] for i in range(len(sites))
        ]
    if servers is None:
        servers = [
            server("s0", "a", memory=3.0, decode=2.0),
            server("s1", "b", memory=3.0, decode=1.0),
        ]
    return {
        "name": "tiny",
        "model": {
            "name": "toy",
            "num_blocks": num_blocks,
            "block_memory_gb": block_gb,
            "kv_bytes_per_token_per_block": kv_bytes,
        },
        "requests": {"max_input_tokens": input_tokens, "max_output_tokens": output_tokens},
        "sites": sites,
        "site_rtt_ms": site_rtt,
        "servers": servers,
        "clients": clients or [{"id": "c0", "site": sites[0], "share": 1.0}],
        "overheads": overheads or {},
    }


def server(
    server_id: str,
    site: str,
    *,
    memory: float,
    decode: float,
    prefill_fixed: float = 0.0,
    prefill_per_token: float = 0.0,
) -> dict[str, Any]:
    return {
        "id": server_id,
        "site": site,
        "memory_gb": memory,
        "decode_ms_per_block": decode,
        "prefill_ms_per_block": {"fixed": prefill_fixed, "per_token": prefill_per_token},
    }


def build(**kwargs: Any) -> Scenario:
    return parse_scenario(scenario_dict(**kwargs))


def modified(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with the dotted ``path`` (list indices as numbers) set."""
    result = copy.deepcopy(data)
    target: Any = result
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return result
