"""ASGI middleware of the coordinator: request ids (and the client address) in every log line,
and the request body size limit."""

from __future__ import annotations

import json
import time
import uuid

import structlog
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging import get_logger

log = get_logger("bprr.api")


class RequestIdMiddleware:
    """Give every request an id (X-Request-ID, echoed back) bound into structlog's context."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
        request_id = request_id or uuid.uuid4().hex
        peer = scope.get("client")
        client = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        structlog.contextvars.bind_contextvars(request_id=request_id, client=client)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Paths only: query strings and headers (tokens) are never logged.
            log.debug(
                "request",
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id", "client")


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; FastAPI passes HTTPExceptions through its body
    reading, and its handler answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"body: larger than the limit of {max_bytes} bytes")


class BodyLimitMiddleware:
    """Refuse a request body larger than ``max_bytes`` with 413, before it is read whole: at
    once when Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await self._refuse(send, 413 if declared > 0 else 400)
                    return
                # The server reads no more than Content-Length: nothing left to count.
                await self.app(scope, receive, send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, 413)

    async def _refuse(self, send: Send, status: int) -> None:
        detail = (
            f"body: larger than the limit of {self.max_bytes} bytes"
            if status == 413
            else "body: the Content-Length header is not a number"
        )
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
