"""The operator dashboard rendered by headless Chromium against a live coordinator.

A uvicorn subprocess on 127.0.0.1 (temporary SQLite) gets the paper's clustered scenario, two
extra servers that register and heartbeat (one online, one draining), a CG placement and a
booked session, then (while the history samples every 2 s) a re-plan that every server loads
and three more bookings; Chromium, with no network beyond 127.0.0.1, loads ``/`` and the test
asserts on the rendered DOM (cards, sites, coverage and the bottleneck, servers, routes, the
uPlot charts with the re-plan marked, predicted vs measured), then saves a screenshot to
out/dashboard/dashboard.png (printed; gitignored) for a person to look at.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN, JOIN, ROOT, example_scenario
from tests.dashboard.browser import NoNetwork, free_port, parse, run_chromium

SCREENSHOT = ROOT / "out" / "dashboard" / "dashboard.png"


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "BPRR_DATABASE_URL": f"sqlite:///{tmp_path / 'bprr.db'}",
        "BPRR_ADMIN_TOKEN": ADMIN,
        "BPRR_JOIN_TOKEN": JOIN,
        "BPRR_PLANNER_INTERVAL_S": "0",  # no automatic re-plan: the test publishes itself
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"the coordinator exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the coordinator did not become ready within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


BOOKING = {"client_site": "cluster0", "input_tokens": 20, "output_tokens": 64}


def heartbeat_all(api: httpx.Client, tokens: dict[str, str], placement: dict[str, Any]) -> None:
    """Every server reports its assigned span of ``placement`` as loaded (edge-drain drains)."""
    spans = {s["server_id"]: {"start": s["start"], "end": s["end"]} for s in placement["spans"]}
    for server_id, token in tokens.items():
        state = "draining" if server_id == "edge-drain" else "online"
        beat = api.post(
            f"/v1/servers/{server_id}/heartbeat",
            json={"boot_epoch": 1, "state": state, "loaded_span": spans.get(server_id)},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert beat.status_code == 200, beat.text


def populate(base: str) -> dict[str, Any]:
    """A swarm with servers in several states, a CG placement and one booked session."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=base, timeout=60) as api:
        loaded = api.post(
            "/v1/scenario", params={"lease_s": 3600}, json=example_scenario(), headers=admin
        )
        assert loaded.status_code == 201, loaded.text
        tokens = {s["id"]: s["token"] for s in loaded.json()["servers"]}
        for server_id, memory in (("edge-a100", 80.0), ("edge-drain", 40.0)):
            body = {
                "id": server_id,
                "site": "cluster0",
                "gpu": "A100-80GB",
                "memory_gb": memory,
                "decode_ms_per_block": 5.0,
                "prefill_ms_per_block": {"fixed": 10.0, "per_token": 0.1},
                "address": f"{server_id}.example:31337",
                "boot_epoch": 1,
            }
            joined = api.post("/v1/servers", json=body, headers={"Authorization": f"Bearer {JOIN}"})
            assert joined.status_code == 201, joined.text
            tokens[server_id] = joined.json()["token"]
        placed = api.post("/v1/placements", json={"algorithm": "cg"}, headers=admin)
        assert placed.status_code == 201, placed.text
        placement = placed.json()
        heartbeat_all(api, tokens, placement)
        route = api.get("/v1/routes", params=BOOKING)
        assert route.status_code == 200, route.text
        booked = api.post("/v1/sessions", json=BOOKING)
        assert booked.status_code == 201, booked.text
        servers = api.get("/v1/servers").json()
    return {"placement": placement, "session": booked.json(), "servers": servers, "tokens": tokens}


def wait_for_samples(api: httpx.Client, count: int, after: float = 0.0) -> list[dict[str, Any]]:
    """Poll /v1/history until ``count`` samples taken after ``after`` (time) are there."""
    deadline = time.monotonic() + 60
    while True:
        points = [p for p in api.get("/v1/history").json()["points"] if p["at"] > after]
        if len(points) >= count:
            return points
        assert time.monotonic() < deadline, f"only {len(points)} history samples after 60 s"
        time.sleep(0.5)


def replan(base: str, swarm: dict[str, Any]) -> dict[str, Any]:
    """Some samples, then another placement (generation 3) loaded by every server, more
    bookings, and samples after it."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=base, timeout=60) as api:
        before = wait_for_samples(api, 2)
        placed = api.post("/v1/placements", json={"algorithm": "cg"}, headers=admin)
        assert placed.status_code == 201, placed.text
        placement = placed.json()
        heartbeat_all(api, swarm["tokens"], placement)
        for _ in range(3):
            assert api.post("/v1/sessions", json=BOOKING).status_code == 201
        wait_for_samples(api, 2, after=before[-1]["at"])
        swarm["servers"] = api.get("/v1/servers").json()
        swarm["history"] = api.get("/v1/history").json()
        swarm["overview"] = api.get("/v1/overview").json()
    swarm["placement"] = placement
    return swarm


def test_dashboard_renders_the_live_swarm(coordinator: str) -> None:
    swarm = replan(coordinator, populate(coordinator))
    placement = swarm["placement"]
    history = swarm["history"]
    assert placement["generation"] == 3  # the scenario's, populate's, then replan's

    with NoNetwork() as proxy:  # no network beyond 127.0.0.1: uPlot comes with the page
        dumped = run_chromium("--dump-dom", f"{coordinator}/", proxy=proxy.url)
    assert proxy.page_requests() == []
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = parse(dumped.stdout)
    body = [attrs for tag, attrs in dom.elements if tag == "body"]
    assert body and body[0].get("data-loaded") == "true", "the page never finished a refresh"
    assert dom.text_by_id["status"].startswith("live")

    # Cards: the generation, its algorithm and objective, the booked session.
    assert dom.text_by_id["generation"].strip() == str(placement["generation"])
    assert dom.text_by_id["algorithm"].startswith("cg ")
    assert dom.text_by_id["objective"].strip() == f"{placement['objective_ms_per_token']:.1f}"
    assert dom.text_by_id["sessions"].strip() == "4"
    assert dom.text_by_id["bookings"].strip() == "4 / 0"
    assert "bloom-176b" in dom.text_by_id["model"]

    # Every server has a row in the table and a label in the site diagram.
    rows = {
        attrs["data-server"]
        for tag, attrs in dom.elements
        if tag == "tr" and "data-server" in attrs
    }
    assert rows == {s["id"] for s in swarm["servers"]}
    sites = {
        attrs["data-site"] for tag, attrs in dom.elements if tag == "g" and "data-site" in attrs
    }
    assert sites == {"cluster0", "cluster1", "cluster2"}
    assert len(dom.with_class("line", "rtt-line")) == 3

    # Block coverage: one loaded bar per loaded server, coloured by its state, at its span.
    loaded = {
        attrs["data-server"]: (int(attrs["data-start"]), int(attrs["data-end"]), attrs["class"])
        for attrs in dom.with_class("rect", "span", "loaded")
    }
    expected = {
        s["id"]: (s["loaded_span"]["start"], s["loaded_span"]["end"])
        for s in swarm["servers"]
        if s["loaded_span"] is not None
    }
    assert {k: v[:2] for k, v in loaded.items()} == expected
    assert all("online" in v[2] for k, v in loaded.items() if k != "edge-drain")
    if "edge-drain" in loaded:
        assert "draining" in loaded["edge-drain"][2]
    assigned = dom.with_class("rect", "span", "assigned")
    assert len(assigned) == len(placement["spans"])
    cover = dom.with_class("rect", "cover")
    assert len(cover) == 70 and all(int(c["data-count"]) >= 1 for c in cover)
    draining_pills = [a for a in dom.with_class("span", "pill", "draining")]
    assert len(draining_pills) == 1

    # Recent routes: the bookings (newest first) and the route query before them, with paths.
    kinds = [
        attrs["data-kind"] for tag, attrs in dom.elements if tag == "tr" and "data-kind" in attrs
    ]
    assert kinds[:5] == ["booked"] * 4 + ["route"]
    first_hop = swarm["session"]["route"]["hops"][0]
    assert (
        f"{first_hop['server_id']}[{first_hop['start']}:{first_hop['end']}]"
        in dom.text_by_id["routes"]
    )

    # Charts over time (uPlot): one per panel, with the samples and the re-plan marked.
    assert len(dom.with_class("div", "uplot")) == 3
    for chart in ("chart-sessions", "chart-bookings", "chart-waits"):
        (attrs,) = [a for tag, a in dom.elements if a.get("id") == chart]
        assert int(attrs["data-points"]) >= len(history["points"]) >= 4, chart
        assert int(attrs["data-replans"]) >= 1, chart
    assert "active sessions" in dom.text_by_id["chart-sessions"]  # the legend
    assert [p["active_sessions"] for p in history["points"]][-1] == 4
    marked = [m["generation"] for m in history["replans"]]
    assert marked[-1] == 3 and marked == sorted(set(marked))
    replans = [a for tag, a in dom.elements if tag == "tr" and "data-generation" in a]
    assert {"3"} <= {a["data-generation"] for a in replans}
    assert "no re-plan" not in dom.text_by_id["replans"]
    # Predictions are labelled as such; nothing measured is invented.
    generations = dom.text_by_id["generations"]
    assert f"{placement['objective_ms_per_token']:.1f} (predicted)" in generations
    assert "not measured yet" in generations and "(measured)" not in generations
    assert "model prediction" in dom.text_by_id["bound"]
    assert "first token (pred.)" in dom.text_by_id["routes"]
    # The bottleneck is named and outlined on the coverage strip.
    neck = swarm["overview"]["bottleneck"]
    assert neck and dom.text_by_id["bottleneck"].strip() == neck["text"]
    assert f"only {neck['live_copies']} live cop" in neck["text"]
    outlined = [
        (int(a["data-start"]), int(a["data-end"])) for a in dom.with_class("rect", "cover-mark")
    ]
    assert outlined == [tuple(r) for r in neck["blocks"]]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = run_chromium(f"--screenshot={SCREENSHOT}", "--window-size=1400,1500", f"{coordinator}/")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert SCREENSHOT.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"dashboard screenshot: {SCREENSHOT}")
