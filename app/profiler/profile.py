"""Run a profile, build its report, and cache it on disk for the server agent.

``run_profile`` times the blocks and fits the speeds; ``measured_speeds`` is what a server
calls at start: the scenario's speed fields for this device, dtype and architecture, read from
the cache (a JSON file keyed by device, dtype, architecture, plan, threads and versions, like
PETALS' throughput cache) or measured once and stored. torch is imported only when a profile
actually runs, so reading a cached entry works without the ``profile`` extra.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from app.profiler.arch import BlockArch
from app.profiler.fit import ProfileFit, Timing, fit_profile


class Architecture(Protocol):
    """What is profiled: a plain-torch BlockArch preset or app.profiler.hf.HfBlocks (a
    Hugging Face config built by transformers, possibly quantised)."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> int: ...

    def kv_bytes_per_token(self, bytes_per_value: int) -> int: ...

    def as_dict(self) -> dict[str, object]: ...


DIGITS = 6
CACHE_VERSION = 1
DEFAULT_PLAN: dict[str, Any] = {
    "blocks": [1, 2],
    "contexts": [128, 512, 1024],
    "batches": [1, 2, 4],
    "repeats": 5,
    "warmup": 2,
}
INSTALL_HINT = "install the profile extra: pip install -e '.[profile]' (torch)"


class TorchMissingError(RuntimeError):
    def __init__(self) -> None:
        super().__init__(f"bprr profile needs torch: {INSTALL_HINT}")


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def build_report(
    arch: Architecture,
    plan: dict[str, Any],
    environment: dict[str, Any],
    timings: list[Timing],
    fit: ProfileFit,
) -> dict[str, Any]:
    """The JSON report: the scenario fields first, then the fit, the batch effect and the raw
    medians. Fitted values below zero (noise on a tiny intercept) become 0 in the scenario
    fields, with a note."""
    notes: list[str] = []
    fixed, per_token = fit.prefill.fixed_ms, fit.prefill.per_token_ms
    if fixed < 0:
        notes.append(f"prefill fixed fitted as {fixed:.4g} ms; reported as 0")
    if per_token < 0:
        notes.append(f"prefill per_token fitted as {per_token:.4g} ms; reported as 0")
    if fit.decode.overhead_ms is None:
        notes.append("one number of blocks: fits go through the origin (no overhead term)")
    return {
        "decode_ms_per_block": _r(fit.decode.ms_per_block),
        "prefill_ms_per_block": {
            "fixed": _r(max(0.0, fixed)),
            "per_token": _r(max(0.0, per_token)),
        },
        "architecture": arch.as_dict(),
        **environment,
        "plan": plan,
        "fit": {
            "decode": {
                "r2": _r(fit.decode.r2),
                "overhead_ms": _r(fit.decode.overhead_ms),
                "ms_per_block_per_context_token": _r(fit.decode.ms_per_block_per_context_token),
                "mean_context": _r(fit.decode.mean_context),
                "points": fit.decode.points,
            },
            "prefill": {
                "r2": _r(fit.prefill.r2),
                "overhead_ms": _r(fit.prefill.overhead_ms),
                "fixed_ms": _r(fixed),
                "per_token_ms": _r(per_token),
                "points": fit.prefill.points,
            },
        },
        "batch_effect": [
            {
                "batch": e.batch,
                "decode_ms_per_block": _r(e.decode_ms_per_block),
                "ratio_vs_batch_1": _r(e.ratio_vs_batch_1),
                "ms_per_request_per_block": _r(e.ms_per_request_per_block),
            }
            for e in fit.batches
        ],
        "timings": [
            {
                "kind": t.kind,
                "blocks": t.blocks,
                "batch": t.batch,
                "context": t.context,
                "ms": _r(t.ms),
            }
            for t in timings
        ],
        "notes": notes,
    }


def run_profile(
    arch: Architecture,
    plan: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``arch`` on ``device`` in ``dtype`` following ``plan`` (DEFAULT_PLAN's keys) and
    return the report. Raises TorchMissingError without torch, ValueError for a bad plan,
    device or dtype, FitError when the timings cannot be fitted."""
    try:
        import torch

        from app.profiler import measure
    except ImportError as error:
        raise TorchMissingError() from error
    settings = {**DEFAULT_PLAN, **(plan or {})}
    steps = measure.Plan(
        blocks=tuple(settings["blocks"]),
        contexts=tuple(settings["contexts"]),
        batches=tuple(settings["batches"]),
        repeats=int(settings["repeats"]),
        warmup=int(settings["warmup"]),
    )
    torch_device = measure.resolve_device(device)
    torch_dtype = measure.resolve_dtype(dtype, torch_device)
    if threads is not None:
        if threads < 1:
            raise ValueError("threads: must be at least 1")
        torch.set_num_threads(threads)
    environment = {
        "device": measure.device_label(torch_device),
        "device_type": torch_device.type,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    value_bytes = torch_dtype.itemsize  # the KV cache stays in the compute dtype
    if isinstance(arch, BlockArch):
        timings = measure.measure(arch, steps, torch_device, torch_dtype, progress=progress)
        block_bytes = arch.params * value_bytes
    else:  # a Hugging Face config: transformers' own blocks
        from app.profiler import hf

        if not isinstance(arch, hf.HfBlocks):
            raise TypeError(f"cannot profile a {type(arch).__name__}")
        environment["quantization"] = arch.quant
        environment["transformers"] = _version("transformers")
        if arch.quant != "none":
            environment["bitsandbytes"] = _version("bitsandbytes")
        timings, block_bytes = hf.measure_hf(
            arch, steps, torch_device, torch_dtype, progress=progress
        )
    # The scenario's model fields for blocks like these (PUT /v1/model).
    environment["model_fields"] = {
        "block_memory_gb": _r(block_bytes / 1e9),
        "kv_bytes_per_token_per_block": arch.kv_bytes_per_token(value_bytes),
    }
    return build_report(arch, steps.as_dict(), environment, timings, fit_profile(timings))


# --- the on-disk cache ------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``$BPRR_PROFILE_CACHE``, else ``$XDG_CACHE_HOME/bprr/profile.json`` (~/.cache)."""
    explicit = os.environ.get("BPRR_PROFILE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bprr" / "profile.json"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(
    arch: Architecture,
    plan: dict[str, Any],
    device: str,
    dtype: str,
    threads: int | None,
    device_label: str | None = None,
) -> str:
    """Entries are valid for one device (by name), dtype, architecture, plan, thread count and
    the versions of bprr, torch, transformers and bitsandbytes; anything else changed means
    measuring again."""
    return json.dumps(
        {
            "device": device_label or device,
            "dtype": dtype,
            "architecture": arch.as_dict(),
            "plan": {**DEFAULT_PLAN, **plan},
            "threads": threads,
            "bprr": _version("bprr"),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "bitsandbytes": _version("bitsandbytes"),
        },
        sort_keys=True,
    )


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or foreign file counts as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the cache atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"version": CACHE_VERSION, "entries": entries}, out, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cached_profile(
    arch: Architecture,
    plan: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    cache_path: Path | None = None,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
    runner: Callable[..., dict[str, Any]] = run_profile,
) -> tuple[dict[str, Any], bool]:
    """The report for this configuration from the cache, or measured now and stored.
    Returns ``(report, from_cache)``."""
    path = cache_path or default_cache_path()
    settings = plan or {}
    label = cpu_model() if device == "cpu" else None
    key = cache_key(arch, settings, device, dtype, threads, label)
    entries = read_cache(path)
    if not refresh and key in entries:
        return entries[key], True
    report = runner(arch, settings, device=device, dtype=dtype, threads=threads, progress=progress)
    entries = read_cache(path)  # another process may have written meanwhile
    entries[key] = report
    write_cache(path, entries)
    return report, False


def scenario_speeds(report: dict[str, Any]) -> dict[str, Any]:
    """The scenario fields of a server from a report (or a ``bprr profile --json`` output)."""
    prefill = report["prefill_ms_per_block"]
    return {
        "decode_ms_per_block": float(report["decode_ms_per_block"]),
        "prefill_ms_per_block": {
            "fixed": float(prefill["fixed"]),
            "per_token": float(prefill["per_token"]),
        },
    }


def measured_speeds(
    arch: Architecture | str,
    *,
    device: str = "cpu",
    dtype: str = "fp16",
    plan: dict[str, Any] | None = None,
    threads: int | None = None,
    cache_path: Path | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """What a server agent calls at start: ``{decode_ms_per_block, prefill_ms_per_block:
    {fixed, per_token}}`` for this machine, measured once per configuration and cached."""
    from app.profiler.arch import PRESETS, ArchError

    if isinstance(arch, str):
        if arch not in PRESETS:
            raise ArchError(f"arch: unknown architecture {arch!r}")
        arch = PRESETS[arch]
    report, _ = cached_profile(
        arch,
        plan,
        device=device,
        dtype=dtype,
        threads=threads,
        cache_path=cache_path,
        refresh=refresh,
    )
    return scenario_speeds(report)
