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
speeds, with the calibration's exchanges and delayed exchanges}, "requests": [..., each with
"delays": its exchanges, delayed exchanges, delayed prefills and the time slept]}.

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
the model and the emulated backend route every hop through the client. The DHT's traffic is
left undelayed (off the timed path).

A known difference, kept: opening a hop's stream (``_ServerInferenceSession.create``, inside
the first-token time) is not delayed, and the model has no term for it. On a WAN it costs 0 to
1 RTT per hop: go-libp2p sends the protocol header with the first message when it knows the
peer speaks the protocol (from identify), and waits one round trip of multistream-select when
it does not; a peer not yet connected costs the dial's handshakes more. No fixed delay here
would be faithful to that, and one added here alone would only open a gap to the model that
the model should close itself, so measured and predicted first-token times both leave it out
and read low against a real WAN's by up to one RTT per hop. The close of each hop's stream
(after the last token) is undelayed too: it is in the request's e2e time, not its token times.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

REPEATS = 5
_SLICES: dict[tuple[str, int, int], Any] = {}
PROMPTS = (8, 32)
T = TypeVar("T")


class HopDelays:
    """The one-way delay (half the RTT) of each server's traffic for the current client;
    none while no client is set (the calibration). Counts what it did since the last
    ``take()``: every exchange through ``_step``, those it delayed (and of them the first of
    each hop's session, the prefill), and the time it actually slept, so that a run shows
    its delays were applied, and applied nowhere else."""

    def __init__(self, rtt_ms: dict[str, dict[str, float]], peers: dict[str, str]) -> None:
        self.rtt_ms = rtt_ms  # client id -> server id -> RTT
        self.peers = peers  # server id -> PETALS peer id (base58)
        self.one_way_s: dict[str, float] = {}  # peer id -> seconds
        self.counts = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"exchanges": 0, "delayed_exchanges": 0, "delayed_prefills": 0, "slept_ms": 0.0}

    def use(self, client: str | None) -> None:
        rtts = {} if client is None else self.rtt_ms[client]
        self.one_way_s = {
            peer: rtts[server] / 2000.0 for server, peer in self.peers.items() if server in rtts
        }

    def take(self) -> dict[str, float]:
        """The counts since the last call; starts new ones."""
        counts, self.counts = self.counts, self._zero()
        return counts

    async def exchange(self, peer: str, prefill: bool, send: Callable[[], Awaitable[T]]) -> T:
        """One step's request to ``peer`` and its reply (``send``), each held back half the
        RTT; the sleeps are timed, not assumed."""
        one_way = self.one_way_s.get(peer, 0.0)
        self.counts["exchanges"] += 1
        if one_way <= 0:
            return await send()
        self.counts["delayed_exchanges"] += 1
        self.counts["delayed_prefills"] += int(prefill)
        began = time.perf_counter()
        await asyncio.sleep(one_way)
        slept = time.perf_counter() - began
        reply = await send()
        began = time.perf_counter()
        await asyncio.sleep(one_way)
        slept += time.perf_counter() - began
        self.counts["slept_ms"] += slept * 1000.0
        return reply

    def install(self) -> None:
        """Wrap PETALS' per-hop step (see the module docstring)."""
        from petals.client.inference_session import _ServerInferenceSession

        step = _ServerInferenceSession._step
        delays = self

        async def delayed_step(session: Any, request: Any) -> Any:
            # not yet stepped: this exchange opens the hop's session with the prefill
            return await delays.exchange(
                session.span.peer_id.to_base58(),
                not session.stepped,
                lambda: step(session, request),
            )

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


def calibrate(
    manager: Any, servers: dict[str, list[Any]], hidden: int, delays: HopDelays
) -> dict[str, Any]:
    """Per server: decode ms per block, the prefill line per block (fixed + per token), the
    per-hop transport (the one-block step less one block's compute), and the exchanges its
    calibration made and of them those ``delays`` held back (none: no client is set)."""
    from hivemind import PeerID

    speeds: dict[str, Any] = {}
    delays.take()
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
        counts = delays.take()
        speeds[server_id]["calibration_exchanges"] = counts["exchanges"]
        speeds[server_id]["calibration_delayed_exchanges"] = counts["delayed_exchanges"]
    return speeds


def _stamper(stamps: list[float]) -> Any:
    def stamp(_token: int) -> None:
        stamps.append(time.perf_counter())

    return stamp


def replay(
    swarm: Any, requests: list[dict[str, Any]], vocab: int, seed: int, delays: HopDelays
) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for request in requests:
        ids = torch.randint(3, vocab, (1, request["input_tokens"]), generator=generator)
        stamps: list[float] = []
        on_token = _stamper(stamps)
        delays.take()
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
                "delays": delays.take(),  # this request's exchanges (HopDelays.take)
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
        delays.use(None)  # the calibration: PETALS' own transport, undelayed
        with torch.inference_mode():
            speeds = calibrate(swarm.manager, plan["servers"], model.config.hidden_size, delays)
        if plan["requests"]:  # untimed: the first session's connections and caches
            first = plan["requests"][0]
            swarm.client_site = first["client_site"]
            delays.use(first["client"])
            replay(swarm, plan["requests"][:1], model.config.vocab_size, plan["seed"] + 1, delays)
        rows = []
        for request in plan["requests"]:
            swarm.client_site = request["client_site"]
            delays.use(request["client"])
            rows += replay(swarm, [request], model.config.vocab_size, plan["seed"], delays)
    Path(sys.argv[2]).write_text(json.dumps({"servers": speeds, "requests": rows}))
    # Done: leave without interpreter finalization, where a PETALS session finalized after
    # hivemind's event-loop thread stopped waits on that loop forever.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
