"""The testbed's child processes: started with their output read line by line on threads,
waited for by a line prefix, and stopped as process groups (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path


class TestbedError(Exception):
    """The testbed could not run (a process failed to start, a placement was refused...)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Processes:
    """Child processes with their stdout lines on a queue each; stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: list[tuple[str, subprocess.Popen[str], queue.Queue[str]]] = []

    def start(self, name: str, args: list[str]) -> queue.Queue[str]:
        lines: queue.Queue[str] = queue.Queue()
        stderr = (self.log_dir / f"{name}.err").open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            start_new_session=True,
        )
        stderr.close()
        self.items.append((name, process, lines))

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line.rstrip("\n"))

        threading.Thread(target=pump, name=f"out-{name}", daemon=True).start()
        return lines

    def wait_line(self, name: str, prefix: str, deadline: float) -> str:
        for item_name, process, lines in self.items:
            if item_name != name:
                continue
            while time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=0.1)
                except queue.Empty:
                    if process.poll() is not None:
                        raise TestbedError(
                            f"{name} exited with status {process.returncode}: "
                            f"{self.stderr_tail(name)}"
                        ) from None
                    continue
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            raise TestbedError(f"{name} did not print {prefix!r} in time: {self.stderr_tail(name)}")
        raise KeyError(name)

    def stderr_tail(self, name: str) -> str:
        path = self.log_dir / f"{name}.err"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text.strip().splitlines()[-1][:300] if text.strip() else "(no output)"

    def stop(self, name_prefix: str = "", timeout_s: float = 10.0) -> None:
        chosen = [item for item in self.items if item[0].startswith(name_prefix)]
        for _, process, _ in reversed(chosen):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, process, _ in reversed(chosen):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.items = [item for item in self.items if item not in chosen]
