"""The client side of ``bprr testbed --backend petals``; runs under the PETALS interpreter
(``.venv-petals``), never imported by the coordinator's code.

    PYTHON -P harness/bprr_harness/testbed/petals_replay.py PLAN.json OUT.json

(-P and a file path: PETALS' environment has neither the coordinator nor the harness.)

PLAN: {"model", "coordinator", "initial_peers", "dht_prefix", "servers": {id: [peer, start,
end]}, "rtt_ms": {client id: {server id: RTT}}, "requests": [{"index", "client",
"client_site", "input_tokens", "output_tokens"}], "seed"}.
First the calibration, undelayed: for every server, the time of a PETALS inference step on
its first block alone and on its whole span, for two prompt lengths and for decoding (median
of ``REPEATS``): the per-block compute (the slope) and PETALS' own per-hop transport on
loopback (the rest). Then the requests one after the other through ``BookedSwarm``, each
hop's traffic delayed by the RTT between the request's client and that server
(``HopDelays``): booking, first-token and per-token times. Writes OUT: {"servers": {id:
speeds}, "requests": [...]}.

The delays, and why here: the kernel has no netem, and a delaying TCP relay in front of a
server's libp2p port (the emulated backend's way) cannot give each client site its own delay,
since a PETALS client's p2p daemon keeps one connection per peer, dialled at whatever address
the peer announced. So the delay sits where every inference message of a hop passes in this
process: ``_ServerInferenceSession._step``, the coroutine that puts one step's request on the
hop's ``rpc_inference`` stream and awaits the server's reply. It holds the request back half
the RTT before it is sent and the reply half the RTT after it arrived: each exchange with a
server takes one RTT more than on loopback, as through the emulated backend's relay (half the
RTT each way, order kept, no bandwidth limit). Server-to-server pushes (``rpc_push``, where a
server forwards its output to the next server of the chain beside the reply to the client)
are switched off (``use_server_to_server=False``): that traffic would cross no delay here, and
the model and the emulated backend route every hop through the client. Left undelayed, off
the timed path or absent from the model: the DHT's traffic and the opening of a hop's stream
(libp2p negotiates it on the connection the client already holds).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPEATS = 5
_SLICES: dict[tuple[str, int, int], Any] = {}
PROMPTS = (8, 32)


class HopDelays:
    """The one-way delay (half the RTT) of each server's traffic for the current client;
    none while no client is set (the calibration)."""

    def __init__(self, rtt_ms: dict[str, dict[str, float]], peers: dict[str, str]) -> None:
        self.rtt_ms = rtt_ms  # client id -> server id -> RTT
        self.peers = peers  # server id -> PETALS peer id (base58)
        self.one_way_s: dict[str, float] = {}  # peer id -> seconds

    def use(self, client: str | None) -> None:
        rtts = {} if client is None else self.rtt_ms[client]
        self.one_way_s = {
            peer: rtts[server] / 2000.0 for server, peer in self.peers.items() if server in rtts
        }

    def install(self) -> None:
        """Wrap PETALS' per-hop step (see the module docstring)."""
        from petals.client.inference_session import _ServerInferenceSession

        step = _ServerInferenceSession._step
        delays = self

        async def delayed_step(session: Any, request: Any) -> Any:
            one_way = delays.one_way_s.get(session.span.peer_id.to_base58(), 0.0)
            if one_way > 0:
                await asyncio.sleep(one_way)
            reply = await step(session, request)
            if one_way > 0:
                await asyncio.sleep(one_way)
            return reply

        _ServerInferenceSession._step = delayed_step


def _step_ms(manager: Any, peer: Any, start: int, end: int, tokens: int, hidden: int) -> float:
    """Median time (ms) of a prefill of ``tokens`` (or, with ``tokens`` == 0, of one decode
    step after an 8-token prefill) on blocks [start, end) of one server, through PETALS."""
    import torch
    from petals.client.inference_session import InferenceSession

    key = (str(peer), start, end)
    sub = _SLICES.get(key)
    if sub is None:  # one sub-manager per span, kept: each has its own update thread
        sub = _SLICES[key] = manager[start:end]
        sub.chain = [(peer, 0, end - start)]
        sub.failed = set()
    samples = []
    for _ in range(REPEATS + 1):
        with InferenceSession(sub, max_length=64) as session:
            if tokens == 0:
                session.step(torch.randn(1, 8, hidden))
                began = time.perf_counter()
                session.step(torch.randn(1, 1, hidden))
            else:
                began = time.perf_counter()
                session.step(torch.randn(1, tokens, hidden))
            samples.append((time.perf_counter() - began) * 1000.0)
        # finalizers on this thread: a PETALS session collected on hivemind's event-loop
        # thread closes itself through that same loop and deadlocks it
        gc.collect()
    return statistics.median(samples[1:])  # the first one warms up


def calibrate(manager: Any, servers: dict[str, list[Any]], hidden: int) -> dict[str, Any]:
    """Per server: decode ms per block, the prefill line per block (fixed + per token), and
    the per-hop transport (the one-block step less one block's compute)."""
    from hivemind import PeerID

    speeds: dict[str, Any] = {}
    for server_id, (peer, start, end) in servers.items():
        peer_id = PeerID.from_base58(peer)
        blocks = end - start
        one = {t: _step_ms(manager, peer_id, start, start + 1, t, hidden) for t in (0, *PROMPTS)}
        if blocks > 1:
            full = {t: _step_ms(manager, peer_id, start, end, t, hidden) for t in (0, *PROMPTS)}
            per_block = {t: max(1e-3, (full[t] - one[t]) / (blocks - 1)) for t in one}
        else:
            per_block = {t: one[t] / 2 for t in one}  # one block: no slope; split evenly
        low, high = PROMPTS
        per_token = max(0.0, (per_block[high] - per_block[low]) / (high - low))
        speeds[server_id] = {
            "decode_ms_per_block": per_block[0],
            "prefill_fixed_ms": max(0.0, per_block[low] - per_token * low),
            "prefill_per_token_ms": per_token,
            "transport_decode_ms": max(0.0, one[0] - per_block[0]),
            "transport_prefill_ms": max(0.0, one[low] - per_block[low]),
        }
    return speeds


def _stamper(stamps: list[float]) -> Any:
    def stamp(_token: int) -> None:
        stamps.append(time.perf_counter())

    return stamp


def replay(swarm: Any, requests: list[dict[str, Any]], vocab: int, seed: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for request in requests:
        ids = torch.randint(3, vocab, (1, request["input_tokens"]), generator=generator)
        stamps: list[float] = []
        on_token = _stamper(stamps)
        began = time.perf_counter()
        with torch.inference_mode():
            swarm.generate(
                ids,
                max_new_tokens=request["output_tokens"],
                on_token=on_token,
                min_new_tokens=request["output_tokens"],
            )
        attempt = swarm.report.attempts[-1]
        first_ms = (stamps[0] - began) * 1000.0 - attempt.booking_ms
        gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(stamps)]
        rows.append(
            {
                **request,
                "hops": [[h[0], h[2], h[3]] for h in attempt.hops],
                "booking_ms": attempt.booking_ms,
                "first_token_ms": first_ms,
                "token_ms": gaps,
                "e2e_ms": (stamps[-1] - began) * 1000.0,
                "attempts": len(swarm.report.attempts),
            }
        )
    return rows


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from bprr_client import RouteClient
    from bprr_client.swarm import BookedSwarm

    # by name: the repository's petals/ folder must not pass for PETALS to a type checker
    petals = importlib.import_module("petals")
    model = petals.AutoDistributedModelForCausalLM.from_pretrained(
        plan["model"],
        initial_peers=plan["initial_peers"],
        dht_prefix=plan["dht_prefix"],
        torch_dtype=torch.float32,
        use_server_to_server=False,  # every hop through the client (the module docstring)
    )
    delays = HopDelays(plan["rtt_ms"], {sid: peer for sid, (peer, _, _) in plan["servers"].items()})
    delays.install()
    with RouteClient(plan["coordinator"]) as routes:
        swarm = BookedSwarm(model, routes, request_timeout=30.0)
        if swarm.manager.config.use_server_to_server:
            raise RuntimeError("PETALS kept server-to-server pushes on: they would skip the delays")
        with torch.inference_mode():
            speeds = calibrate(swarm.manager, plan["servers"], model.config.hidden_size)
        if plan["requests"]:  # untimed: the first session's connections and caches
            first = plan["requests"][0]
            swarm.client_site = first["client_site"]
            delays.use(first["client"])
            replay(swarm, plan["requests"][:1], model.config.vocab_size, plan["seed"] + 1)
        rows = []
        for request in plan["requests"]:
            swarm.client_site = request["client_site"]
            delays.use(request["client"])
            rows += replay(swarm, [request], model.config.vocab_size, plan["seed"])
    Path(sys.argv[2]).write_text(json.dumps({"servers": speeds, "requests": rows}))
    # Done: leave without interpreter finalization, where a PETALS session finalized after
    # hivemind's event-loop thread stopped waits on that loop forever.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
