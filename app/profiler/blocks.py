"""Random-weight decoder blocks in plain torch (needs the ``profile`` extra).

A block is what PETALS serves: pre-norm self-attention with grouped key/value heads and a KV
cache, then a pre-norm MLP, each with a residual. Weights are random (no download); the timing
of a forward pass depends on the shapes, not on the values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.profiler.arch import BlockArch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.), also for a head count that is not a power of 2."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < heads:
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(heads - closest)]
    return torch.tensor(slopes)


class KVCache:
    """Keys and values of ``capacity`` positions per request; ``length`` of them are filled."""

    def __init__(self, keys: Tensor, values: Tensor, length: int) -> None:
        self.keys = keys
        self.values = values
        self.length = length


class DecoderBlock(nn.Module):
    slopes: Tensor  # ALiBi (buffer)
    inv_freq: Tensor  # RoPE (buffer)

    def __init__(self, arch: BlockArch) -> None:
        super().__init__()
        self.arch = arch
        h, kv = arch.hidden, arch.kv_heads * arch.head_dim
        norm = nn.LayerNorm if arch.norm == "layernorm" else RMSNorm
        self.attn_norm = norm(h)
        self.mlp_norm = norm(h)
        self.qkv = nn.Linear(h, h + 2 * kv, bias=arch.bias)
        self.out = nn.Linear(h, h, bias=arch.bias)
        if arch.mlp == "swiglu":
            self.up = nn.Linear(h, 2 * arch.intermediate, bias=arch.bias)  # gate and up fused
        else:
            self.up = nn.Linear(h, arch.intermediate, bias=arch.bias)
        self.down = nn.Linear(arch.intermediate, h, bias=arch.bias)
        if arch.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(arch.heads), persistent=False)
        else:
            half = arch.head_dim // 2
            inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (t, d/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, x: Tensor, cache: KVCache) -> Tensor:
        """``x``: (batch, tokens, hidden) new tokens after the ``cache.length`` cached ones;
        their keys and values are written into the cache (which must have room)."""
        arch = self.arch
        b, t, _ = x.shape
        d = arch.head_dim
        start, end = cache.length, cache.length + t
        qkv = self.qkv(self.attn_norm(x))
        q, k, v = qkv.split([arch.hidden, arch.kv_heads * d, arch.kv_heads * d], dim=-1)
        q = q.view(b, t, arch.heads, d).transpose(1, 2)
        k = k.view(b, t, arch.kv_heads, d).transpose(1, 2)
        v = v.view(b, t, arch.kv_heads, d).transpose(1, 2)
        positions = torch.arange(start, end, device=x.device)
        if arch.position == "rope":
            q, k = self._rope(q, positions), self._rope(k, positions)
        cache.keys[:, :, start:end] = k
        cache.values[:, :, start:end] = v
        keys, values = cache.keys[:, :, :end], cache.values[:, :, :end]
        key_pos = torch.arange(end, device=x.device)
        causal = key_pos[None, :] <= positions[:, None]  # (t, end)
        mask = torch.zeros(t, end, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~causal, float("-inf"))
        if arch.position == "alibi":
            distance = (key_pos[None, :] - positions[:, None]).to(x.dtype)  # <= 0 where seen
            mask = mask[None] + self.slopes.to(x.dtype)[:, None, None] * distance[None]
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=arch.kv_heads != arch.heads
        )
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, arch.hidden))
        hidden = self.up(self.mlp_norm(x))
        if arch.mlp == "swiglu":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate="tanh")
        out: Tensor = x + self.down(hidden)
        return out


def build_blocks(
    arch: BlockArch, count: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> list[DecoderBlock]:
    """``count`` blocks with random weights (scaled so activations stay finite), allocated
    directly in ``dtype`` on ``device`` and filled a few rows at a time, so that building
    needs little more memory than the blocks themselves (a BLOOM block is 4.9 GB in bf16)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(count):
        with torch.device("meta"):
            block = DecoderBlock(arch)
        block = block.to(dtype).to_empty(device=device)
        with torch.no_grad():
            for name, parameter in block.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
                elif parameter.dim() == 1:  # norms
                    parameter.fill_(1.0)
                else:
                    scale = 1.0 / math.sqrt(parameter.shape[1])
                    rows = max(1, (1 << 22) // parameter.shape[1])
                    for start in range(0, parameter.shape[0], rows):
                        part = parameter[start : start + rows]
                        noise = torch.randn(part.shape, generator=generator, dtype=torch.float32)
                        part.copy_(noise.mul_(scale))
            if arch.position == "alibi":
                block.slopes = alibi_slopes(arch.heads).to(device)
            else:
                half = arch.head_dim // 2
                steps = torch.arange(half, dtype=torch.float32, device=device) / half
                block.inv_freq = 1.0 / (10000.0**steps)
        blocks.append(block.eval())
    return blocks


def new_cache(
    arch: BlockArch,
    batch: int,
    capacity: int,
    length: int,
    device: torch.device,
    dtype: torch.dtype,
) -> KVCache:
    """A cache with room for ``capacity`` positions whose first ``length`` hold random keys
    and values (what the prefill would have left)."""
    shape = (batch, arch.kv_heads, capacity, arch.head_dim)
    keys = torch.zeros(shape, device=device, dtype=dtype)
    values = torch.zeros(shape, device=device, dtype=dtype)
    if length:
        keys[:, :, :length].normal_()
        values[:, :, :length].normal_()
    return KVCache(keys, values, length)
