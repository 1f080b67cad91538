"""Reading request traces (the Azure LLM inference trace format) for workloads and profiles.

A trace is a CSV with columns TIMESTAMP, ContextTokens, GeneratedTokens. Reading is cached by
(path, limit, modification time): the workload profile and the simulator read the same file.
"""

from __future__ import annotations

import csv
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

__all__ = ["WorkloadError", "read_trace"]


class WorkloadError(ValueError):
    """A workload that cannot be built; the message names the field or the file."""


def read_trace(path: str | Path, limit: int | None = None) -> tuple[FloatArray, IntArray, IntArray]:
    """Read an Azure LLM inference trace: (arrival ms from the first request, inputs, outputs)."""
    path = Path(path)
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as error:
        raise WorkloadError(f"workload.trace: cannot read {path} ({error.strerror})") from None
    arrival, inputs, outputs = _read_cached(str(path), limit, stamp)
    return arrival.copy(), inputs.copy(), outputs.copy()


@lru_cache(maxsize=8)
def _read_cached(name: str, limit: int | None, stamp: int) -> tuple[FloatArray, IntArray, IntArray]:
    path = Path(name)
    times: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(
                reader.fieldnames or []
            )
            if missing:
                raise WorkloadError(
                    f"{path}: trace lacks column(s) {', '.join(sorted(missing))} "
                    "(need TIMESTAMP, ContextTokens, GeneratedTokens)"
                )
            for line, row in enumerate(reader, start=2):
                if limit is not None and len(times) >= limit:
                    break
                try:
                    times.append(_parse_timestamp(row["TIMESTAMP"]))
                    inputs.append(int(row["ContextTokens"]))
                    outputs.append(int(row["GeneratedTokens"]))
                except (TypeError, ValueError):
                    raise WorkloadError(f"{path}, line {line}: malformed trace row") from None
    except OSError as error:
        raise WorkloadError(f"workload.trace: cannot read {path} ({error.strerror})") from None
    if not times:
        raise WorkloadError(f"workload.trace: {path} holds no requests")
    stamps = np.array(times, dtype=np.float64)
    order = np.argsort(stamps, kind="stable")
    stamps = stamps[order]
    return (
        (stamps - stamps[0]) * 1000.0,
        np.array(inputs, dtype=np.int64)[order],
        np.array(outputs, dtype=np.int64)[order],
    )


def _parse_timestamp(text: str) -> float:
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    # Azure's format has 7 fractional digits; datetime takes at most 6.
    if "." in value:
        head, fraction = value.split(".", 1)
        value = f"{head}.{fraction[:6]}"
    return datetime.fromisoformat(value).timestamp()
