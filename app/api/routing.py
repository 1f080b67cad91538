"""Authentication before the body, even for a body that is not JSON.

FastAPI decodes a JSON body before it runs a route's dependencies, so a malformed body would
be a 422 before the auth dependencies (app.api.deps) could answer 401/403; a body that
decodes is validated after them. ``AuthBeforeBodyRoute`` closes that gap: when the body
cannot be decoded, it runs the route's dependencies (its auth checks, their sub-dependencies)
without the body, so a missing or wrong token gets its 401/403 first; with the right token,
the 422 stands.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import solve_dependencies
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def undecodable_body(error: Exception) -> bool:
    """The errors FastAPI raises before any dependency runs: JSON that does not parse (a
    ``json_invalid`` validation error) or a body it cannot read at all (400)."""
    if isinstance(error, RequestValidationError):
        found = error.errors()
        return bool(found) and all(e.get("type") == "json_invalid" for e in found)
    return isinstance(error, HTTPException) and error.status_code == 400


class AuthBeforeBodyRoute(APIRoute):
    """A route whose dependencies (authentication) answer before an undecodable body's 422.

    The dependencies run a second time only on that error path: a request with a body that
    decodes runs them once, in FastAPI's own order (dependencies, then the body's model)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        if self.body_field is None or not self.dependant.dependencies:
            return handler
        # The route's dependencies (those of its decorator and of its parameters) alone:
        # neither its own parameters nor its body.
        auth_only = Dependant(dependencies=self.dependant.dependencies, path=self.path_format)

        async def authenticated_first(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, HTTPException) as error:
                if undecodable_body(error):
                    await _authenticate(request, auth_only)  # raises the 401/403, if any
                raise

        return authenticated_first


async def _authenticate(request: Request, auth_only: Dependant) -> None:
    async with AsyncExitStack() as stack:
        # Errors of the dependencies' own parameters (a malformed path id) leave the body's
        # 422 as the answer; a failed auth check raises its 401/403 from here.
        await solve_dependencies(
            request=request,
            dependant=auth_only,
            body=None,
            async_exit_stack=stack,
            embed_body_fields=False,
        )
