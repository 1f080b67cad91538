"""``RouteClient``: ask the coordinator for a route, book and release sessions."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import httpx

from bprr_client.http import (
    DEFAULT_TIMEOUT,
    BearerAuth,
    RetryPolicy,
    raise_for_status,
    request,
)
from bprr_client.models import Route, Session, SessionRequest

log = logging.getLogger("bprr_client.routes")


class RouteClient:
    """A client of the coordinator's routes and sessions, over one ``httpx.Client``.

    ``client_site`` is the default site of the requests (each call may name another).
    ``http_client`` lets a caller bring its own client (a test client, a shared pool); paths
    are then resolved against its ``base_url``, and the client is not closed here.
    Every call retries what can be retried (see ``bprr_client.http.request``) and raises
    ``CoordinatorError`` (an error status) or ``CoordinatorUnreachable``.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        client_site: str | None = None,
        token: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client_site = client_site
        self.retry = retry or RetryPolicy()
        self._auth = BearerAuth(token) if token else None
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport
        )
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._timeout = timeout
        # session id -> its token (returned once by the booking; sent on release)
        self._session_tokens: dict[str, str] = {}

    # --- plumbing -----------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        if self._auth is not None:
            kwargs.setdefault("auth", self._auth)
        return request(
            self._http,
            method,
            url,
            policy=self.retry,
            idempotent=idempotent,
            sleep=self._sleep,
            rng=self._rng,
            **kwargs,
        )

    def _site(self, client_site: str | None) -> str:
        site = client_site or self.client_site
        if not site:
            raise ValueError("client_site: name the client's site (here or in RouteClient())")
        return site

    # --- API ----------------------------------------------------------------------------------

    def route(self, input_tokens: int, output_tokens: int, client_site: str | None = None) -> Route:
        """The best chain right now (read-only; nothing is reserved)."""
        params = {
            "client_site": self._site(client_site),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        response = self._send("GET", "/v1/routes", idempotent=True, params=params)
        raise_for_status(response)
        return Route.parse(response.json())

    def book(
        self,
        input_tokens: int,
        output_tokens: int,
        client_site: str | None = None,
        *,
        wait_s: float = 0.0,
        idempotency_key: str | None = None,
    ) -> Session:
        """Book a session: the coordinator reserves cache on every hop of the returned path.

        ``wait_s`` > 0 waits up to that long in the coordinator's central queue when nothing
        fits now (0: refused at once with 503 + Retry-After, which is retried after the
        hint). Every booking carries an ``Idempotency-Key`` (a fresh uuid unless given), so
        a retry after a timeout returns the same session instead of booking twice. The
        session's token is kept and sent when it is released."""
        body = SessionRequest(
            client_site=self._site(client_site),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            wait_s=wait_s,
        )
        payload = body.to_json()
        if not wait_s:
            del payload["wait_s"]  # the default; older coordinators do not know the field
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        kwargs: dict[str, Any] = {"json": payload, "headers": headers}
        if wait_s:
            log.info("booking: waiting up to %.1f s in the coordinator's queue", wait_s)
            kwargs["timeout"] = _longer(self._timeout, wait_s)
        response = self._send("POST", "/v1/sessions", idempotent=True, **kwargs)
        raise_for_status(response)
        session = Session.parse(response.json())
        if session.token:
            self._session_tokens[session.id] = session.token
        return session

    def release(
        self, session: Session | str, token: str | None = None, *, missing_ok: bool = True
    ) -> bool:
        """Release a session, with its token (kept from the booking, or ``token``); False
        when it was already gone (released or expired), or with ``missing_ok=False``
        ``CoordinatorError`` (404) with the coordinator's reason."""
        session_id = session if isinstance(session, str) else session.id
        token = token or self._session_tokens.get(session_id)
        if token is None and isinstance(session, Session):
            token = session.token
        kwargs: dict[str, Any] = {}
        if token:
            kwargs["auth"] = BearerAuth(token)
        response = self._send("DELETE", f"/v1/sessions/{session_id}", idempotent=True, **kwargs)
        if response.status_code == 404:
            self._session_tokens.pop(session_id, None)
            if not missing_ok:
                raise_for_status(response)
            return False
        raise_for_status(response)
        self._session_tokens.pop(session_id, None)
        return True

    @contextmanager
    def session(
        self,
        input_tokens: int,
        output_tokens: int,
        client_site: str | None = None,
        *,
        wait_s: float = 0.0,
    ) -> Iterator[Session]:
        """Book a session for the ``with`` block and release it on the way out."""
        booked = self.book(input_tokens, output_tokens, client_site, wait_s=wait_s)
        try:
            yield booked
        finally:
            self.release(booked)

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RouteClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _longer(timeout: httpx.Timeout | float, wait_s: float) -> httpx.Timeout:
    """The client's timeout with the read timeout stretched by a queue wait."""
    base = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
    read = (base.read or 10.0) + wait_s
    return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)
