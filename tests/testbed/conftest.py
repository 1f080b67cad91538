from __future__ import annotations

import pytest
from bprr_harness.testbed import netns


@pytest.fixture(scope="session")
def namespaces() -> None:
    """Skip (with the reason) where this machine forbids network namespaces; CI runs as root
    and has them, so there these tests run."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable here: {reason}")


# the PETALS environment (built when missing), for `bprr testbed --backend petals`
from tests.petals.conftest import petals_python  # noqa: E402, F401
