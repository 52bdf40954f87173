"""What every relay keeps of its mapping and options, said once: the state TcpListener,
SctpListener and UdpRelay all read on their per-connection (per-flow) paths, copied into
plain attributes at construction because those paths run for every client.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.ground import accesslog
from proxy.ground.access import AllowList
from proxy.ground.config import Mapping, RelayOptions
from proxy.ground.stats import MappingStats
from proxy.relays.idle import IdleSweeper

log = logging.getLogger("pyproxy")


class RelayBase:
    """One mapping's relay: what it publishes, where it counts, whom it lets in, where it logs."""

    def __init__(self, mapping: Mapping, port: int, options: RelayOptions,
                 stats: MappingStats) -> None:
        self.mapping = mapping
        self.port = port
        self.stats = stats
        self.allow = AllowList(options.allow)
        self.access = accesslog.current  # None: off
        # Said once here, so that without -log-level debug a connection (a flow) pays one
        # attribute test.
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._backend = mapping.backend_address


class StreamListener(RelayBase):
    """A relay of connections (TCP) or associations (SCTP): capped by -max-conns, each dialled
    under -dial-timeout and -dial-retry, closed after -idle-timeout of silence."""

    def __init__(self, mapping: Mapping, port: int, options: RelayOptions,
                 stats: MappingStats) -> None:
        super().__init__(mapping, port, options, stats)
        self.max_conns = options.max_conns
        self.dial_timeout = options.dial_timeout
        self.dial_retry = options.dial_retry
        self.idle_timeout = options.idle_timeout
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in start()
        self._idle: IdleSweeper | None = None
