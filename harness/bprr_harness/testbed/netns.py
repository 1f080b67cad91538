"""Network namespaces for the testbed: one per site, joined by a bridge (iproute2).

Names: namespaces ``bprr-tb-<run>-s<i>``, the bridge ``bptb<run>`` and veth pairs
``bt<run>h<i>`` (root side) / ``eth0`` (site side), so every run's leftovers are identifiable
and ``cleanup(run)`` (or ``cleanup()`` for all runs) removes them. Addresses come from one
free /24 in 10.200.0.0/13 chosen per run: the bridge is ``.1``, site i is ``.(10 + i)``.
The bridge lives in the root namespace so that the coordinator (a thread of the main
process) is reachable from every site at the bridge's address; nothing is routed beyond the
/24 (no default route, no forwarding), so traffic stays inside the namespaces and the bridge.

Delays: with ``netem`` (where the kernel has it) each site's egress is shaped per destination
site (half the RTT each way, the site's own RTT on its loopback); without it the testbed puts
``bprr_harness.testbed.relay`` on the path instead (the kernel here has no netem).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

PREFIX = "bprr-tb-"
RUN_ID = re.compile(r"^[a-z0-9]{1,6}$")


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed while setting up the testbed network."""


def new_run_id() -> str:
    return secrets.token_hex(3)


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (None when they can): not root, no ``ip``, or
    ``ip netns add`` refused (a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        return "not running as root (ip netns needs CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"{PREFIX}probe{secrets.token_hex(2)}"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def list_namespaces() -> list[str]:
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _links() -> list[str]:
    result = _run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in result.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def cleanup(run_id: str | None = None) -> list[str]:
    """Delete the namespaces, bridge and veths of run ``run_id`` (of every run when None).
    Returns what was deleted."""
    if run_id is not None and not RUN_ID.match(run_id):
        raise ValueError(f"run id: {run_id!r} is not a testbed run id")
    ns_prefix = f"{PREFIX}{run_id}-" if run_id else PREFIX
    deleted = []
    for name in list_namespaces():
        if name.startswith(ns_prefix):
            _run(["ip", "netns", "del", name], check=False)
            deleted.append(name)
    link_prefixes = (f"bptb{run_id}", f"bt{run_id}h") if run_id else ("bptb", "bt")
    for link in _links():
        if link.startswith(link_prefixes) and _is_testbed_link(link, run_id):
            _run(["ip", "link", "del", link], check=False)
            deleted.append(link)
    return deleted


def _is_testbed_link(name: str, run_id: str | None) -> bool:
    if run_id is not None:
        return name == f"bptb{run_id}" or re.fullmatch(rf"bt{run_id}h\d+", name) is not None
    return re.fullmatch(r"bptb[a-z0-9]{1,6}|bt[a-z0-9]{1,6}h\d+", name) is not None


def _used_networks() -> list[ipaddress.IPv4Network]:
    result = _run(["ip", "-4", "-o", "addr", "show"], check=False)
    nets = []
    for line in result.stdout.splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            nets.append(ipaddress.IPv4Interface(match.group(1)).network)
    routes = _run(["ip", "-4", "route", "show"], check=False)
    for line in routes.stdout.splitlines():
        head = line.split()[0] if line.split() else ""
        if head and head != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(head, strict=False))
    return nets


def choose_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that overlaps no address or route of this machine."""
    rng = rng or random.Random()
    used = _used_networks()
    for _ in range(200):
        candidate = ipaddress.IPv4Network(f"10.{rng.randint(200, 207)}.{rng.randint(0, 255)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError("no free /24 found in 10.200.0.0/13")


def netem_works(namespace: str) -> bool:
    """Whether ``tc qdisc ... netem`` is accepted (tried on the namespace's loopback)."""
    if shutil.which("tc") is None:
        return False
    added = _run(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            "1ms",
        ],
        check=False,
    )
    if added.returncode != 0:
        return False
    _run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", "lo", "root"], check=False)
    return True


class SiteNetwork:
    """One namespace per site on a bridge; ``up()`` creates, ``down()`` removes everything
    (also when ``up()`` failed half-way). A context manager."""

    def __init__(self, sites: Sequence[str], run_id: str | None = None) -> None:
        if not sites:
            raise ValueError("sites: at least one")
        self.sites = list(sites)
        self.run_id = run_id or new_run_id()
        if not RUN_ID.match(self.run_id):
            raise ValueError(f"run id: {self.run_id!r} must be 1-6 lowercase letters or digits")
        self.bridge = f"bptb{self.run_id}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.netem = False
        self._created = False

    def namespace(self, site: str) -> str:
        return f"{PREFIX}{self.run_id}-s{self.sites.index(site)}"

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace(site) for site in self.sites]

    def address(self, site: str) -> str:
        if self.subnet is None:
            raise NetnsError("the network is not up")
        return str(self.subnet.network_address + 10 + self.sites.index(site))

    @property
    def bridge_address(self) -> str:
        if self.subnet is None:
            raise NetnsError("the network is not up")
        return str(self.subnet.network_address + 1)

    def exec_prefix(self, site: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(site)]

    def up(self) -> None:
        self._created = True
        try:
            self.subnet = choose_subnet()
            prefix = self.subnet.prefixlen
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i, site in enumerate(self.sites):
                ns = self.namespace(site)
                host_if, peer_if = f"bt{self.run_id}h{i}", f"bt{self.run_id}n{i}"
                _run(["ip", "netns", "add", ns])
                _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if])
                _run(["ip", "link", "set", peer_if, "netns", ns])
                _run(["ip", "link", "set", host_if, "master", self.bridge])
                _run(["ip", "link", "set", host_if, "up"])
                inside = ["ip", "netns", "exec", ns, "ip"]
                _run([*inside, "link", "set", peer_if, "name", "eth0"])
                _run([*inside, "addr", "add", f"{self.address(site)}/{prefix}", "dev", "eth0"])
                _run([*inside, "link", "set", "eth0", "up"])
                _run([*inside, "link", "set", "lo", "up"])
        except BaseException:
            self.down()
            raise

    def apply_netem(self, site_rtt_ms: Sequence[Sequence[float]]) -> None:
        """Per-destination delays with netem: site i's egress towards site k waits half of
        RTT(i, k); its loopback (same-site traffic) half of RTT(i, i) each way."""
        for i, site in enumerate(self.sites):
            namespace = self.namespace(site)

            def tc(arguments: str, ns: str = namespace) -> None:
                _run(["ip", "netns", "exec", ns, "tc", *arguments.split()])

            tc("qdisc add dev eth0 root handle 1: htb default 1")
            tc("class add dev eth0 parent 1: classid 1:1 htb rate 10gbit")
            for k, other in enumerate(self.sites):
                if k == i:
                    continue
                cls = f"1:{10 + k}"
                tc(f"class add dev eth0 parent 1: classid {cls} htb rate 10gbit")
                delay = f"{site_rtt_ms[i][k] / 2:.3f}ms"
                tc(f"qdisc add dev eth0 parent {cls} handle {10 + k}: netem delay {delay}")
                match = f"u32 match ip dst {self.address(other)}/32 flowid {cls}"
                tc(f"filter add dev eth0 parent 1: protocol ip {match}")
            tc(f"qdisc add dev lo root netem delay {site_rtt_ms[i][i] / 2:.3f}ms")
        self.netem = True

    def down(self) -> list[str]:
        if not self._created:
            return []
        deleted = cleanup(self.run_id)
        self._created = False
        return deleted

    def __enter__(self) -> SiteNetwork:
        self.up()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()
