"""Blocks of any Hugging Face model from its ``config.json``, built by transformers' own model
classes with random weights (offline: nothing is downloaded), optionally quantised to int8
(LLM.int8) or NF4 with bitsandbytes as PETALS serves them. Needs the ``profile`` extra.

A "block" is one decoder layer of the model's base class (``AutoModel``: LlamaModel,
MistralModel, FalconModel, BloomModel, Qwen2Model, ...); a stack of ``n`` blocks is that
model with ``n`` layers, run on ``inputs_embeds`` with a transformers KV cache, so the timed
code is exactly what transformers executes for that architecture. The embedding table is
shrunk to a few rows (it is never used) so a large vocabulary costs no memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from app.profiler.fit import Timing
from app.profiler.measure import Plan, Point, plan_points, time_points

Quant = Literal["none", "int8", "nf4"]
QUANTS: tuple[Quant, ...] = ("none", "int8", "nf4")
BITSANDBYTES_HINT = "pip install bitsandbytes==0.50.2"


class HfConfigError(ValueError):
    """A config.json that cannot be built (the message names the field or the file)."""


class QuantUnavailable(ValueError):
    """This machine cannot run the requested quantisation (the message names ``quant`` and
    says why)."""


@dataclass(frozen=True)
class HfBlocks:
    """What to build: the model's config (as JSON) and the quantisation. ``as_dict`` is the
    report's ``architecture`` and part of the profile cache key."""

    name: str
    config: dict[str, Any] = field(hash=False)
    quant: Quant = "none"

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def transformers_config(self, layers: int) -> Any:
        from transformers import AutoConfig

        values = {k: v for k, v in self.config.items() if k != "model_type"}
        try:
            config = AutoConfig.for_model(self.model_type, **values)
        except Exception as error:  # transformers' validators raise several kinds
            reason = error.__cause__ or error
            raise HfConfigError(f"config: transformers cannot build it: {reason}") from None
        config.num_hidden_layers = layers
        config.vocab_size = 2  # unused: the stack runs on inputs_embeds
        config.pad_token_id = None
        config.use_cache = True
        return config

    @cached_property
    def shape(self) -> dict[str, int]:
        """Hidden size, heads, key/value heads, head size and MLP width of one block."""
        config = self.transformers_config(1)
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        if kv is None:  # Falcon: multi-query (1) or num_kv_heads with the new architecture
            kv = getattr(config, "num_kv_heads", None) or heads
            if getattr(config, "multi_query", False) and not getattr(
                config, "new_decoder_architecture", False
            ):
                kv = 1
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = getattr(config, "intermediate_size", None) or getattr(
            config, "ffn_hidden_size", None
        )
        return {
            "hidden": hidden,
            "heads": heads,
            "kv_heads": int(kv),
            "head_dim": head_dim,
            "intermediate": int(inter or 4 * hidden),
        }

    @cached_property
    def params(self) -> int:
        """Parameters of one block, counted on a block built on the meta device (free)."""
        with torch.device("meta"):
            layer = decoder_layers(_base_model(self.transformers_config(1), torch.float32))[0]
        return sum(p.numel() for p in layer.parameters())

    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        shape = self.shape
        return 2 * shape["kv_heads"] * shape["head_dim"] * bytes_per_value

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": "huggingface-config",
            "model_type": self.model_type,
            **self.shape,
            "quantization": self.quant,
            "params_per_block": self.params,
            "config": self.config,
        }


def load_config(path: Path, quant: Quant = "none") -> HfBlocks:
    """A model's ``config.json`` (the file, or a folder holding it)."""
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise HfConfigError(f"config: cannot read {file}: {error.strerror}") from None
    except ValueError as error:
        raise HfConfigError(f"config: {file} is not JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise HfConfigError(f"config: {file} has no model_type (a Hugging Face config.json?)")
    if quant not in QUANTS:
        raise HfConfigError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    from transformers import CONFIG_MAPPING

    if data["model_type"] not in CONFIG_MAPPING:
        raise HfConfigError(
            f"config: model_type {data['model_type']!r} is unknown to this transformers"
        )
    names = data.get("architectures") or [data["model_type"]]
    blocks = HfBlocks(str(data.get("_name_or_path") or names[0]), data, quant)
    blocks.shape  # noqa: B018  (fails here, naming the field, rather than mid-profile)
    return blocks


def _base_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModel

    auto: Any = AutoModel  # transformers' auto classes are untyped
    model: nn.Module = auto.from_config(config, dtype=dtype)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``layers`` in Llama-likes, ``h`` in BLOOM/Falcon)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(model, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise HfConfigError(f"config: {type(model).__name__} has no list of decoder layers")


# --- quantisation ----------------------------------------------------------------------------


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise QuantUnavailable(
            f"quant: int8/nf4 blocks need bitsandbytes, not installed here ({BITSANDBYTES_HINT})"
        ) from None
    return bitsandbytes


def _quantised(linear: nn.Linear, quant: Quant, dtype: torch.dtype, device: torch.device) -> Any:
    bnb = _bitsandbytes()
    weight = linear.weight.data.to(torch.float16 if device.type == "cuda" else dtype)
    bias = linear.bias is not None
    if quant == "int8":
        module = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=dtype,
            quant_type="nf4",
        )
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias:
        module.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return module.to(device)  # moving to the device quantises the weights


def quantise_layers(
    layers: nn.ModuleList, quant: Quant, dtype: torch.dtype, device: torch.device
) -> None:
    """Replace every ``nn.Linear`` of the layers by its bitsandbytes int8 / NF4 counterpart."""
    if quant == "none":
        return
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _quantised(child, quant, dtype, device))


def check_quant(quant: Quant, dtype: torch.dtype, device: torch.device) -> None:
    """Run one tiny quantised matmul on ``device``: QuantUnavailable (saying why) if this
    machine cannot, e.g. a bitsandbytes build without a backend for the device."""
    if quant == "none":
        return
    bnb = _bitsandbytes()
    try:
        probe = quantise_probe(quant, dtype, device)
        with torch.inference_mode():
            out = probe(torch.randn(2, 64, device=device, dtype=dtype))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
    except QuantUnavailable:
        raise
    except Exception as error:
        raise QuantUnavailable(
            f"quant: {quant} blocks cannot run on {device.type} here: bitsandbytes "
            f"{bnb.__version__} failed ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def quantise_probe(quant: Quant, dtype: torch.dtype, device: torch.device) -> nn.Module:
    linear = nn.Linear(64, 64, bias=True, dtype=torch.float32)
    module: nn.Module = _quantised(linear.to(dtype), quant, dtype, device)
    return module


# --- building and timing ---------------------------------------------------------------------


@dataclass
class Stack:
    """The base model with ``max(plan.blocks)`` layers; ``use(n)`` makes it run the first n."""

    model: nn.Module
    layers: nn.ModuleList
    attribute: str
    depths: dict[int, nn.ModuleList]

    def use(self, n: int) -> None:
        setattr(self.model, self.attribute, self.depths[n])
        self.model.config.num_hidden_layers = n  # type: ignore[union-attr]

    def block_bytes(self) -> int:
        """Memory of one block as built (quantised weights at their packed size, plus
        bitsandbytes' scales): the scenario's ``block_memory_gb`` x 1e9."""
        layer = self.layers[0]
        tensors = [*layer.parameters(), *layer.buffers()]
        total = sum(t.numel() * t.element_size() for t in tensors)
        for module in layer.modules():  # NF4 keeps its absmax scales beside the weight
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            absmax = getattr(state, "absmax", None)
            if isinstance(absmax, torch.Tensor):
                total += absmax.numel() * absmax.element_size()
        return total


def build_stack(
    blocks: HfBlocks, counts: list[int], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> Stack:
    """The model with random weights (transformers' own initialisation), on ``device``."""
    torch.manual_seed(seed)
    config = blocks.transformers_config(max(counts))
    with torch.device(device):
        model = _base_model(config, dtype).eval()
    layers = decoder_layers(model)
    quantise_layers(layers, blocks.quant, dtype, device)
    attribute = next(n for n in ("layers", "h", "blocks") if getattr(model, n, None) is layers)
    depths = {n: nn.ModuleList(list(layers)[:n]) for n in counts}
    return Stack(model, layers, attribute, depths)


def measure_hf(
    blocks: HfBlocks,
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> tuple[list[Timing], int]:
    """Time decode steps and prefills of transformers' blocks for every point of ``plan``;
    also return the bytes of one block as built (:meth:`Stack.block_bytes`).

    A decode point keeps its own cache, filled once by a prefill of ``context`` tokens; each
    timed step appends one token and the cache is cropped back after it. A prefill point
    starts from an empty cache each time."""
    from transformers import DynamicCache

    check_quant(blocks.quant, dtype, device)
    counts = sorted(set(plan.blocks))
    stack = build_stack(blocks, counts, device, dtype, seed)
    hidden = blocks.shape["hidden"]
    points = plan_points(plan)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def embeds(batch: int, tokens: int) -> torch.Tensor:
        x = torch.randn(batch, tokens, hidden, generator=generator)
        return x.to(device=device, dtype=dtype)

    def runner(point: Point) -> Callable[[], object]:
        model = stack.model
        if point.kind == "prefill":
            x = embeds(1, point.context)

            def prefill() -> object:
                stack.use(point.blocks)
                return model(inputs_embeds=x, cache=DynamicCache(), use_cache=True)

            return prefill
        stack.use(point.blocks)
        cache = DynamicCache()
        model(inputs_embeds=embeds(point.batch, point.context), cache=cache, use_cache=True)
        step = embeds(point.batch, 1)

        def decode() -> object:
            stack.use(point.blocks)
            out = model(inputs_embeds=step, cache=cache, use_cache=True)
            cache.crop(point.context - cache.get_seq_length())  # back to ``context`` tokens
            return out

        return decode

    return time_points(points, runner, plan, device, progress, seed), stack.block_bytes()
