"""Small hand-made swarms for the simulator tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.allocation.scenario import Scenario, parse_scenario
from app.simulation.workload import Workload


def two_server_scenario(**overrides: Any) -> Scenario:
    """Two servers at one site (RTT 10 ms), two blocks, room for one request's cache each.

    s_m = 1 GB, s_c = 1e8 B x (4 + 3) tokens = 0.7 GB, M = 2.05 GB: one block plus exactly one
    cache slot. Prefill per block 5 + 0.5 x 4 = 7 ms, decode 2 ms per block, no overheads.
    """
    data: dict[str, Any] = {
        "name": "two-servers",
        "model": {
            "name": "toy",
            "num_blocks": 2,
            "block_memory_gb": 1.0,
            "kv_bytes_per_token_per_block": 1e8,
        },
        "requests": {"max_input_tokens": 4, "max_output_tokens": 3},
        "sites": ["a"],
        "site_rtt_ms": [[10]],
        "servers": [
            {
                "id": f"s{j}",
                "site": "a",
                "memory_gb": 2.05,
                "decode_ms_per_block": 2.0,
                "prefill_ms_per_block": {"fixed": 5.0, "per_token": 0.5},
            }
            for j in range(2)
        ],
        "clients": [{"id": "c0", "site": "a"}],
    }
    data.update(overrides)
    return parse_scenario(data)


def fixed_workload(
    arrivals: list[float], inputs: int = 4, outputs: int = 3, clients: list[int] | None = None
) -> Workload:
    n = len(arrivals)
    return Workload(
        arrival_ms=np.array(arrivals, dtype=np.float64),
        client=np.array(clients or [0] * n, dtype=np.int64),
        input_tokens=np.full(n, inputs, dtype=np.int64),
        output_tokens=np.full(n, outputs, dtype=np.int64),
        description="fixed",
    )
