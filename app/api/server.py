"""The HTTP server's guards for ``bprr serve`` (uvicorn): connections that never finish
their request headers are closed, idle keep-alive connections are closed, and at most
``max_connections`` are open at once.

uvicorn closes an idle keep-alive connection only after a first response, and never a
connection that sends nothing or sends its headers a byte at a time (slowloris): thousands of
those exhausted the file descriptors. ``GuardedH11Protocol`` arms a deadline whenever the
connection waits for a request's headers (on connect, and after each response) and closes
the connection if no request has started by then; beyond ``max_connections`` open
connections, a new one is closed at once. The limits come from the settings
(BPRR_HEADER_TIMEOUT_S, BPRR_KEEP_ALIVE_S, BPRR_MAX_CONNECTIONS), read once per process so
that every worker process of ``bprr serve --workers N`` applies them.
"""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import Settings

PROTOCOL = "app.api.server:GuardedH11Protocol"


@cache
def _limits() -> tuple[float, int]:
    settings = Settings()
    return settings.header_timeout_s, settings.max_connections


class GuardedH11Protocol(H11Protocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _, max_connections = _limits()
        if len(self.connections) > max_connections:
            transport.close()
            return
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        timeout_s, _ = _limits()
        self._header_deadline = self.loop.call_later(timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run / uvicorn.Config options that apply the limits of ``settings``."""
    return {
        "http": PROTOCOL,
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "backlog": min(2048, settings.max_connections),
        "h11_max_incomplete_event_size": 16 * 1024,
    }
