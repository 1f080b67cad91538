"""``bprr serve --demo SCENARIO``: the coordinator, a simulated swarm and a client stream in one
process, stopped cleanly by Ctrl-C or SIGTERM.

Start-up: uvicorn serves the coordinator on a background thread (on a fresh SQLite file); the
scenario is loaded through ``POST /v1/scenario?online=false`` (model, sites, RTTs, clients;
its servers not yet live); one agent per server registers and heartbeats; the coordinator's
planner places them by itself (a placement is forced through ``POST /v1/placements`` only when
the planner's leaves a demo server without a span); the agents load their spans and go
online; then the client stream starts. Shutdown runs it backwards: the stream stops and
releases its sessions, the agents leave, the coordinator stops.

Everything goes through the public HTTP API with the admin token, as an operator would.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import httpx
import uvicorn
from bprr_client import CoordinatorError, RetryPolicy, RouteClient, ServerAgent
from pydantic import SecretStr

from app.allocation.scenario import PoissonWorkload, Scenario, load_scenario
from app.settings import Settings
from bprr_harness.demo.stream import Booked, ClientStream, DemoClient
from bprr_harness.demo.swarm import make_agents

# Demo pacing when the environment does not set it: fast heartbeats and planner ticks so that
# servers go joining -> online within a couple of seconds.
DEMO_DEFAULTS: dict[str, float | str] = {
    "heartbeat_interval_s": 1.0,
    "lease_ttl_s": 5.0,
    "planner_interval_s": 0.5,
    # Every server of the scenario takes part (auto may leave small ones idle, which the
    # demo would show as never coming online); BPRR_PLANNER_ALGORITHM=auto shows its choice.
    "planner_algorithm": "cg",
}
# Arrival rate when the scenario has no Poisson workload (a trace, or none).
FALLBACK_RATE_PER_S = 0.5


class DemoError(Exception):
    """The demo cannot start (bad scenario, port in use, coordinator refused the scenario)."""


@dataclass(frozen=True)
class DemoOptions:
    scenario_path: Path
    host: str = "127.0.0.1"
    port: int = 8080
    speed: float = 1.0
    seed: int | None = None
    placement_wait_s: float = 5.0
    online_wait_s: float = 15.0


@dataclass
class DemoSummary:
    booked: int
    rejected: int
    failed: int
    released: int
    servers_left: int
    servers: int
    still_registered: int | None


def demo_settings(base: Settings, database_url: str, admin_token: str) -> Settings:
    """The coordinator's settings for the demo: its own database, an admin token, and the demo
    pacing for every setting the environment leaves unset."""
    update: dict[str, Any] = {
        "database_url": database_url,
        "admin_token": SecretStr(admin_token),
        "auto_migrate": True,
    }
    if base.join_token is None:
        # The demo's own agents register without a token: an open (development) swarm,
        # which the coordinator announces with a warning.
        update["dev_mode"] = True
    for name, value in DEMO_DEFAULTS.items():
        if name not in base.model_fields_set:
            update[name] = value
    return Settings.model_validate({**base.model_dump(), **update})


class Demo:
    """The whole demo; ``run()`` blocks until ``stop()`` (or a signal) and returns a summary."""

    def __init__(
        self, options: DemoOptions, settings: Settings | None = None, out: TextIO | None = None
    ) -> None:
        self.options = options
        self.out = out or sys.stdout
        try:
            self.scenario: Scenario = load_scenario(options.scenario_path)
        except ValueError as error:  # ScenarioError
            raise DemoError(str(error)) from None
        if not (options.speed > 0 and options.speed < float("inf")):
            raise DemoError(f"--demo-speed: must be a positive number, got {options.speed}")
        base = settings or Settings()
        self.generated_token = base.admin_token is None
        admin = (
            secrets.token_urlsafe(18)
            if base.admin_token is None
            else base.admin_token.get_secret_value()
        )
        self._tempdir = Path(tempfile.mkdtemp(prefix="bprr-demo-"))
        self.database_path = self._tempdir / "demo.db"
        self.settings = demo_settings(base, f"sqlite:///{self.database_path}", admin)
        self.admin_token = admin
        self._stop = threading.Event()
        self.server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self.url = ""
        self.agents: list[ServerAgent] = []
        self.stream: ClientStream | None = None
        self._routes: RouteClient | None = None

    # --- output ----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"[demo] {message}", file=self.out, flush=True)

    # --- signals ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the demo gracefully (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: FrameType | None) -> None:
            if not self._stop.is_set():
                self.say(f"{signal.Signals(signum).name}: stopping (agents leave, threads join)")
            self._stop.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # --- phases ----------------------------------------------------------------------------

    def _start_coordinator(self) -> None:
        from app.api.app import create_app
        from app.api.server import uvicorn_options

        app = create_app(self.settings)
        config = uvicorn.Config(
            app,
            host=self.options.host,
            port=self.options.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            **uvicorn_options(self.settings),
        )
        server = uvicorn.Server(config)
        self.server = server
        thread = threading.Thread(target=server.run, name="bprr-demo-uvicorn", daemon=True)
        self._server_thread = thread
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise DemoError(
                    f"the coordinator did not start on {self.options.host}:{self.options.port} "
                    "(port in use? see the log above)"
                )
            time.sleep(0.02)
        port = self.options.port
        if port == 0 and server.servers:
            port = int(server.servers[0].sockets[0].getsockname()[1])
        host = self.options.host
        shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host == "0.0.0.0" else host)
        self.url = f"http://{shown}:{port}"

    def _admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            timeout=30.0,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    def _load_scenario(self) -> None:
        with self._admin() as client:
            raw = self.scenario.model_dump(mode="json", exclude_none=True)
            response = client.post("/v1/scenario", params={"online": "false"}, json=raw)
        if response.status_code != 201:
            raise DemoError(f"the coordinator refused the scenario: {response.text[:500]}")

    def _start_agents(self) -> None:
        join = self.settings.join_token
        self.agents = make_agents(
            self.scenario,
            self.url,
            join_token=None if join is None else join.get_secret_value(),
            speed=self.options.speed,
            seed=self._seed(),
        )
        # Register all of them first, so the planner sees the whole swarm at once.
        for agent in self.agents:
            try:
                agent.register()
            except Exception as error:
                raise DemoError(f"server {agent.server.id} could not register: {error}") from None
        for agent in self.agents:
            agent.start()

    def _assignments(self, client: httpx.Client) -> tuple[int, dict[str, Any]]:
        current = client.get("/v1/placements/current")
        generation = int(current.json()["generation"]) if current.status_code == 200 else 0
        servers = {s["id"]: s for s in client.get("/v1/servers").json()}
        return generation, servers

    def _await_placement(self) -> None:
        """Wait for the planner's placement; force one when a demo server has no span."""
        ids = [s.id for s in self.scenario.servers]
        deadline = time.monotonic() + self.options.placement_wait_s
        with self._admin() as client:
            while not self._stop.is_set():
                generation, servers = self._assignments(client)
                placed = [i for i in ids if (servers.get(i) or {}).get("assigned_span")]
                if generation >= 1 and len(placed) == len(ids):
                    self.say(f"the planner placed all {len(ids)} servers: generation {generation}")
                    return
                if time.monotonic() >= deadline:
                    break
                self._stop.wait(0.1)
            if self._stop.is_set():
                return
            self.say(
                f"the planner placed {len(placed)} of {len(ids)} servers (generation "
                f"{generation}); forcing a placement with POST /v1/placements"
            )
            # The planner's own algorithm: its next round then keeps this placement instead
            # of re-spanning every server again.
            algorithm = self.settings.planner_algorithm
            response = client.post("/v1/placements", json={"algorithm": algorithm})
            if response.status_code != 201:
                raise DemoError(f"POST /v1/placements failed: {response.text[:500]}")
            self.say(f"placement generation {response.json()['generation']} published")

    def _await_online(self) -> None:
        ids = {s.id for s in self.scenario.servers}
        deadline = time.monotonic() + self.options.online_wait_s
        online = 0
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                servers = client.get("/v1/servers").json()
                online = sum(
                    1
                    for s in servers
                    if s["id"] in ids
                    and s["state"] == "online"
                    and s.get("loaded_span") is not None
                    and s.get("loaded_span") == s.get("assigned_span")
                )
                if online == len(ids):
                    self.say(f"all {online} servers online with their spans loaded")
                    return
                self._stop.wait(0.1)
        if not self._stop.is_set():
            self.say(f"{online} of {len(ids)} servers online; starting the clients anyway")

    def _seed(self) -> int:
        if self.options.seed is not None:
            return self.options.seed
        workload = self.scenario.workload
        return workload.seed if isinstance(workload, PoissonWorkload) else 0

    def _rate(self) -> float:
        workload = self.scenario.workload
        if isinstance(workload, PoissonWorkload):
            return workload.rate_per_s
        self.say(f"the scenario has no Poisson workload: {FALLBACK_RATE_PER_S}/s arrivals")
        return FALLBACK_RATE_PER_S

    def _start_clients(self) -> None:
        routes = RouteClient(self.url, retry=RetryPolicy(attempts=2), timeout=10.0)
        self._routes = routes

        def book(site: str, input_tokens: int, output_tokens: int) -> Booked | None:
            try:
                session = routes.book(input_tokens, output_tokens, site)
            except CoordinatorError as error:
                if error.status_code in (409, 503):  # nothing fits now / not routable yet
                    return None
                raise
            return Booked(session.id, session.route.total_ms / 1000.0)

        def release(session_id: str) -> None:
            routes.release(session_id)

        rate = self._rate()
        stream = ClientStream(
            [DemoClient(c.id, c.site, c.share) for c in self.scenario.clients],
            rate,
            book,
            release,
            input_tokens=self.scenario.requests.max_input_tokens,
            output_tokens=self.scenario.requests.max_output_tokens,
            speed=self.options.speed,
            seed=self._seed(),
        )
        self.stream = stream
        stream.start()
        self.say(
            f"clients: Poisson arrivals at {rate:g}/s x speed {self.options.speed:g} "
            f"= {rate * self.options.speed:g}/s, {self.scenario.requests.max_input_tokens} "
            f"input / {self.scenario.requests.max_output_tokens} output tokens each"
        )

    # --- the whole run ---------------------------------------------------------------------

    def run(self, ready: Callable[[Demo], None] | None = None) -> DemoSummary:
        with self.signals():
            try:
                self._start_coordinator()
                self.say(f"coordinator on {self.url} (fresh SQLite database {self.database_path})")
                token_note = (
                    "generated for this run" if self.generated_token else "from BPRR_ADMIN_TOKEN"
                )
                self.say(f"admin token ({token_note}): {self.admin_token}")
                self._load_scenario()
                self.say(
                    f"scenario {self.scenario.name!r} loaded from {self.options.scenario_path}: "
                    f"{len(self.scenario.servers)} servers, {len(self.scenario.clients)} clients"
                )
                self._start_agents()
                self.say(f"{len(self.agents)} simulated server agents registered")
                self._await_placement()
                self._await_online()
                if not self._stop.is_set():
                    self._start_clients()
                    self.say(f"dashboard: {self.url}/   API docs: {self.url}/docs")
                    self.say("press Ctrl-C to stop")
                    if ready is not None:
                        ready(self)
                thread = self._server_thread
                while not self._stop.wait(0.5):
                    if thread is not None and not thread.is_alive():
                        raise DemoError("the coordinator stopped unexpectedly (see the log above)")
            finally:
                summary = self._shutdown()
        return summary

    def _shutdown(self) -> DemoSummary:
        released = 0
        if self.stream is not None:
            released = self.stream.stop()
        for agent in self.agents:
            agent.request_stop()
        for agent in self.agents:
            agent.stop(timeout_s=10.0)
        left = sum(1 for agent in self.agents if agent.registration is None and agent.error is None)
        still: int | None = None
        if self.url and self._server_thread is not None and self._server_thread.is_alive():
            try:
                with httpx.Client(base_url=self.url, timeout=5.0) as client:
                    ids = {a.server_id for a in self.agents}
                    still = sum(1 for s in client.get("/v1/servers").json() if s["id"] in ids)
            except httpx.HTTPError:
                still = None
        if self._routes is not None:
            self._routes.close()
        if self.server is not None:
            self.server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=30)
        shutil.rmtree(self._tempdir, ignore_errors=True)
        stats = self.stream.stats if self.stream is not None else None
        summary = DemoSummary(
            booked=0 if stats is None else stats.booked,
            rejected=0 if stats is None else stats.rejected,
            failed=0 if stats is None else stats.failed,
            released=released,
            servers_left=left,
            servers=len(self.agents),
            still_registered=still,
        )
        self.say(
            f"stopped: {summary.booked} sessions booked, {summary.rejected} refused, "
            f"{summary.released} released at shutdown; {summary.servers_left} of "
            f"{summary.servers} servers left the swarm"
            + ("" if still is None else f", {still} still registered")
        )
        return summary


def serve_demo(
    scenario_path: Path,
    *,
    host: str,
    port: int,
    speed: float,
    seed: int | None,
    settings: Settings,
) -> None:
    """``bprr serve --demo``, as the coordinator finds it (entry point ``bprr.demo``: demo):
    run the demo until stopped; one that cannot start is a ``UserError`` (one error line)."""
    from app.cli_style import UserError

    options = DemoOptions(scenario_path=scenario_path, host=host, port=port, speed=speed, seed=seed)
    try:
        Demo(options, settings).run()
    except DemoError as error:
        raise UserError(str(error)) from None
