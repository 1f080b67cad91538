"""The delaying relay on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest
from bprr_harness.testbed.relay import Relay, RelaySpec


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _round_trips(delay_ms: float, rounds: int = 5, size: int = 3000) -> list[float]:
    server, port = await _echo_server()
    relay = Relay(RelaySpec("127.0.0.1", 0, "127.0.0.1", port, delay_ms))
    await relay.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    payload = bytes(range(256)) * (size // 256)
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        echoed = await reader.readexactly(len(payload))
        times.append((time.perf_counter() - began) * 1000.0)
        assert echoed == payload  # bytes arrive intact and in order
    writer.close()
    await relay.close()
    server.close()
    assert relay.connections == 1
    return times


def test_relay_adds_twice_the_one_way_delay_per_round_trip() -> None:
    delayed = asyncio.run(_round_trips(15.0))
    direct = asyncio.run(_round_trips(0.0))
    # one RTT through the relay = 2 x 15 ms at least; scheduling on a busy machine only adds
    # to it, so no upper bound is asserted (no test asserts wall-clock speed)
    assert min(delayed) >= 30.0
    assert sorted(delayed)[len(delayed) // 2] > sorted(direct)[len(direct) // 2]


def test_relay_spec_round_trips_and_rejects_bad_specs() -> None:
    spec = RelaySpec.parse("10.0.0.2:20001=127.0.0.1:7100@12.5")
    assert spec == RelaySpec("10.0.0.2", 20001, "127.0.0.1", 7100, 12.5)
    assert RelaySpec.parse(spec.format()) == spec
    with pytest.raises(ValueError, match="HOST:PORT=HOST:PORT@MS"):
        RelaySpec.parse("10.0.0.2:20001")
    with pytest.raises(ValueError, match="delay_ms"):
        RelaySpec("a", 1, "b", 2, -1.0)
