"""``bprr profile``: measure a server's block speeds (registered by ``register(cli)``).

torch is imported only when the command runs; without it the command prints one ``error:``
line saying to install the ``profile`` extra.
"""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from app.allocation.scenario import ScenarioError
from app.cli_style import output_console
from app.profiler.arch import PRESETS, ArchError, custom_arch
from app.profiler.fit import FitError
from app.profiler.profile import (
    DEFAULT_PLAN,
    Architecture,
    TorchMissingError,
    cached_profile,
    default_cache_path,
    run_profile,
)

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5}  # per weight; the rest stays in --dtype


class Preset(enum.StrEnum):
    """``--arch``: the keys of app.profiler.arch.PRESETS."""

    bloom_176b = "bloom-176b"
    llama_2_70b = "llama-2-70b"


class Quantization(enum.StrEnum):
    """``--quant``: app.profiler.hf.QUANTS (``none`` and the keys of QUANT_BYTES)."""

    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class BlockStyle(enum.StrEnum):
    """``--style``: the block layouts app.profiler.arch.custom_arch builds."""

    llama = "llama"
    bloom = "bloom"


class Dtype(enum.StrEnum):
    """``--dtype``: the keys of BYTES."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ProfileUserError(ScenarioError):
    """A bad argument or an impossible profile: one ``error:`` line, exit status 2."""


def _ints(option: str, text: str, low: int) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ProfileUserError(
            f"{option}: {text!r} is not a comma-separated list of integers"
        ) from None
    if not values:
        raise ProfileUserError(f"{option}: give at least one value")
    if min(values) < low:
        raise ProfileUserError(f"{option}: values must be at least {low}")
    return sorted(set(values))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _check_memory(
    arch: Architecture, blocks: int, dtype: str, device: str, quant: str = "none"
) -> None:
    if device != "cpu":
        return
    need = arch.params * QUANT_BYTES.get(quant, BYTES[dtype]) * blocks
    available = _available_bytes()
    if available is not None and need > 0.8 * available:
        raise ProfileUserError(
            f"--blocks: {blocks} blocks of {arch.name} in {dtype} need {need / 2**30:.1f} GiB, "
            f"more than 80% of the {available / 2**30:.1f} GiB available; use fewer blocks, "
            "--dtype bf16, or smaller sizes"
        )


def _print_report(report: dict[str, Any], from_cache: bool) -> None:
    console = output_console()
    arch = report["architecture"]
    source = " (from the cache)" if from_cache else ""
    built = ""
    if "transformers" in report:
        built = f", {arch['model_type']} blocks of transformers {report['transformers']}"
        if report.get("quantization", "none") != "none":
            built += f", {report['quantization']} (bitsandbytes {report['bitsandbytes']})"
    console.print(
        f"{arch['name']}: hidden {arch['hidden']}, {arch['heads']} heads "
        f"({arch['kv_heads']} kv), intermediate {arch['intermediate']}, "
        f"{arch['params_per_block'] / 1e6:.3g} M params/block; {report['device']}, "
        f"{report['dtype']}, torch {report['torch']}{built}{source}"
    )
    fit = report["fit"]
    prefill = report["prefill_ms_per_block"]
    console.print(
        f"decode_ms_per_block: {report['decode_ms_per_block']:.4f}  "
        f"(R^2 {fit['decode']['r2']:.4f}; "
        f"{fit['decode']['ms_per_block_per_context_token']:.3g} ms per cached token, at mean "
        f"context {fit['decode']['mean_context']:.0f})"
    )
    console.print(
        f"prefill_ms_per_block: fixed {prefill['fixed']:.4f} + per_token "
        f"{prefill['per_token']:.5f} x l  (R^2 {fit['prefill']['r2']:.4f})"
    )
    table = Table(title="decode step vs batch size (the paper assumes no effect)")
    table.add_column("batch", justify="right")
    table.add_column("ms/block (step)", justify="right")
    table.add_column("ratio vs batch 1", justify="right")
    table.add_column("ms/block per request", justify="right")
    for row in report["batch_effect"]:
        table.add_row(
            str(row["batch"]),
            f"{row['decode_ms_per_block']:.4f}",
            f"{row['ratio_vs_batch_1']:.3f}",
            f"{row['ms_per_request_per_block']:.4f}",
        )
    console.print(table)
    fields = report.get("model_fields")
    if fields:  # reports cached before these fields existed lack them
        console.print(
            f"model fields: block_memory_gb {fields['block_memory_gb']:.4g}, "
            f"kv_bytes_per_token_per_block {fields['kv_bytes_per_token_per_block']} "
            f"({report['dtype']} cache)"
        )
    for note in report["notes"]:
        console.print(f"note: {note}")
    console.print(
        json.dumps(
            {
                "decode_ms_per_block": report["decode_ms_per_block"],
                "prefill_ms_per_block": report["prefill_ms_per_block"],
            }
        ),
        soft_wrap=True,
    )


def profile_command(
    arch_name: Annotated[
        Preset | None,
        typer.Option("--arch", help="An architecture preset (the sizes below override it)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A Hugging Face config.json (or its folder): blocks built by transformers "
            "(Llama, Mistral, Falcon, BLOOM, Qwen, ...), random weights, nothing downloaded.",
        ),
    ] = None,
    quant: Annotated[
        Quantization,
        typer.Option(
            "--quant",
            help="Quantised linear layers (bitsandbytes, with --config): int8 or nf4.",
        ),
    ] = Quantization.none,
    hidden: Annotated[int | None, typer.Option("--hidden", help="Hidden size.")] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Attention heads.")] = None,
    kv_heads: Annotated[
        int | None, typer.Option("--kv-heads", help="Key/value heads (grouped-query attention).")
    ] = None,
    intermediate: Annotated[
        int | None, typer.Option("--intermediate", help="MLP intermediate size.")
    ] = None,
    style: Annotated[
        BlockStyle | None,
        typer.Option(
            "--style", help="llama (RMSNorm, RoPE, SwiGLU) or bloom (LayerNorm, ALiBi, GELU)."
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[
        Dtype, typer.Option("--dtype", help="Weight and activation type.")
    ] = Dtype.fp32,
    blocks: Annotated[
        str, typer.Option("--blocks", help="Numbers of blocks to chain, comma-separated.")
    ] = ",".join(map(str, DEFAULT_PLAN["blocks"])),
    contexts: Annotated[
        str,
        typer.Option("--contexts", help="Context lengths l (decode cache, prefill tokens)."),
    ] = ",".join(map(str, DEFAULT_PLAN["contexts"])),
    batches: Annotated[
        str, typer.Option("--batches", help="Decode batch sizes (1 is always measured).")
    ] = ",".join(map(str, DEFAULT_PLAN["batches"])),
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per point (median).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per point.")] = 2,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache", help="Read/store the result in the profile cache.")
    ] = False,
    cache_file: Annotated[
        Path | None, typer.Option("--cache-file", help="Cache file (implies --cache).")
    ] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Measure even if cached.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Time random-weight transformer blocks and fit the server's speed fields
    (decode_ms_per_block, prefill_ms_per_block) by least squares."""
    arch = _architecture(
        None if arch_name is None else arch_name.value,
        config,
        quant.value,
        hidden,
        heads,
        kv_heads,
        intermediate,
        None if style is None else style.value,
    )
    dtype_name = dtype.value
    if repeats < 1:
        raise ProfileUserError("--repeats: must be at least 1")
    if warmup < 0:
        raise ProfileUserError("--warmup: must be at least 0")
    if threads is not None and threads < 1:
        raise ProfileUserError("--threads: must be at least 1")
    block_counts = _ints("--blocks", blocks, 1)
    lengths = _ints("--contexts", contexts, 1)
    if len(lengths) < 2:
        raise ProfileUserError("--contexts: give at least two lengths (the prefill line)")
    plan: dict[str, Any] = {
        "blocks": block_counts,
        "contexts": lengths,
        "batches": sorted({1, *_ints("--batches", batches, 1)}),
        "repeats": repeats,
        "warmup": warmup,
    }
    _check_memory(arch, max(block_counts), dtype_name, device, quant.value)

    def progress(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        if cache or cache_file is not None:
            report, from_cache = cached_profile(
                arch,
                plan,
                device=device,
                dtype=dtype_name,
                threads=threads,
                cache_path=cache_file or default_cache_path(),
                refresh=refresh,
                progress=progress,
            )
        else:
            report = run_profile(
                arch, plan, device=device, dtype=dtype_name, threads=threads, progress=progress
            )
            from_cache = False
    except (TorchMissingError, FitError) as error:
        raise ProfileUserError(str(error)) from None
    except ValueError as error:  # the device, dtype, plan, or a --quant this machine lacks
        raise ProfileUserError(f"--{error}") from None
    if as_json:
        print(json.dumps(report))
    else:
        _print_report(report, from_cache)


def _architecture(
    arch_name: str | None,
    config: Path | None,
    quant: str,
    hidden: int | None,
    heads: int | None,
    kv_heads: int | None,
    intermediate: int | None,
    style: str | None,
) -> Architecture:
    sizes = (hidden, heads, kv_heads, intermediate, style)
    if config is not None:
        if arch_name is not None or any(v is not None for v in sizes):
            raise ProfileUserError("--config: give it alone (not with --arch or sizes)")
        try:
            from app.profiler import hf
        except ImportError as error:
            raise ProfileUserError(f"--config needs torch and transformers: {error}") from None
        if quant not in hf.QUANTS:
            raise ProfileUserError(f"--quant: {quant!r} is not one of {', '.join(hf.QUANTS)}")
        try:
            return hf.load_config(config, quant)
        except hf.HfConfigError as error:
            raise ProfileUserError(f"--{error}") from None
    if quant != "none":
        raise ProfileUserError("--quant: int8/nf4 blocks need --config (transformers' blocks)")
    if arch_name is None and (hidden is None or heads is None):
        raise ProfileUserError(
            f"--arch: give a preset ({', '.join(PRESETS)}), --hidden and --heads, or --config"
        )
    try:
        return custom_arch(
            arch_name,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            style=style,
        )
    except ArchError as error:
        raise ProfileUserError(f"--{error}") from None


def register(cli: typer.Typer) -> None:
    cli.command("profile")(profile_command)
