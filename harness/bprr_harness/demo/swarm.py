"""Simulated GPU servers for the demo: a span host that "loads" blocks after a delay, a prober
that answers RTTs from the scenario, and one ``bprr_client.ServerAgent`` per scenario server.

Needs the client package (``bprr_client``); importing this module without it raises
ImportError, which ``bprr serve --demo`` turns into a one-line error.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping

from bprr_client import ServerAgent, ServerInfo, Span

from app.allocation.scenario import Scenario

# The demo's simulated addresses: a reserved TLD, never resolvable, so nothing real is probed.
ADDRESS_SUFFIX = ".demo.invalid"


def server_address(server_id: str) -> str:
    return f"{server_id}{ADDRESS_SUFFIX}:31337"


def site_address(site: str) -> str:
    return f"site-{site}{ADDRESS_SUFFIX}:443"


class SimulatedHost:
    """A ``SpanHost`` that takes ``load_s_per_block`` seconds per block (divided by ``speed``,
    at most ``max_load_s``) to load an assigned span; while loading, nothing is loaded."""

    def __init__(
        self,
        load_s_per_block: float = 0.02,
        max_load_s: float = 2.0,
        speed: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.load_s_per_block = load_s_per_block
        self.max_load_s = max_load_s
        self.speed = speed
        self._clock = clock
        self._lock = threading.Lock()
        self._target: Span | None = None
        self._ready_at = 0.0
        self.loads = 0
        self.closed = False

    def load_time_s(self, span: Span) -> float:
        blocks: int = span.end - span.start
        seconds = min(self.max_load_s, self.load_s_per_block * blocks)
        return seconds / self.speed

    def apply(self, span: Span | None) -> None:
        with self._lock:
            self._target = span
            self._ready_at = self._clock() + (0.0 if span is None else self.load_time_s(span))
            if span is not None:
                self.loads += 1

    def loaded_span(self) -> Span | None:
        with self._lock:
            if self._target is None or self._clock() < self._ready_at:
                return None
            return self._target

    def poll(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            self._target = None
            self.closed = True


class ScenarioProber:
    """A prober for the server ``own_id``: the RTT to a simulated address is the scenario's
    (its ``rtt_ms`` override for the pair of ids, else the site matrix), times a random factor
    within ``1 +- jitter``; unknown addresses are unreachable (None)."""

    def __init__(
        self,
        scenario: Scenario,
        own_id: str,
        jitter: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError("jitter: must be in [0, 1)")
        self._scenario = scenario
        self._matrix = scenario.site_matrix()
        self._site_index = {site: i for i, site in enumerate(scenario.sites)}
        sites = {s.id: s.site for s in scenario.servers}
        if own_id not in sites:
            raise ValueError(f"own_id: {own_id!r} is not a server of the scenario")
        self.own_id = own_id
        self._own_site = sites[own_id]
        # address -> (endpoint id or None for a site, the endpoint's site)
        self._targets: dict[str, tuple[str | None, str]] = {
            server_address(server_id): (server_id, site) for server_id, site in sites.items()
        }
        for site in scenario.sites:
            self._targets[site_address(site)] = (None, site)
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def expected_ms(self, address: str) -> float | None:
        target = self._targets.get(address)
        if target is None:
            return None
        target_id, target_site = target
        if target_id is not None:
            override = self._scenario.pair_override(self.own_id, target_id)
            if override is not None:
                return override
        return self._matrix[self._site_index[self._own_site]][self._site_index[target_site]]

    def __call__(self, address: str) -> float | None:
        value = self.expected_ms(address)
        if value is None or self._jitter == 0:
            return value
        with self._lock:
            factor = 1.0 + self._jitter * (2 * self._rng.random() - 1)
        return value * factor


def server_info(scenario: Scenario, index: int) -> ServerInfo:
    spec = scenario.servers[index]
    # a scenario server's fields are the registration's (docs/SCENARIO.md), less the address
    return ServerInfo(**spec.model_dump(), address=server_address(spec.id))


def make_agents(
    scenario: Scenario,
    coordinator_url: str,
    *,
    join_token: str | None = None,
    speed: float = 1.0,
    seed: int = 0,
    probe_interval_s: float = 10.0,
    rtt_jitter: float = 0.0,
    site_targets: Mapping[str, str] | None = None,
) -> list[ServerAgent]:
    """One agent per scenario server, with a simulated host and the scenario's RTTs. The
    agents probe every site (``site_targets``, by default all of the scenario's) and their
    live peers."""
    targets = dict(site_targets or {site: site_address(site) for site in scenario.sites})
    agents = []
    for index, spec in enumerate(scenario.servers):
        rng = random.Random(f"{seed}:{spec.id}")
        agents.append(
            ServerAgent(
                coordinator_url,
                server_info(scenario, index),
                join_token=join_token,
                host=SimulatedHost(speed=speed),
                prober=ScenarioProber(scenario, spec.id, rtt_jitter, random.Random(rng.random())),
                site_targets=targets,
                probe_peers=True,
                probe_interval_s=probe_interval_s,
                rng=rng,
            )
        )
    return agents
