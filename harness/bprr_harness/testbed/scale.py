"""Scaling a scenario down to what the testbed can run on one machine (pure)."""

from __future__ import annotations

from typing import Any

from app.allocation.scenario import PoissonWorkload, Scenario, ScenarioError, parse_scenario


def scale_scenario(
    scenario: Scenario,
    *,
    blocks: int | None = None,
    time_scale: float = 1.0,
    output_tokens: int | None = None,
    requests: int | None = None,
    rate_per_s: float | None = None,
    seed: int | None = None,
) -> Scenario:
    """The same swarm with fewer, proportionally bigger blocks and shorter times.

    ``blocks``: L' blocks, each standing for L / L' original ones (weights, KV bytes and
    per-block times multiplied by that factor, so every server holds the same share of the
    model, in the same cache slots, at the same speed). ``time_scale``: every time (RTTs,
    speeds, overheads) multiplied by it, and the arrival rate divided by it, so the load is
    unchanged. PETALS' hidden size and cache tokens are pinned to the original's.
    ``output_tokens``, ``requests``, ``rate_per_s``, ``seed`` replace the request limit and
    the Poisson workload's fields (a workload is created when the scenario has none and a
    rate is given).
    """
    if not (time_scale > 0 and time_scale < float("inf")):
        raise ScenarioError(f"--time-scale: must be a positive number, got {time_scale}")
    old_blocks = scenario.model.num_blocks
    if blocks is not None and not 1 <= blocks <= old_blocks:
        raise ScenarioError(f"--blocks: must be between 1 and the model's {old_blocks}")
    new_blocks = old_blocks if blocks is None else blocks
    factor = old_blocks / new_blocks
    raw: dict[str, Any] = scenario.model_dump(mode="json", exclude_none=True)
    model = raw["model"]
    model["hidden_size"] = scenario.model.effective_hidden_size
    model["petals_cache_tokens"] = scenario.model.effective_petals_cache_tokens
    model["num_blocks"] = new_blocks
    model["block_memory_gb"] = scenario.model.block_memory_gb * factor
    model["kv_bytes_per_token_per_block"] = scenario.model.kv_bytes_per_token_per_block * factor
    raw["site_rtt_ms"] = [[v * time_scale for v in row] for row in scenario.site_matrix()]
    if "rtt_ms" in raw:
        raw["rtt_ms"] = {
            a: {b: v * time_scale for b, v in row.items()} for a, row in raw["rtt_ms"].items()
        }
    for server in raw["servers"]:
        server["decode_ms_per_block"] *= factor * time_scale
        prefill = server.setdefault("prefill_ms_per_block", {"fixed": 0.0, "per_token": 0.0})
        prefill["fixed"] = prefill.get("fixed", 0.0) * factor * time_scale
        prefill["per_token"] = prefill.get("per_token", 0.0) * factor * time_scale
    if "overheads" in raw:
        raw["overheads"] = {k: v * time_scale for k, v in raw["overheads"].items()}
    if output_tokens is not None:
        if output_tokens < 1:
            raise ScenarioError("--output-tokens: must be at least 1")
        raw["requests"]["max_output_tokens"] = output_tokens
    workload = scenario.workload
    if isinstance(workload, PoissonWorkload) or rate_per_s is not None:
        base_rate = workload.rate_per_s if isinstance(workload, PoissonWorkload) else 0.0
        raw["workload"] = {
            "arrival": "poisson",
            "rate_per_s": rate_per_s if rate_per_s is not None else base_rate / time_scale,
            "num_requests": requests
            if requests is not None
            else (workload.num_requests if isinstance(workload, PoissonWorkload) else 1),
            "seed": seed
            if seed is not None
            else (workload.seed if isinstance(workload, PoissonWorkload) else 0),
        }
    if requests is not None and requests < 1:
        raise ScenarioError("--requests: must be at least 1")
    if time_scale != 1.0 or blocks is not None:
        raw["name"] = f"{scenario.name}-scaled"
    return parse_scenario(raw)
