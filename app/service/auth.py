"""Bearer-token checks shared by the domain services (no transaction of their own, except
``check_measurer``'s one read). Tokens are compared in constant time; server tokens are stored
as SHA-256 hashes only."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from app.service.errors import Forbidden, Unauthorized
from app.settings import Settings
from app.store.models import ServerRow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(token: str, expected: SecretStr) -> bool:
    return hmac.compare_digest(token.encode(), expected.get_secret_value().encode())


def is_admin(settings: Settings, token: str | None) -> bool:
    expected = settings.admin_token
    return expected is not None and token is not None and same_secret(token, expected)


def check_admin(settings: Settings, token: str | None) -> None:
    expected = settings.admin_token
    if expected is None:
        raise Forbidden("admin routes are disabled: set BPRR_ADMIN_TOKEN on the coordinator")
    if token is None:
        raise Unauthorized("missing bearer token (admin token required)")
    if not same_secret(token, expected):
        raise Forbidden("the bearer token is not the admin token")


def check_join(settings: Settings, token: str | None) -> None:
    """Registration of a new server id: the join token, or anyone in dev mode."""
    expected = settings.join_token
    if expected is None:
        if settings.dev_mode:
            return
        raise Forbidden(
            "registration is closed: set BPRR_JOIN_TOKEN on the coordinator "
            "(or BPRR_DEV_MODE=true for an open development swarm)"
        )
    if token is None:
        raise Unauthorized("missing bearer token (the join token is required)")
    if not same_secret(token, expected):
        raise Forbidden("the bearer token is not the join token")


def check_server_token(row: ServerRow, token: str | None) -> None:
    if token is None:
        raise Unauthorized("missing bearer token (the server's own token is required)")
    if not hmac.compare_digest(hash_token(token), row.token_hash):
        raise Forbidden(f"the bearer token does not belong to server {row.id!r}")
