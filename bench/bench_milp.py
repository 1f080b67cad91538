"""MILP-BPRR benchmarks: time to proven optimum on the paper's clustered scenario, and the
objective after a time limit versus CG-BPRR on a 26-server scenario.

    .venv/bin/python bench/bench_milp.py                # all figures (several minutes)
    .venv/bin/python bench/bench_milp.py --quick        # per-client model only, 10 s limits
    .venv/bin/python bench/bench_milp.py --quick --linearization mccormick  # one of the two
    .venv/bin/python bench/bench_milp.py --write-example  # (re)write examples/clustered-26.json

Every figure is printed, for both linearisations of the products f e (``enforce``: CP-SAT
enforcement literals, ``mccormick``: explicit product variables); medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.allocation import cg, milp  # noqa: E402
from app.allocation.instance import Instance  # noqa: E402
from app.allocation.scenario import Scenario, load_scenario, parse_scenario  # noqa: E402
from app.allocation.solve import default_concurrency, solve_cg  # noqa: E402

CLUSTERED_9 = ROOT / "examples" / "paper-clustered-9.json"
CLUSTERED_26 = ROOT / "examples" / "clustered-26.json"

# The paper's profiled constants (BLOOM-176B in NF4, ms) and memory (GB).
A100 = {
    "memory_gb": 86.13,
    "decode_ms_per_block": 3.2197,
    "prefill_ms_per_block": {"fixed": 32.99, "per_token": 0.0743},
    "gpu": "A100-80GB",
}
MIG = {
    "memory_gb": 9.1,
    "decode_ms_per_block": 16.2488,
    "prefill_ms_per_block": {"fixed": 206.3547, "per_token": 0.1041},
    "gpu": "A100-MIG-1g.10gb",
}


def clustered_26(seed: int = 26) -> dict[str, Any]:
    """6 A100 + 20 MIG slices over 4 sites, 3 clients; the paper's constants, seeded RTTs."""
    rng = random.Random(seed)
    sites = [f"cluster{i}" for i in range(4)]
    rtt = [[5.0] * 4 for _ in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            rtt[i][j] = rtt[j][i] = float(rng.randint(20, 120))
    servers = []
    for k in range(6):
        servers.append({"id": f"a100-{k}", "site": sites[rng.randrange(4)], **A100})
    for k in range(20):
        servers.append({"id": f"mig-{k}", "site": sites[rng.randrange(4)], **MIG})
    clients = [
        {"id": f"c{k}", "site": sites[k], "share": share} for k, share in enumerate([0.5, 0.3, 0.2])
    ]
    base = json.loads(CLUSTERED_9.read_text())
    return {
        "name": "clustered-26",
        "model": base["model"],
        "requests": base["requests"],
        "sites": sites,
        "site_rtt_ms": rtt,
        "servers": servers,
        "clients": clients,
        "overheads": base["overheads"],
        "workload": {"arrival": "poisson", "rate_per_s": 0.5, "num_requests": 100, "seed": 1},
    }


def label(aggregate: bool, linearization: milp.Linearization) -> str:
    return f"{'per-client ' if aggregate else 'per-request'} {linearization:9s}"


def time_to_optimum(
    scenario: Scenario,
    R: int,
    runs: int,
    limit: float,
    aggregate: bool,
    linearization: milp.Linearization,
) -> None:
    """Median wall time of solve_milp (build + CP-SAT) over ``runs`` runs."""
    instance = Instance.from_scenario(scenario)
    counts = scenario.client_request_counts(R)
    times: list[float] = []
    results = []
    while len(times) < runs:
        started = time.perf_counter()
        solution = milp.solve_milp(
            instance,
            R,
            counts,
            time_limit_s=limit,
            aggregate=aggregate,
            linearization=linearization,
        )
        times.append(time.perf_counter() - started)
        results.append(solution)
    last = results[-1]
    try:
        cg_text = f"{solve_cg(instance, R, counts).objective_ms_per_token:.4f}"
        ratio = f"{last.objective_ms_per_token / float(cg_text):.4f}"
    except cg.InfeasibleError:
        cg_text, ratio = "infeasible", "n/a"
    proven = sum(s.optimal is True for s in results)
    print(
        f"  R={R:3d} {label(aggregate, linearization)}: median {statistics.median(times):7.2f} s "
        f"(runs {' '.join(f'{t:.2f}' for t in times)}), proven optimal {proven}/{len(times)} "
        f"(limit {limit:g} s); objective {last.objective_ms_per_token:.4f} "
        f"bound {last.bound_ms_per_token:.4f} gap {last.gap:.2%}; CG {cg_text}; MILP/CG {ratio}",
        flush=True,
    )


def after_limit(
    scenario: Scenario,
    R: int,
    runs: int,
    limit: float,
    aggregate: bool,
    linearization: milp.Linearization,
) -> None:
    """Objective of solve_milp after ``limit`` seconds versus CG-BPRR's, same process."""
    instance = Instance.from_scenario(scenario)
    counts = scenario.client_request_counts(R)
    reference = solve_cg(instance, R, counts).objective_ms_per_token
    values: list[float] = []
    gaps: list[float] = []
    walls: list[float] = []
    statuses: list[str] = []
    for _ in range(runs):
        started = time.perf_counter()
        try:
            solution = milp.solve_milp(
                instance,
                R,
                counts,
                time_limit_s=limit,
                aggregate=aggregate,
                linearization=linearization,
            )
        except milp.MilpNoSolutionError:
            statuses.append("none")
            continue
        finally:
            walls.append(time.perf_counter() - started)
        values.append(solution.objective_ms_per_token)
        gaps.append(solution.gap or 0.0)
        statuses.append(solution.status)
    if not values:
        print(
            f"  R={R:3d} {label(aggregate, linearization)}: no solution within {limit:g} s "
            f"({runs} runs)"
        )
        return
    value = statistics.median(values)
    print(
        f"  R={R:3d} {label(aggregate, linearization)}: MILP {value:.4f} ms/token after "
        f"{limit:g} s "
        f"(median of {len(values)}, wall {statistics.median(walls):.1f} s, "
        f"{'/'.join(statuses)}, gap {statistics.median(gaps):.2%}); CG {reference:.4f}; "
        f"MILP/CG {value / reference:.4f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="per-client model only, 10 s limits")
    parser.add_argument("--linearization", choices=["both", *milp.LINEARIZATIONS], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit", type=float, default=30.0, help="26-server time limit (s)")
    parser.add_argument("--write-example", action="store_true")
    args = parser.parse_args()
    if args.write_example:
        CLUSTERED_26.write_text(parse_scenario(clustered_26()).to_json() + "\n")
        print(f"wrote {CLUSTERED_26}")
        return
    runs = args.runs
    limit = 10.0 if args.quick else args.limit
    optimum_limit = 10.0 if args.quick else 60.0
    linearizations: tuple[milp.Linearization, ...] = (
        milp.LINEARIZATIONS if args.linearization == "both" else (args.linearization,)
    )
    print(
        f"OR-Tools {version('ortools')}, 2 workers, TIME_SCALE {milp.TIME_SCALE}/ms, "
        f"default linearization {milp.DEFAULT_LINEARIZATION}"
    )

    nine = load_scenario(CLUSTERED_9)
    instance9 = Instance.from_scenario(nine)
    default9 = default_concurrency(nine, instance9)
    high9 = cg.max_feasible_concurrency(instance9)
    print(
        f"paper-clustered-9: time to proven optimum; default R={default9} (rate 0.5/s), "
        f"CG feasible up to R={high9}"
    )
    for R in sorted({1, 10, default9, high9}):
        for linearization in linearizations:
            time_to_optimum(nine, R, runs, optimum_limit, True, linearization)
        if R <= 60 and not args.quick:  # the per-request model grows with |R| x links
            for linearization in linearizations:
                time_to_optimum(nine, R, 1, optimum_limit, False, linearization)

    scenario26 = load_scenario(CLUSTERED_26)
    instance26 = Instance.from_scenario(scenario26)
    default26 = default_concurrency(scenario26, instance26)
    print(
        f"clustered-26 (6 A100 + 20 MIG, 4 sites, 3 clients): objective after {limit:g} s vs CG; "
        f"default R={default26}"
    )
    for linearization in linearizations:
        after_limit(scenario26, default26, runs, limit, True, linearization)
    if not args.quick:
        for linearization in linearizations:
            after_limit(scenario26, default26, 1, limit, False, linearization)
            after_limit(scenario26, 10 * default26, 1, limit, True, linearization)


if __name__ == "__main__":
    main()
