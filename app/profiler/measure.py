"""Timing of decode steps and prefills through random-weight blocks (needs torch)."""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.profiler.arch import BlockArch
from app.profiler.blocks import DTYPES, KVCache, build_blocks, new_cache
from app.profiler.fit import Kind, Timing
from app.profiler.profile import cpu_model


class ProfileSetupError(ValueError):
    """The device or dtype cannot run the profile (a message for the user)."""


@dataclass(frozen=True)
class Plan:
    """What to time: every number of blocks x context x batch for decode (a step with a cache
    of ``context`` tokens), every number of blocks x context for a prefill of ``context``
    tokens (one request)."""

    blocks: tuple[int, ...]
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        for field in ("blocks", "contexts", "batches"):
            values = getattr(self, field)
            if not values:
                raise ValueError(f"{field}: give at least one value")
            low = 0 if field == "contexts" else 1
            if any(v < low for v in values):
                raise ValueError(f"{field}: values must be at least {low}")
        if 1 not in self.batches:
            raise ValueError("batches: must include 1 (the scenario's tau is batch 1)")
        if len(set(self.contexts)) < 2:
            raise ValueError("contexts: give at least two lengths (the prefill line needs them)")
        if min(self.contexts) < 1:
            raise ValueError("contexts: a prefill needs at least one token")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats: at least 1 (warmup: at least 0)")

    def as_dict(self) -> dict[str, object]:
        return {
            "blocks": list(self.blocks),
            "contexts": list(self.contexts),
            "batches": list(self.batches),
            "repeats": self.repeats,
            "warmup": self.warmup,
        }


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ProfileSetupError(f"device: {name} requested but CUDA is not available here")
        return torch.device(name)
    raise ProfileSetupError(f"device: {name!r} is neither cpu nor cuda[:N]")


def device_label(device: torch.device) -> str:
    """A human-readable name of the device (the cache key uses it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model() or platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ProfileSetupError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype != torch.float32:
        try:  # some CPU builds lack half-precision kernels: say so rather than crash later
            a = torch.ones(4, 4, dtype=dtype)
            torch.nn.functional.linear(a, a)
            torch.nn.functional.scaled_dot_product_attention(
                a[None, None], a[None, None], a[None, None]
            )
        except RuntimeError as error:
            raise ProfileSetupError(
                f"dtype: {name} is not supported on this CPU by torch {torch.__version__} "
                f"({error}); use --dtype fp32 or bf16"
            ) from None
    return dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class Point:
    kind: Kind
    blocks: int
    batch: int
    context: int


def plan_points(plan: Plan) -> list[Point]:
    """Decode: every number of blocks x context x batch; prefill: blocks x context, batch 1."""
    contexts = sorted(set(plan.contexts))
    counts = sorted(set(plan.blocks))
    decode = [
        Point("decode", n, b, c)
        for n in counts
        for c in contexts
        for b in sorted(set(plan.batches))
    ]
    return decode + [Point("prefill", n, 1, c) for n in counts for c in contexts]


def time_points(
    points: list[Point],
    runner: Callable[[Point], Callable[[], object]],
    plan: Plan,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[Timing]:
    """Warm every point up ``plan.warmup`` times, then time the points in rounds, each round
    in a new random order, ``plan.repeats`` rounds in all; a point's timing is its median.
    Interleaving spreads slow phases of a shared machine (another process, frequency
    changes) over every point instead of biasing the few measured at that moment.
    ``runner(point)`` returns the call to time (it must do the same work every time)."""
    rng = random.Random(seed)
    samples: dict[Point, list[float]] = {p: [] for p in points}
    with torch.inference_mode():
        runs = {p: runner(p) for p in points}
        for point in points:
            for _ in range(plan.warmup):
                runs[point]()
        for round_ in range(plan.repeats):
            order = list(points)
            rng.shuffle(order)
            for point in order:
                samples[point].append(_time_once(runs[point], device))
            if progress:
                progress(f"round {round_ + 1}/{plan.repeats}: {len(points)} points timed")
    timings = []
    for p in points:
        ms = statistics.median(samples[p])
        timings.append(Timing(p.kind, p.blocks, p.batch, p.context, ms))
        if progress:
            what = (
                f"batch={p.batch} context={p.context}"
                if p.kind == "decode"
                else f"tokens={p.context}"
            )
            progress(f"{p.kind:7s} blocks={p.blocks} {what}: {ms:.3f} ms")
    return timings


def measure(
    arch: BlockArch,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[Timing]:
    """Time decode steps and prefills for every point of ``plan`` through the plain-torch
    blocks (:func:`time_points`). Every block keeps one KV cache buffer as large as the
    largest point needs; a point uses its first ``batch`` rows and ``context`` positions
    (random keys and values, as a prefill leaves)."""
    torch.manual_seed(seed)
    blocks = build_blocks(arch, max(plan.blocks), device, dtype, seed=seed)
    points = plan_points(plan)
    capacity = max(plan.contexts) + 1
    caches = [new_cache(arch, max(plan.batches), capacity, capacity, device, dtype) for _ in blocks]
    inputs = {
        (b, t): torch.randn(b, t, arch.hidden, device=device, dtype=dtype)
        for b, t in {(p.batch, 1 if p.kind == "decode" else p.context) for p in points}
    }

    def runner(point: Point) -> Callable[[], object]:
        cached = point.context if point.kind == "decode" else 0
        x = inputs[(point.batch, 1 if point.kind == "decode" else point.context)]
        views = [
            KVCache(c.keys[: point.batch], c.values[: point.batch], cached)
            for c in caches[: point.blocks]
        ]

        def run() -> object:
            h = x
            for block, cache in zip(blocks, views, strict=False):
                cache.length = cached  # rewind: every call does the same work
                h = block(h, cache)
            return h

        return run

    return time_points(points, runner, plan, device, progress, seed)
