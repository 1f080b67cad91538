"""A userspace TCP relay that delays each direction by a fixed one-way time (asyncio).

The kernel here has no ``netem``, so the testbed puts one of these on the path between a
client site and a server: it accepts on ``listen`` and forwards to ``target``; every chunk read
from one side is written to the other ``delay_ms`` later (order kept, no bandwidth limit), so a
request/response exchange through it takes one RTT = 2 x ``delay_ms`` more than direct.

``python -m bprr_harness.testbed.relay LISTEN=TARGET@DELAY_MS ...`` runs several listeners in one
process until SIGTERM/SIGINT; it prints ``ready`` once all of them accept connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

CHUNK = 65536


@dataclass(frozen=True)
class RelaySpec:
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    delay_ms: float

    def __post_init__(self) -> None:
        if not (self.delay_ms >= 0 and self.delay_ms < float("inf")):
            raise ValueError(f"delay_ms: must be finite and >= 0, got {self.delay_ms}")

    @classmethod
    def parse(cls, text: str) -> RelaySpec:
        """``HOST:PORT=HOST:PORT@MS``."""
        try:
            listen, rest = text.split("=", 1)
            target, delay = rest.rsplit("@", 1)
            lh, lp = listen.rsplit(":", 1)
            th, tp = target.rsplit(":", 1)
            return cls(lh, int(lp), th, int(tp), float(delay))
        except ValueError as error:
            raise ValueError(
                f"relay spec {text!r}: expected HOST:PORT=HOST:PORT@MS ({error})"
            ) from None

    def format(self) -> str:
        return (
            f"{self.listen_host}:{self.listen_port}="
            f"{self.target_host}:{self.target_port}@{self.delay_ms:g}"
        )


def _nodelay(writer: asyncio.StreamWriter) -> None:
    """No Nagle: a chunk goes out when it is due, not after the peer's delayed ACK."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay_s, data))
            if not data:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()
    finally:
        if not sender.done():
            sender.cancel()


class Relay:
    """One listener; ``await start()`` binds it (port 0 picks a free one: see ``port``)."""

    def __init__(self, spec: RelaySpec) -> None:
        self.spec = spec
        self._server: asyncio.Server | None = None
        self.connections = 0

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.spec.listen_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.spec.listen_host, self.spec.listen_port, reuse_address=True
        )

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        delay_s = self.spec.delay_ms / 1000.0
        try:
            target_r, target_w = await asyncio.open_connection(
                self.spec.target_host, self.spec.target_port
            )
        except OSError:
            client_w.close()
            return
        _nodelay(client_w)
        _nodelay(target_w)
        try:
            await asyncio.gather(
                _pump(client_r, target_w, delay_s), _pump(target_r, client_w, delay_s)
            )
        finally:
            for w in (client_w, target_w):
                w.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.wait_closed()


async def serve(specs: Sequence[RelaySpec], ready: asyncio.Event | None = None) -> None:
    relays = [Relay(s) for s in specs]
    for relay in relays:
        await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for relay in relays:
            await relay.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bprr_harness.testbed.relay", description=__doc__
    )
    parser.add_argument("specs", nargs="+", metavar="LISTEN=TARGET@DELAY_MS")
    args = parser.parse_args(argv)
    try:
        specs = [RelaySpec.parse(s) for s in args.specs]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(serve(specs))


if __name__ == "__main__":  # pragma: no cover
    main()
