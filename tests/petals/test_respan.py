"""One real PETALS server through ``PetalsHost``: a new span is loaded in the same process
(same pid, same peer id), and "loaded" means PETALS announced the span online."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.petals.conftest import in_namespace

pytestmark = [pytest.mark.petals, pytest.mark.slow]


def test_respan_in_process(petals_python: Path, namespaces: None, tmp_path: Path) -> None:
    facts: dict[str, Any] = in_namespace("tests.petals.respan", tmp_path / "f.json", 900)
    assert facts["loaded"] == [2, 6]
    assert facts["loaded_right_after_apply"] == "None"  # not loaded until announced
    assert facts["same_process_and_peer"] is True and facts["starts"] == 1
    lines = facts["respan_lines"]
    assert any("blocks 0:3 announced online" in x for x in lines)
    assert any("re-spanning" in x for x in lines)
    assert any("blocks 2:6 announced online" in x for x in lines)
    left = facts["leftovers"]
    assert left["processes"] == [] and left["sockets"] == []
    assert all("torch_shm_manager" in line for line in left["lingered"]), left
