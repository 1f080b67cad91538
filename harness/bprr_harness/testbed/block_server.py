"""A small block server for the testbed: ``python -m bprr_harness.testbed.block_server ...``.

It hosts the span the coordinator assigns of a model made of random-weight decoder blocks
(``app.profiler.blocks``, a tiny configuration; block b's weights are seeded by b, so every
server holding block b computes the same function), and serves prefill and decode steps over
HTTP (a threaded ``http.server``; activations as raw little-endian float32, one row of
``hidden`` values per token; one KV cache per session and block).

Compute time: the tiny blocks take a fraction of a millisecond on a CPU, so a step of k blocks
is padded (slept) up to the emulated time of the server it stands for: ``overhead + k x tau``
for a decode step, ``overhead(l) + k x (fixed + per_token x l)`` for a prefill of l tokens
(``--decode-ms-per-block``, ``--prefill-*``: the scenario's speeds; ``--*-overhead-*``: the
scenario's per-server overheads). At start it measures its own blocks with the profiler's
timing (``median_ms``) and least-squares fits (``fit_decode``, ``fit_prefill``) and registers
those measured speeds through ``bprr_client.ServerAgent``, which then heartbeats and tells it
which span to load.

It prints one line ``ready {json}`` (the measured speeds) once it serves and is registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import parse_qs, urlparse

import torch
from bprr_client import PrefillSpeed, ServerAgent, ServerInfo, Span

from app.profiler.arch import BlockArch, custom_arch
from app.profiler.blocks import DecoderBlock, KVCache, build_blocks, new_cache
from app.profiler.fit import Timing, fit_decode, fit_prefill

log = logging.getLogger("bprr.testbed.server")
DTYPE = torch.float32
DEVICE = torch.device("cpu")


def tiny_arch(hidden: int = 64, heads: int = 4) -> BlockArch:
    """The testbed's block: Llama-style (RMSNorm, RoPE, SwiGLU, GQA) at ``hidden`` size."""
    return custom_arch(None, hidden=hidden, heads=heads, kv_heads=max(1, heads // 2))


@dataclass(frozen=True)
class Emulation:
    """The server being emulated: per-block speeds and per-step overheads (ms)."""

    decode_ms_per_block: float
    prefill_fixed_ms: float
    prefill_per_token_ms: float
    decode_overhead_ms: float = 0.0
    prefill_overhead_fixed_ms: float = 0.0
    prefill_overhead_per_token_ms: float = 0.0

    def target_ms(self, kind: str, blocks: int, tokens: int, overhead: bool = True) -> float:
        if kind == "decode":
            extra = self.decode_overhead_ms if overhead else 0.0
            return extra + blocks * self.decode_ms_per_block
        extra = (
            self.prefill_overhead_fixed_ms + self.prefill_overhead_per_token_ms * tokens
            if overhead
            else 0.0
        )
        return extra + blocks * (self.prefill_fixed_ms + self.prefill_per_token_ms * tokens)


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``run`` (ms) after ``warmup`` untimed calls (CPU: no sync)."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        samples.append((time.perf_counter() - began) * 1000.0)
    return statistics.median(samples)


def pad_until(deadline: float) -> None:
    """Sleep until ``deadline`` (perf_counter seconds): coarse sleep, then a short spin."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        if left > 0.0015:
            time.sleep(left - 0.001)


class BlockStore:
    """Blocks by index, built on demand (same seed per index everywhere)."""

    def __init__(self, arch: BlockArch) -> None:
        self.arch = arch
        self._blocks: dict[int, DecoderBlock] = {}
        self._lock = threading.Lock()

    def get(self, index: int) -> DecoderBlock:
        with self._lock:
            block = self._blocks.get(index)
            if block is None:
                block = build_blocks(self.arch, 1, DEVICE, DTYPE, seed=1000 + index)[0]
                self._blocks[index] = block
            return block

    def keep(self, span: Span | None) -> None:
        with self._lock:
            wanted = set() if span is None else set(range(span.start, span.end))
            for index in list(self._blocks):
                if index not in wanted:
                    del self._blocks[index]


def run_step(
    store: BlockStore,
    emulation: Emulation,
    kind: str,
    start: int,
    end: int,
    x: torch.Tensor,
    caches: Sequence[KVCache],
    overhead: bool = True,
) -> torch.Tensor:
    """Blocks [start, end) on ``x`` (1, tokens, hidden), padded to the emulated time."""
    began = time.perf_counter()
    tokens = x.shape[1]
    with torch.inference_mode():
        h = x
        for index, cache in zip(range(start, end), caches, strict=True):
            h = store.get(index)(h, cache)
            cache.length += tokens
    pad_until(began + emulation.target_ms(kind, end - start, tokens, overhead) / 1000.0)
    return h


@dataclass(frozen=True)
class MeasuredSpeed:
    decode_ms_per_block: float
    prefill_fixed_ms: float
    prefill_per_token_ms: float
    decode_r2: float
    prefill_r2: float

    def as_dict(self) -> dict[str, float]:
        return {
            "decode_ms_per_block": self.decode_ms_per_block,
            "prefill_fixed_ms": self.prefill_fixed_ms,
            "prefill_per_token_ms": self.prefill_per_token_ms,
            "decode_r2": self.decode_r2,
            "prefill_r2": self.prefill_r2,
        }


def measure_speed(
    store: BlockStore,
    emulation: Emulation,
    contexts: tuple[int, int] = (8, 32),
    blocks: tuple[int, ...] = (2,),
    repeats: int = 5,
) -> MeasuredSpeed:
    """Time this server's own (padded) steps without the per-step overheads (median wall
    time per point) and fit tau and the prefill line with the profiler's least squares
    (``app.profiler.fit``). One number of blocks: the fits then go through the origin (a
    padded step has no per-step overhead), which stays stable when the CPU is shared."""
    arch = store.arch
    timings: list[Timing] = []
    for n in blocks:
        for context in contexts:
            decode_caches = [
                new_cache(arch, 1, context + 1, context, DEVICE, DTYPE) for _ in range(n)
            ]
            x1 = torch.randn(1, 1, arch.hidden)

            def decode(
                caches: list[KVCache] = decode_caches,
                x: torch.Tensor = x1,
                n: int = n,
                context: int = context,
            ) -> object:
                for cache in caches:
                    cache.length = context
                return run_step(store, emulation, "decode", 0, n, x, caches, overhead=False)

            timings.append(Timing("decode", n, 1, context, median_ms(decode, repeats)))
            prefill_caches = [new_cache(arch, 1, context, 0, DEVICE, DTYPE) for _ in range(n)]
            xl = torch.randn(1, context, arch.hidden)

            def prefill(
                caches: list[KVCache] = prefill_caches, x: torch.Tensor = xl, n: int = n
            ) -> object:
                for cache in caches:
                    cache.length = 0
                return run_step(store, emulation, "prefill", 0, n, x, caches, overhead=False)

            timings.append(Timing("prefill", n, 1, context, median_ms(prefill, repeats)))
    decode_fit = fit_decode([t for t in timings if t.kind == "decode"])
    prefill_fit = fit_prefill([t for t in timings if t.kind == "prefill"])
    store.keep(None)
    return MeasuredSpeed(
        decode_ms_per_block=decode_fit.ms_per_block,
        prefill_fixed_ms=max(0.0, prefill_fit.fixed_ms),
        prefill_per_token_ms=max(0.0, prefill_fit.per_token_ms),
        decode_r2=decode_fit.r2,
        prefill_r2=prefill_fit.r2,
    )


class BlockHost:
    """The ``SpanHost`` of the agent: builds the assigned span's blocks."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self._span: Span | None = None
        self._lock = threading.Lock()

    def apply(self, span: Span | None) -> None:
        if span is not None:
            for index in range(span.start, span.end):
                self.store.get(index)
        self.store.keep(span)
        with self._lock:
            self._span = span

    def loaded_span(self) -> Span | None:
        with self._lock:
            return self._span

    def poll(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._span = None


class Session:
    def __init__(self, start: int, end: int, caches: list[KVCache]) -> None:
        self.start = start
        self.end = end
        self.caches = caches
        self.lock = threading.Lock()


class BlockService:
    """Sessions and steps, independent of HTTP (tests call it directly)."""

    def __init__(self, store: BlockStore, host: BlockHost, emulation: Emulation) -> None:
        self.store = store
        self.host = host
        self.emulation = emulation
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.steps = 0
        self.last_step_ms = 0.0

    def step(
        self, session_id: str, kind: str, start: int, end: int, capacity: int, payload: bytes
    ) -> tuple[bytes, float]:
        """Run one step; returns the output rows and the time the step took here (ms)."""
        hidden = self.store.arch.hidden
        if kind not in ("prefill", "decode"):
            raise ValueError("kind: prefill or decode")
        if len(payload) % (4 * hidden) or not payload:
            raise ValueError(f"body: a whole number of float32 rows of {hidden} values")
        tokens = len(payload) // (4 * hidden)
        span = self.host.loaded_span()
        if span is None or not span.start <= start < end <= span.end:
            raise LookupError(f"blocks [{start}, {end}) are not loaded here (span {span})")
        with self._lock:
            session = self.sessions.get(session_id)
            if kind == "prefill":
                if capacity < tokens:
                    raise ValueError("capacity: at least the prompt's tokens")
                caches = [
                    new_cache(self.store.arch, 1, capacity, 0, DEVICE, DTYPE)
                    for _ in range(end - start)
                ]
                session = Session(start, end, caches)
                self.sessions[session_id] = session
            elif session is None:
                raise LookupError(f"session {session_id}: unknown (prefill first)")
        if (session.start, session.end) != (start, end):
            raise ValueError("start, end: differ from the session's prefill")
        x = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(1, tokens, hidden)
        with session.lock:
            if session.caches[0].length + tokens > session.caches[0].keys.shape[2]:
                raise ValueError("the session's cache is full (capacity)")
            began = time.perf_counter()
            out = run_step(self.store, self.emulation, kind, start, end, x, session.caches)
            self.last_step_ms = (time.perf_counter() - began) * 1000.0
        self.steps += 1
        return out.contiguous().numpy().tobytes(), self.last_step_ms

    def close(self, session_id: str) -> bool:
        with self._lock:
            return self.sessions.pop(session_id, None) is not None


def make_handler(service: BlockService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body leave at once

        def log_message(self, format: str, *args: object) -> None:
            return

        def _reply(
            self, status: int, body: bytes, kind: str = "text/plain", step_ms: float | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            if step_ms is not None:
                self.send_header("X-Step-Ms", f"{step_ms:.4f}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/ping":
                self._reply(200, b"ok")
            elif path == "/info":
                span = service.host.loaded_span()
                body = {
                    "span": None if span is None else [span.start, span.end],
                    "sessions": len(service.sessions),
                    "steps": service.steps,
                }
                self._reply(200, json.dumps(body).encode(), "application/json")
            else:
                self._reply(404, b"not found")

        def do_POST(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length)
            if url.path != "/step":
                self._reply(404, b"not found")
                return
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                out, step_ms = service.step(
                    query["session"],
                    query["kind"],
                    int(query["start"]),
                    int(query["end"]),
                    int(query.get("capacity", "0")),
                    payload,
                )
            except KeyError as missing:
                self._reply(400, f"missing query parameter {missing}".encode())
            except LookupError as error:
                self._reply(409, str(error).encode())
            except ValueError as error:
                self._reply(400, str(error).encode())
            else:
                self._reply(200, out, "application/octet-stream", step_ms)

        def do_DELETE(self) -> None:
            path = urlparse(self.path).path
            if path.startswith("/session/"):
                found = service.close(path.removeprefix("/session/"))
                self._reply(HTTPStatus.NO_CONTENT if found else 404, b"")
            else:
                self._reply(404, b"not found")

    return Handler


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bprr_harness.testbed.block_server")
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--coordinator", required=True, help="coordinator URL")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on")
    parser.add_argument("--address", required=True, help="HOST:PORT registered for clients")
    parser.add_argument("--memory-gb", type=float, required=True)
    parser.add_argument("--gpu", default=None)
    parser.add_argument("--decode-ms-per-block", type=float, required=True)
    parser.add_argument("--prefill-fixed-ms", type=float, default=0.0)
    parser.add_argument("--prefill-per-token-ms", type=float, default=0.0)
    parser.add_argument("--decode-overhead-ms", type=float, default=0.0)
    parser.add_argument("--prefill-overhead-fixed-ms", type=float, default=0.0)
    parser.add_argument("--prefill-overhead-per-token-ms", type=float, default=0.0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--join-token", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(1)

    emulation = Emulation(
        args.decode_ms_per_block,
        args.prefill_fixed_ms,
        args.prefill_per_token_ms,
        args.decode_overhead_ms,
        args.prefill_overhead_fixed_ms,
        args.prefill_overhead_per_token_ms,
    )
    store = BlockStore(tiny_arch(args.hidden, args.heads))
    speed = measure_speed(store, emulation)
    host = BlockHost(store)
    service = BlockService(store, host, emulation)
    listen_host, listen_port = args.listen.rsplit(":", 1)
    httpd = ThreadingHTTPServer((listen_host, int(listen_port)), make_handler(service))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    address = args.address.replace(":0", f":{httpd.server_address[1]}")
    agent = ServerAgent(
        args.coordinator,
        ServerInfo(
            id=args.server_id,
            site=args.site,
            gpu=args.gpu,
            memory_gb=args.memory_gb,
            decode_ms_per_block=speed.decode_ms_per_block,
            prefill_ms_per_block=PrefillSpeed(
                fixed=speed.prefill_fixed_ms, per_token=speed.prefill_per_token_ms
            ),
            address=address,
        ),
        join_token=args.join_token,
        host=host,
        prober=lambda _address: None,
        probe_peers=False,
        probe_interval_s=3600.0,
    )
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    deadline = time.monotonic() + 30
    while True:
        try:
            agent.register()
            break
        except Exception as error:  # the coordinator may still be starting
            if time.monotonic() > deadline or stop.is_set():
                print(f"error: could not register: {error}", file=sys.stderr, flush=True)
                httpd.shutdown()
                sys.exit(1)
            time.sleep(0.2)
    agent.start()
    ready = {"address": address, **speed.as_dict()}
    print(f"ready {json.dumps(ready)}", flush=True)
    stop.wait()
    agent.stop(timeout_s=5.0)
    httpd.shutdown()


if __name__ == "__main__":  # pragma: no cover
    main()
