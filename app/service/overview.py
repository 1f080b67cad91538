"""A read-only summary of the swarm for the operator dashboard (``GET /v1/overview``).

Everything here is public information already visible piecewise through the other GET routes
and /metrics (no tokens, no addresses beyond what ``GET /v1/servers`` shows); it is gathered in
one read transaction so the dashboard needs one request for the swarm's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from app.service.state import client_list, load_state

if TYPE_CHECKING:
    from app.service.coordinator import Coordinator


class SiteOut(BaseModel):
    name: str
    servers: list[str]
    client_share: float
    internal_rtt_ms: float


class SiteRttOut(BaseModel):
    a: str
    b: str
    rtt_ms: float
    measured: bool


class OverviewOut(BaseModel):
    now: float
    generation: int
    live_servers: int
    routable_servers: int
    coverage: float
    num_blocks: int | None
    block_servers: list[int]
    active_sessions: int
    reserved_slots: int
    sessions_booked: int
    sessions_rejected: int
    placements_published: int
    lease_ttl_s: float
    heartbeat_interval_s: float
    default_site_rtt_ms: float
    sites: list[SiteOut]
    site_rtts: list[SiteRttOut]


def overview(coordinator: Coordinator) -> OverviewOut:
    settings = coordinator.settings
    now = coordinator.clock()
    view = coordinator.view()
    with coordinator.read_tx() as db:
        state = load_state(db)
    num_blocks = None if state.model is None else state.model.num_blocks
    block_servers = [0] * (num_blocks or 0)
    routable = 0
    for entry, expires in zip(view.entries, view.lease, strict=True):
        if expires <= now:
            continue
        routable += 1
        for block in range(entry.span.start, min(entry.span.end, len(block_servers))):
            block_servers[block] += 1
    shares: dict[str, float] = {}
    for _, site, share in client_list(state) if state.sites else []:
        shares[site] = shares.get(site, 0.0) + share
    total_share = sum(shares.values()) or 1.0
    sites = [
        SiteOut(
            name=site,
            servers=[s.id for s in state.servers if s.site == site],
            client_share=shares.get(site, 0.0) / total_share,
            internal_rtt_ms=state.site_rtt(site, site, settings.default_site_rtt_ms),
        )
        for site in state.sites
    ]
    default_rtt = settings.default_site_rtt_ms
    rtts = [
        SiteRttOut(
            a=a,
            b=b,
            rtt_ms=state.site_rtt(a, b, default_rtt),
            measured=state.rtt(a, b) is not None,
        )
        for i, a in enumerate(state.sites)
        for b in state.sites[i + 1 :]
    ]
    return OverviewOut(
        now=now,
        generation=state.generation,
        live_servers=sum(1 for s in state.servers if s.lease_expires_at > now),
        routable_servers=routable,
        coverage=view.coverage(now),
        num_blocks=num_blocks,
        block_servers=block_servers,
        active_sessions=coordinator.active_sessions(),
        reserved_slots=sum(s.reserved_slots for s in state.servers),
        sessions_booked=coordinator.counters.sessions_booked,
        sessions_rejected=coordinator.counters.sessions_rejected,
        placements_published=coordinator.counters.placements_published,
        lease_ttl_s=settings.lease_ttl_s,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        default_site_rtt_ms=default_rtt,
        sites=sites,
        site_rtts=rtts,
    )
