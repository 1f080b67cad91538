"""A testbed client: ``python -m bprr_harness.testbed.client CONFIG.json OUT.json`` (run in
its site's namespace).

It replays its requests at their arrival times (one thread each). A request books a session
from the coordinator (``RouteClient``; policy ``cg``: WS-RR on the coordinator, a 503 waits
its Retry-After and tries again) or takes the PETALS route the runner computed (policy
``petals``), pays the scenario's per-request overhead (slept, less what the booking took),
then runs real generation through the chain as a PETALS client does: the prefill goes
client -> server A -> client -> server B -> ...; every decode step relays one token's
activations the same way. Times are measured here, on the client's clock.

Before the requests it calibrates its transport: a few one-block decode steps on every server
through the delayed path; the median of (client-side time - the server's own step time,
``X-Step-Ms``) less the emulated RTT is this system's own per-hop cost (HTTP, relay,
serialisation), which the runner adds to the model's prediction.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bprr_client import CoordinatorError, RetryPolicy, RouteClient

PING_SAMPLES = 7


def _post_step(
    http: httpx.Client,
    address: str,
    session: str,
    kind: str,
    start: int,
    end: int,
    capacity: int,
    x: np.ndarray[Any, np.dtype[np.float32]],
) -> np.ndarray[Any, np.dtype[np.float32]]:
    response = http.post(
        f"http://{address}/step",
        params={
            "session": session,
            "kind": kind,
            "start": start,
            "end": end,
            "capacity": capacity,
        },
        content=x.astype("<f4").tobytes(),
    )
    if response.status_code != 200:
        raise RuntimeError(f"{address} {kind}: {response.status_code} {response.text[:200]}")
    return np.frombuffer(response.content, dtype="<f4").reshape(x.shape)


def step_transport_ms(
    http: httpx.Client, address: str, hidden: int, samples: int = PING_SAMPLES
) -> float | None:
    """The median time of a decode step on one block of ``address`` through the delayed
    path, less the time the server spent in the step (its ``X-Step-Ms``): the RTT plus this
    system's per-hop transport cost."""
    info = http.get(f"http://{address}/info").json()
    if info["span"] is None:  # hosts nothing under this placement: never on a route
        return None
    start = info["span"][0]
    session = f"calibration-{uuid.uuid4().hex}"
    x = np.zeros((1, 1, hidden), dtype=np.float32)
    times = []
    for i in range(samples + 2):
        kind = "prefill" if i == 0 else "decode"
        began = time.perf_counter()
        response = http.post(
            f"http://{address}/step",
            params={
                "session": session,
                "kind": kind,
                "start": start,
                "end": start + 1,
                "capacity": samples + 2,
            },
            content=x.tobytes(),
        )
        wall = (time.perf_counter() - began) * 1000.0
        response.raise_for_status()
        if i >= 2:  # the prefill and one warm-up decode are not counted
            times.append(wall - float(response.headers["X-Step-Ms"]))
    http.delete(f"http://{address}/session/{session}")
    return statistics.median(times)


class Runner:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.addresses: dict[str, str] = config["addresses"]  # server id -> host:port (delayed)
        self.hidden: int = config["hidden"]
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.epoch = time.perf_counter()
        # One client for all request threads (httpx.Client is thread-safe): creating one per
        # request would add its set-up time to the measured waiting.
        self.routes = RouteClient(
            config["coordinator"], retry=RetryPolicy(attempts=1), timeout=30.0
        )
        # Likewise one client for the servers (a kept-alive connection per concurrent step).
        self.http = httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=None))

    def now_ms(self) -> float:
        return (time.perf_counter() - self.epoch) * 1000.0

    def _book(self, request: dict[str, Any]) -> tuple[list[tuple[str, int, int]], dict[str, Any]]:
        """(hops, info): the route booked for ``request`` (cg) or given (petals)."""
        if self.config["policy"] == "petals":
            return [(str(h[0]), int(h[1]), int(h[2])) for h in request["route"]], {"session": None}
        routes = self.routes
        retries = 0
        while True:
            attempt = self.now_ms()
            try:
                session = routes.book(
                    request["input_tokens"], request["output_tokens"], self.config["site"]
                )
            except CoordinatorError as error:
                if error.status_code != 503 or retries > 200:
                    raise
                retries += 1
                time.sleep(min(max(error.retry_after_s or 0.05, 0.01), 5.0))
                continue
            hops = [(h.server_id, h.start, h.end) for h in session.route.hops]
            info = {
                "session": session.id,
                "attempt_ms": attempt,
                "retries": retries,
                "coordinator_first_token_ms": session.route.first_token_ms,
                "coordinator_per_token_ms": session.route.per_token_ms,
            }
            return hops, info

    def _release(self, session_id: str) -> None:
        self.routes.release(session_id)

    def run_request(self, request: dict[str, Any]) -> None:
        rng = np.random.default_rng(request["index"])
        arrival = self.now_ms()
        started = arrival
        hops, info = self._book(request)
        if "attempt_ms" in info:
            started = info["attempt_ms"]
        booked = self.now_ms()
        overhead_s = (self.config["per_request_ms"] - (booked - started)) / 1000.0
        if overhead_s > 0:
            time.sleep(overhead_s)
        l_in, l_out = request["input_tokens"], request["output_tokens"]
        capacity = l_in + l_out
        session = uuid.uuid4().hex
        token_ms: list[float] = []
        try:
            http = self.http
            x = rng.standard_normal((1, l_in, self.hidden)).astype(np.float32)
            for server, start, end in hops:
                x = _post_step(
                    http, self.addresses[server], session, "prefill", start, end, capacity, x
                )
            first = self.now_ms()
            last = first
            for _ in range(l_out - 1):
                token = x[:, -1:, :]
                h = (token / (np.linalg.norm(token) + 1e-6)).astype(np.float32)
                for server, start, end in hops:
                    h = _post_step(
                        http, self.addresses[server], session, "decode", start, end, capacity, h
                    )
                x = h
                now = self.now_ms()
                token_ms.append(now - last)
                last = now
            for server, _, _ in hops:
                http.delete(f"http://{self.addresses[server]}/session/{session}")
        finally:
            if info.get("session"):
                self._release(info["session"])
        result = {
            "index": request["index"],
            "client": self.config["client"],
            "hops": [list(h) for h in hops],
            "input_tokens": l_in,
            "output_tokens": l_out,
            "arrival_ms": arrival,
            "start_ms": started,
            "wait_ms": started - arrival,
            "booking_ms": booked - started,
            "first_token_ms": first - started,
            "token_ms": token_ms,
            "end_ms": last,
            "checksum": float(np.abs(x).sum()),
            **{k: v for k, v in info.items() if k not in ("attempt_ms", "session")},
        }
        with self._lock:
            self.results.append(result)

    def calibrate(self) -> dict[str, float]:
        measured = {
            server: step_transport_ms(self.http, address, self.hidden)
            for server, address in self.addresses.items()
        }
        return {server: ms for server, ms in measured.items() if ms is not None}

    def run(self) -> dict[str, Any]:
        pings = self.calibrate()
        errors: list[str] = []
        self.epoch = time.perf_counter()
        threads = []

        def guarded(request: dict[str, Any]) -> None:
            try:
                self.run_request(request)
            except Exception as error:  # reported, not raised: the others go on
                with self._lock:
                    errors.append(f"request {request['index']}: {type(error).__name__}: {error}")

        for request in sorted(self.config["requests"], key=lambda r: r["at_ms"]):
            delay = request["at_ms"] / 1000.0 - (time.perf_counter() - self.epoch)
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=guarded, args=(request,), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        return {
            "client": self.config["client"],
            "calibration_ms": pings,
            "results": self.results,
            "errors": errors,
        }


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bprr_harness.testbed.client CONFIG.json OUT.json", file=sys.stderr)
        sys.exit(2)
    config = json.loads(Path(args[0]).read_text())
    output = Runner(config).run()
    Path(args[1]).write_text(json.dumps(output))


if __name__ == "__main__":  # pragma: no cover
    main()
