"""The demo in-process on a free port: the placement the demo forces when the planner has not
placed every server in time, the swarm going online, and the summary after ``stop()``."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import httpx
from bprr_harness.demo.runner import Demo, DemoOptions, DemoSummary

from app.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paper-clustered-9.json"


def test_a_forced_placement_brings_every_server_online_and_stop_cleans_up() -> None:
    out = io.StringIO()
    options = DemoOptions(EXAMPLE, host="127.0.0.1", port=0, speed=50.0, placement_wait_s=0.0)
    demo = Demo(options, Settings(admin_token=None, join_token="join-me"), out)
    ready = threading.Event()
    result: list[DemoSummary] = []
    thread = threading.Thread(target=lambda: result.append(demo.run(lambda _: ready.set())))
    thread.start()
    try:
        assert ready.wait(20), out.getvalue()
        assert demo.url.startswith("http://127.0.0.1:") and not demo.url.endswith(":0")
        assert demo.database_path.exists()
        with httpx.Client(base_url=demo.url, timeout=5) as client:
            servers = client.get("/v1/servers").json()
            assert len(servers) == 9
            assert all(s["state"] == "online" for s in servers), servers
            assert all(s["loaded_span"] == s["assigned_span"] for s in servers)
            admin = {"Authorization": f"Bearer {demo.admin_token}"}
            assert client.get("/v1/scenario", headers=admin).status_code == 200
            # The generated admin token works on the admin routes.
            assert client.put("/v1/model", headers=admin, json={}).status_code == 422
            deadline = time.monotonic() + 10
            while client.get("/v1/overview").json()["sessions_booked"] < 3:
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.05)
    finally:
        demo.stop()
        thread.join(30)
    assert not thread.is_alive()
    log = out.getvalue()
    # Forced at once (placement_wait_s=0), unless the planner, on a busy machine, placed
    # every server while the agents were still registering.
    assert "forcing a placement with POST /v1/placements" in log or "the planner placed all" in log
    assert "admin token (generated for this run)" in log
    summary = result[0]
    assert summary.booked >= 3
    assert summary.servers == summary.servers_left == 9
    assert summary.still_registered == 0
    assert not demo.database_path.parent.exists()  # the temporary database is removed
