"""The part of ``bprr_client.petals_server`` that imports PETALS (only under its interpreter).

``SteeredServer`` is ``petals.server.server.Server`` with its block choice replaced by the
coordinator's assignment: ``_choose_blocks`` returns the span in the control file (waiting
while there is none) and ``_should_choose_other_blocks`` is true when that span changed, so
PETALS' own rebalancing loop (checked every ``balance_check_s`` on average) shuts the old
module container down and loads the new span in the same process, with the same peer id and
p2p daemon. A watcher thread writes the status file from the DHT's view of this peer.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

from hivemind.utils.logging import get_logger
from petals.data_structures import UID_DELIMITER, ServerState
from petals.server.server import Server
from petals.utils.dht import get_remote_module_infos

from bprr_client.petals_server import (
    POLL_S,
    install_stop_signals,
    read_span,
    watch_parent,
    write_json,
)

logger = get_logger("bprr_client.petals_server")


class SteeredServer(Server):  # type: ignore[misc]  # PETALS has no type information
    def __init__(self, *, control: Path, **kwargs: Any) -> None:
        self.control = control
        self.current: tuple[int, int] | None = None
        super().__init__(**kwargs)

    def _choose_blocks(self) -> list[int]:
        while not self.stop.is_set():
            span = read_span(self.control)
            if span is not None and span[1] <= self.block_config.num_hidden_layers:
                self.current = span
                logger.info(f"bprr: hosting blocks {span[0]}:{span[1]}")
                return list(range(*span))
            self.stop.wait(POLL_S)
        raise KeyboardInterrupt  # stopped while waiting for an assignment

    def _should_choose_other_blocks(self) -> bool:
        wanted = read_span(self.control)
        if wanted != self.current:
            logger.info(f"bprr: assignment {self.current} -> {wanted}: re-spanning")
            self.current = None
            return True
        return False

    def announced_online(self, span: tuple[int, int]) -> bool:
        """True when the DHT shows this peer ONLINE for every block of ``span``."""
        uids = [f"{self.dht_prefix}{UID_DELIMITER}{i}" for i in range(*span)]
        infos = get_remote_module_infos(self.dht, uids, latest=True)
        for info in infos:
            server = None if info is None else info.servers.get(self.dht.peer_id)
            if server is None or server.state != ServerState.ONLINE:
                return False
        return True


def report(server: SteeredServer, status: Path, stop: threading.Event) -> None:
    """Write the status file whenever what it says changes (and every few seconds)."""
    identity = {
        "pid": os.getpid(),
        "peer_id": server.dht.peer_id.to_base58(),
        "multiaddrs": [str(a) for a in server.dht.get_visible_maddrs()],
    }
    last: dict[str, Any] | None = None
    while not stop.is_set():
        span = server.current
        online = False
        if span is not None and server.module_container is not None:
            try:
                online = server.announced_online(span)
            except Exception as error:  # a DHT hiccup: report not online, try again
                logger.warning(f"bprr: DHT lookup failed: {error!r}")
        value = {**identity, "span": None if span is None else list(span), "online": online}
        if value != last:
            if online:  # logged before the status says so: a reader of both never races
                logger.info(f"bprr: blocks {span[0]}:{span[1]} announced online")  # type: ignore[index]
            write_json(status, value)
            last = value
        stop.wait(POLL_S)


def run(args: argparse.Namespace) -> int:
    install_stop_signals()
    stop = threading.Event()
    threading.Thread(target=watch_parent, args=(stop, os.getppid()), daemon=True).start()
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    kwargs: dict[str, Any] = {}
    if args.identity_path:
        kwargs["identity_path"] = args.identity_path
    if args.attn_cache_tokens is not None:
        kwargs["attn_cache_tokens"] = args.attn_cache_tokens
    server = SteeredServer(
        control=args.control,
        converted_model_name_or_path=args.model,
        dht_prefix=args.dht_prefix,
        initial_peers=list(args.initial_peer),
        host_maddrs=list(args.host_maddr),
        announce_maddrs=list(args.announce_maddr) or list(args.host_maddr),
        throughput=args.throughput,
        num_blocks=layers,  # the cache is sized for any span; the span itself comes later
        device=args.device,
        torch_dtype=args.torch_dtype,
        update_period=args.update_period,
        mean_balance_check_period=args.balance_check_s,
        mean_block_selection_delay=0.0,
        balance_quality=1.0,
        skip_reachability_check=True,
        reachable_via_relay=False,
        use_relay=False,
        use_auto_relay=False,
        nat_port_map=False,
        auto_nat=False,
        **kwargs,
    )
    reporter = threading.Thread(target=report, args=(server, args.status, stop), daemon=True)
    reporter.start()
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("bprr: stopping")
    finally:
        stop.set()
        reporter.join(timeout=2)
        server.shutdown()
    return 0
