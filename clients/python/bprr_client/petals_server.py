"""bprr's launcher around ``petals.server.server.Server``: a PETALS server that hosts the span
the coordinator assigned, re-spans in process when the assignment changes, and reports its
peer id, addresses and which span PETALS announced ONLINE. Run with the PETALS interpreter:

    PYTHON -m bprr_client.petals_server MODEL_DIR --control CONTROL.json --status STATUS.json \\
        --dht-prefix NAME --host-maddr /ip4/127.0.0.1/tcp/PORT [--initial-peer MADDR ...] \\
        [--identity-path KEY] [--throughput 1.0] [--device cpu] [--torch-dtype float32]

The agent (``PetalsHost``) writes ``{"span": [start, end]}`` (or ``{"span": null}``) into
CONTROL; the launcher writes STATUS: ``{"pid", "peer_id", "multiaddrs", "span", "online"}``,
where ``online`` is true only once the DHT shows this peer ONLINE for every block of
``span``. Nothing reaches outside the given addresses: no public bootstrap peers (an empty
``--initial-peer`` list starts a new swarm), no relays, no NAT port mapping, no auto-NAT,
no reachability check, no PyPI version check (that lives in PETALS' CLI only).

Exit codes: 0 stopped (SIGTERM/SIGINT, or the parent agent went away); 3 PETALS is not
importable by this interpreter (one ``error:`` line); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

NOT_INSTALLED = 3
POLL_S = 0.2


def read_span(control: Path) -> tuple[int, int] | None:
    """The span the agent asks for (None: host nothing; a missing or torn file: None)."""
    try:
        data = json.loads(control.read_text(encoding="utf-8"))
        span = data["span"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if span is None:
        return None
    start, end = int(span[0]), int(span[1])
    return (start, end) if 0 <= start < end else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a reader never sees half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bprr_client.petals_server")
    parser.add_argument("model", help="model folder (or hub name, if the hub is reachable)")
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--host-maddr", action="append", default=[], required=True)
    parser.add_argument("--announce-maddr", action="append", default=[])
    parser.add_argument("--initial-peer", action="append", default=[])
    parser.add_argument("--identity-path")
    parser.add_argument("--throughput", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-dtype", default="float32")
    parser.add_argument("--attn-cache-tokens", type=int, default=None)
    parser.add_argument("--update-period", type=float, default=30.0)
    parser.add_argument("--balance-check-s", type=float, default=0.5)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import petals  # noqa: F401  (the check: is PETALS importable by this interpreter?)
    except ImportError as error:
        print(
            f"error: PETALS is not importable by {sys.executable} ({error}); build its "
            "environment with `make petals` and pass --petals-python .venv-petals/bin/python",
            file=sys.stderr,
        )
        return NOT_INSTALLED
    from bprr_client._petals_launcher import run

    return run(args)


def watch_parent(stop: threading.Event, parent: int) -> None:
    """Stop when the agent that started us is gone (we were re-parented)."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            stop.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


def install_stop_signals() -> None:
    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def now() -> float:
    return time.monotonic()


if __name__ == "__main__":
    sys.exit(main())
