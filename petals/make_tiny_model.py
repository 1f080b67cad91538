"""Make a tiny random-weight Llama and its tokenizer in a folder, with no hub: what the
real-PETALS tests and ``bprr testbed --backend petals`` serve.

    .venv-petals/bin/python petals/make_tiny_model.py OUT_DIR [--layers 6] [--seed 0]

The weights are seeded (the same folder every time); the tokenizer is a byte-level BPE
trained offline on a few sentences. Run with the PETALS environment's interpreter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SENTENCES = [
    "bprr places transformer blocks on servers and routes every request along a chain.",
    "A chain covers all blocks in order; each server holds one contiguous span.",
    "The quick brown fox jumps over the lazy dog while the swarm serves tokens.",
    "Servers join and leave; the coordinator re-plans and the agents re-span.",
    "PETALS runs large language models over the Internet, a few blocks per machine.",
]


def make(out: Path, layers: int = 6, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        print("error: --layers: must be at least 1", file=sys.stderr)
        return 2
    print(make(args.out, args.layers, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
