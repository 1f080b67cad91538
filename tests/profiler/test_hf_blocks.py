"""Blocks from Hugging Face config.json files (app.profiler.hf): transformers' own classes,
random weights, int8/NF4 through bitsandbytes, and ``bprr profile --config``.

tests/profiler/configs/ holds the published config.json of five models (Llama-2-70B,
BLOOM-176B, Mistral-7B, Falcon-40B, Qwen2-7B): their block sizes are checked on the meta
device (no memory); timing runs on the same configs shrunk to a tiny width."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from app.cli import main
from app.profiler import hf
from app.profiler.arch import PRESETS
from app.profiler.measure import Plan
from app.profiler.profile import cache_key

CONFIGS = Path(__file__).parent / "configs"
CPU = torch.device("cpu")
FAMILIES = {
    "llama-2-70b": "LlamaDecoderLayer",
    "bloom-176b": "BloomBlock",
    "mistral-7b": "MistralDecoderLayer",
    "falcon-40b": "FalconDecoderLayer",
    "qwen2-7b": "Qwen2DecoderLayer",
}
PLAN = Plan(blocks=(1, 2), contexts=(4, 12), batches=(1, 2), repeats=1, warmup=0)


def tiny(name: str, tmp_path: Path) -> Path:
    """The model's config with its sizes shrunk (every other field kept)."""
    config: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    for key, value in (
        ("hidden_size", 64),
        ("intermediate_size", 128),
        ("num_attention_heads", 4),
        ("n_head", 4),
        ("num_key_value_heads", 2),
        ("num_kv_heads", 2),
    ):
        if key in config:
            config[key] = value
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", FAMILIES)
def test_published_configs_give_the_published_block_sizes(name: str) -> None:
    blocks = hf.load_config(CONFIGS / f"{name}.json")
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    shape = blocks.shape
    assert shape["hidden"] == config["hidden_size"]
    assert blocks.model_type == config["model_type"]
    report = blocks.as_dict()
    assert report["params_per_block"] == blocks.params and report["quantization"] == "none"
    assert report["name"] == config["_name_or_path"]
    if name in PRESETS:  # the plain-torch presets count the same parameters
        preset = PRESETS[name]
        assert blocks.params == preset.params
        assert (shape["heads"], shape["kv_heads"]) == (preset.heads, preset.kv_heads)
        assert blocks.kv_bytes_per_token(2) == preset.kv_bytes_per_token(2)
    expected_kv = {"bloom-176b": 112, "falcon-40b": 8, "qwen2-7b": 4}.get(name, 8)
    assert shape["kv_heads"] == expected_kv


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_blocks_with_a_cache(name: str, tmp_path: Path) -> None:
    blocks = hf.load_config(tiny(name, tmp_path).parent)  # the folder works too
    stack = hf.build_stack(blocks, [1, 2], CPU, torch.float32)
    assert [type(layer).__name__ for layer in stack.layers] == [FAMILIES[name]] * 2
    from transformers import DynamicCache

    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stack.use(2)
        full = stack.model(inputs_embeds=x, use_cache=False).last_hidden_state
        cache = DynamicCache()
        prefix = stack.model(inputs_embeds=x[:, :5], cache=cache, use_cache=True)
        step = stack.model(inputs_embeds=x[:, 5:], cache=cache, use_cache=True)
        assert cache.get_seq_length() == 6
        stack.use(1)
        one = stack.model(inputs_embeds=x, use_cache=False).last_hidden_state
    torch.testing.assert_close(prefix.last_hidden_state, full[:, :5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.last_hidden_state, full[:, 5:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(one, full)  # one block is not two


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_blocks_run_on_this_machine(quant: hf.Quant, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    blocks = hf.load_config(tiny("llama-2-70b", tmp_path), quant)
    stack = hf.build_stack(blocks, [1], CPU, torch.float32)
    linears = [m for m in stack.layers.modules() if isinstance(m, nn.Linear)]
    wanted = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert linears and all(isinstance(m, wanted) for m in linears)
    stack.use(1)
    with torch.inference_mode():
        out = stack.model(inputs_embeds=torch.randn(1, 3, 64), use_cache=False)
    assert torch.isfinite(out.last_hidden_state).all()
    timings, block_bytes = hf.measure_hf(blocks, PLAN, CPU, torch.float32)
    assert len(timings) == 2 * 2 * 2 + 2 * 2 and all(t.ms > 0 for t in timings)
    # Quantised weights take 1 byte (int8) or half a byte (NF4) instead of 4, plus scales.
    linear_weights = sum(m.in_features * m.out_features for m in linears)
    others = (blocks.params - linear_weights) * 4
    per_weight = 1.0 if quant == "int8" else 0.5
    assert others + linear_weights * per_weight <= block_bytes
    assert block_bytes < others + linear_weights * (per_weight + 0.25)


def test_measure_covers_every_point(tmp_path: Path) -> None:
    blocks = hf.load_config(tiny("falcon-40b", tmp_path))
    timings, block_bytes = hf.measure_hf(blocks, PLAN, CPU, torch.float32)
    assert block_bytes == blocks.params * 4  # fp32, unquantised
    points = {(t.kind, t.blocks, t.batch, t.context) for t in timings}
    assert points == {("decode", n, b, c) for n in (1, 2) for b in (1, 2) for c in (4, 12)} | {
        ("prefill", n, 1, c) for n in (1, 2) for c in (4, 12)
    }


def test_missing_bitsandbytes_is_said_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_bitsandbytes(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_bitsandbytes)
    with pytest.raises(hf.QuantUnavailable, match="need bitsandbytes, not installed"):
        hf.check_quant("int8", torch.float32, CPU)
    hf.check_quant("none", torch.float32, CPU)  # unquantised blocks never need it


def test_a_device_bitsandbytes_cannot_run_is_said_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def no_backend(*_: Any) -> nn.Module:
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(hf, "quantise_probe", no_backend)
    config = tiny("qwen2-7b", tmp_path)
    code, _, err = run(["profile", "--config", str(config), "--quant", "nf4", "--quiet"], capsys)
    assert code == 2
    assert err.strip().startswith("error: --quant: nf4 blocks cannot run on cpu here")
    assert "no kernel for this device" in err and len(err.strip().splitlines()) == 1


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_profile_cli_with_a_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tiny("mistral-7b", tmp_path)
    argv = ["profile", "--config", str(config), "--quant", "int8", "--threads", "1", "--quiet"]
    # 1 and 8 blocks: a long lever arm for the per-block slope on a busy shared machine.
    plan = ["--blocks", "1,8", "--contexts", "4,16", "--batches", "1", "--repeats", "5"]
    code, out, err = run([*argv, *plan, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["architecture"]["model_type"] == "mistral"
    assert report["architecture"]["source"] == "huggingface-config"
    assert report["quantization"] == "int8" and report["bitsandbytes"] == "0.50.2"
    # A fitted slope on a busy machine may come out at any sign: only its presence is checked.
    assert report["transformers"] and isinstance(report["decode_ms_per_block"], float)
    assert all(t["ms"] > 0 for t in report["timings"])
    assert {t["kind"] for t in report["timings"]} == {"decode", "prefill"}
    # Model fields for the scenario: int8 weights, the KV cache in the compute dtype (fp32).
    fields = report["model_fields"]
    assert fields["kv_bytes_per_token_per_block"] == 2 * 2 * 16 * 4  # 2 kv heads x 16 dims
    assert 0 < fields["block_memory_gb"] * 1e9 < report["architecture"]["params_per_block"] * 2
    code, out, err = run([*argv, *plan], capsys)
    assert code == 0, err
    text = " ".join(out.split())  # rich wraps at the terminal width
    assert "mistral blocks of transformers" in text and "int8 (bitsandbytes 0.50.2)" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config", "/nonexistent/config.json"], "--config: cannot read"),
        (["--config", "{bad}"], "has no model_type"),
        (["--config", "{unknown}"], "model_type 'no-such-model' is unknown"),
        (["--config", "{uneven}"], "not a multiple of the number of attention heads"),
        (["--config", "{good}", "--quant", "fp8"], "--quant: 'fp8' is not one of"),
        (["--config", "{good}", "--hidden", "64"], "--config: give it alone"),
        (["--arch", "llama-2-70b", "--quant", "int8"], "--quant: int8/nf4 blocks need --config"),
    ],
)
def test_bad_configs_are_one_error_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    files = {
        "bad": {"hidden_size": 64},
        "unknown": {"model_type": "no-such-model"},
        "uneven": {"model_type": "llama", "hidden_size": 100, "num_attention_heads": 7},
    }
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    names = {f"{{{name}}}": str(tmp_path / f"{name}.json") for name in files}
    names["{good}"] = str(tiny("llama-2-70b", tmp_path))
    code, out, err = run(["profile", *[names.get(a, a) for a in extra]], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_cache_key_tells_quantisations_apart(tmp_path: Path) -> None:
    config = tiny("llama-2-70b", tmp_path)
    keys = {cache_key(hf.load_config(config, q), {}, "cpu", "fp32", 1) for q in hf.QUANTS}
    assert len(keys) == 3
