"""The clustered study's client positions, and the study outputs (CSV, summary tables)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from app.simulation import generators
from app.simulation.run import simulate
from app.simulation.studies import (
    QUICK_MARK,
    STUDIES,
    Means,
    Spread,
    mean_table,
    reduction,
    run_study,
    spread_table,
    study_figure,
    study_progress,
)


@pytest.mark.parametrize(
    ("client", "to_a100", "to_mig"),
    [(0, 100.0, 100.0), (1, 5.0, 100.0), (2, 100.0, 5.0)],
)
def test_clustered_client_position_sets_the_client_rtts(
    client: int, to_a100: float, to_mig: float
) -> None:
    # The authors' client_position: 0 = no servers, 1 = with the A100s, 2 = with the MIGs.
    scenario = generators.clustered(client_cluster=client)
    assert scenario.clients[0].site == f"cluster{client}"
    (row,) = scenario.client_server_rtt()
    kinds = [server.id.split("-")[0] for server in scenario.servers]
    assert [r for r, k in zip(row, kinds, strict=True) if k == "a100"] == [to_a100] * 2
    assert [r for r, k in zip(row, kinds, strict=True) if k == "mig"] == [to_mig] * 7
    # Servers do not move: A100-A100 and MIG-MIG stay 5 ms, A100-MIG 100 ms.
    assert scenario.site_rtt_ms[1][1] == 5 and scenario.site_rtt_ms[1][2] == 100


def test_clustered_default_is_the_shipped_example() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json"
    shipped = json.loads(example.read_text(encoding="utf-8"))
    generated = json.loads(generators.clustered().to_json())
    for key in ("model", "requests", "sites", "site_rtt_ms", "servers", "clients", "overheads"):
        assert generated[key] == shipped[key], key


def test_clustered_client_position_is_checked() -> None:
    with pytest.raises(ValueError, match="client_cluster"):
        generators.clustered(client_cluster=3)


def test_client_next_to_the_a100s_is_faster_for_cg_wsrr() -> None:
    far = simulate(generators.clustered(64, 0.1, 40, 1, client_cluster=0), "cg-wsrr")
    near = simulate(generators.clustered(64, 0.1, 40, 1, client_cluster=1), "cg-wsrr")
    # Same arrivals; the first and last hops lose 95 ms of RTT per token each way.
    assert near.arrival_ms.tobytes() == far.arrival_ms.tobytes()
    far_s, near_s = far.summary(), near.summary()
    assert float(near_s["mean_ms_per_token"]) < float(far_s["mean_ms_per_token"]) - 50


def test_clustered_study_covers_every_client_position() -> None:
    study = STUDIES["clustered"]
    labels = [p.label for p in study.points]
    assert len(labels) == len(set(labels)) == 3 * 2 * 2
    for site in generators.CLUSTERED_SITES:
        assert sum(f"client={site} " in label for label in labels) == 4
    # Each point's scenario really has its client there (and the point's l_max and rate).
    for point in study.points:
        scenario = point.make(5, 1)
        assert f"client={scenario.clients[0].site} " in point.label
        assert f"lmax={scenario.requests.max_output_tokens} " in point.label


def test_clustered_study_outputs_are_coherent(tmp_path: Path) -> None:
    # All 12 points, three policies, a few requests: every output names every point once.
    study = dataclasses.replace(STUDIES["clustered"], policies=("petals", "cg-wsrr", "auto"))
    rows = run_study(study, tmp_path, quick=True, console=Console(file=None, quiet=True))
    assert len(rows) == 12 * 3
    with (tmp_path / "runs.csv").open(encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [r["point"] for r in written] == [r["point"] for r in rows]
    assert len(list((tmp_path / "scenarios").glob("*.json"))) == 12  # no slug collisions
    png = (tmp_path / "clustered.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert QUICK_MARK.encode() in png  # the PNG's title metadata says it is a quick run
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    response, per_token = (
        summary.split("**Mean time per token")[0],
        summary.split("**Mean time per token")[1],
    )
    tokens = {(r["point"], r["policy"]): float(r["mean_ms_per_token"]) for r in written}
    e2e = {(r["point"], r["policy"]): float(r["mean_e2e_ms"]) for r in written}
    for point in study.points:
        line = next(x for x in per_token.splitlines() if x.startswith(f"| {point.label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        petals, ours = tokens[(point.label, "petals")], tokens[(point.label, "cg-wsrr")]
        auto = tokens[(point.label, "auto")]
        expected = [
            f"{petals:.1f}",
            f"{ours:.1f}",
            f"{auto:.1f}",
            f"{reduction(petals, ours):.1f}%",
        ]
        assert cells[1:] == expected
        line = next(x for x in response.splitlines() if x.startswith(f"| {point.label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        ratio = e2e[(point.label, "auto")] / e2e[(point.label, "petals")]
        assert cells[1] == f"{e2e[(point.label, 'petals')] / 1000:.3f}"
        assert cells[-1] == f"{ratio:.3f}"
    # response time, ms/token, TTFT, wait
    assert summary.count("| client=cluster2 lmax=128 rate=0.5 |") == 4


def _synthetic(study_name: str) -> tuple[Means, Spread, list[dict[str, object]]]:
    """Two seeds per (point, policy); cg-sp and cg-wsrr give identical results (the case in
    which one line used to hide the other)."""
    study = STUDIES[study_name]
    rows: list[dict[str, object]] = []
    for point in study.points:
        for i, policy in enumerate(study.policies):
            base = 100.0 + (0 if policy in ("cg-sp", "cg-wsrr") else 10 * i)
            for seed, jitter in ((1, -5.0), (2, 5.0)):
                row: dict[str, object] = {
                    "point": point.label,
                    "policy": policy,
                    "seed": seed,
                    "x": point.x,
                    "mean_ms_per_token": base + jitter,
                    "mean_e2e_ms": 1000 * (base + jitter),
                    "mean_ttft_ms": 1.0,
                    "mean_wait_ms": 0.0,
                    "p95_e2e_ms": 1.0,
                    "mean_attempts": 1.0,
                }
                rows.append(row)
    return mean_table(rows), spread_table(rows), rows


def test_spread_is_the_lowest_and_highest_seed() -> None:
    means, spread, _ = _synthetic("rate")
    key = ("rate=0.1", "petals")
    assert spread[key]["mean_ms_per_token"] == (95.0, 105.0)
    assert means[key]["mean_ms_per_token"] == 100.0


def test_every_policy_is_visible_with_its_spread() -> None:
    study = STUDIES["rate"]
    means, spread, _ = _synthetic("rate")
    figure = study_figure(study, means, spread=spread, seeds=2)
    axis = figure.axes[0]
    containers = {c.get_label(): c for c in axis.containers}
    assert list(containers) == list(study.policies)
    lines = [containers[policy].lines[0] for policy in study.policies]  # the data lines
    looks = {(ln.get_marker(), ln.get_linestyle(), ln.get_fillstyle()) for ln in lines}
    assert len(looks) == len(study.policies)  # no two policies drawn alike
    assert len({str(line.get_color()) for line in lines}) == len(study.policies)
    sp, wsrr = containers["cg-sp"].lines[0], containers["cg-wsrr"].lines[0]
    assert list(sp.get_ydata()) == list(wsrr.get_ydata())  # equal results ...
    assert all(a != b for a, b in zip(sp.get_xdata(), wsrr.get_xdata(), strict=True))  # apart
    # Error bars from the lowest to the highest seed (response-time panel, ms).
    (_, _, (segments,)) = containers["petals"].lines
    spans = sorted((float(s[0][1]), float(s[1][1])) for s in segments.get_segments())
    assert spans[0] == (95_000.0, 105_000.0)
    title = figure.get_suptitle()
    assert "lowest to highest of 2 seeds" in title and QUICK_MARK not in title
    assert all(QUICK_MARK not in text.get_text() for text in figure.texts)


def test_a_quick_run_is_marked_on_the_figure() -> None:
    study = STUDIES["clustered"]  # grouped bars
    means, spread, _ = _synthetic("clustered")
    figure = study_figure(study, means, spread=spread, seeds=1, quick=True)
    title = figure.get_suptitle()
    assert title.endswith(QUICK_MARK) and "one seed" in title
    assert QUICK_MARK in [text.get_text() for text in figure.texts]  # across the figure too
    labels = {c.get_label() for c in figure.axes[0].containers}
    assert set(study.policies) <= labels  # every policy's bars (each with error bars)


def test_progress_off_a_terminal_is_one_plain_line_per_run() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=40)
    assert not console.is_terminal
    with study_progress(console, "rate", 3) as advance:
        for label in ("rate=0.1 seed 1 petals", "rate=0.1 seed 1 auto", "rate=0.2 seed 1 auto"):
            advance(label)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3  # not wrapped at the console's 40 columns
    assert lines[0].startswith("rate [1/3] rate=0.1 seed 1 petals (")
    assert lines[2].startswith("rate [3/3] rate=0.2 seed 1 auto (") and lines[2].endswith(" s)")
