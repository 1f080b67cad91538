"""Round-trip time probes and their smoothing.

A prober is any callable ``(address) -> milliseconds | None`` (None: unreachable), so hosts
and tests can bring their own; ``TcpProber`` times a TCP connect, ``HttpProber`` an HTTP GET.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

import httpx


class Prober(Protocol):
    def __call__(self, address: str) -> float | None: ...


def split_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a URL -> (host, port); ValueError naming the address."""
    text = address.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.hostname is None:
            raise ValueError(f"address {address!r}: no host")
        default = 443 if parts.scheme == "https" else 80
        return parts.hostname, parts.port or default
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


class TcpProber:
    """Time to open (and close) a TCP connection: one network round trip."""

    def __init__(
        self, timeout_s: float = 1.0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.timeout_s = timeout_s
        self._clock = clock

    def __call__(self, address: str) -> float | None:
        try:
            host, port = split_address(address)
        except ValueError:
            return None
        started = self._clock()
        try:
            with socket.create_connection((host, port), timeout=self.timeout_s):
                elapsed = self._clock() - started
        except OSError:
            return None
        return elapsed * 1000.0


class HttpProber:
    """Time of an HTTP GET (any status counts as an answer) on a kept-alive client: after the
    first call the connection is reused, so the time is one round trip plus the handler."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        path: str = "/",
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._client = client or httpx.Client(timeout=timeout_s)
        self.path = path
        self._clock = clock

    def __call__(self, address: str) -> float | None:
        url = address if "://" in address else f"http://{address}{self.path}"
        started = self._clock()
        try:
            self._client.get(url)
        except httpx.HTTPError:
            return None
        return (self._clock() - started) * 1000.0

    def close(self) -> None:
        self._client.close()


class Ewma:
    """Exponentially weighted moving averages, one per key: ``new = a*x + (1-a)*old``."""

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha: must be in (0, 1]")
        self.alpha = alpha
        self.values: dict[str, float] = {}

    def update(self, key: str, sample: float) -> float:
        if not math.isfinite(sample) or sample < 0:
            raise ValueError(f"{key}: an RTT sample must be finite and >= 0, got {sample}")
        old = self.values.get(key)
        value = sample if old is None else self.alpha * sample + (1 - self.alpha) * old
        self.values[key] = value
        return value

    def forget(self, key: str) -> None:
        self.values.pop(key, None)
