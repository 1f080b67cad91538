"""Bookings with the central queue, on loopback (SQLite, one coordinator process).

1. wait_s = 0: bookings per second (each a POST and its DELETE with the session's token),
   A/B against a baseline commit (default: the HEAD before the sessions domain changed),
   interleaved in the same run: the baseline's tree is exported with ``git archive`` and
   served by the same interpreter. wrk drives both with the same script.
2. Saturation with a queue: Poisson arrivals above what the swarm serves at once, each booking
   waiting up to --wait-s in the queue, holding its session for the route's predicted time,
   then releasing it; the measured wait p50/p99 beside the simulator's prediction for the
   same swarm, placement algorithm and load (app.simulation.run.simulate: start - arrival).

    .venv/bin/python bench/bench_queue.py                     # both parts
    .venv/bin/python bench/bench_queue.py --part ab --runs 3 --seconds 5
    .venv/bin/python bench/bench_queue.py --part service --runs 3   # no HTTP: the service
    .venv/bin/python bench/bench_queue.py --part saturation --rate 6 --seconds 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _wrk import (  # noqa: E402
    book_and_release_script,
    cpu_seconds,
    free_port,
    swarm,
    wait_ready,
    wrk,
)

ADMIN = "bench-admin"
CLIENT = "bench-client"
# The last commit before the sessions domain changed (session tokens, the queue, units).
DEFAULT_BASELINE = "9676567"


def export_tree(revision: str) -> Path:
    """The baseline's files (git archive), beside nothing of the working tree."""
    target = Path(tempfile.mkdtemp(prefix="bprr-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def start(tree: Path, database: Path, extra_env: dict[str, str]) -> tuple[Any, str]:
    """uvicorn on the tree's app (its directory first on sys.path), one process."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        BPRR_DATABASE_URL=f"sqlite:///{database}",
        BPRR_ADMIN_TOKEN=ADMIN,
        BPRR_SESSION_GRACE_S="0",
        BPRR_PLANNER_INTERVAL_S=os.environ.get("BENCH_PLANNER_INTERVAL_S", "1"),
        BPRR_CLIENT_TOKENS=json.dumps({"bench": CLIENT}),
    )
    env.update(extra_env)
    command = [sys.executable, "-m", "uvicorn", "app.api.app:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(
        command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(process, base, f"the coordinator of {tree}")
    return process, base


def load(base: str, scenario: dict[str, Any]) -> None:
    loaded = httpx.post(
        f"{base}/v1/scenario",
        params={"lease_s": 3600},
        json=scenario,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=120,
    )
    loaded.raise_for_status()
    time.sleep(1.2)  # the route view's refresh


def bookings_per_s(tree: Path, seconds: float, connections: int, work: Path) -> dict[str, Any]:
    """wrk's figures, and the coordinator's CPU time per booking (with its release) during
    the run: on a shared machine the rate moves with the other load, the CPU per booking
    much less."""
    database = Path(tempfile.mkdtemp(prefix="bprr-db-")) / "bench.db"
    process, base = start(tree, database, {})
    try:
        load(base, swarm())
        script = work / "book.lua"
        script.write_text(book_and_release_script(CLIENT))
        cpu_before = cpu_seconds(process.pid)
        result: dict[str, Any] = wrk(base, "/v1/sessions", seconds, connections, str(script))
        cpu = cpu_seconds(process.pid) - cpu_before
        result["cpu_ms_per_booking"] = cpu * 1000 / max(1, result.get("booked", 0))
        return result
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(database.parent, ignore_errors=True)


def part_ab(baseline: str, runs: int, seconds: float, connections: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bprr-bench-"))
    old = export_tree(baseline)
    rates: dict[str, list[float]] = {"baseline": [], "current": []}
    cpu: dict[str, list[float]] = {"baseline": [], "current": []}
    try:
        trees = [("baseline", old), ("current", ROOT)]
        for run in range(runs):
            # ABBA order: a load that drifts during the session favours neither.
            for label, tree in trees if run % 2 == 0 else trees[::-1]:
                result = bookings_per_s(tree, seconds, connections, work)
                rates[label].append(result.get("booked_per_s", 0.0))
                cpu[label].append(result["cpu_ms_per_booking"])
                print(
                    f"  run {run + 1} {label:8s} booked {result.get('booked_per_s', 0):.0f}/s "
                    f"released {result.get('released_per_s', 0):.0f}/s "
                    f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                    f"non-2xx {result['non2xx']} "
                    f"server CPU {result['cpu_ms_per_booking']:.2f} ms/booking",
                    flush=True,
                )
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    medians = {label: statistics.median(values) for label, values in rates.items()}
    cpu_medians = {label: statistics.median(values) for label, values in cpu.items()}
    ratio = medians["current"] / medians["baseline"] if medians["baseline"] else float("nan")
    cpu_ratio = (
        cpu_medians["baseline"] / cpu_medians["current"] if cpu_medians["current"] else float("nan")
    )
    print(
        f"== wait_s=0 bookings/s (wrk -c{connections}, {seconds:g} s, medians of {runs}): "
        f"baseline {baseline} {medians['baseline']:.0f}/s, current {medians['current']:.0f}/s, "
        f"ratio {ratio:.3f}; server CPU per booking + release: baseline "
        f"{cpu_medians['baseline']:.2f} ms, current {cpu_medians['current']:.2f} ms "
        f"(baseline/current {cpu_ratio:.3f})"
    )
    return {
        "baseline": baseline,
        "rates": rates,
        "medians": medians,
        "ratio": ratio,
        "cpu_ms_per_booking": cpu,
        "cpu_medians": cpu_medians,
        "cpu_ratio": cpu_ratio,
    }


# In-process: the sessions service alone (no HTTP, no wrk), book then release, on SQLite.
SERVICE_LOOP = """
import sys, tempfile, time
sys.path.insert(0, {bench!r})
from fastapi.testclient import TestClient
from pydantic import SecretStr
from app.api.app import create_app
from app.service.schemas import SessionIn
from app.settings import Settings
from _wrk import swarm

def main():
    url = "sqlite:///" + tempfile.mkdtemp() + "/b.db"
    settings = Settings(database_url=url, admin_token=SecretStr("a"), planner_interval_s=0,
                        session_grace_s=0)
    app = create_app(settings, background=False)
    with TestClient(app) as http:
        http.post("/v1/scenario", params={{"lease_s": 3600}}, json=swarm(),
                  headers={{"Authorization": "Bearer a"}}).raise_for_status()
        coordinator = app.state.coordinator
        body = SessionIn(client_site="site3", input_tokens=20, output_tokens=8)
        new = hasattr(coordinator.sessions, "start")

        def loop(n):
            for _ in range(n):
                out = coordinator.book(body)
                if new:
                    coordinator.sessions.release(out.id, out.token)
                else:
                    coordinator.release(out.id)

        loop(50)
        started = time.perf_counter()
        loop({n})
        print((time.perf_counter() - started) / {n} * 1000)

if __name__ == "__main__":
    main()
"""


def part_service(baseline: str, runs: int, iterations: int) -> dict[str, Any]:
    old = export_tree(baseline)
    script = Path(tempfile.mkdtemp(prefix="bprr-bench-")) / "loop.py"
    script.write_text(SERVICE_LOOP.format(bench=str(ROOT / "bench"), n=iterations))
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    try:
        for run in range(runs):
            for label, tree in (("baseline", old), ("current", ROOT)):
                out = subprocess.run(
                    [sys.executable, str(script)],
                    cwd=tree,
                    env=dict(os.environ, PYTHONPATH=str(tree)),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                times[label].append(float(out.strip().splitlines()[-1]))
                print(f"  run {run + 1} {label:8s} {times[label][-1]:.2f} ms", flush=True)
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(script.parent, ignore_errors=True)
    medians = {label: statistics.median(values) for label, values in times.items()}
    ratio = medians["baseline"] / medians["current"]
    print(
        f"== in-process book + release (SQLite, medians of {runs}): baseline {baseline} "
        f"{medians['baseline']:.2f} ms, current {medians['current']:.2f} ms, "
        f"throughput ratio {ratio:.3f}"
    )
    return {"times_ms": times, "medians_ms": medians, "ratio": ratio}


# --- part 2: saturation with the queue ---------------------------------------------------------


def small_swarm(servers: int, seed: int = 11) -> dict[str, Any]:
    """A swarm that saturates at a few requests per second (long, token-heavy requests)."""
    data = swarm(servers=servers, sites=3, seed=seed)
    data["name"] = f"queue-{servers}"
    data["requests"] = {"max_input_tokens": 2048, "max_output_tokens": 256}
    for entry in data["servers"]:
        entry["memory_gb"] = min(entry["memory_gb"], 24.0)
    return data


async def offered_load(
    base: str, rate: float, seconds: float, wait_s: float, inputs: int, outputs: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    sites = ["site0", "site1", "site2"]
    waits: list[float] = []
    codes: dict[int, int] = {}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=base, timeout=wait_s + 30, limits=limits) as http:

        async def one(i: int) -> None:
            body = {
                "client_site": sites[i % 3],
                "input_tokens": inputs,
                "output_tokens": outputs,
                "wait_s": wait_s,
            }
            asked = time.monotonic()
            reply = await http.post(
                "/v1/sessions", json=body, headers={"Authorization": f"Bearer {CLIENT}"}
            )
            codes[reply.status_code] = codes.get(reply.status_code, 0) + 1
            if reply.status_code != 201:
                return
            waits.append(time.monotonic() - asked)
            session = reply.json()
            await asyncio.sleep(session["route"]["total_ms"] / 1000)
            await http.delete(
                f"/v1/sessions/{session['id']}",
                headers={"Authorization": f"Bearer {session['token']}"},
            )

        tasks = []
        started = time.monotonic()
        at = 0.0
        i = 0
        while at < seconds:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {"waits_s": waits, "codes": codes, "requests": i}


def predicted(
    scenario: dict[str, Any],
    database: Path,
    rate: float,
    requests: int,
    inputs: int,
    outputs: int,
    seed: int,
) -> dict[str, Any]:
    """The simulator on the same swarm, the same load (as many requests as the coordinator
    was sent) and the coordinator's OWN published plan (its spans, and its chains when it
    dispatches with JFFC; else WS-RR on its spans), read from the coordinator's database."""
    import sqlite3

    from app.allocation.chains import Chain
    from app.allocation.instance import Instance, Span
    from app.allocation.perf import Hop
    from app.allocation.scenario import parse_scenario
    from app.simulation.engine import Simulator
    from app.simulation.policies import ChainsPolicy, WsrrPolicy
    from app.simulation.service import make_service_model
    from app.simulation.workload import scenario_workload

    data = dict(scenario)
    lengths = {
        name: {stat: value for stat in ("mean", "p50", "p90", "p99", "max")}
        for name, value in (("input_tokens", inputs), ("output_tokens", outputs))
    }
    data["workload"] = {
        "arrival": "poisson",
        "rate_per_s": rate,
        "num_requests": max(1, requests),
        "seed": seed,
        **lengths,
    }
    parsed = parse_scenario(data)
    instance = Instance.from_scenario(parsed)
    with sqlite3.connect(database) as connection:
        spans_json, chains_json, dispatcher = connection.execute(
            "SELECT spans, chains, dispatcher FROM placements ORDER BY generation DESC LIMIT 1"
        ).fetchone()
    index = {server_id: j for j, server_id in enumerate(instance.server_ids)}
    spans: list[Span | None] = [None] * instance.num_servers
    for server_id, (start, end) in json.loads(spans_json).items():
        spans[index[server_id]] = Span(start, end)
    capacity = [
        0 if span is None else instance.cache_tokens(j, span.length) for j, span in enumerate(spans)
    ]
    policy: Any
    if dispatcher == "jffc" and chains_json:
        chains = [
            Chain(
                tuple(Hop(index[s], a, b) for s, a, b in chain["hops"]),
                int(chain["capacity"]),
                float(chain["service_ms"]),
            )
            for chain in json.loads(chains_json)
        ]
        policy = ChainsPolicy("coordinator-jffc", spans, capacity, chains)
    else:
        policy = WsrrPolicy("coordinator-wsrr", instance, spans, capacity)
    workload = scenario_workload(parsed, seed)
    result = Simulator(instance, workload, policy, make_service_model("paper", instance)).run()
    wait_s = (result.start_ms - result.arrival_ms) / 1000.0
    return {"policy": policy.name, "waits_s": wait_s.tolist()}


def part_saturation(
    rate: float, seconds: float, wait_s: float, servers: int, inputs: int, outputs: int, seed: int
) -> dict[str, Any]:
    scenario = small_swarm(servers)
    database = Path(tempfile.mkdtemp(prefix="bprr-db-")) / "bench.db"
    # No re-plan during the run: the prediction simulates the plan published at load.
    process, base = start(
        ROOT, database, {"BPRR_QUEUE_MAX_DEPTH": "100000", "BPRR_PLANNER_INTERVAL_S": "0"}
    )
    try:
        load(base, scenario)
        placement = httpx.get(f"{base}/v1/placements/current", timeout=30).json()
        measured = asyncio.run(offered_load(base, rate, seconds, wait_s, inputs, outputs, seed))
        model = predicted(scenario, database, rate, measured["requests"], inputs, outputs, seed)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(database.parent, ignore_errors=True)

    def quantiles(values: list[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.asarray(values), [50, 99])
        return float(p50), float(p99)

    m50, m99 = quantiles(measured["waits_s"])
    s50, s99 = quantiles(model["waits_s"])
    print(
        f"== saturation: {servers} servers, Poisson {rate:g}/s for {seconds:g} s, "
        f"{inputs}+{outputs} tokens, wait_s {wait_s:g}, placement {placement.get('algorithm')}\n"
        f"   measured: {len(measured['waits_s'])} booked of {measured['requests']} "
        f"(codes {measured['codes']}), wait p50 {m50:.3f} s p99 {m99:.3f} s\n"
        f"   simulator ({model['policy']}): wait p50 {s50:.3f} s p99 {s99:.3f} s"
    )
    return {
        "measured": {"p50_s": m50, "p99_s": m99, "codes": measured["codes"]},
        "predicted": {"policy": model["policy"], "p50_s": s50, "p99_s": s99},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ab", "service", "saturation", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--load-seconds", type=float, default=40.0)
    parser.add_argument("--wait-s", type=float, default=60.0)
    parser.add_argument("--servers", type=int, default=12)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--outputs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None and args.part != "saturation":
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    out: dict[str, Any] = {}
    if args.part in {"ab", "both"}:
        out["ab"] = part_ab(args.baseline, args.runs, args.seconds, args.connections)
    if args.part == "service":
        out["service"] = part_service(args.baseline, args.runs, args.iterations)
    if args.part in {"saturation", "both"}:
        out["saturation"] = part_saturation(
            args.rate,
            args.load_seconds,
            args.wait_s,
            args.servers,
            args.inputs,
            args.outputs,
            args.seed,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
