"""``bprr testbed``: the whole emulated swarm on one machine, its measurements, and the
performance model's predictions for the same routes.

Order of a run: network (one namespace per site on a bridge, or loopback when namespaces are
unavailable), coordinator (uvicorn on a thread, fresh SQLite file, planner thread off so
that the placement under test stays put), the scenario loaded with its servers not yet live,
delaying relays (one process per server site; one listener per server and client site,
half the RTT each way), one block server process per scenario server in its site's
namespace (measures its speed, registers, heartbeats, loads the span it is assigned), then
for each policy: a placement forced through ``POST /v1/placements`` (``cg`` at the design
concurrency |R| of the workload's rate, or ``petals``), the servers online with their spans,
and one client process per scenario client in its site's namespace replaying that client's
requests of the scenario's Poisson workload. Teardown runs backwards in ``finally`` (also on
SIGINT / SIGTERM and on errors) and deletes every ``bprr-tb-<run>`` namespace.

The prediction for a request is ``perf.request_timing`` on its route, with the scenario's
RTTs and overheads and the servers' *measured* speeds, plus the transport cost of this
testbed per hop: the client's median one-block decode step through the delayed path, less
the server's own step time and the emulated RTT (the stated calibration).
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
import uvicorn
from pydantic import SecretStr

from app.allocation import cg, petals
from app.allocation.instance import Instance
from app.allocation.scenario import Scenario
from app.settings import Settings
from bprr_harness.testbed import netns
from bprr_harness.testbed.processes import Processes, TestbedError, free_port
from bprr_harness.testbed.relay import RelaySpec
from bprr_harness.testbed.report import (  # the report's functions, for the callers of old
    POLICIES,
    error_summary,
    measured_scenario,
    predictions,
    simulator_metrics,
    testbed_metrics,
)

SERVER_PORT_BASE = 7100
RELAY_PORT_BASE = 20000
HIDDEN = 64
HEADS = 4


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: tear down and stop."""


@dataclass(frozen=True)
class TestbedOptions:
    __test__ = False  # not a pytest class
    policies: tuple[str, ...] = ("cg",)
    use_netns: bool = True
    hidden: int = HIDDEN
    heads: int = HEADS
    seed: int | None = None
    start_timeout_s: float = 90.0
    keep_logs: Path | None = None


@dataclass
class PolicyRun:
    policy: str
    placement: dict[str, Any]
    requests: list[dict[str, Any]]
    pings: dict[str, dict[str, float]]
    errors: list[str]
    wall_s: float


@dataclass
class TestbedResult:
    __test__ = False
    scenario: Scenario
    mode: str  # "netns" | "netns+netem" | "loopback"
    mode_note: str
    run_id: str
    measured_speeds: dict[str, dict[str, float]]
    runs: list[PolicyRun] = field(default_factory=list)


class Testbed:
    """One run of ``bprr testbed``; ``run()`` returns a TestbedResult."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        scenario: Scenario,
        options: TestbedOptions,
        out: TextIO | None = None,
    ) -> None:
        if scenario.workload is None or not hasattr(scenario.workload, "rate_per_s"):
            raise TestbedError("workload: the testbed replays a Poisson workload")
        for policy in options.policies:
            if policy not in POLICIES:
                raise TestbedError(f"--policy: {policy!r} is neither cg nor petals")
        self.scenario = scenario
        self.options = options
        self.out = out or sys.stderr
        self.instance = Instance.from_scenario(scenario)
        self.network: netns.SiteNetwork | None = None
        self.mode = "loopback"
        self.mode_note = ""
        self.tmp = Path(tempfile.mkdtemp(prefix="bprr-testbed-"))
        self.procs = Processes(self.tmp)
        self.admin_token = secrets.token_urlsafe(18)
        self.join_token = secrets.token_urlsafe(18)  # registration needs one (no dev mode)
        self.server: uvicorn.Server | None = None
        self.server_thread: threading.Thread | None = None
        self.url = ""
        self.run_id = netns.new_run_id()
        self.measured: dict[str, dict[str, float]] = {}
        self.client_addresses: dict[str, dict[str, str]] = {}  # client site -> server -> addr

    def say(self, message: str) -> None:
        print(f"[testbed] {message}", file=self.out, flush=True)

    # --- network --------------------------------------------------------------------------

    def _network(self) -> None:
        reason = "--no-netns given" if not self.options.use_netns else netns.unavailable_reason()
        if reason is not None:
            self.mode = "loopback"
            self.mode_note = (
                f"network namespaces unavailable ({reason}): everything on loopback, "
                "with the same userspace delays"
            )
            self.say(self.mode_note)
            return
        network = netns.SiteNetwork(self.scenario.sites, self.run_id)
        self.network = network
        network.up()
        assert network.subnet is not None
        self.mode = "netns"
        self.mode_note = (
            f"{len(self.scenario.sites)} network namespaces bprr-tb-{self.run_id}-s* on bridge "
            f"{network.bridge} ({network.subnet})"
        )
        if netns.netem_works(network.namespaces[0]):
            network.apply_netem(self.scenario.site_matrix())
            self.mode = "netns+netem"
            self.mode_note += "; delays by netem"
        else:
            self.mode_note += "; no netem in this kernel: delays by userspace relays"
        self.say(self.mode_note)

    def _prefix(self, site: str) -> list[str]:
        return [] if self.network is None else self.network.exec_prefix(site)

    def _site_host(self, site: str) -> str:
        return "127.0.0.1" if self.network is None else self.network.address(site)

    # --- coordinator ----------------------------------------------------------------------

    def _coordinator(self) -> None:
        from app.api.app import create_app

        host = "127.0.0.1" if self.network is None else self.network.bridge_address
        settings = Settings.model_validate(
            {
                **Settings().model_dump(),
                "database_url": f"sqlite:///{self.tmp / 'coordinator.db'}",
                "admin_token": SecretStr(self.admin_token),
                "join_token": SecretStr(self.join_token),
                "auto_migrate": True,
                "planner_interval_s": 0.0,
                "heartbeat_interval_s": 1.0,
                "lease_ttl_s": 10.0,
                "session_grace_s": 30.0,
            }
        )
        config = uvicorn.Config(
            create_app(settings),
            host=host,
            port=0,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="bprr-testbed-uvicorn", daemon=True)
        self.server, self.server_thread = server, thread
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise TestbedError("the coordinator did not start")
            time.sleep(0.02)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        self.url = f"http://{host}:{port}"
        self.say(f"coordinator on {self.url} (SQLite in {self.tmp})")
        with self._admin() as client:
            raw = self.scenario.model_dump(mode="json", exclude_none=True)
            response = client.post("/v1/scenario", params={"online": "false"}, json=raw)
        if response.status_code != 201:
            raise TestbedError(f"the coordinator refused the scenario: {response.text[:300]}")

    def _admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            timeout=120.0,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    # --- relays and servers -----------------------------------------------------------------

    def _ports(self) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        server_ports: dict[str, int] = {}
        relay_ports: dict[tuple[str, str], int] = {}
        client_sites = sorted({c.site for c in self.scenario.clients})
        for j, spec in enumerate(self.scenario.servers):
            server_ports[spec.id] = (
                SERVER_PORT_BASE + j if self.network is not None else free_port()
            )
            for s, site in enumerate(client_sites):
                relay_ports[(spec.id, site)] = (
                    RELAY_PORT_BASE + 100 * j + s if self.network is not None else free_port()
                )
        return server_ports, relay_ports

    def _start_swarm(self) -> None:
        python = sys.executable
        server_ports, relay_ports = self._ports()
        matrix = self.scenario.site_matrix()
        index = {site: i for i, site in enumerate(self.scenario.sites)}
        netem = self.mode == "netns+netem"
        # Relays: one process per server site, listening where clients of each site connect.
        by_site: dict[str, list[str]] = {}
        for (server_id, client_site), port in relay_ports.items():
            spec = next(s for s in self.scenario.servers if s.id == server_id)
            host = self._site_host(spec.site)
            direct = f"{host}:{server_ports[server_id]}"
            if netem:
                address = direct
            else:
                rtt = matrix[index[client_site]][index[spec.site]]
                override = None
                for client in self.scenario.clients:
                    if client.site == client_site:
                        override = self.scenario.pair_override(client.id, server_id)
                        break
                delay = (rtt if override is None else override) / 2.0
                relay = RelaySpec(host, port, "127.0.0.1", server_ports[server_id], delay)
                by_site.setdefault(spec.site, []).append(relay.format())
                address = f"{host}:{port}"
            self.client_addresses.setdefault(client_site, {})[server_id] = address
        deadline = time.monotonic() + self.options.start_timeout_s
        for site, specs in by_site.items():
            name = f"relay-{index[site]}"
            self.procs.start(
                name, [*self._prefix(site), python, "-m", "bprr_harness.testbed.relay", *specs]
            )
            self.procs.wait_line(name, "ready", deadline)
        o = self.scenario.overheads
        for j, spec in enumerate(self.scenario.servers):
            listen_host = "127.0.0.1" if not netem else "0.0.0.0"
            args = [
                *self._prefix(spec.site),
                python,
                "-m",
                "bprr_harness.testbed.block_server",
                "--server-id",
                spec.id,
                "--join-token",
                self.join_token,
                "--site",
                spec.site,
                "--coordinator",
                self.url,
                "--listen",
                f"{listen_host}:{server_ports[spec.id]}",
                "--address",
                f"{self._site_host(spec.site)}:{server_ports[spec.id]}",
                "--memory-gb",
                repr(spec.memory_gb),
                "--decode-ms-per-block",
                repr(spec.decode_ms_per_block),
                "--prefill-fixed-ms",
                repr(spec.prefill_ms_per_block.fixed),
                "--prefill-per-token-ms",
                repr(spec.prefill_ms_per_block.per_token),
                "--decode-overhead-ms",
                repr(o.per_token_ms),
                "--prefill-overhead-fixed-ms",
                repr(o.prefill_fixed_ms),
                "--prefill-overhead-per-token-ms",
                repr(o.prefill_per_token_ms),
                "--hidden",
                str(self.options.hidden),
                "--heads",
                str(self.options.heads),
            ]
            if spec.gpu:
                args += ["--gpu", spec.gpu]
            self.procs.start(f"server-{j}", args)
        for j, spec in enumerate(self.scenario.servers):
            ready = json.loads(self.procs.wait_line(f"server-{j}", "ready", deadline))
            self.measured[spec.id] = {k: v for k, v in ready.items() if k != "address"}
        self.say(
            f"{len(self.scenario.servers)} block servers registered (hidden {self.options.hidden},"
            f" measured tau: "
            + ", ".join(
                f"{sid} {m['decode_ms_per_block']:.2f} ms" for sid, m in self.measured.items()
            )
            + ")"
        )

    # --- placement ------------------------------------------------------------------------

    def _place(self, policy: str) -> dict[str, Any]:
        body: dict[str, Any] = {"algorithm": policy}
        if policy == "cg":
            body["concurrency"] = cg.design_concurrency(self.instance, self._rate())
        with self._admin() as client:
            response = client.post("/v1/placements", json=body)
            if response.status_code != 201:
                raise TestbedError(f"POST /v1/placements {body}: {response.text[:300]}")
            placement: dict[str, Any] = response.json()
            deadline = time.monotonic() + self.options.start_timeout_s
            while True:
                servers = client.get("/v1/servers").json()
                waiting = [
                    s["id"]
                    for s in servers
                    if s.get("assigned_span")
                    and (s["state"] != "online" or s.get("loaded_span") != s["assigned_span"])
                ]
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    raise TestbedError(f"servers not online with their spans: {waiting}")
                time.sleep(0.1)
        spans = ", ".join(f"{p['server_id']}[{p['start']},{p['end']})" for p in placement["spans"])
        self.say(f"{policy} placement, generation {placement['generation']}: {spans}")
        return placement

    def _rate(self) -> float:
        return float(getattr(self.scenario.workload, "rate_per_s", 1.0))

    def _placement_tuple(self, placement: dict[str, Any]) -> tuple[Any, ...]:
        from app.allocation.instance import Span

        spans: list[Span | None] = [None] * len(self.scenario.servers)
        index = {s.id: j for j, s in enumerate(self.scenario.servers)}
        for item in placement["spans"]:
            spans[index[item["server_id"]]] = Span(item["start"], item["end"])
        return tuple(spans)

    # --- clients --------------------------------------------------------------------------

    def _requests(self) -> list[dict[str, Any]]:
        from app.simulation.workload import scenario_workload

        workload = scenario_workload(self.scenario, self.options.seed)
        return [
            {
                "index": i,
                "client": int(workload.client[i]),
                "at_ms": float(workload.arrival_ms[i] - workload.arrival_ms[0]),
                "input_tokens": int(workload.input_tokens[i]),
                "output_tokens": int(workload.output_tokens[i]),
            }
            for i in range(len(workload))
        ]

    def _run_clients(self, policy: str, placement: dict[str, Any]) -> PolicyRun:
        requests = self._requests()
        petals_routes: dict[int, list[list[Any]]] = {}
        if policy == "petals":
            router = petals.PetalsRouter(
                self.scenario, self.instance, self._placement_tuple(placement)
            )
            for c in range(len(self.scenario.clients)):
                route = router.route(c)
                if route is None:
                    raise TestbedError(f"PETALS finds no route for client {c}")
                ids = [self.scenario.servers[h.server].id for h in route.hops]
                petals_routes[c] = [
                    [sid, h.start, h.end] for sid, h in zip(ids, route.hops, strict=True)
                ]
        began = time.monotonic()
        deadline = began + 600
        outputs: list[Path] = []
        names = []
        for c, client in enumerate(self.scenario.clients):
            mine = [dict(r) for r in requests if r["client"] == c]
            if not mine:
                continue
            for r in mine:
                if policy == "petals":
                    r["route"] = petals_routes[c]
            config = {
                "coordinator": self.url,
                "client": client.id,
                "site": client.site,
                "policy": policy,
                "addresses": self.client_addresses[client.site],
                "hidden": self.options.hidden,
                "per_request_ms": self.scenario.overheads.per_request_ms,
                "requests": mine,
            }
            config_path = self.tmp / f"client-{policy}-{c}.json"
            config_path.write_text(json.dumps(config))
            output = self.tmp / f"client-{policy}-{c}.out.json"
            outputs.append(output)
            name = f"client-{policy}-{c}"
            names.append(name)
            self.procs.start(
                name,
                [
                    *self._prefix(client.site),
                    sys.executable,
                    "-m",
                    "bprr_harness.testbed.client",
                    str(config_path),
                    str(output),
                ],
            )
        for name, _process, _ in list(self.procs.items):
            if name not in names:
                continue
            while _process.poll() is None:
                if time.monotonic() > deadline:
                    raise TestbedError(f"{name} did not finish within 600 s")
                time.sleep(0.1)
            if _process.returncode != 0:
                raise TestbedError(f"{name} failed: {self.procs.stderr_tail(name)}")
        self.procs.stop(f"client-{policy}-")
        results: list[dict[str, Any]] = []
        pings: dict[str, dict[str, float]] = {}
        errors: list[str] = []
        for output in outputs:
            data = json.loads(output.read_text())
            results.extend(data["results"])
            pings[data["client"]] = data["calibration_ms"]
            errors.extend(data["errors"])
        results.sort(key=lambda r: r["index"])
        return PolicyRun(policy, placement, results, pings, errors, time.monotonic() - began)

    # --- the whole run --------------------------------------------------------------------

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: FrameType | None) -> None:
            raise Interrupted(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def run(self, after_setup: Callable[[Testbed], None] | None = None) -> TestbedResult:
        result = TestbedResult(self.scenario, "loopback", "", self.run_id, {})
        with self._signals():
            try:
                self._network()
                self._coordinator()
                self._start_swarm()
                if after_setup is not None:
                    after_setup(self)
                for policy in self.options.policies:
                    placement = self._place(policy)
                    run = self._run_clients(policy, placement)
                    self.say(
                        f"{policy}: {len(run.requests)} requests in {run.wall_s:.1f} s"
                        + (f", {len(run.errors)} failed" if run.errors else "")
                    )
                    result.runs.append(run)
            finally:
                self.teardown()
        result.mode, result.mode_note, result.measured_speeds = (
            self.mode,
            self.mode_note,
            self.measured,
        )
        return result

    def teardown(self) -> None:
        """Stop clients, servers (they leave the swarm), relays, the coordinator; delete the
        namespaces. Safe to call twice."""
        try:
            self.procs.stop("client-")
            self.procs.stop("server-")
            self.procs.stop()
        finally:
            if self.server is not None:
                self.server.should_exit = True
            if self.server_thread is not None:
                self.server_thread.join(timeout=15)
            if self.network is not None:
                self.network.down()
            if self.options.keep_logs is None:
                import shutil

                shutil.rmtree(self.tmp, ignore_errors=True)


__all__ = [
    "POLICIES",
    "Testbed",
    "TestbedError",
    "TestbedOptions",
    "TestbedResult",
    "error_summary",
    "measured_scenario",
    "predictions",
    "simulator_metrics",
    "testbed_metrics",
]
