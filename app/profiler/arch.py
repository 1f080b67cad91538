"""Transformer block shapes (pure: no torch). Presets follow the models' published configs
(``app/data/model_block_specs.csv`` lists the same sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu"]
Position = Literal["alibi", "rope"]


class ArchError(ValueError):
    """An architecture that cannot be built (names the field)."""


@dataclass(frozen=True)
class BlockArch:
    """One decoder block: pre-norm attention with ``kv_heads`` grouped key/value heads, then a
    pre-norm MLP. BLOOM: LayerNorm, biases, ALiBi, GELU MLP; Llama: RMSNorm, no biases, RoPE,
    SwiGLU MLP."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    norm: Norm
    mlp: Mlp
    position: Position
    bias: bool

    def __post_init__(self) -> None:
        for field in ("hidden", "heads", "kv_heads", "intermediate"):
            if getattr(self, field) < 1:
                raise ArchError(f"{field.replace('_', '-')}: must be at least 1")
        if self.hidden % self.heads:
            raise ArchError(f"heads: {self.heads} does not divide hidden size {self.hidden}")
        if self.heads % self.kv_heads:
            raise ArchError(f"kv-heads: {self.kv_heads} does not divide {self.heads} heads")
        if self.position == "rope" and self.head_dim % 2:
            raise ArchError(f"heads: RoPE needs an even head size, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        """Parameters of one block (weights, biases and norms)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h
        mlp = (3 if self.mlp == "swiglu" else 2) * h * self.intermediate
        norms = 2 * h * (2 if self.norm == "layernorm" else 1)
        biases = (h + 2 * kv + h + self.intermediate + h) if self.bias else 0
        return attention + mlp + norms + biases

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        return 2 * self.kv_heads * self.head_dim * bytes_per_value

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate,
            "norm": self.norm,
            "mlp": self.mlp,
            "position": self.position,
            "bias": self.bias,
            "params_per_block": self.params,
        }


PRESETS: dict[str, BlockArch] = {
    "bloom-176b": BlockArch(
        "bloom-176b", 14336, 112, 112, 4 * 14336, "layernorm", "gelu", "alibi", True
    ),
    "llama-2-70b": BlockArch("llama-2-70b", 8192, 64, 8, 28672, "rmsnorm", "swiglu", "rope", False),
}


def custom_arch(
    base: str | None,
    *,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    style: str | None = None,
) -> BlockArch:
    """A preset (``base``), optionally with sizes replaced, or a block from sizes alone.
    ``style`` is ``llama`` (RMSNorm, RoPE, SwiGLU) or ``bloom`` (LayerNorm, ALiBi, GELU)."""
    if base is not None:
        if base not in PRESETS:
            raise ArchError(
                f"arch: unknown architecture {base!r} (choose from {', '.join(PRESETS)})"
            )
        preset = PRESETS[base]
    else:
        if hidden is None or heads is None:
            raise ArchError("hidden, heads: give both (or an --arch preset)")
        preset = PRESETS["llama-2-70b" if (style or "llama") == "llama" else "bloom-176b"]
    if style not in (None, "llama", "bloom"):
        raise ArchError(f"style: {style!r} is neither llama nor bloom")
    like = PRESETS["bloom-176b" if style == "bloom" else "llama-2-70b"] if style else preset
    changed = any(v is not None for v in (hidden, heads, kv_heads, intermediate, style))
    h = hidden if hidden is not None else preset.hidden
    n_heads = heads if heads is not None else preset.heads
    if kv_heads is not None:
        n_kv = kv_heads
    elif heads is not None:  # keep the preset's grouping when it still divides
        group = preset.heads // preset.kv_heads
        n_kv = n_heads // group if n_heads % group == 0 else n_heads
    else:
        n_kv = preset.kv_heads
    if intermediate is not None:
        inter = intermediate
    elif hidden is not None:
        inter = round(preset.intermediate * h / preset.hidden)
    else:
        inter = preset.intermediate
    name = preset.name if base is not None and not changed else "custom"
    if base is not None and changed:
        name = f"{base} (modified)"
    return BlockArch(name, h, n_heads, n_kv, inter, like.norm, like.mlp, like.position, like.bias)
