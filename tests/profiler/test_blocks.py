"""The plain-torch decoder blocks: shapes, parameter counts, and the KV cache."""

from __future__ import annotations

import pytest
import torch

from app.profiler.arch import PRESETS, ArchError, BlockArch, custom_arch
from app.profiler.blocks import build_blocks, new_cache

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "arch",
    [
        custom_arch(None, hidden=64, heads=4, kv_heads=2, style="llama"),
        custom_arch(None, hidden=64, heads=4, style="bloom"),
    ],
    ids=["llama-gqa", "bloom-alibi"],
)
def test_decode_with_cache_matches_the_full_forward(arch: BlockArch) -> None:
    (block,) = build_blocks(arch, 1, CPU, torch.float32)
    tokens = torch.randn(2, 12, 64)
    with torch.inference_mode():
        full = block(tokens, new_cache(arch, 2, 12, 0, CPU, torch.float32))
        cache = new_cache(arch, 2, 12, 0, CPU, torch.float32)
        prefix = block(tokens[:, :10], cache)
        cache.length = 10
        step = block(tokens[:, 10:11], cache)
        cache.length = 11
        step2 = block(tokens[:, 11:12], cache)
    assert prefix.shape == (2, 10, 64) and torch.isfinite(full).all()
    torch.testing.assert_close(prefix, full[:, :10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, full[:, 10:11], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step2, full[:, 11:12], rtol=1e-4, atol=1e-5)
    # Attention is causal and sees the cache: changing an earlier token changes later outputs.
    changed = tokens.clone()
    changed[:, 0] = torch.randn(2, 64)
    with torch.inference_mode():
        other = block(changed, new_cache(arch, 2, 12, 0, CPU, torch.float32))
    assert not torch.allclose(other[:, 11], full[:, 11])


def test_parameter_counts_match_the_presets() -> None:
    for name, expected in (("llama-2-70b", 855_654_400), ("bloom-176b", 2_466_437_120)):
        assert PRESETS[name].params == expected  # app/data/model_block_specs.csv
    for arch in (
        custom_arch(None, hidden=96, heads=6, kv_heads=2, intermediate=200, style="llama"),
        custom_arch(None, hidden=96, heads=6, style="bloom"),
    ):
        (block,) = build_blocks(arch, 1, CPU, torch.float32)
        assert sum(p.numel() for p in block.parameters()) == arch.params


def test_bf16_blocks_run_on_cpu() -> None:
    arch = custom_arch(None, hidden=32, heads=2)
    (block,) = build_blocks(arch, 1, CPU, torch.bfloat16)
    with torch.inference_mode():
        out = block(
            torch.randn(1, 4, 32, dtype=torch.bfloat16),
            new_cache(arch, 1, 4, 0, CPU, torch.bfloat16),
        )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 64, "heads": 3}, "heads: 3 does not divide hidden size 64"),
        ({"hidden": 64, "heads": 4, "kv_heads": 3}, "kv-heads: 3 does not divide 4 heads"),
        ({"hidden": 0, "heads": 4}, "hidden: must be at least 1"),
        ({"hidden": 64}, "hidden, heads: give both"),
        ({"hidden": 64, "heads": 4, "style": "gpt"}, "style"),
    ],
)
def test_bad_sizes_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ArchError, match=message):
        custom_arch(None, **kwargs)  # type: ignore[arg-type]


def test_preset_overrides_keep_its_style() -> None:
    arch = custom_arch("llama-2-70b", hidden=1024, heads=8)
    assert (arch.kv_heads, arch.intermediate, arch.norm, arch.position) == (
        1,
        3584,
        "rmsnorm",
        "rope",
    )
    assert arch.name == "llama-2-70b (modified)"
    with pytest.raises(ArchError, match="unknown architecture"):
        custom_arch("gpt-5")
