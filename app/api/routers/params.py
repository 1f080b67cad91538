"""What several routers' OpenAPI documentation shares: the documented id path parameters and
the 503 answer of a route that needs the database."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path

from app.api.deps import IdPath
from app.service.schemas import ErrorOut

# FastAPI merges these with IdPath's own Path() (its bounds and pattern are kept).
ServerIdPath = Annotated[
    IdPath,
    Path(
        description="The server's id (its choice at registration, or `srv-` and 12 hex digits)",
        examples=["s0"],
    ),
]
SessionIdPath = Annotated[
    IdPath,
    Path(
        description="The session's id, as returned by POST /v1/sessions",
        examples=["0f6c2b3e9d1a4c5b8e7f6a5b4c3d2e1f"],
    ),
]
UNAVAILABLE: dict[str, Any] = {
    "model": ErrorOut,
    "description": "The database is unreachable (a Retry-After header says when to retry)",
}
