"""The testbed's report: each request's measured times against the performance model
(``perf.request_timing`` on its route with the measured speeds plus the calibrated transport),
the error summary, and the simulator's metrics on the same scenario for comparison."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from app.allocation.instance import Instance
from app.allocation.perf import Hop, request_timing
from app.allocation.scenario import Scenario, parse_scenario

if TYPE_CHECKING:
    from bprr_harness.testbed.runner import PolicyRun, TestbedResult

POLICIES = {"cg": "cg-wsrr", "petals": "petals"}  # testbed policy -> simulator policy


def measured_scenario(
    scenario: Scenario, measured: dict[str, dict[str, float]], *, overheads: bool = True
) -> Scenario:
    """The scenario with every server's speeds replaced by its measured ones; without
    ``overheads`` also with its per-hop and per-request overheads zeroed (for a system whose
    own overheads are measured instead, as the PETALS backend's transport calibration)."""
    raw = scenario.model_dump(mode="json", exclude_none=True)
    for server in raw["servers"]:
        m = measured.get(server["id"])
        if m is not None:
            server["decode_ms_per_block"] = m["decode_ms_per_block"]
            server["prefill_ms_per_block"] = {
                "fixed": m["prefill_fixed_ms"],
                "per_token": m["prefill_per_token_ms"],
            }
    if not overheads:
        raw.pop("overheads", None)
    return parse_scenario(raw)


def compared_row(
    instance: Instance,
    request: dict[str, Any],
    hops: list[Hop],
    first_transport_ms: float,
    token_transport_ms: float,
) -> dict[str, Any]:
    """One request's measured first-token and per-token times beside the model's
    (``perf.request_timing`` on its route plus this testbed's transport per step), and the
    relative errors. ``request`` has client, index, hops, input/output tokens, first_token_ms
    and token_ms (the gaps between tokens)."""
    c = instance_client(instance, request)
    timing = request_timing(instance, c, hops, request["input_tokens"], request["output_tokens"])
    predicted_first = timing.first_token_ms + first_transport_ms
    predicted_token = timing.per_token_ms + token_transport_ms
    gaps = request["token_ms"]
    measured_token = float(np.mean(gaps)) if gaps else float("nan")
    return {
        "index": request["index"],
        "client": request["client"],
        "route": [f"{sid}[{s},{e})" for sid, s, e in request["hops"]],
        "first_token_ms": request["first_token_ms"],
        "predicted_first_token_ms": predicted_first,
        "first_token_error": request["first_token_ms"] / predicted_first - 1.0,
        "per_token_ms": measured_token,
        "predicted_per_token_ms": predicted_token,
        "per_token_error": measured_token / predicted_token - 1.0,
        "transport_ms_per_step": token_transport_ms,
        "rtt_ms_per_step": float(sum(instance.rtt_ms[c, h.server] for h in hops)),
        "output_tokens": request["output_tokens"],
    }


def instance_client(instance: Instance, request: dict[str, Any]) -> int:
    return instance.client_ids.index(request["client"])


def predictions(result: TestbedResult, run: PolicyRun) -> list[dict[str, Any]]:
    """Each request's measured and predicted first-token and per-token times."""
    scenario = measured_scenario(result.scenario, result.measured_speeds)
    instance = Instance.from_scenario(scenario)
    server_index = {s.id: j for j, s in enumerate(scenario.servers)}
    rows = []
    for r in run.requests:
        c = instance_client(instance, r)
        hops = [Hop(server_index[sid], start, end) for sid, start, end in r["hops"]]
        pings = run.pings[r["client"]]
        # the calibration's step through the delayed path, less the server's step and the RTT
        transport = sum(
            max(0.0, pings[scenario.servers[h.server].id] - float(instance.rtt_ms[c, h.server]))
            for h in hops
        )
        row = compared_row(instance, r, hops, transport, transport)
        row["wait_ms"] = r["wait_ms"]
        row["e2e_ms"] = r["end_ms"] - r["arrival_ms"]
        row["checksum"] = r["checksum"]
        rows.append(row)
    return rows


def policy_report(
    placement: dict[str, Any], rows: list[dict[str, Any]], failed: list[str]
) -> dict[str, Any]:
    """One policy's part of the report: its placement, error summary, metrics and rows."""
    return {
        "placement": [
            {"server": s["server_id"], "start": s["start"], "end": s["end"]}
            for s in placement["spans"]
        ],
        "errors": error_summary(rows) if rows else {},
        "failed_requests": failed,
        "testbed": testbed_metrics(rows) if rows else {},
        "requests": rows,
    }


def error_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    first = np.array([abs(r["first_token_error"]) for r in rows])
    token = np.array([abs(r["per_token_error"]) for r in rows if np.isfinite(r["per_token_error"])])
    return {
        "requests": float(len(rows)),
        "first_token_mean_abs_error": float(first.mean()) if len(first) else float("nan"),
        "first_token_worst_abs_error": float(first.max()) if len(first) else float("nan"),
        "per_token_mean_abs_error": float(token.mean()) if len(token) else float("nan"),
        "per_token_worst_abs_error": float(token.max()) if len(token) else float("nan"),
        "mean_first_token_ms": float(np.mean([r["first_token_ms"] for r in rows])),
        "mean_predicted_first_token_ms": float(
            np.mean([r["predicted_first_token_ms"] for r in rows])
        ),
        "mean_per_token_ms": float(np.mean([r["per_token_ms"] for r in rows])),
        "mean_predicted_per_token_ms": float(np.mean([r["predicted_per_token_ms"] for r in rows])),
    }


def testbed_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The simulator's summary metrics, from the testbed's measurements (ms)."""
    e2e = np.array([r["e2e_ms"] for r in rows])
    outputs = np.array([r["output_tokens"] for r in rows])
    ttft = np.array([r["wait_ms"] + r["first_token_ms"] for r in rows])
    wait = np.array([r["wait_ms"] for r in rows])
    return {
        "mean_ms_per_token": float((e2e / outputs).mean()),
        "mean_ttft_ms": float(ttft.mean()),
        "mean_e2e_ms": float(e2e.mean()),
        "mean_wait_ms": float(wait.mean()),
    }


def simulator_metrics(scenario: Scenario, policy: str, seed: int | None) -> dict[str, float]:
    """``bprr simulate`` on the same scenario and workload, the same metrics."""
    from app.simulation.run import simulate

    summary = simulate(scenario, POLICIES[policy], seed).summary()
    keys = ("mean_ms_per_token", "mean_ttft_ms", "mean_e2e_ms", "mean_wait_ms")
    return {k: float(summary[k]) for k in keys}  # type: ignore[arg-type]
