"""A PETALS client steered by bprr, run with the PETALS interpreter by the swarm driver:
greedy generation through ``BookedSwarm``, and the same generation by plain transformers on
the same weights for reference. Prints one JSON object.

    .venv-petals/bin/python tests/petals/petals_client.py MODEL_DIR --coordinator URL \\
        --initial-peer MADDR --dht-prefix NAME --tokens 12 [--pause-after N --marker F --go F]

With ``--pause-after N`` it writes the booked route to MARKER after N tokens and waits for
the file GO before the next token (the driver kills a server on the chain meanwhile).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox jumps over the lazy dog"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--initial-peer", action="append", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--client-site", default="east")
    parser.add_argument("--pause-after", type=int)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from bprr_client import RouteClient
    from bprr_client.swarm import BookedSwarm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from petals import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        reference = plain.generate(input_ids, max_new_tokens=args.tokens, do_sample=False)
    started = time.monotonic()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peer,
        dht_prefix=args.dht_prefix,
        torch_dtype=torch.float32,
    )
    loaded_s = time.monotonic() - started
    seen: list[int] = []

    with RouteClient(args.coordinator, client_site=args.client_site) as routes:
        swarm = BookedSwarm(model, routes, request_timeout=5.0, failover_timeout_s=60.0)

        def on_token(token: int) -> None:
            seen.append(token)
            if args.pause_after is not None and len(seen) == args.pause_after:
                attempt = swarm.report.attempts[-1]
                args.marker.write_text(json.dumps({"hops": attempt.hops}))
                while not args.go.exists():
                    time.sleep(0.05)

        started = time.monotonic()
        with torch.inference_mode():
            output = swarm.generate(input_ids, max_new_tokens=args.tokens, on_token=on_token)
        generate_s = time.monotonic() - started
    report = {
        "prompt_tokens": int(input_ids.shape[1]),
        "tokens": output[0].tolist(),
        "reference": reference[0].tolist(),
        "model_load_s": loaded_s,
        "generate_s": generate_s,
        "attempts": [vars(a) for a in swarm.report.attempts],
        "failover_s": swarm.report.failover_s,
    }
    print(json.dumps(report), flush=True)
    # leave without interpreter finalization: a PETALS session finalized after hivemind's
    # event-loop thread stopped would wait on that loop forever
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
