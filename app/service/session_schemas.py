"""Request and response bodies of the sessions routes (POST/GET/DELETE /v1/sessions).

``BookingIn`` is SessionIn with ``wait_s``; ``BookingOut`` is SessionOut with the session's
token (returned once, at booking; the coordinator keeps only its hash).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field

from app.service.schemas import Body, Name, RouteOut, SessionOut, Tokens, _integral

OutputTokens = Annotated[int, Field(ge=1, le=10_000_000), BeforeValidator(_integral)]
# The schema's bound is the hard ceiling; the configured one (BPRR_QUEUE_MAX_WAIT_S) is
# checked by the service with the same field name.
WaitSeconds = Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)]
EndReason = Literal["released", "expired", "server_lost", "abandoned"]


class BookingIn(Body):
    client_site: Name
    input_tokens: Tokens
    output_tokens: OutputTokens
    # 0: answer at once (503 + Retry-After when every chain is full); > 0: wait up to this
    # long in the central FIFO queue for a free chain.
    wait_s: WaitSeconds = 0.0


class BookingOut(SessionOut):
    token: str = Field(
        description="The session's token: DELETE and GET /v1/sessions/{id} need it "
        "(Authorization: Bearer). Returned once; the coordinator stores only its hash."
    )


class SessionStatusOut(BaseModel):
    id: str
    state: Literal["active", "ended"]
    end_reason: EndReason | None
    created_at: float
    ended_at: float | None
    expires_in_s: float | None
    route: RouteOut
