"""Seeded scenario generators for the studies: the paper's clustered swarm, random clustered
swarms of any size and A100 share, and a geo-distributed swarm over real Azure RTTs.

Every generator is a pure function of its arguments (a seed included), so a study re-creates
exactly the scenarios it ran; ``bprr experiment`` also writes them next to its CSV.

Geo swarm, how per-block speeds are derived (no profile exists for most of these GPUs):
decoding one token through one block streams the block's weights from GPU memory once, so
decode time per block = block bytes / memory bandwidth (gpu_specs.csv, ``mem_bandwidth_GBps``);
prefill of l tokens per block = the same weight read + l x (FLOPs per token per block) /
dense fp16 tensor throughput (``fp16_bf16_dense_tensor_TFLOPS_fp32acc``). This is the
memory-bound roofline; it ignores kernel overheads, which the measured A100 constants of the
clustered scenario (3.2 ms per NF4 block, ~5x the roofline) include.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.allocation.scenario import Scenario, parse_scenario

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# The paper's profiled constants (BLOOM-176B in NF4 on PETALS; see PAPER.md).
BLOOM = {
    "name": "bloom-176b",
    "num_blocks": 70,
    "block_memory_gb": 1.3234,
    "kv_bytes_per_token_per_block": 57344,
}
A100 = {
    "gpu": "A100-80GB",
    "memory_gb": 86.13,
    "decode_ms_per_block": 3.2197,
    "prefill_ms_per_block": {"fixed": 32.99, "per_token": 0.0743},
}
MIG = {
    "gpu": "A100-MIG-1g.10gb",
    "memory_gb": 9.1,
    "decode_ms_per_block": 16.2488,
    "prefill_ms_per_block": {"fixed": 206.3547, "per_token": 0.1041},
}
OVERHEADS = {
    "per_token_ms": 100,
    "prefill_fixed_ms": 67,
    "prefill_per_token_ms": 0.7049,
    "per_request_ms": 70,
}
GIB_IN_GB = 2**30 / 1e9


def _poisson(rate: float, count: int, seed: int) -> dict[str, Any]:
    return {"arrival": "poisson", "rate_per_s": rate, "num_requests": count, "seed": seed}


CLUSTERED_SITES = ("cluster0", "cluster1", "cluster2")
CLIENT_POSITIONS = {0: "no servers", 1: "with the A100s", 2: "with the MIGs"}


def clustered(
    l_max: int = 128,
    rate_per_s: float = 0.5,
    num_requests: int = 100,
    seed: int = 1,
    input_tokens: int = 20,
    client_cluster: int = 0,
) -> Scenario:
    """The paper's testbed: 2 A100s and 7 MIG slices, 5 ms inside a cluster, 100 ms between.

    Both A100s are in cluster 1, the MIGs in cluster 2, and the single client in cluster
    ``client_cluster``, the authors' ``client_position`` (test_general_case_online.m):
    0 = cluster 0, no servers, 100 ms to all; 1 = with the A100s; 2 = with the MIGs (their
    default). examples/paper-clustered-9.json is this scenario with the defaults (cluster 0).
    """
    if client_cluster not in CLIENT_POSITIONS:
        raise ValueError(f"client_cluster: must be one of {sorted(CLIENT_POSITIONS)}")
    sites = list(CLUSTERED_SITES)
    servers: list[dict[str, Any]] = [
        {"id": "a100-0", "site": "cluster1", **A100},
        {"id": "a100-1", "site": "cluster1", **A100},
    ]
    servers += [{"id": f"mig-{i}", "site": "cluster2", **MIG} for i in range(7)]
    return parse_scenario(
        {
            "name": f"clustered-lmax{l_max}-rate{rate_per_s:g}-client{client_cluster}",
            "model": BLOOM,
            "requests": {"max_input_tokens": input_tokens, "max_output_tokens": l_max},
            "sites": sites,
            "site_rtt_ms": [[5 if a == b else 100 for b in sites] for a in sites],
            "servers": servers,
            "clients": [{"id": "c0", "site": sites[client_cluster], "share": 1.0}],
            "overheads": OVERHEADS,
            "workload": _poisson(rate_per_s, num_requests, seed),
        }
    )


def random_clustered(
    num_servers: int,
    a100_fraction: float,
    rate_per_s: float,
    num_requests: int,
    seed: int,
    l_max: int = 128,
    num_clusters: int | None = None,
) -> Scenario:
    """A larger swarm like the paper's: A100s and MIG slices spread over clusters.

    round(a100_fraction x n) servers are A100s (at least one when the fraction is positive);
    clusters are 5 ms inside, and 20-150 ms (uniform, symmetric, seeded) between; servers
    and the single client are assigned to clusters uniformly at random.
    """
    if num_servers < 1:
        raise ValueError("num_servers: must be at least 1")
    if not 0 <= a100_fraction <= 1:
        raise ValueError("a100_fraction: must be within [0, 1]")
    rng = np.random.default_rng(seed)
    k = num_clusters or max(3, num_servers // 10)
    sites = [f"cluster{i}" for i in range(k)]
    between = rng.uniform(20, 150, size=(k, k))
    rtt = np.triu(between, 1)
    rtt = rtt + rtt.T + 5 * np.eye(k)
    a100s = round(a100_fraction * num_servers)
    if a100_fraction > 0:
        a100s = max(1, a100s)
    kinds = [A100] * a100s + [MIG] * (num_servers - a100s)
    where = rng.integers(0, k, size=num_servers)
    servers = [
        {"id": f"s{j}", "site": sites[int(where[j])], **kind} for j, kind in enumerate(kinds)
    ]
    return parse_scenario(
        {
            "name": f"clustered-n{num_servers}-a100-{a100_fraction:g}-seed{seed}",
            "model": BLOOM,
            "requests": {"max_input_tokens": 20, "max_output_tokens": l_max},
            "sites": sites,
            "site_rtt_ms": np.round(rtt, 3).tolist(),
            "servers": servers,
            "clients": [{"id": "c0", "site": sites[int(rng.integers(0, k))], "share": 1.0}],
            "overheads": OVERHEADS,
            "workload": _poisson(rate_per_s, num_requests, seed),
        }
    )


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bandwidth_gbps: float
    tflops: float


def load_gpus(path: Path | None = None) -> dict[str, Gpu]:
    path = path or DATA_DIR / "gpu_specs.csv"
    gpus = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            gpus[row["gpu"]] = Gpu(
                row["gpu"],
                float(row["memory_GB"]),
                float(row["mem_bandwidth_GBps"]),
                float(row["fp16_bf16_dense_tensor_TFLOPS_fp32acc"]),
            )
    return gpus


def load_region_rtt(path: Path | None = None) -> tuple[list[str], list[list[float | None]]]:
    """The 50-region Azure RTT matrix (ms); None where a pair was not measured."""
    path = path or DATA_DIR / "azure_interregion_rtt_ms.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    regions = rows[0][1:]
    matrix: list[list[float | None]] = []
    for row in rows[1:]:
        matrix.append([float(cell) if cell.strip() else None for cell in row[1:]])
    return regions, matrix


GEO_GPUS = (
    ("A100-SXM-80GB", 0.15),
    ("A100-40GB", 0.1),
    ("A40-48GB", 0.1),
    ("L40S-48GB", 0.1),
    ("RTX-4090-24GB", 0.2),
    ("RTX-3090-24GB", 0.15),
    ("L4-24GB", 0.1),
    ("T4-16GB", 0.1),
)
PREFILL_GFLOP_PER_TOKEN = 4.933  # BLOOM-176B, model_block_specs.csv
INTRA_REGION_RTT_MS = 2.0


def geo(
    num_regions: int = 12,
    num_servers: int = 40,
    num_clients: int = 4,
    rate_per_s: float = 1.0,
    num_requests: int = 200,
    seed: int = 0,
    l_max: int = 128,
) -> Scenario:
    """A geo-distributed swarm over real Azure inter-region RTTs and a mix of GPUs.

    Regions: a seeded random subset of the 50 whose pairs are all measured (2 ms inside a
    region). Servers: GPUs drawn with the weights of GEO_GPUS, placed in random regions;
    memory = datasheet GiB in GB; speeds from the roofline described in the module docstring.
    Clients: ``num_clients`` in random regions, equal shares. Model: BLOOM-176B in NF4.
    """
    rng = np.random.default_rng(seed)
    names, matrix = load_region_rtt()
    chosen: list[int] = []

    def rtt_of(a: int, b: int) -> float | None:  # symmetric where one direction is missing
        forward = matrix[a][b]
        return forward if forward is not None else matrix[b][a]

    for candidate in rng.permutation(len(names)).tolist():
        if all(rtt_of(candidate, j) is not None for j in chosen):
            chosen.append(candidate)
        if len(chosen) == num_regions:
            break
    if len(chosen) < num_regions:
        raise ValueError(f"num_regions: only {len(chosen)} regions are measured pairwise")
    sites = [names[i] for i in chosen]
    rtt = [
        [INTRA_REGION_RTT_MS if a == b else float(rtt_of(a, b) or 0.0) for b in chosen]
        for a in chosen
    ]
    gpus = load_gpus()
    kinds = [g for g, _ in GEO_GPUS]
    weights = np.array([w for _, w in GEO_GPUS])
    block_gb = float(BLOOM["block_memory_gb"])  # type: ignore[arg-type]
    servers = []
    for j in range(num_servers):
        gpu = gpus[kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]]
        decode = 1000.0 * block_gb / gpu.bandwidth_gbps
        per_token = PREFILL_GFLOP_PER_TOKEN / gpu.tflops  # GFLOP / TFLOPS = ms
        servers.append(
            {
                "id": f"{gpu.name.lower()}-{j}",
                "site": sites[int(rng.integers(0, num_regions))],
                "gpu": gpu.name,
                "memory_gb": round(gpu.memory_gb * GIB_IN_GB, 3),
                "decode_ms_per_block": round(decode, 6),
                "prefill_ms_per_block": {
                    "fixed": round(decode, 6),
                    "per_token": round(per_token, 6),
                },
            }
        )
    clients = [
        {"id": f"c{i}", "site": sites[int(rng.integers(0, num_regions))], "share": 1.0}
        for i in range(num_clients)
    ]
    return parse_scenario(
        {
            "name": f"geo-{num_regions}r-{num_servers}s-seed{seed}",
            "model": BLOOM,
            "requests": {"max_input_tokens": 20, "max_output_tokens": l_max},
            "sites": sites,
            "site_rtt_ms": rtt,
            "servers": servers,
            "clients": clients,
            "overheads": OVERHEADS,
            "workload": _poisson(rate_per_s, num_requests, seed),
        }
    )


def with_workload(scenario: Scenario, rate_per_s: float, num_requests: int, seed: int) -> Scenario:
    data = scenario.model_dump(exclude_none=True)
    data["workload"] = _poisson(rate_per_s, num_requests, seed)
    return parse_scenario(data)


# --- the follow-up paper's MIG swarm (Llama-2-7B on A100 MIG slices, Azure code trace) --------

LLAMA2_7B = {
    "name": "llama-2-7b",
    "num_blocks": 32,
    "block_memory_gb": 0.4048,  # 202.4 M parameters per block in fp16
    "kv_bytes_per_token_per_block": 16384,  # 2 x 4096 x 2 bytes
    "hidden_size": 4096,
}
# Speeds: the memory-bound roofline of the slice (block bytes / its share of A100-80GB
# bandwidth) x 3 for kernel overheads; prefill per token: 2 x params FLOPs at 30% of the
# slice's share of 312 TFLOPS. 3g.40gb has 4/8 of the memory and 3/7 of the compute; 2g.20gb
# 2/8 and 2/7. Usable memory: the slice less 0.5 GB for the CUDA context.
MIG_3G_40GB = {
    "gpu": "A100-MIG-3g.40gb",
    "memory_gb": 39.5,
    "decode_ms_per_block": 1.191,
    "prefill_ms_per_block": {"fixed": 1.191, "per_token": 0.01012},
}
MIG_2G_20GB = {
    "gpu": "A100-MIG-2g.20gb",
    "memory_gb": 19.5,
    "decode_ms_per_block": 2.382,
    "prefill_ms_per_block": {"fixed": 2.382, "per_token": 0.01518},
}
# PETALS' overheads as the BPRR paper measured them (OVERHEADS), with the per-prompt-token
# transfer scaled from BLOOM's hidden size (14336) to Llama-2-7B's (4096): the activations sent
# per token shrink in proportion.
MIG_OVERHEADS = {
    **OVERHEADS,
    "prefill_per_token_ms": round(0.7049 * 4096 / 14336, 4),
}
CODE_TRACE = "azure_llm_inference_trace_2023_code.csv"
MIG_CAPS = (3712, 256)  # the follow-up paper's caps: max input and output tokens
TABLE1_RATE = 2.57


def mig_swarm(
    num_servers: int = 9,
    rate_per_s: float = TABLE1_RATE,
    num_requests: int = 1000,
    seed: int = 1,
    trace: bool = True,
) -> Scenario:
    """The follow-up paper's swarm: 40 GB and 20 GB MIG slices in a 1:2 mix, Llama-2-7B.

    Nine servers (3 x 3g.40gb + 6 x 2g.20gb) is its Table I testbed, on one site (1 ms);
    larger swarms spread over max(1, n // 30) sites, 5 ms inside and 10-60 ms between
    (seeded). Workload: the first ``num_requests`` requests of the Azure code trace, time
    rescaled to ``rate_per_s`` (caps 3712 in, 256 out as in the paper), or, when ``trace`` is
    False, Poisson arrivals at that rate with the trace's length distributions (mean and
    quantiles of the capped lengths: the scenario's optional length fields).
    """
    from app.allocation.scenario import resolve_trace
    from app.allocation.traces import read_trace
    from app.allocation.workload import WorkloadProfile, trace_rate

    if num_servers < 1:
        raise ValueError("num_servers: must be at least 1")
    rng = np.random.default_rng(seed)
    k = 1 if num_servers <= 9 else max(1, num_servers // 30)
    sites = [f"dc{i}" for i in range(k)]
    between = rng.uniform(10, 60, size=(k, k))
    rtt = np.triu(between, 1)
    inside = 1.0 if k == 1 else 5.0
    rtt = rtt + rtt.T + inside * np.eye(k)
    big = max(1, round(num_servers / 3))
    kinds = [MIG_3G_40GB] * big + [MIG_2G_20GB] * (num_servers - big)
    where = rng.integers(0, k, size=num_servers)
    servers = [
        {"id": f"{'3g' if kind is MIG_3G_40GB else '2g'}-{j}", "site": sites[int(where[j])], **kind}
        for j, kind in enumerate(kinds)
    ]
    workload: dict[str, Any]
    if trace:
        arrival, _, _ = read_trace(resolve_trace(CODE_TRACE), num_requests)
        scale = trace_rate(arrival) / rate_per_s
        workload = {"trace": CODE_TRACE, "limit": num_requests, "time_scale": round(scale, 9)}
    else:
        _, inputs, outputs = read_trace(resolve_trace(CODE_TRACE))
        lengths = WorkloadProfile.from_samples(
            rate_per_s, np.clip(inputs, 0, MIG_CAPS[0]), np.clip(outputs, 1, MIG_CAPS[1])
        ).to_json()
        workload = {**_poisson(rate_per_s, num_requests, seed), **lengths}
    return parse_scenario(
        {
            "name": f"mig-{num_servers}-rate{rate_per_s:g}-seed{seed}",
            "model": LLAMA2_7B,
            "requests": {"max_input_tokens": MIG_CAPS[0], "max_output_tokens": MIG_CAPS[1]},
            "sites": sites,
            "site_rtt_ms": np.round(rtt, 3).tolist(),
            "servers": servers,
            "clients": [{"id": "c0", "site": sites[int(rng.integers(0, k))], "share": 1.0}],
            "overheads": MIG_OVERHEADS,
            "workload": workload,
        }
    )
