"""``bprr testbed --backend petals``: the scenario's servers as real PETALS 2.2 servers (a tiny
random-weight Llama with the scenario's number of blocks), steered by the coordinator through
``bprr-agent --petals-model``, and one PETALS client (``bprr_harness.testbed.petals_replay``, under
the PETALS interpreter) replaying the scenario's requests through ``bprr_client.swarm``.

Order of a run: the tiny model; the coordinator (``bprr serve`` subprocess, planner off,
the scenario loaded with its servers not yet live); one agent per server (the first starts
the swarm, the others join it); for each policy a placement forced through
``POST /v1/placements`` and every assigned span announced online by PETALS; then the client:
calibration and the requests one after the other. Teardown runs backwards in ``finally``.

Delays: the scenario's per-site RTTs, with the emulated backend's semantics (every exchange
between a client and a server takes the RTT between them more, half each way). All
processes are on 127.0.0.1 and the kernel has no netem, so the PETALS client process holds
each hop's inference traffic back by that RTT (``petals_replay.HopDelays``, which says why a
relay in front of the servers cannot do it, and what stays undelayed), and every hop goes
through the client (no server-to-server pushes), as in the model. The client counts what the
delays did: each request's row carries its exchanges with servers, how many were delayed (and
of them prefills) and the time slept (``delayed_exchanges``, ``delayed_prefills``,
``delay_slept_ms``), and each server's measured speeds the calibration's exchanges and delayed
exchanges (none: it runs undelayed).

What is compared: each request's first-token and per-token time against
``perf.request_timing`` on its route, with the scenario's RTTs, the servers' speeds as
measured through PETALS by the calibration (per-block compute), plus the per-hop transport
it measured (PETALS' own RPC cost per hop, on loopback, undelayed). The scenario's overheads
are left out of the prediction: they state a system's per-hop and per-request costs, which
here are real PETALS' and measured. Requests are replayed one at a time, at most
``MAX_SERVERS`` servers (each is ~14 processes and ~650 MiB).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.allocation import cg
from app.allocation.instance import Instance
from app.allocation.perf import Hop
from app.allocation.scenario import Scenario
from bprr_harness.testbed.report import compared_row, measured_scenario

ROOT = Path(__file__).resolve().parents[3]  # the checkout: petals/, .venv-petals
DEFAULT_PETALS_PYTHON = ROOT / ".venv-petals" / "bin" / "python"
MAX_SERVERS = 4
MAX_TOKENS = 200  # the tiny model's 256 positions, prompt + output
PREFIX = "bprr-tb"
START_TIMEOUT_S = 600.0  # PETALS starts in 5-30 s; a busy CI machine may take minutes


class PetalsTestbedError(Exception):
    """The PETALS testbed could not run (no PETALS environment, a process failed...)."""


@dataclass
class PetalsRun:
    policy: str
    placement: dict[str, Any]
    speeds: dict[str, dict[str, float]]
    requests: list[dict[str, Any]]


@dataclass
class PetalsResult:
    scenario: Scenario
    timings_s: dict[str, float] = field(default_factory=dict)
    runs: list[PetalsRun] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PetalsTestbed:
    def __init__(
        self,
        scenario: Scenario,
        policies: tuple[str, ...] = ("cg",),
        petals_python: Path = DEFAULT_PETALS_PYTHON,
        seed: int = 0,
        say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ) -> None:
        if not petals_python.exists():
            raise PetalsTestbedError(
                f"--backend petals: no PETALS environment at {petals_python} (run `make petals`)"
            )
        if len(scenario.servers) > MAX_SERVERS:
            raise PetalsTestbedError(
                f"--backend petals: at most {MAX_SERVERS} servers on this machine "
                f"(the scenario has {len(scenario.servers)})"
            )
        self.scenario = scenario
        self.policies = policies
        self.python = petals_python
        self.seed = seed
        self.say = say
        self.admin = secrets.token_urlsafe(18)
        self.join = secrets.token_urlsafe(18)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.services: dict[str, subprocess.Popen[bytes]] = {}  # name -> runs until stopped
        self.work = Path(tempfile.mkdtemp(prefix="bprr-tbp-"))
        self.url = ""
        self.first_peer: str | None = None
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }

    # --- processes ------------------------------------------------------------------------

    def _start(
        self, name: str, argv: list[str], service: bool = True, **env: str
    ) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **env},
                cwd=ROOT,
                start_new_session=True,
            )
        self.processes.append(process)
        if service:
            self.services[name] = process
        return process

    def _wait(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``check`` until it returns something true; fail at once when a service
        (the coordinator, an agent) has exited, with the last line of its log."""
        deadline = time.monotonic() + timeout_s
        while True:
            for name, process in self.services.items():
                if process.poll() is not None:
                    lines = _text(self.work / f"{name}.log").strip().splitlines() or ["-"]
                    raise PetalsTestbedError(  # its last line: its error, on one line
                        f"{what}: {name} exited with status {process.returncode}: {lines[-1]}"
                    )
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise PetalsTestbedError(f"{what}: not within {timeout_s:.0f} s")
            time.sleep(0.2)

    def _http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.admin}"}
        return httpx.Client(base_url=self.url, timeout=60.0, headers=headers)

    def _coordinator(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        serve = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1"]
        self._start(
            "coordinator",
            [*serve, "--port", str(port)],
            BPRR_DATABASE_URL=f"sqlite:///{self.work / 'coordinator.db'}",
            BPRR_ADMIN_TOKEN=self.admin,
            BPRR_JOIN_TOKEN=self.join,
            BPRR_PLANNER_INTERVAL_S="0",
            BPRR_HEARTBEAT_INTERVAL_S="1",
            BPRR_LEASE_TTL_S="10",
        )

        def up() -> bool:
            try:
                with self._http() as client:
                    return client.get("/v1/servers").status_code == 200
            except httpx.TransportError:
                return False

        self._wait("the coordinator", up, 60)
        raw = self.scenario.model_dump(mode="json", exclude_none=True)
        with self._http() as client:
            reply = client.post("/v1/scenario", params={"online": "false"}, json=raw)
        if reply.status_code != 201:
            raise PetalsTestbedError(f"the coordinator refused the scenario: {reply.text[:300]}")

    def _agent(self, spec: Any) -> None:
        state = self.work / spec.id
        state.mkdir()
        port = _free_port()
        peers = ["--petals-new-swarm"] if self.first_peer is None else []
        if self.first_peer is not None:
            peers = ["--petals-initial-peer", self.first_peer]
        self._start(
            spec.id,
            [
                *(str(self.python), "-m", "bprr_client.cli", "--coordinator", self.url),
                *("run", "--id", spec.id, "--site", spec.site, "--join-token", self.join),
                *("--memory-gb", repr(spec.memory_gb), "--no-peers"),
                *("--decode-ms-per-block", repr(spec.decode_ms_per_block)),
                *("--address", f"127.0.0.1:{port}", "--petals-model", str(self.work / "model")),
                *("--petals-python", str(self.python), "--petals-dht-prefix", PREFIX),
                *("--petals-port", str(port), "--petals-state-dir", str(state)),
                *("--petals-log", str(state / "petals.log"), *peers),
            ],
        )
        if self.first_peer is None:
            status = self._wait("the first PETALS server", lambda: _status(state), START_TIMEOUT_S)
            self.first_peer = status["multiaddrs"][0]
            self._wait(
                "the first PETALS server's DHT",
                lambda: "Running a server on" in _text(state / "petals.log"),
                START_TIMEOUT_S,
            )

    def _registered(self) -> None:
        """Wait until every scenario server's agent registered (a live lease)."""
        wanted = {spec.id for spec in self.scenario.servers}
        with self._http() as client:

            def live() -> bool:
                servers = client.get("/v1/servers").json()
                return wanted <= {s["id"] for s in servers if s["lease"] == "live"}

            self._wait("every agent's registration", live, 300)

    def _place(self, policy: str) -> dict[str, Any]:
        body: dict[str, Any] = {"algorithm": policy}
        if policy == "cg":
            rate = float(getattr(self.scenario.workload, "rate_per_s", 1.0))
            body["concurrency"] = cg.design_concurrency(Instance.from_scenario(self.scenario), rate)
        with self._http() as client:
            reply = client.post("/v1/placements", json=body)
            if reply.status_code != 201:
                raise PetalsTestbedError(f"POST /v1/placements {body}: {reply.text[:300]}")
            placement: dict[str, Any] = reply.json()

            def loaded() -> list[dict[str, Any]] | None:
                servers: list[dict[str, Any]] = client.get("/v1/servers").json()
                ready = all(
                    s["state"] == "online" and s.get("loaded_span") == s["assigned_span"]
                    for s in servers
                    if s.get("assigned_span")
                )
                return servers if ready else None

            servers = self._wait(f"the {policy} placement loaded by PETALS", loaded, 300)
        placement["servers"] = {s["id"]: s for s in servers}
        return placement

    def _requests(self) -> list[dict[str, Any]]:
        from app.simulation.workload import scenario_workload

        workload = scenario_workload(self.scenario, self.seed)
        rows = []
        for i in range(len(workload)):
            client = self.scenario.clients[int(workload.client[i])]
            inputs = max(1, min(int(workload.input_tokens[i]), MAX_TOKENS // 2))
            outputs = max(2, min(int(workload.output_tokens[i]), MAX_TOKENS - inputs))
            rows.append(
                {
                    "index": i,
                    "client": client.id,
                    "client_site": client.site,
                    "input_tokens": inputs,
                    "output_tokens": outputs,
                }
            )
        return rows

    def _client(self, placement: dict[str, Any]) -> dict[str, Any]:
        servers = {
            sid: [s["peer_id"], s["assigned_span"]["start"], s["assigned_span"]["end"]]
            for sid, s in placement["servers"].items()
            if s.get("assigned_span") and s.get("peer_id")
        }
        instance = Instance.from_scenario(self.scenario)
        rtt_ms = {
            client.id: {
                server.id: float(instance.rtt_ms[i, j])
                for j, server in enumerate(self.scenario.servers)
            }
            for i, client in enumerate(self.scenario.clients)
        }
        plan = {
            "model": str(self.work / "model"),
            "coordinator": self.url,
            "initial_peers": [self.first_peer],
            "dht_prefix": PREFIX,
            "servers": servers,
            "rtt_ms": rtt_ms,  # the model's client-server RTTs (site matrix and overrides)
            "requests": self._requests(),
            "seed": self.seed,
        }
        plan_path = self.work / "plan.json"
        plan_path.write_text(json.dumps(plan))
        out = self.work / "replay.json"
        client = self._start(
            "client",
            service=False,
            argv=[
                str(self.python),
                "-P",
                str(Path(__file__).with_name("petals_replay.py")),
                str(plan_path),
                str(out),
            ],
        )
        if client.wait(timeout=1800) != 0:
            raise PetalsTestbedError(
                f"the PETALS client failed: {_text(self.work / 'client.log')[-800:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    # --- the run --------------------------------------------------------------------------

    def run(self) -> PetalsResult:
        result = PetalsResult(self.scenario)
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # tear down as on Ctrl-C
        try:
            began = time.monotonic()
            maker = [str(self.python), str(ROOT / "petals/make_tiny_model.py")]
            layers = ["--layers", str(self.scenario.model.num_blocks)]
            subprocess.run(
                [*maker, str(self.work / "model"), *layers],
                check=True,
                capture_output=True,
                env=self.env,
            )
            self._coordinator()
            for spec in self.scenario.servers:
                self._agent(spec)
            self._registered()
            result.timings_s["start"] = time.monotonic() - began
            count = len(self.scenario.servers)
            self.say(f"{count} PETALS servers up in {result.timings_s['start']:.0f} s")
            for policy in self.policies:
                began = time.monotonic()
                placement = self._place(policy)
                result.timings_s[f"place_{policy}"] = time.monotonic() - began
                self.say(
                    f"{policy}: placement loaded in {result.timings_s[f'place_{policy}']:.1f} s"
                )
                replay = self._client(placement)
                result.runs.append(
                    PetalsRun(policy, placement, replay["servers"], replay["requests"])
                )
        except (OSError, subprocess.CalledProcessError, httpx.HTTPError) as error:
            raise PetalsTestbedError(f"{type(error).__name__}: {error}") from None
        except KeyboardInterrupt:
            raise PetalsTestbedError("interrupted; every process stopped") from None
        finally:
            self.stop()
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        return result

    def stop(self) -> None:
        """SIGTERM every process (agents leave and stop PETALS), newest first; then kill
        whatever is left of their groups, and remove hivemind's stale sockets."""
        from bprr_client.petals import remove_stale_hivemind_sockets

        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        remove_stale_hivemind_sockets()
        import shutil

        shutil.rmtree(self.work, ignore_errors=True)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _status(state: Path) -> dict[str, Any] | None:
    try:
        value: dict[str, Any] = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return value


def petals_predictions(result: PetalsResult, run: PetalsRun) -> list[dict[str, Any]]:
    """Each request's measured and predicted times (``report.compared_row``): the scenario's
    RTTs, the calibrated speeds, no scenario overheads, plus the calibrated transport."""
    scenario = measured_scenario(result.scenario, run.speeds, overheads=False)
    instance = Instance.from_scenario(scenario)
    server_index = {s.id: j for j, s in enumerate(scenario.servers)}
    rows = []
    for r in run.requests:
        hops = [Hop(server_index[sid], start, end) for sid, start, end in r["hops"]]
        decode = sum(run.speeds[sid]["transport_decode_ms"] for sid, _, _ in r["hops"])
        prefill = sum(run.speeds[sid]["transport_prefill_ms"] for sid, _, _ in r["hops"])
        row = compared_row(instance, r, hops, prefill, decode)
        row["wait_ms"] = r["booking_ms"]
        row["e2e_ms"] = r["e2e_ms"]
        row["attempts"] = r["attempts"]
        delays = r["delays"]  # petals_replay.HopDelays.take(), this request's
        row["exchanges"] = int(delays["exchanges"])
        row["delayed_exchanges"] = int(delays["delayed_exchanges"])
        row["delayed_prefills"] = int(delays["delayed_prefills"])
        row["delay_slept_ms"] = delays["slept_ms"]
        rows.append(row)
    return rows
