"""One short end-to-end testbed run (three servers, two sites), the loopback fallback through
the CLI, and the pure parts (scaling, block servers' sessions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from bprr_client import Span
from bprr_harness.testbed import netns
from bprr_harness.testbed.block_server import (
    BlockHost,
    BlockService,
    BlockStore,
    Emulation,
    tiny_arch,
)
from bprr_harness.testbed.runner import Testbed, TestbedOptions, error_summary, predictions
from bprr_harness.testbed.runner import testbed_metrics as metrics_of
from bprr_harness.testbed.scale import scale_scenario

from app.allocation.scenario import load_scenario
from app.cli import main

TINY = Path(__file__).with_name("tiny-2sites.json")
CLUSTERED = Path(__file__).parents[2] / "examples" / "paper-clustered-9.json"
# No assertion here on how fast anything ran (CI shares 2 busy cores): the emulation pads
# every step to at least its target, so measured times have a lower bound only; the
# model-vs-measured errors are reported by `bprr testbed` (figures in the README), and the
# tests check that they are computed, finite and cover every request.


@pytest.mark.usefixtures("namespaces")
def test_end_to_end_run_in_namespaces_matches_the_model() -> None:
    scenario = load_scenario(TINY)
    testbed = Testbed(scenario, TestbedOptions(policies=("cg", "petals")))
    result = testbed.run()
    assert result.mode in ("netns", "netns+netem")
    assert not [n for n in netns.list_namespaces() if n.startswith(f"bprr-tb-{result.run_id}")]
    assert set(result.measured_speeds) == {"e0", "e1", "w0"}
    for spec in scenario.servers:  # padded steps take at least the emulated time
        measured = result.measured_speeds[spec.id]["decode_ms_per_block"]
        assert measured >= 0.95 * spec.decode_ms_per_block
    routes = {}
    for run in result.runs:
        assert run.errors == []
        assert len(run.requests) == 6
        rows = predictions(result, run)
        summary = error_summary(rows)
        for key in (
            "per_token_mean_abs_error",
            "per_token_worst_abs_error",
            "first_token_mean_abs_error",
            "first_token_worst_abs_error",
        ):
            assert math.isfinite(summary[key]) and summary[key] >= 0, (key, rows)
        assert summary["per_token_worst_abs_error"] >= summary["per_token_mean_abs_error"]
        for row in rows:
            assert row["per_token_ms"] > row["transport_ms_per_step"]  # RTTs and compute count
        routes[run.policy] = {r["index"]: tuple(r["route"]) for r in rows}
        checks = {r["index"]: r["checksum"] for r in rows}
        routes[run.policy + "-checksum"] = checks  # type: ignore[assignment]
        assert metrics_of(rows)["mean_e2e_ms"] > 0
    # The same prompt through different chains of the same model gives the same output
    # (block b has the same weights on every server): the activations really flowed.
    cg_sum, petals_sum = routes["cg-checksum"], routes["petals-checksum"]
    for index in cg_sum:
        assert cg_sum[index] == pytest.approx(petals_sum[index], rel=1e-4)
    # PETALS routes the east client over the single fast west server; WS-RR does not.
    assert routes["cg"] != routes["petals"]


def test_loopback_fallback_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "testbed",
            str(TINY),
            "--no-netns",
            "--requests",
            "2",
            "--output-tokens",
            "4",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "loopback"
    assert "unavailable (--no-netns given)" in report["mode_note"]
    entry = report["policies"]["cg"]
    assert entry["failed_requests"] == []
    assert len(entry["requests"]) == 2
    assert all(len(r["route"]) >= 1 for r in entry["requests"])
    assert math.isfinite(entry["errors"]["per_token_mean_abs_error"])
    assert set(entry["simulator"]) == set(entry["testbed"])


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", str(TINY), "--policy", "milp"])
    assert exit_info.value.code == 2
    assert "--policy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["testbed", str(TINY), "--time-scale", "0"])
    assert "--time-scale" in capsys.readouterr().err


def test_scaling_keeps_shares_slots_and_load() -> None:
    original = load_scenario(CLUSTERED)
    scaled = scale_scenario(original, blocks=14, time_scale=0.2, output_tokens=16, requests=12)
    assert scaled.model.num_blocks == 14
    factor = 70 / 14
    assert scaled.model.block_memory_gb == pytest.approx(original.model.block_memory_gb * factor)
    a, b = original.servers[0], scaled.servers[0]
    assert b.decode_ms_per_block == pytest.approx(a.decode_ms_per_block * factor * 0.2)
    assert scaled.site_matrix()[0][1] == pytest.approx(original.site_matrix()[0][1] * 0.2)
    assert scaled.overheads.per_token_ms == pytest.approx(original.overheads.per_token_ms * 0.2)
    assert scaled.requests.max_output_tokens == 16
    assert scaled.workload is not None and original.workload is not None
    assert scaled.workload.num_requests == 12  # type: ignore[union-attr]
    assert scaled.workload.rate_per_s == pytest.approx(  # type: ignore[union-attr]
        original.workload.rate_per_s / 0.2  # type: ignore[union-attr]
    )
    assert scaled.model.effective_hidden_size == original.model.effective_hidden_size


def test_block_service_same_output_whatever_the_split() -> None:
    emulation = Emulation(0.01, 0.01, 0.0)
    arch = tiny_arch()
    whole = BlockService(BlockStore(arch), BlockHost(BlockStore(arch)), emulation)
    whole.host = BlockHost(whole.store)
    whole.host.apply(Span(start=0, end=3))
    first = BlockService(BlockStore(arch), BlockHost(BlockStore(arch)), emulation)
    first.host = BlockHost(first.store)
    first.host.apply(Span(start=0, end=2))
    second = BlockService(BlockStore(arch), BlockHost(BlockStore(arch)), emulation)
    second.host = BlockHost(second.store)
    second.host.apply(Span(start=1, end=3))
    rng = np.random.default_rng(0)
    prompt = rng.standard_normal((5, arch.hidden)).astype(np.float32).tobytes()
    out_whole, _ = whole.step("s", "prefill", 0, 3, 8, prompt)
    mid, _ = first.step("s", "prefill", 0, 2, 8, prompt)
    out_split, step_ms = second.step("s", "prefill", 2, 3, 8, mid)
    assert out_whole == out_split
    assert step_ms > 0
    token = rng.standard_normal((1, arch.hidden)).astype(np.float32).tobytes()
    a, _ = whole.step("s", "decode", 0, 3, 8, token)
    b, _ = second.step("s", "decode", 2, 3, 8, first.step("s", "decode", 0, 2, 8, token)[0])
    assert a == b
    with pytest.raises(LookupError, match="not loaded"):
        first.step("t", "prefill", 2, 3, 8, prompt)
    with pytest.raises(LookupError, match="unknown"):
        whole.step("nope", "decode", 0, 3, 8, token)
    with pytest.raises(ValueError, match="float32 rows"):
        whole.step("s", "decode", 0, 3, 8, b"abc")
