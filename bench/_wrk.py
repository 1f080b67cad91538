"""What the coordinator benchmarks share (bench_api.py, bench_queue.py): the 200-server swarm,
a free loopback port, waiting for a coordinator to be ready, wrk runs parsed into figures, the
book-then-release Lua script, and the CPU time a process spent (to compare runs on a busy
machine, where throughput alone varies with what else runs)."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx


def swarm(servers: int = 200, sites: int = 10, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    names = [f"site{i}" for i in range(sites)]
    matrix = [
        [5.0 if i == j else 20.0 + 10.0 * abs(i - j) for j in range(sites)] for i in range(sites)
    ]
    gpus = [
        ("A100-80GB", 80.0, 3.2197, 32.99),
        ("L40S", 44.0, 5.1, 45.0),
        ("MIG-1g", 9.1, 16.2, 206.4),
    ]
    entries = []
    for j in range(servers):
        gpu, memory, tau, fixed = gpus[j % 3]
        entries.append(
            {
                "id": f"srv{j:03d}",
                "site": names[rng.randrange(sites)],
                "gpu": gpu,
                "memory_gb": memory,
                "decode_ms_per_block": tau * rng.uniform(0.9, 1.1),
                "prefill_ms_per_block": {"fixed": fixed, "per_token": 0.08},
                "address": f"127.0.0.1:{40000 + j}",
            }
        )
    return {
        "name": "bench-200",
        "model": {
            "name": "bloom-176b",
            "num_blocks": 70,
            "block_memory_gb": 1.3234,
            "kv_bytes_per_token_per_block": 57344,
        },
        "requests": {"max_input_tokens": 20, "max_output_tokens": 128},
        "sites": names,
        "site_rtt_ms": matrix,
        "servers": entries,
        "clients": [{"id": f"c{i}", "site": s, "share": 1.0} for i, s in enumerate(names)],
        "overheads": {"per_token_ms": 1, "prefill_fixed_ms": 5},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_ready(
    process: subprocess.Popen[bytes], base: str, what: str, timeout_s: float = 60
) -> None:
    """Until GET /readyz answers 200; SystemExit (the process killed) if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit(f"{what} did not start")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (Linux /proc), 0 where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, utime and stime fields 14 and 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    base: str, path: str, seconds: float, connections: int, script: str | None = None
) -> dict[str, float]:
    duration = max(1, round(seconds))
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script:
        command += ["-s", script]
    out = subprocess.run([*command, base + path], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    wall = float(elapsed.group(1)) if elapsed else float(duration)
    if elapsed and elapsed.group(2) == "ms":
        wall /= 1000
    elif elapsed and elapsed.group(2) == "m":
        wall *= 60
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(bad.group(1)) if bad else 0

    def percentile(label: str) -> float:
        match = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if match is None:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    ok_rate = rate * (total - non2xx) / total if total else 0.0
    result = {
        "rps": rate,
        "ok_rps": ok_rate,
        "p50_ms": percentile("50"),
        "p99_ms": percentile("99"),
        "requests": total,
        "non2xx": non2xx,
    }
    # Counters a script prints from done() ("BOOKED n", "RELEASED n", "FULL n").
    for name, count in re.findall(r"^(BOOKED|RELEASED|FULL) (\d+)$", out, re.MULTILINE):
        result[name.lower()] = int(count)
        result[f"{name.lower()}_per_s"] = int(count) / wall
    return result


# Book a session, then release it on the same connection (DELETE, with the session's token
# when the reply carries one: older coordinators' do not), so that the swarm's cache never
# fills up and the run measures sustainable bookings; done() prints the counts.
_BOOK_AND_RELEASE = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
local sites = {}
for i = 0, 9 do sites[#sites + 1] = "site" .. i end
local n, booked, released, full = 0, 0, 0, 0
local pending = {}
local post_headers = {["Content-Type"] = "application/json"}
AUTHORIZATION
function request()
  if #pending > 0 then
    local held = table.remove(pending)
    local headers = {}
    if held[2] then headers["Authorization"] = "Bearer " .. held[2] end
    return wrk.format("DELETE", "/v1/sessions/" .. held[1], headers)
  end
  n = n + 1
  local body = '{"client_site": "' .. sites[(n % 10) + 1] ..
    '", "input_tokens": 20, "output_tokens": 8}'
  return wrk.format("POST", "/v1/sessions", post_headers, body)
end
function response(status, headers, body)
  if status == 201 then
    booked = booked + 1
    local id = string.match(body, '"id":"(%x+)"')
    local token = string.match(body, '"token":"([%w_%-]+)"')
    if id then table.insert(pending, {id, token}) end
  elseif status == 204 then
    released = released + 1
  elseif status == 503 then
    full = full + 1
  end
  thread_counts = {booked, released, full}
end
function done(summary, latency, requests)
  local b, r, f = 0, 0, 0
  for _, t in ipairs(threads) do
    local c = t:get("thread_counts")
    if c then b, r, f = b + c[1], r + c[2], f + c[3] end
  end
  io.write("BOOKED " .. b .. "\\nRELEASED " .. r .. "\\nFULL " .. f .. "\\n")
end
"""


def book_and_release_script(client_token: str | None = None) -> str:
    """The Lua script: POST /v1/sessions (as the client of ``client_token`` if given), then
    DELETE the session it booked."""
    authorization = (
        f'post_headers["Authorization"] = "Bearer {client_token}"' if client_token else ""
    )
    return _BOOK_AND_RELEASE.replace("AUTHORIZATION", authorization)
