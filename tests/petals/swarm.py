"""A real PETALS swarm steered by a real coordinator, on loopback: the driver the PETALS tests
run inside a network namespace that has only ``lo`` (``unshare -n``). It records facts;
the tests assert on them.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m tests.petals.swarm OUT.json'

Phases: (A) two agents with PETALS servers and a client generating 12 tokens; (B) a third,
faster server joins: re-plan, re-span, the next session; (C) a generation during which the
server on the chain's last hop is killed (its process group) after 4 tokens.
Every process started carries ``BPRR_PETALS_RUN=<run id>`` in its environment, so the
driver can tell that none is left afterwards; hivemind 1.1.10 leaves its socket files in
/tmp (whatever TMPDIR says): the stale ones are removed at the end and counted.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from bprr_client.petals import HIVEMIND_SOCKETS, remove_stale_hivemind_sockets

ROOT = Path(__file__).resolve().parents[2]
PETALS_PYTHON = Path(os.environ.get("BPRR_PETALS_PYTHON", ROOT / ".venv-petals/bin/python"))
ADMIN, JOIN = "admin-token-petals", "join-token-petals"
PREFIX = "tiny"
# the coordinator's view of the tiny model: 6 blocks of 1 GB; servers of 3.6 GB hold 3
MODEL = {
    "name": "tiny",
    "num_blocks": 6,
    "block_memory_gb": 1.0,
    "kv_bytes_per_token_per_block": 1_000_000,
    "max_input_tokens": 64,
    "max_output_tokens": 32,
    "overheads": {"per_token_ms": 1},
}
OPEN = re.compile(r"rpc_inference\.open\(blocks=(\d+):(\d+), remote_peer=")


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Swarm:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.run_id = f"{os.getpid()}-{time.time_ns()}"
        self.env = {
            **os.environ,
            "BPRR_PETALS_RUN": self.run_id,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(work / "tmp"),
        }
        (work / "tmp").mkdir()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.model_dir = work / "model"
        self.first_peer: str | None = None
        self.sockets_before = set(glob.glob(HIVEMIND_SOCKETS))

    # --- processes ------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **env},
            cwd=ROOT,
            start_new_session=True,  # its own group: whatever it leaves is killed with it
        )
        self.processes[name] = process
        return process

    def make_model(self) -> None:
        subprocess.run(
            [str(PETALS_PYTHON), str(ROOT / "petals/make_tiny_model.py"), str(self.model_dir)],
            check=True,
            env=self.env,
            capture_output=True,
        )

    def start_coordinator(self) -> None:
        self._start(
            "coordinator",
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            BPRR_DATABASE_URL=f"sqlite:///{self.work / 'bprr.db'}",
            BPRR_ADMIN_TOKEN=ADMIN,
            BPRR_JOIN_TOKEN=JOIN,
            BPRR_LEASE_TTL_S="4",
            BPRR_HEARTBEAT_INTERVAL_S="0.5",
            BPRR_PLANNER_INTERVAL_S="1",
            BPRR_REPLAN_MIN_GAIN="0",
            BPRR_SESSION_GRACE_S="5",
        )

        def up() -> bool:
            try:
                return self.http.get("/v1/servers").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the coordinator", up, 60)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        reply = self.http.put("/v1/model", json=MODEL, headers=admin)
        assert reply.status_code == 200, reply.text

    def start_agent(self, name: str, memory_gb: float, decode_ms: float) -> None:
        state = self.work / name
        state.mkdir()
        port = free_port()
        peers = (
            ["--petals-new-swarm"]
            if self.first_peer is None
            else ["--petals-initial-peer", self.first_peer]
        )
        self._start(
            name,
            [
                *(str(PETALS_PYTHON), "-m", "bprr_client.cli", "--coordinator", self.url, "-v"),
                *("run", "--id", name, "--site", "east", "--memory-gb", str(memory_gb)),
                *("--decode-ms-per-block", str(decode_ms), "--address", f"127.0.0.1:{port}"),
                *("--join-token", JOIN, "--no-peers", "--petals-model", str(self.model_dir)),
                *("--petals-python", str(PETALS_PYTHON), "--petals-dht-prefix", PREFIX),
                *("--petals-port", str(port), "--petals-identity", str(state / "identity.key")),
                *("--petals-state-dir", str(state), "--petals-log", str(state / "petals.log")),
                *peers,
            ],
        )
        if self.first_peer is None:
            status = wait_for("the first PETALS server's address", lambda: self.status(name), 120)
            self.first_peer = status["multiaddrs"][0]
            # the others bootstrap from it once its DHT runs ("Running a server on")
            wait_for(
                "the first server", lambda: "Running a server on" in self.petals_log(name), 120
            )

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = json.loads((self.work / name / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return value

    def petals_log(self, name: str) -> str:
        path = self.work / name / "petals.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def served_spans(self, name: str, since: int = 0) -> list[tuple[int, int]]:
        """The spans ``rpc_inference.open`` logged by this server (after offset ``since``)."""
        text = self.petals_log(name)[since:]
        return [(int(a), int(b)) for a, b in OPEN.findall(text)]

    def servers(self) -> dict[str, dict[str, Any]]:
        return {s["id"]: s for s in self.http.get("/v1/servers").json()}

    def settled(self, names: list[str]) -> dict[str, dict[str, Any]] | None:
        """Every named server online with its assigned span loaded, or None."""
        servers = self.servers()
        for name in names:
            s = servers.get(name)
            if s is None or s["state"] != "online" or s["loaded_span"] != s["assigned_span"]:
                return None
        return servers

    def run_client(self, name: str, tokens: int, **pause: Path | int) -> subprocess.Popen[bytes]:
        assert self.first_peer is not None
        argv = [str(PETALS_PYTHON), str(ROOT / "tests/petals/petals_client.py")]
        argv += [str(self.model_dir), "--coordinator", self.url, "--dht-prefix", PREFIX]
        argv += ["--initial-peer", self.first_peer, "--tokens", str(tokens)]
        for key, value in pause.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        out = (self.work / f"{name}.json").open("wb")
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=(self.work / f"{name}.log").open("wb"),
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def client_result(self, name: str, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        code = process.wait(timeout=300)
        if code != 0:
            tail = (self.work / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"client {name} exited {code}: {tail}")
        value: dict[str, Any] = json.loads((self.work / f"{name}.json").read_text())
        return value

    def kill_launcher(self, name: str) -> int:
        """SIGKILL the PETALS server's whole process group (a crash), not its agent."""
        status = self.status(name)
        assert status is not None
        pid = int(status["pid"])
        os.killpg(pid, signal.SIGKILL)
        return pid

    def stop(self) -> dict[str, float]:
        """SIGTERM agents (they leave and stop PETALS), then the coordinator; seconds each."""
        took: dict[str, float] = {}
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            started = time.monotonic()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
            took[name] = time.monotonic() - started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # e.g. a multiprocessing forkserver
        self.http.close()
        return took

    def marked(self) -> dict[int, str]:
        """Processes carrying this run's marker (zombies have no environment: not listed)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"BPRR_PETALS_RUN={self.run_id}".encode() in environ:
                found[int(entry.name)] = cmdline[:120]
        return found

    def leftovers(self, grace_s: float = 20.0) -> dict[str, list[str]]:
        """After the stop: processes of this run still alive after ``grace_s`` (helpers such
        as torch_shm_manager or a multiprocessing forkserver exit on their own once their
        parent is gone) are listed under ``lingered`` and killed; ``processes`` is what is
        left after that, and ``sockets`` the hivemind socket files this run left in /tmp
        (stale ones, or ones still live in this run's network namespace)."""
        deadline = time.monotonic() + grace_s
        while self.marked() and time.monotonic() < deadline:
            time.sleep(0.2)
        lingered = self.marked()
        for pid in lingered:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        alive = [f"{pid}: {cmd}" for pid, cmd in self.marked().items()]
        sockets = sorted(
            path
            for path in set(glob.glob(HIVEMIND_SOCKETS)) - self.sockets_before
            if path in namespace_sockets() or not listening(path)
        )
        return {
            "processes": alive,
            "sockets": sockets,
            "lingered": [f"{pid}: {cmd}" for pid, cmd in lingered.items()],
        }


def namespace_sockets() -> set[str]:
    """The unix socket paths bound in this network namespace: /proc/net/unix is per
    namespace, so a live hivemind socket of another run on the machine (outside the test's
    namespace) is not counted as this run's."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        rows = table.read().splitlines()[1:]
    return {fields[7] for row in rows if len(fields := row.split()) >= 8}


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def scenario(work: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {"timings_s": {}}
    timings = facts["timings_s"]
    swarm = Swarm(work)
    try:
        swarm.make_model()
        started = time.monotonic()
        swarm.start_coordinator()
        swarm.start_agent("s0", memory_gb=3.6, decode_ms=10.0)
        swarm.start_agent("s1", memory_gb=3.6, decode_ms=10.0)
        wait_for("s0 and s1 online", lambda: swarm.settled(["s0", "s1"]), 240)
        timings["startup"] = time.monotonic() - started
        facts["servers_a"] = swarm.servers()

        # (A) one generation through the booked two-hop chain
        offsets = {n: len(swarm.petals_log(n)) for n in ("s0", "s1")}
        started = time.monotonic()
        facts["a"] = swarm.client_result("client-a", swarm.run_client("client-a", 12))
        timings["client_a"] = time.monotonic() - started
        facts["served_a"] = {n: swarm.served_spans(n, offsets[n]) for n in offsets}
        facts["reserved_after_a"] = {n: s["reserved_slots"] for n, s in swarm.servers().items()}

        # (B) a faster server joins: re-plan, re-span, the next session uses it
        generation = swarm.http.get("/v1/routes", params=_route()).json()["generation"]
        started = time.monotonic()
        swarm.start_agent("s2", memory_gb=9.0, decode_ms=2.0)

        def replanned() -> dict[str, dict[str, Any]] | None:
            servers = swarm.settled(["s0", "s1", "s2"])
            if servers is None or servers["s2"]["assigned_span"] is None:
                return None
            route = swarm.http.get("/v1/routes", params=_route())
            if route.status_code != 200 or route.json()["generation"] == generation:
                return None
            return servers

        facts["servers_b"] = wait_for("the re-plan with s2", replanned, 240)
        timings["join_to_settled"] = time.monotonic() - started
        facts["respans"] = {
            n: [line for line in swarm.petals_log(n).splitlines() if "re-spanning" in line]
            for n in ("s0", "s1")
        }
        offsets = {n: len(swarm.petals_log(n)) for n in ("s0", "s1", "s2")}
        facts["b"] = swarm.client_result("client-b", swarm.run_client("client-b", 12))
        facts["served_b"] = {n: swarm.served_spans(n, offsets[n]) for n in offsets}

        # (C) kill the server of the chain's last hop after 4 tokens
        marker, go = work / "paused.json", work / "go"
        client = swarm.run_client("client-c", 16, pause_after=4, marker=marker, go=go)
        paused = json.loads(wait_for("the client's pause", lambda: _read(marker), 240))
        victim = paused["hops"][-1][0]
        killed_at = time.monotonic()
        swarm.kill_launcher(victim)
        go.write_text("go")
        states: list[tuple[float, str, Any]] = []

        def dropped() -> bool:
            server = swarm.servers().get(victim)
            state = None if server is None else (server["state"], server["loaded_span"])
            states.append((time.monotonic() - killed_at, str(state), state))
            return server is None or server["state"] != "online"

        wait_for("the coordinator to drop the killed server", dropped, 30, every_s=0.1)
        timings["kill_to_not_routed"] = time.monotonic() - killed_at
        routes_after = [
            [h["server_id"] for h in swarm.http.get("/v1/routes", params=_route()).json()["hops"]]
            for _ in range(3)
        ]
        facts["c"] = swarm.client_result("client-c", client)
        timings["kill_to_client_done"] = time.monotonic() - killed_at
        facts["victim"] = victim
        facts["paused_hops"] = paused["hops"]
        facts["routes_after_kill"] = routes_after
    finally:
        timings["stop"] = swarm.stop()
        # what the clients' and the killed server's hivemind processes left in /tmp
        facts["stale_sockets_removed"] = len(remove_stale_hivemind_sockets())
        facts["leftovers"] = swarm.leftovers()
        facts["logs"] = {
            name: (work / f"{name}.log").read_text(errors="replace")[-2500:]
            for name in swarm.processes
            if (work / f"{name}.log").exists()
        }
    return facts


def _route() -> dict[str, Any]:
    return {"client_site": "east", "input_tokens": 10, "output_tokens": 12}


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except OSError:
        return None


def main() -> int:
    out = Path(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="bprr-pt-") as work:
        try:
            facts = scenario(Path(work))
        except Exception as error:
            facts = {"error": f"{type(error).__name__}: {error}"}
            logs = {p.name: p.read_text(errors="replace")[-2500:] for p in Path(work).glob("*.log")}
            facts["logs"] = logs
            for name in ("s0", "s1", "s2"):
                log = Path(work) / name / "petals.log"
                if log.exists():
                    facts["logs"][f"{name}/petals.log"] = log.read_text(errors="replace")[-2500:]
    out.write_text(json.dumps(facts, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
