"""Named studies for ``bprr experiment``: sweeps of scenarios x policies x seeds.

Each study is a list of points (a scenario generator's arguments and a label for the x axis),
the policies to compare, and the seeds. Running one writes, under the output folder:
``runs.csv`` (one row per run: point, policy, seed and every summary number),
``scenarios/`` (the generated scenario files, so each run can be replayed with
``bprr simulate``), ``<study>.png`` (mean response time and per-token time per policy, each
policy with its own colour, marker, line style and a small sideways offset so that no curve
hides another, error bars from the lowest to the highest seed, and a ``--quick`` run marked
"QUICK RUN - not a result" in the title, across the figure and in the PNG's metadata),
``summary.md`` (markdown tables of the means over seeds: response time with auto / petals,
per-token time with cg-wsrr's reduction against PETALS, TTFT, waiting) and prints the
response-time table. Progress goes to its own console: a live bar on a terminal, one plain
line per finished run elsewhere (a piped or logged run is never silent).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from app.allocation.scenario import Scenario
from app.simulation import generators
from app.simulation.run import simulate

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CORE_POLICIES = ("petals", "cg-sp", "cg-wsrr", "chains", "auto")
ABLATIONS = ("petals-order", "petals-number", "petals-rr")


@dataclass(frozen=True)
class Point:
    label: str  # shown in tables and on the x axis
    x: float
    make: Callable[[int, int], Scenario]  # (num_requests, seed) -> scenario


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    x_name: str
    points: tuple[Point, ...]
    policies: tuple[str, ...]
    requests: int
    quick_requests: int
    seeds: int
    bars: bool = False  # categorical points: grouped bars instead of lines


def _clustered_points() -> tuple[Point, ...]:
    """Client position (the authors' 0/1/2) x l_max 64/128 x rate 0.1/0.5, client outermost."""
    points: list[Point] = []
    for client in generators.CLIENT_POSITIONS:
        for l_max in (64, 128):
            for rate in (0.1, 0.5):
                make = functools.partial(_clustered_at, client, l_max, rate)
                label = f"client={generators.CLUSTERED_SITES[client]} lmax={l_max} rate={rate:g}"
                points.append(Point(label, len(points), make))
    return tuple(points)


def _clustered_at(client: int, l_max: int, rate: float, count: int, seed: int) -> Scenario:
    return generators.clustered(l_max, rate, count, seed, client_cluster=client)


def _sweep(
    values: tuple[float, ...], label: str, make: Callable[[float, int, int], Scenario]
) -> tuple[Point, ...]:
    return tuple(Point(f"{label}={v:g}", v, functools.partial(make, v)) for v in values)


def _scale_at(servers: float, count: int, seed: int) -> Scenario:
    """The scale study's swarm: ``count`` requests per 100 servers, so that every size replays
    the same length of time at the same load per server."""
    n = int(servers)
    return generators.mig_swarm(n, 2.57 * n / 9, count * n // 100, seed, trace=False)


STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "clustered",
            "the paper's clustered testbed: client in cluster 0/1/2 x l_max 64/128 x "
            "rate 0.1/0.5, all policies",
            "scenario",
            _clustered_points(),
            ("petals", "cg-sp", "cg-wsrr", "milp-wsrr", "chains", "auto", *ABLATIONS),
            requests=300,
            quick_requests=12,
            seeds=3,
            bars=True,
        ),
        Study(
            "rate",
            "clustered testbed, l_max 128, arrival rate 0.1 .. 1.0 req/s",
            "arrival rate (req/s)",
            _sweep(
                (0.1, 0.2, 0.35, 0.5, 0.75, 1.0),
                "rate",
                lambda v, n, s: generators.clustered(128, v, n, s),
            ),
            (*CORE_POLICIES, "petals-rr"),
            requests=300,
            quick_requests=12,
            seeds=3,
        ),
        Study(
            "servers",
            "random clustered swarms, 20% A100, 10 .. 200 servers, rate = n / 25 req/s",
            "servers",
            _sweep(
                (10, 25, 50, 100, 200),
                "n",
                lambda v, n, s: generators.random_clustered(int(v), 0.2, v / 25, n, s),
            ),
            (*CORE_POLICIES, "petals-rr"),
            requests=500,
            quick_requests=12,
            seeds=3,
        ),
        Study(
            "a100",
            "random clustered swarms of 40 servers, A100 share 5% .. 60%, rate 1.5 req/s",
            "fraction of A100s",
            _sweep(
                (0.05, 0.1, 0.2, 0.4, 0.6),
                "a100",
                lambda v, n, s: generators.random_clustered(40, v, 1.5, n, s),
            ),
            (*CORE_POLICIES, "petals-rr"),
            requests=400,
            quick_requests=12,
            seeds=3,
        ),
        Study(
            "lmax",
            "clustered testbed, rate 0.3 req/s, l_max 32 .. 256",
            "l_max (output tokens)",
            _sweep(
                (32, 64, 128, 256),
                "lmax",
                lambda v, n, s: generators.clustered(int(v), 0.3, n, s),
            ),
            (*CORE_POLICIES, "petals-rr"),
            requests=300,
            quick_requests=12,
            seeds=3,
        ),
        Study(
            "geo",
            "geo-distributed: 12 Azure regions (real RTTs), 40 mixed GPUs, 4 clients",
            "arrival rate (req/s)",
            _sweep(
                (0.5, 1.0, 2.0, 4.0),
                "rate",
                lambda v, n, s: generators.geo(rate_per_s=v, num_requests=n, seed=s),
            ),
            (*CORE_POLICIES, *ABLATIONS),
            requests=400,
            quick_requests=12,
            seeds=3,
        ),
        Study(
            "scale",
            "MIG swarms (1 x 3g.40gb : 2 x 2g.20gb), Llama-2-7B, Poisson arrivals with the Azure "
            "code trace's lengths, rate 2.57 x n / 9 req/s, requests per 100 servers",
            "servers",
            _sweep((100, 300, 1000), "n", _scale_at),
            ("petals", "cg-wsrr", "chains", "auto"),
            requests=1200,  # per 100 servers: the same ~42 s of arrivals at every size
            quick_requests=100,
            seeds=2,
        ),
        Study(
            "table1",
            "the follow-up paper's Table I swarm: 3 x 3g.40gb + 6 x 2g.20gb MIG, Llama-2-7B, "
            "the Azure code trace rescaled to 2.57 req/s, 1000 requests",
            "swarm",
            (Point("table1", 0, lambda n, s: generators.mig_swarm(9, 2.57, n, s)),),
            ("petals", "cg-sp", "cg-wsrr", "cg-wsrr-profile", "chains", "auto"),
            requests=1000,
            quick_requests=200,
            seeds=1,
            bars=True,
        ),
    )
}

CSV_FIELDS = (
    "study",
    "point",
    "x",
    "policy",
    "seed",
    "requests",
    "mean_ms_per_token",
    "mean_ttft_ms",
    "mean_e2e_ms",
    "p50_e2e_ms",
    "p95_e2e_ms",
    "p99_e2e_ms",
    "mean_wait_ms",
    "waited_fraction",
    "mean_attempts",
    "throughput_rps",
    "design_concurrency",
    "peak_concurrency",
    "placement_seconds",
    "wall_seconds",
    "events",
)


def run_study(
    study: Study,
    out: Path,
    *,
    quick: bool = False,
    seeds: int | None = None,
    console: Console | None = None,
    progress_console: Console | None = None,
    milp_time_limit_s: float = 5.0,
) -> list[dict[str, Any]]:
    """Run every (point, policy, seed); write runs.csv, scenarios/ and the plot; print a table.

    ``console`` gets the table, ``progress_console`` (default: ``console``) the progress.
    """
    console = console or Console()
    progress_console = progress_console or console
    count = study.quick_requests if quick else study.requests
    seed_count = seeds if seeds is not None else (1 if quick else study.seeds)
    milp_limit = 1.0 if quick else milp_time_limit_s
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenarios").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(study.points) * seed_count * len(study.policies)
    with study_progress(progress_console, study.name, total) as advance:
        for point in study.points:
            for seed in range(1, seed_count + 1):
                scenario = point.make(count, seed)
                slug = point.label.replace("=", "-").replace(" ", "_")
                (out / "scenarios" / f"{slug}-seed{seed}.json").write_text(
                    scenario.to_json(), encoding="utf-8"
                )
                for policy in study.policies:
                    result = simulate(scenario, policy, milp_time_limit_s=milp_limit)
                    summary = result.summary()
                    row = {key: summary.get(key, "") for key in CSV_FIELDS}
                    row.update(
                        study=study.name, point=point.label, x=point.x, policy=policy, seed=seed
                    )
                    rows.append(row)
                    advance(f"{point.label} seed {seed} {policy}")
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    means = mean_table(rows)
    plot(
        study,
        means,
        out / f"{study.name}.png",
        spread=spread_table(rows),
        seeds=seed_count,
        quick=quick,
    )
    (out / "summary.md").write_text(
        markdown_summary(study, means, count, seed_count), encoding="utf-8"
    )
    console.print(render_table(study, means))
    console.print(
        f"wrote {out / 'runs.csv'}, {out / (study.name + '.png')}, {out / 'summary.md'}, "
        f"{out / 'scenarios'}"
    )
    return rows


@contextlib.contextmanager
def study_progress(console: Console, name: str, total: int) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(label)``, called once per finished run: a live bar when ``console`` is a
    terminal; otherwise one plain line per run (a live display is never drawn into a file or a
    pipe, which left a piped run silent for a minute)."""
    if console.is_terminal:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(name, total=total)
            yield lambda _label: progress.advance(task)
        return
    started = time.perf_counter()
    done = 0

    def advance(label: str) -> None:
        nonlocal done
        done += 1
        console.print(
            f"{name} [{done}/{total}] {label} ({time.perf_counter() - started:.1f} s)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    yield advance


Means = dict[tuple[str, str], dict[str, float]]
Spread = dict[tuple[str, str], dict[str, tuple[float, float]]]  # (lowest, highest) over seeds
PLOTTED = ("mean_e2e_ms", "mean_ms_per_token")
MEAN_FIELDS = (
    "x",
    "mean_ms_per_token",
    "mean_e2e_ms",
    "mean_ttft_ms",
    "mean_wait_ms",
    "p95_e2e_ms",
    "mean_attempts",
)


def mean_table(rows: list[dict[str, Any]]) -> Means:
    """(point, policy) -> mean over seeds of each number."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["point"], row["policy"]), []).append(row)
    means: Means = {}
    for key, members in groups.items():
        means[key] = {
            name: sum(float(m[name]) for m in members) / len(members) for name in MEAN_FIELDS
        }
    return means


def spread_table(rows: list[dict[str, Any]]) -> Spread:
    """(point, policy) -> (lowest, highest) over seeds of each plotted number."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["point"], row["policy"]), []).append(row)
    return {
        key: {
            name: (min(float(m[name]) for m in members), max(float(m[name]) for m in members))
            for name in PLOTTED
        }
        for key, members in groups.items()
    }


def reduction(petals: float, ours: float) -> float:
    """Relative reduction of ``ours`` against ``petals`` in percent."""
    return math.nan if petals <= 0 else 100.0 * (petals - ours) / petals


def ratio(ours: float, petals: float) -> float:
    """ours / petals (mean response time); below 1 means faster than PETALS."""
    return math.nan if petals <= 0 else ours / petals


def render_table(study: Study, means: Means) -> Table:
    table = Table(title=f"{study.name}: mean response time (s), waiting included")
    table.add_column(study.x_name)
    for policy in study.policies:
        table.add_column(policy, justify="right")
    compare = "petals" in study.policies and "auto" in study.policies
    if compare:
        table.add_column("auto / petals", justify="right")
    for point in study.points:
        cells = [point.label]
        for policy in study.policies:
            value = means.get((point.label, policy))
            cells.append("-" if value is None else f"{value['mean_e2e_ms'] / 1000:.3f}")
        if compare:
            ours = means[(point.label, "auto")]["mean_e2e_ms"]
            theirs = means[(point.label, "petals")]["mean_e2e_ms"]
            cells.append(f"{ratio(ours, theirs):.3f}")
        table.add_row(*cells)
    return table


def markdown_summary(study: Study, means: Means, requests: int, seeds: int) -> str:
    """Markdown tables of the means over seeds: response time (+ auto / petals), ms/token
    (+ cg-wsrr's reduction against PETALS), TTFT, waiting."""
    lines = [
        f"Study `{study.name}`: {study.description}; {requests} requests per run, "
        f"means over {seeds} seed(s).",
        "",
    ]
    for metric, title, scale, extra in (
        ("mean_e2e_ms", "Mean response time (s), waiting included", 1000.0, "auto"),
        ("mean_ms_per_token", "Mean time per token (ms), waiting included", 1.0, "cg-wsrr"),
        ("mean_ttft_ms", "Mean time to first token (ms)", 1.0, None),
        (
            "mean_wait_ms",
            "Mean wait before the request starts (ms; PETALS: retries included)",
            1.0,
            None,
        ),
    ):
        header = [study.x_name, *study.policies]
        compare = extra is not None and extra in study.policies and "petals" in study.policies
        if compare:
            header.append("auto / petals" if extra == "auto" else "cg-wsrr vs petals")
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        digits = 3 if scale > 1 else 1
        for point in study.points:
            cells = [point.label]
            for policy in study.policies:
                value = means.get((point.label, policy))
                cells.append("-" if value is None else f"{value[metric] / scale:.{digits}f}")
            if compare:
                ours = means[(point.label, str(extra))][metric]
                theirs = means[(point.label, "petals")][metric]
                if extra == "auto":
                    cells.append(f"{ratio(ours, theirs):.3f}")
                else:
                    cells.append(f"{reduction(theirs, ours):.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


QUICK_MARK = "QUICK RUN - not a result"
MARKERS = "osD^v<>PX*hH"
LINE_STYLES = ("-", "--", "-.", ":")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "--", "oo")
OFFSET_FRACTION = 0.008  # sideways shift between neighbouring policies, of the x range


def plot(
    study: Study,
    means: Means,
    path: Path,
    *,
    spread: Spread | None = None,
    seeds: int = 1,
    quick: bool = False,
) -> None:
    """Write the study's figure (see study_figure) as a PNG whose metadata carries its title."""
    figure = study_figure(study, means, spread=spread, seeds=seeds, quick=quick)
    title = figure_title(study, seeds, quick)
    figure.savefig(path, dpi=110, metadata={"Title": title, "Software": "bprr experiment"})
    import matplotlib.pyplot as plt

    plt.close(figure)


def figure_title(study: Study, seeds: int, quick: bool) -> str:
    bars = f"error bars: lowest to highest of {seeds} seeds" if seeds > 1 else "one seed"
    title = f"bprr experiment {study.name}: {study.description}\nmeans over seeds; {bars}"
    return f"{title} - {QUICK_MARK}" if quick else title


def study_figure(
    study: Study,
    means: Means,
    *,
    spread: Spread | None = None,
    seeds: int = 1,
    quick: bool = False,
) -> Figure:
    """Mean response time and per-token time per policy, every policy visible: its own colour,
    marker, line style (or hatch), hollow markers on every other policy and a small sideways
    offset, so equal results stay side by side; error bars from the per-seed runs' lowest to
    highest; a quick run says so across the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if study.bars:  # one panel per row, wide enough for every group of bars
        width_in = max(12.0, 1.1 * len(study.points))
        fig, axes = plt.subplots(2, 1, figsize=(width_in, 9))
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    count = len(study.policies)
    colours = plt.get_cmap("tab10" if count <= 10 else "tab20").colors  # type: ignore[attr-defined]
    xs = [p.x for p in study.points]
    span = (max(xs) - min(xs)) or 1.0
    for axis, metric, title in (
        (axes[0], "mean_e2e_ms", "mean response time (ms)"),
        (axes[1], "mean_ms_per_token", "mean time per token (ms)"),
    ):
        for i, policy in enumerate(study.policies):
            ys = [means[(p.label, policy)][metric] for p in study.points]
            lows = [
                y - (spread[(p.label, policy)][metric][0] if spread else y)
                for p, y in zip(study.points, ys, strict=True)
            ]
            highs = [
                (spread[(p.label, policy)][metric][1] if spread else y) - y
                for p, y in zip(study.points, ys, strict=True)
            ]
            colour = colours[i % len(colours)]
            if study.bars:
                width = 0.8 / count
                at = [x + (i - count / 2 + 0.5) * width for x in xs]
                axis.bar(
                    at,
                    ys,
                    width=width,
                    yerr=[lows, highs],
                    capsize=2,
                    color=colour,
                    hatch=HATCHES[i % len(HATCHES)],
                    edgecolor="black",
                    linewidth=0.4,
                    label=policy,
                )
            else:
                shift = (i - (count - 1) / 2) * OFFSET_FRACTION * span
                axis.errorbar(
                    [x + shift for x in xs],
                    ys,
                    yerr=[lows, highs],
                    capsize=3,
                    color=colour,
                    marker=MARKERS[i % len(MARKERS)],
                    fillstyle="none" if i % 2 else "full",
                    linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                    markersize=8,
                    alpha=0.85,
                    label=policy,
                )
        if study.bars:
            axis.set_xticks(xs)
            axis.set_xticklabels([p.label.replace(" ", "\n") for p in study.points], fontsize=8)
        else:
            axis.set_xlabel(study.x_name)
        axis.set_ylabel(title)
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
    if study.bars:  # above the panel: the bars fill it from side to side
        axes[0].legend(
            fontsize=8, ncol=min(count, 6), loc="lower center", bbox_to_anchor=(0.5, 1.0)
        )
    else:
        axes[0].legend(fontsize=8, ncol=2 if count > 6 else 1)
    fig.suptitle(figure_title(study, seeds, quick), fontsize=9, color="red" if quick else "black")
    if quick:
        fig.text(
            0.5,
            0.5,
            QUICK_MARK,
            fontsize=40,
            color="red",
            alpha=0.18,
            rotation=20,
            ha="center",
            va="center",
            zorder=10,
        )
    fig.tight_layout()
    return fig
