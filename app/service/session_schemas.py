"""Request and response bodies of the sessions routes (POST/GET/DELETE /v1/sessions).

``BookingIn`` is SessionIn with ``wait_s``; ``BookingOut`` is SessionOut with the session's
token (returned once, at booking; the coordinator keeps only its hash).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.service.schemas import (
    ROUTE_EXAMPLE,
    Body,
    Name,
    RouteOut,
    Seconds,
    SessionOut,
    Tokens,
    _integral,
)

OutputTokens = Annotated[int, Field(ge=1, le=10_000_000), BeforeValidator(_integral)]
# The schema's bound is the hard ceiling; the configured one (BPRR_QUEUE_MAX_WAIT_S) is
# checked by the service with the same field name.
WaitSeconds = Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)]
EndReason = Literal["released", "expired", "server_lost", "abandoned"]


class BookingIn(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 128},
                {
                    "client_site": "cluster0",
                    "input_tokens": 20,
                    "output_tokens": 128,
                    "wait_s": 30,
                },
            ]
        }
    )

    client_site: Name = Field(description="Where the client runs: a site or a client id")
    input_tokens: Tokens = Field(description="Prompt length (tokens)")
    output_tokens: OutputTokens = Field(description="Tokens to generate")
    # 0: answer at once (503 + Retry-After when every chain is full); > 0: wait up to this
    # long in the central FIFO queue for a free chain.
    wait_s: WaitSeconds = Field(
        0.0,
        description="0: answer at once (503 when every chain is full); more: wait up to this "
        "long (s) in the central FIFO queue for a free chain (at most BPRR_QUEUE_MAX_WAIT_S)",
    )


class BookingOut(SessionOut):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0f6c2b3e9d1a4c5b8e7f6a5b4c3d2e1f",
                    "expires_in_s": 106.8,
                    "route": ROUTE_EXAMPLE,
                    "token": "kq3V0o2wV9m2Q8bZ5mYkq1vT3c9Qp7Xn1a4b6c8d0eE",
                }
            ]
        }
    )

    token: str = Field(
        description="The session's token: DELETE and GET /v1/sessions/{id} need it "
        "(Authorization: Bearer). Returned once; the coordinator stores only its hash."
    )


class SessionStatusOut(BaseModel):
    id: str = Field(description="The session's id")
    state: Literal["active", "ended"] = Field(description="Whether it still holds its cache")
    end_reason: EndReason | None = Field(
        description="Why it ended: released (DELETE), expired (its time ran out), "
        "server_lost (a server of its route left or expired), abandoned (the client left "
        "the queue); null while active"
    )
    created_at: float = Field(description="When it was booked (Unix time, s)")
    ended_at: float | None = Field(description="When it ended (Unix time, s); null: active")
    expires_in_s: Seconds | None = Field(description="Until it ends by itself (s); null once ended")
    route: RouteOut = Field(description="Its route, as booked")
