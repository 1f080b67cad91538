"""Errors the service layer raises; the API turns each into its HTTP status and message."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    """Input that is well-formed but refers to something unknown or impossible (422)."""

    status_code = 422


class Unavailable(ServiceError):
    """Nothing can serve the request now; ``retry_after_s`` says when to try again."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float) -> None:
        seconds = max(1, int(-(-retry_after_s // 1)))
        super().__init__(message, {"Retry-After": str(seconds)})
        self.retry_after_s = retry_after_s
