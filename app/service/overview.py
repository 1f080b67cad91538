"""A read-only summary of the swarm for the operator dashboard (``GET /v1/overview``).

Everything here is public information already visible piecewise through the other GET routes
and /metrics (no tokens, no addresses beyond what ``GET /v1/servers`` shows); it is gathered in
one read transaction so the dashboard needs one request for the swarm's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from app.service import telemetry
from app.service.activity import GenerationTimes, History, Snapshot
from app.service.errors import NotFound
from app.service.state import client_list, load_state

if TYPE_CHECKING:
    from app.service.coordinator import Coordinator
    from app.service.routeview import RouteView


class SiteOut(BaseModel):
    name: str = Field(description="The site")
    servers: list[str] = Field(description="The ids of its registered servers")
    client_share: float = Field(description="Its share of the client requests (0 to 1)")
    internal_rtt_ms: float = Field(description="RTT between two machines of the site (ms)")


class SiteRttOut(BaseModel):
    a: str = Field(description="One site")
    b: str = Field(description="The other site")
    rtt_ms: float = Field(description="Their RTT (ms)")
    measured: bool = Field(
        description="True when measured, false when the default (BPRR_DEFAULT_SITE_RTT_MS)"
    )


class BottleneckOut(BaseModel):
    """The blocks with the fewest live copies: every route crosses them, so their servers'
    cache decides how many sessions fit, whatever the other servers have free."""

    live_copies: int = Field(
        description="Fewest live copies of any block (0: some block has no live server)"
    )
    blocks: list[tuple[int, int]] = Field(
        description="The [start, end) ranges of the blocks with only that many copies"
    )
    servers: list[str] = Field(description="Live servers hosting any of those blocks")
    cache_used: float | None = Field(
        description="Fraction of those servers' cache units in use (null: unknown)"
    )
    idle: list[str] = Field(description="Live, online servers the placement gives no span")
    text: str = Field(description="The same, in one sentence for people")


class OverviewOut(BaseModel):
    now: float = Field(description="The coordinator's clock (Unix time, s)")
    generation: int = Field(description="The published placement's generation (0: none)")
    live_servers: int = Field(description="Servers with a live lease")
    routable_servers: int = Field(
        description="Live servers serving their assigned span (routes use them)"
    )
    coverage: float = Field(description="Fraction of blocks hosted by a live, loaded server")
    num_blocks: int | None = Field(description="The model's blocks (null: no model yet)")
    block_servers: list[int] = Field(description="Live copies of each block, in block order")
    active_sessions: int = Field(description="Sessions holding cache reservations")
    reserved_slots: int = Field(description="Cache units those sessions hold")
    sessions_booked: int = Field(description="Sessions booked by this process")
    sessions_rejected: int = Field(description="Bookings this process refused (503)")
    placements_published: int = Field(description="Placements this process published")
    lease_ttl_s: float = Field(description="How long a lease lasts without a heartbeat (s)")
    heartbeat_interval_s: float = Field(description="How often servers send heartbeats (s)")
    default_site_rtt_ms: float = Field(
        description="The RTT assumed between sites without a measurement (ms)"
    )
    sites: list[SiteOut] = Field(description="The sites, their servers and client shares")
    site_rtts: list[SiteRttOut] = Field(description="The RTT of every pair of sites")
    bottleneck: BottleneckOut | None = Field(
        description="The blocks with the fewest live copies (null: no model)"
    )


def _ranges(blocks: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for block in blocks:
        if out and out[-1][1] == block:
            out[-1] = (out[-1][0], block + 1)
        else:
            out.append((block, block + 1))
    return out


def _span_text(ranges: list[tuple[int, int]]) -> tuple[str, bool]:
    """("blocks 40-54, 60", plural?) for the ranges (the first four named)."""
    parts = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in ranges[:4]]
    more = f" and {len(ranges) - 4} more ranges" if len(ranges) > 4 else ""
    single = len(ranges) == 1 and ranges[0][1] == ranges[0][0] + 1
    return ("block " if single else "blocks ") + ", ".join(parts) + more, not single


def live_copies(view: RouteView, num_blocks: int, now: float) -> list[int]:
    """How many routable servers with a live lease hold each block."""
    copies = [0] * num_blocks
    for entry, expires in zip(view.entries, view.lease, strict=True):
        if expires > now:
            for block in range(entry.span.start, min(entry.span.end, num_blocks)):
                copies[block] += 1
    return copies


def view_bottleneck(view: RouteView, now: float) -> BottleneckOut | None:
    """The bottleneck from the route view alone (no database read): for /metrics."""
    num_blocks = view.model.num_blocks if view.model is not None else 0
    return bottleneck(view, live_copies(view, num_blocks, now), now)


def bottleneck(
    view: RouteView, block_servers: list[int], now: float, idle: list[str] | None = None
) -> BottleneckOut | None:
    """Name the blocks with the fewest live copies, their servers and how full their cache
    is, and the ``idle`` servers (None before a model is set)."""
    if not block_servers:
        return None
    fewest = min(block_servers)
    blocks = [b for b, count in enumerate(block_servers) if count == fewest]
    ranges = _ranges(blocks)
    where, plural = _span_text(ranges)
    have = "have" if plural else "has"
    idle = idle or []
    spare = (
        f"; {len(idle)} server{'s' if len(idle) > 1 else ''} idle (no span in the placement)"
        if idle
        else ""
    )
    if fewest == 0:
        return BottleneckOut(
            live_copies=0,
            blocks=ranges,
            servers=[],
            cache_used=None,
            idle=idle,
            text=f"{where} {have} no live copy: no route until a server hosts them{spare}",
        )
    hosts, used, total = [], 0, 0
    wanted = set(blocks)
    for position, entry in enumerate(view.entries):
        if view.lease[position] <= now:
            continue
        if wanted.intersection(range(entry.span.start, entry.span.end)):
            hosts.append(entry.id)
            used += int(view.reserved[position])
            total += int(view.capacity[position])
    share = used / total if total else None
    copies = "1 live copy" if fewest == 1 else f"{fewest} live copies"
    full = "" if share is None else f"; {share:.0%} of their cache in use"
    return BottleneckOut(
        live_copies=fewest,
        blocks=ranges,
        servers=hosts,
        cache_used=share,
        idle=idle,
        text=f"{where} {have} only {copies} (on {', '.join(hosts)}){full}{spare}",
    )


def overview(coordinator: Coordinator) -> OverviewOut:
    settings = coordinator.settings
    now = coordinator.clock()
    view = coordinator.view()
    with coordinator.read_tx() as db:
        state = load_state(db)
    num_blocks = None if state.model is None else state.model.num_blocks
    block_servers = live_copies(view, num_blocks or 0, now)
    routable = view.live_count(now)
    assigned = state.assigned_spans()
    idle = sorted(
        s.id
        for s in state.servers
        if s.lease_expires_at > now and s.state == "online" and s.id not in assigned
    )
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
        bottleneck=bottleneck(view, block_servers, now, idle),
    )


# --- history ----------------------------------------------------------------------------------


def record_history(coordinator: Coordinator, history: History) -> None:
    """Add one sample of the swarm to ``history`` (from the route view and this process's
    telemetry; no database read unless the generation changed). A newly seen generation's
    predicted per-token time (its placement's objective) is recorded in telemetry."""
    now = coordinator.clock()
    view = coordinator.view()
    booked, refused, wait_s, waits = telemetry.booking_totals()
    snapshot = Snapshot(
        at=now,
        generation=view.generation,
        routable_servers=view.live_count(now),
        coverage=view.coverage(now),
        active_sessions=coordinator.active_sessions(),
        queue_depth=telemetry.queue_depth(),
        booked_total=booked,
        refused_total=refused,
        wait_s_total=wait_s,
        waits_total=waits,
    )
    previous = history.last_generation()
    history.add(snapshot, telemetry.replan_reason(view.generation))
    if view.generation > 0 and view.generation != previous:
        try:
            placement = coordinator.get_placement(view.generation)
        except NotFound:
            return
        telemetry.record_prediction(view.generation, placement.objective_ms_per_token)


def generation_times() -> list[GenerationTimes]:
    """Predicted and measured per-token times of the recent generations, oldest first."""
    return [
        GenerationTimes(
            generation=generation,
            predicted_ms_per_token=_tenth(times.get("predicted")),
            measured_ms_per_token=_tenth(times.get("measured")),
        )
        for generation, times in sorted(telemetry.generation_times().items())
    ]


def _tenth(ms: float | None) -> float | None:
    """Times in replies are rounded to 0.1 ms, as the API's other replies."""
    return None if ms is None else round(ms, 1)
