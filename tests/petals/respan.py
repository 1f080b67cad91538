"""One PETALS server through ``PetalsHost`` (no coordinator): started, given a span, then
another; run inside ``unshare -n`` by the tests, prints the facts as JSON.

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m tests.petals.respan OUT'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bprr_client import Span
from bprr_client.petals import LauncherOptions, PetalsHost

from tests.petals.swarm import PETALS_PYTHON, Swarm, free_port, wait_for


def main() -> int:
    out = Path(sys.argv[1])
    facts: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bprr-pr-") as work:
        swarm = Swarm(Path(work))  # for the model, the process census and the sockets
        swarm.make_model()
        os.environ["BPRR_PETALS_RUN"] = swarm.run_id  # PetalsHost's launcher inherits it
        port = free_port()
        options = LauncherOptions(
            model=str(swarm.model_dir),
            python=str(PETALS_PYTHON),
            dht_prefix="tiny",
            host_maddrs=(f"/ip4/127.0.0.1/tcp/{port}",),
        )
        host = PetalsHost(options, state_dir=Path(work) / "server")
        try:
            started = time.monotonic()
            host.apply(Span(start=0, end=3))
            wait_for("blocks 0:3", host.loaded_span, 180)
            facts["startup_s"] = time.monotonic() - started
            first = (
                host.supervisor.process.pid if host.supervisor.process else None,
                host.identity(),
            )
            started = time.monotonic()
            host.apply(Span(start=2, end=6))
            facts["loaded_right_after_apply"] = str(host.loaded_span())
            loaded = wait_for("blocks 2:6", host.loaded_span, 120, every_s=0.05)
            facts["respan_s"] = time.monotonic() - started
            facts["loaded"] = [loaded.start, loaded.end]
            second = (
                host.supervisor.process.pid if host.supervisor.process else None,
                host.identity(),
            )
            facts["same_process_and_peer"] = first == second
            facts["starts"] = host.supervisor.starts
            log = host.log_path.read_text(errors="replace")
            facts["respan_lines"] = [x for x in log.splitlines() if "bprr:" in x]
        finally:
            started = time.monotonic()
            host.close()
            facts["stop_s"] = time.monotonic() - started
            swarm.http.close()
        facts["leftovers"] = swarm.leftovers()
    out.write_text(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
