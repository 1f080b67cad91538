"""The audit log: one structured line per security-relevant event, on the logger
"bprr.audit" (event "audit", the ``action`` and its fields; JSON with BPRR_LOG_JSON=true).

Actions written today: auth_failed (route, method, status, reason; written by the API's error
handler for every 401/403), server_registered, takeover_refused, server_left, rtts_changed,
model_changed, placement_published, scenario_loaded, session_released (by the sessions
domain). The request id and the client address of the request are bound by the API's
middleware (structlog contextvars) and appear on every line written while it runs.

Never pass a token or any other secret as a field: the lines are meant to be shipped.
"""

from __future__ import annotations

from typing import Any

import structlog

LOGGER_NAME = "bprr.audit"


def audit(action: str, **fields: Any) -> None:
    """Write one audit line. ``fields`` are plain values (str, int, float, bool, None)."""
    # A fresh proxy per call: it follows the current structlog configuration (the app's
    # configure_logging may run after this module is imported, and again in tests).
    structlog.get_logger(LOGGER_NAME).info("audit", action=action, **fields)
