"""HTTP plumbing shared by the agent and the route client: bearer auth, errors, Retry-After,
and retries with jittered exponential backoff."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
# Statuses that say "not now": the request was not carried out and may be sent again.
REFUSED = frozenset({429, 503})
# Statuses from a proxy or a restarting coordinator: safe to repeat for idempotent requests.
TRANSIENT = REFUSED | {502, 504}


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>``; the token can be replaced (a new registration)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request

    def __repr__(self) -> str:  # never print the token
        return "BearerAuth(token=***)"


class CoordinatorError(Exception):
    """The coordinator answered with an error status."""

    def __init__(self, status_code: int, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after_s = retry_after_s


class CoordinatorUnreachable(Exception):
    """No answer from the coordinator (connection refused, timeout, reset) after retries."""


def error_detail(response: httpx.Response) -> str:
    """The coordinator's ``detail`` as one line (FastAPI's field lists become ``loc: msg``)."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query"))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    raise CoordinatorError(
        response.status_code, error_detail(response), retry_after(response, time.time)
    )


def retry_after(response: httpx.Response, now: Callable[[], float]) -> float | None:
    """Seconds the ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - now())
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential backoff: the n-th retry waits ``min(max_s, initial_s *
    multiplier**n)``, less a random fraction up to ``jitter``; a Retry-After header is honoured
    instead (up to ``max_retry_after_s``). ``attempts`` counts the first try."""

    attempts: int = 4
    initial_s: float = 0.25
    multiplier: float = 2.0
    max_s: float = 30.0
    jitter: float = 0.5
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts: must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter: must be between 0 and 1")
        if self.initial_s < 0 or self.max_s < 0 or self.multiplier < 1:
            raise ValueError("initial_s, max_s must be >= 0 and multiplier >= 1")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Delay before retry number ``retry`` (0-based)."""
        base = min(self.max_s, self.initial_s * self.multiplier ** min(retry, 64))
        return base * (1.0 - self.jitter * rng.random())

    def delay(self, retry: int, rng: random.Random, hint_s: float | None) -> float | None:
        """Delay before retry ``retry``: the server's hint when it gave one, else backoff;
        None when the hint is longer than we are willing to wait."""
        if hint_s is not None:
            return None if hint_s > self.max_retry_after_s else hint_s
        return self.backoff(retry, rng)


def _sent_nothing(error: httpx.TransportError) -> bool:
    """Errors raised before the request reached the server: repeating it cannot duplicate it."""
    return isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    policy: RetryPolicy,
    idempotent: bool,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    now: Callable[[], float] = time.time,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request, retrying what can safely be retried.

    Transport errors are retried when the request is idempotent or was never sent; 429 and
    503 (the coordinator refused, nothing happened) always; 502 and 504 only when idempotent.
    Returns the last response (the caller checks its status); raises CoordinatorUnreachable
    when every attempt failed without an answer.
    """
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        last = attempt == policy.attempts - 1
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError as error:
            if last or not (idempotent or _sent_nothing(error)):
                raise CoordinatorUnreachable(
                    f"{method} {url}: {type(error).__name__}: {error}"
                ) from error
            pause = policy.backoff(attempt, rng)
        else:
            retryable = response.status_code in (TRANSIENT if idempotent else REFUSED)
            if not retryable or last:
                return response
            delay = policy.delay(attempt, rng, retry_after(response, now))
            if delay is None:
                return response
            pause = delay
        sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover
