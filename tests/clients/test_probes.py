"""RTT probes (TCP connect, HTTP GET) and their EWMA smoothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from bprr_client import Ewma, HttpProber, TcpProber
from bprr_client.probes import split_address


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_tcp_probe_times_a_connect(listener: int) -> None:
    ticks = iter([100.0, 100.0125])
    prober = TcpProber(clock=lambda: next(ticks))
    assert prober(f"127.0.0.1:{listener}") == pytest.approx(12.5)
    assert TcpProber()(f"127.0.0.1:{listener}") is not None


def test_tcp_probe_of_nothing_is_none() -> None:
    assert TcpProber(timeout_s=0.5)(f"127.0.0.1:{closed_port()}") is None
    assert TcpProber()("not an address") is None


def test_http_probe_times_a_get() -> None:
    ticks = iter([5.0, 5.003])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(404)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    prober = HttpProber(client, path="/livez", clock=lambda: next(ticks))
    assert prober("10.0.0.1:8080") == pytest.approx(3.0)
    assert seen == ["http://10.0.0.1:8080/livez"]

    def down(_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    assert HttpProber(httpx.Client(transport=httpx.MockTransport(down)))("h:1") is None


def test_split_address() -> None:
    assert split_address("10.0.0.1:31337") == ("10.0.0.1", 31337)
    assert split_address("[::1]:80") == ("::1", 80)
    assert split_address("https://example.org/x") == ("example.org", 443)
    for bad in ("host", "host:0", ":80", "host:http"):
        with pytest.raises(ValueError, match="address"):
            split_address(bad)


def test_ewma() -> None:
    ewma = Ewma(alpha=0.5)
    assert ewma.update("a", 10.0) == 10.0
    assert ewma.update("a", 20.0) == 15.0
    assert ewma.update("b", 1.0) == 1.0
    ewma.forget("a")
    assert ewma.update("a", 4.0) == 4.0
    with pytest.raises(ValueError, match="a:"):
        ewma.update("a", float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        Ewma(alpha=0)
