"""Timing of decode steps and prefills through random-weight blocks (needs torch)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from app.profiler.arch import BlockArch
from app.profiler.blocks import DTYPES, DecoderBlock, build_blocks, new_cache
from app.profiler.fit import Timing
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


def median_ms(run: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``run`` in ms, after ``warmup`` untimed runs (synchronised on CUDA)."""
    for _ in range(warmup):
        run()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def _forward(
    blocks: Sequence[DecoderBlock],
    arch: BlockArch,
    x: torch.Tensor,
    context: int,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Callable[[], object]:
    """A closure running ``x`` through ``blocks``, each with its own cache of ``context``
    cached tokens (rewinding it so every call does the same work)."""
    batch = x.shape[0]
    caches = [new_cache(arch, batch, context + new_tokens, context, device, dtype) for _ in blocks]

    def run() -> object:
        h = x
        for block, cache in zip(blocks, caches, strict=True):
            cache.length = context
            h = block(h, cache)
        return h

    return run


def measure(
    arch: BlockArch,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> list[Timing]:
    """Time decode steps and prefills for every point of ``plan``."""
    torch.manual_seed(seed)
    blocks = build_blocks(arch, max(plan.blocks), device, dtype, seed=seed)
    timings: list[Timing] = []
    with torch.inference_mode():
        for n in sorted(set(plan.blocks)):
            chain = blocks[:n]
            for context in sorted(set(plan.contexts)):
                for batch in sorted(set(plan.batches)):
                    x = torch.randn(batch, 1, arch.hidden, device=device, dtype=dtype)
                    run = _forward(chain, arch, x, context, 1, device, dtype)
                    ms = median_ms(run, device, plan.repeats, plan.warmup)
                    timings.append(Timing("decode", n, batch, context, ms))
                    if progress:
                        progress(f"decode  blocks={n} batch={batch} context={context}: {ms:.3f} ms")
                x = torch.randn(1, context, arch.hidden, device=device, dtype=dtype)
                run = _forward(chain, arch, x, 0, context, device, dtype)
                ms = median_ms(run, device, plan.repeats, plan.warmup)
                timings.append(Timing("prefill", n, 1, context, ms))
                if progress:
                    progress(f"prefill blocks={n} tokens={context}: {ms:.3f} ms")
    return timings
