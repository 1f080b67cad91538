"""The HTTP server's connection limits (issue 12): a connection that sends nothing, one
that sends its headers a byte at a time (slowloris), an idle keep-alive one are closed; at
most max_connections are open at once."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.api.served import bprr_serve

# Generous: the point is that they are closed at all (before, never), not how fast.
CLOSED_WITHIN_S = 30.0


def _closed(sock: socket.socket, drip: bytes = b"") -> bool:
    """True when the server closes the connection within CLOSED_WITHIN_S (dripping a byte
    of ``drip`` every 0.2 s meanwhile)."""
    deadline = time.monotonic() + CLOSED_WITHIN_S
    sock.settimeout(0.2)
    position = 0
    while time.monotonic() < deadline:
        try:
            if position < len(drip):
                sock.send(drip[position : position + 1])
                position += 1
            data = sock.recv(65536)
            if data == b"":
                return True
            if b"\r\n\r\n" in data:  # a response (keep-alive): keep waiting for the close
                continue
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


def test_idle_slow_and_kept_alive_connections_are_closed(tmp_path: Path) -> None:
    env = {"BPRR_HEADER_TIMEOUT_S": "0.5", "BPRR_KEEP_ALIVE_S": "0.5"}
    with bprr_serve(f"sqlite:///{tmp_path / 'c.db'}", **env) as served:
        silent = socket.create_connection(("127.0.0.1", served.port))
        slowloris = socket.create_connection(("127.0.0.1", served.port))
        kept = socket.create_connection(("127.0.0.1", served.port))
        kept.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        headers = b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 1000
        try:
            assert _closed(silent)
            assert _closed(slowloris, drip=headers)
            assert _closed(kept)
        finally:
            for sock in (silent, slowloris, kept):
                sock.close()


def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    env = {"BPRR_HEADER_TIMEOUT_S": "120", "BPRR_MAX_CONNECTIONS": "20"}
    with bprr_serve(f"sqlite:///{tmp_path / 'c.db'}", **env) as served:
        idle = [socket.create_connection(("127.0.0.1", served.port)) for _ in range(30)]
        try:
            time.sleep(0.5)
            try:
                status = httpx.get(f"{served.base}/livez", timeout=10).status_code
            except httpx.HTTPError:
                status = 0  # closed without an answer
            assert status != 200
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 30  # the server notices the closed ones
        while httpx.get(f"{served.base}/livez", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
