"""``bprr profile`` end to end on a tiny CPU configuration, the cache, and torch missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.profiler.arch import custom_arch
from app.profiler.fit import Timing, fit_profile
from app.profiler.profile import cached_profile, measured_speeds, read_cache

TINY = ["--hidden", "64", "--heads", "2", "--threads", "1", "--quiet"]
# 1 and 4 blocks: a long lever arm for the per-block slope on a busy shared machine.
TINY_PLAN = ["--blocks", "1,4", "--contexts", "8,32", "--batches", "1,2"]
FAST = ["--repeats", "7", "--warmup", "2"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_profile_json_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["profile", *TINY, *TINY_PLAN, *FAST, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["decode_ms_per_block"] > 0
    prefill = report["prefill_ms_per_block"]
    assert prefill["fixed"] >= 0 and prefill["per_token"] >= 0
    assert prefill["fixed"] + prefill["per_token"] * 8 > 0
    assert report["device_type"] == "cpu" and report["dtype"] == "fp32"
    assert report["threads"] == 1
    arch = custom_arch(None, hidden=64, heads=2)
    assert report["architecture"]["params_per_block"] == arch.params
    # The scenario's model fields for these blocks (fp32: 4 bytes a value).
    assert report["model_fields"] == {
        "block_memory_gb": round(arch.params * 4 / 1e9, 6),
        "kv_bytes_per_token_per_block": arch.kv_bytes_per_token(4),
    }
    timings = report["timings"]
    # decode: 2 block counts x 2 contexts x 2 batches; prefill: 2 x 2
    assert len(timings) == 8 + 4
    assert all(t["ms"] > 0 for t in timings)
    assert {(t["kind"], t["blocks"], t["batch"], t["context"]) for t in timings} == {
        *(("decode", n, b, c) for n in (1, 4) for b in (1, 2) for c in (8, 32)),
        *(("prefill", n, 1, c) for n in (1, 4) for c in (8, 32)),
    }
    # The reported speeds are the least-squares fit of the reported timings.
    refit = fit_profile(
        Timing(t["kind"], t["blocks"], t["batch"], t["context"], t["ms"]) for t in timings
    )
    assert report["decode_ms_per_block"] == pytest.approx(refit.decode.ms_per_block, abs=1e-5)
    assert report["fit"]["prefill"]["fixed_ms"] == pytest.approx(refit.prefill.fixed_ms, abs=1e-5)
    assert report["fit"]["decode"]["r2"] <= 1.0 and report["fit"]["prefill"]["r2"] <= 1.0
    effect = {row["batch"]: row for row in report["batch_effect"]}
    assert set(effect) == {1, 2} and effect[1]["ratio_vs_batch_1"] == 1.0
    assert effect[2]["ratio_vs_batch_1"] == pytest.approx(
        effect[2]["decode_ms_per_block"] / report["decode_ms_per_block"], rel=1e-4
    )
    assert effect[2]["ms_per_request_per_block"] == pytest.approx(
        effect[2]["decode_ms_per_block"] / 2, rel=1e-4
    )
    # The fitted cost of 4 blocks is of the order of a measured step through 4 blocks.
    four = [t["ms"] for t in timings if t["kind"] == "decode" and t["blocks"] == 4]
    assert 0.2 * min(four) < 4 * report["decode_ms_per_block"] < 5 * max(four)


def test_profile_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        [
            "profile",
            *TINY,
            "--blocks",
            "1",
            "--contexts",
            "4,8",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "decode_ms_per_block:" in out and "ratio vs batch 1" in out
    assert "fits go through the origin" in out  # one number of blocks
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"decode_ms_per_block", "prefill_ms_per_block"}
    # Not a terminal: the architecture line is whole, not wrapped at 80 columns.
    first = out.splitlines()[0]
    assert "params/block" in first and ", torch " in first and len(first) > 80


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "error: --arch: give a preset"),
        (
            ["--arch", "gpt-9"],
            "error: --arch: 'gpt-9' is not one of bloom-176b, llama-2-70b",
        ),
        (["--hidden", "64", "--heads", "3"], "error: --heads: 3 does not divide"),
        (
            ["--hidden", "64", "--heads", "2", "--dtype", "fp8"],
            "error: --dtype: 'fp8' is not one of fp32, bf16, fp16",
        ),
        (["--arch", "bloom-176b", "--quant", "int4"], "error: --quant: 'int4' is not one of none"),
        (
            ["--hidden", "64", "--heads", "2", "--style", "gpt"],
            "error: --style: 'gpt' is not one of llama, bloom",
        ),
        (
            ["--hidden", "64", "--heads", "2", "--contexts", "8"],
            "error: --contexts: give at least two",
        ),
        (["--hidden", "64", "--heads", "2", "--blocks", "1,x"], "error: --blocks: '1,x' is not"),
        (["--hidden", "64", "--heads", "2", "--blocks", "0"], "error: --blocks: values must be"),
        (["--hidden", "64", "--heads", "2", "--device", "tpu"], "error: --device: 'tpu'"),
        (
            ["--arch", "bloom-176b", "--blocks", "1000"],
            "error: --blocks: 1000 blocks of bloom-176b",
        ),
    ],
)
def test_bad_arguments_are_one_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["profile", *argv, "--quiet"], capsys)
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cuda_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["profile", *TINY, "--contexts", "4,8", "--device", "cuda"], capsys)
    assert code == 2
    assert err.strip() == "error: --device: cuda requested but CUDA is not available here"


def test_missing_torch_says_to_install_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    code, _, err = run(["profile", *TINY, "--contexts", "4,8"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: bprr profile needs torch: install the profile extra")


def _fake_runner(calls: list[dict[str, Any]]) -> Any:
    def runner(arch: Any, plan: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        calls.append({"plan": plan, **kwargs})
        return {
            "decode_ms_per_block": 2.5 + len(calls),
            "prefill_ms_per_block": {"fixed": 10.0, "per_token": 0.05},
        }

    return runner


def test_cache_measures_once_per_configuration(tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "profile.json"
    arch = custom_arch(None, hidden=64, heads=2)
    calls: list[dict[str, Any]] = []
    runner = _fake_runner(calls)
    first, cached = cached_profile(arch, {"contexts": [8, 16]}, cache_path=cache, runner=runner)
    assert not cached and len(calls) == 1
    again, cached = cached_profile(arch, {"contexts": [8, 16]}, cache_path=cache, runner=runner)
    assert cached and again == first and len(calls) == 1
    # Another dtype, plan or architecture is another entry.
    cached_profile(arch, {"contexts": [8, 16]}, dtype="bf16", cache_path=cache, runner=runner)
    cached_profile(arch, {"contexts": [8, 32]}, cache_path=cache, runner=runner)
    cached_profile(
        custom_arch(None, hidden=64, heads=4),
        {"contexts": [8, 16]},
        cache_path=cache,
        runner=runner,
    )
    assert len(calls) == 4 and len(read_cache(cache)) == 4
    refreshed, cached = cached_profile(
        arch, {"contexts": [8, 16]}, cache_path=cache, refresh=True, runner=runner
    )
    assert not cached and refreshed["decode_ms_per_block"] == 2.5 + 5
    # measured_speeds reads the entry (no torch needed) and returns the scenario fields.
    speeds = measured_speeds(arch, dtype="fp32", plan={"contexts": [8, 16]}, cache_path=cache)
    assert speeds == {
        "decode_ms_per_block": 7.5,
        "prefill_ms_per_block": {"fixed": 10.0, "per_token": 0.05},
    }
    assert len(calls) == 5


def test_a_corrupt_cache_is_measured_again(tmp_path: Path) -> None:
    cache = tmp_path / "profile.json"
    cache.write_text("{not json")
    calls: list[dict[str, Any]] = []
    arch = custom_arch(None, hidden=64, heads=2)
    _, cached = cached_profile(arch, {}, cache_path=cache, runner=_fake_runner(calls))
    assert not cached and len(calls) == 1
    assert len(read_cache(cache)) == 1


def test_profile_cli_cache_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "profile.json"
    argv = ["profile", *TINY, "--blocks", "1", "--contexts", "4,8", "--batches", "1"]
    argv += ["--repeats", "1", "--warmup", "0", "--json", "--cache-file", str(cache)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    code, again, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(again) == json.loads(out)  # the second answer came from the cache
    assert len(read_cache(cache)) == 1


def test_a_dtype_the_cpu_cannot_run_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    real_linear = torch.nn.functional.linear

    def linear(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real_linear(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    code, _, err = run(["profile", *TINY, "--contexts", "4,8", "--dtype", "fp16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --dtype: fp16 is not supported on this CPU")
    assert "use --dtype fp32 or bf16" in err
