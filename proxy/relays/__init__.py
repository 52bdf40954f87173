"""The relays: one per mapping, each forwarding one protocol between a frontend socket and
the backend. Every relay satisfies Relay, so the modes above never ask which protocol they
hold; make_relay() is the one place that picks the class for a protocol.

A new protocol is a module here with a class that satisfies Relay, one entry in _RELAYS, and
its socket kind in proxy.ground.sockets (and its flag rules in proxy.ground.config).
"""

from __future__ import annotations

import socket
from typing import Protocol

from proxy.ground.config import Mapping, Proto, RelayOptions
from proxy.ground.stats import MappingStats
from proxy.relays import native
from proxy.relays.native import NativeTcpListener
from proxy.relays.sctp import SctpListener
from proxy.relays.tcp import TcpListener
from proxy.relays.udp import UdpRelay


class Relay(Protocol):
    """What a mode needs of a relay: start it on its frontend socket, stop taking new
    clients, count and close what is still open."""

    @property
    def mapping(self) -> Mapping: ...
    @property
    def port(self) -> int: ...
    @property
    def stats(self) -> MappingStats: ...

    @property
    def open_count(self) -> int:
        """Connections (associations, flows) still open: what a drain waits for."""
        ...

    async def start(self, sock: socket.socket, *, adopted: bool = False) -> None:
        """Serve on `sock`; `adopted`: it came on fd 4, so keep dockerd's choice of options."""
        ...

    def stop_accepting(self) -> None:
        """Take no new client. (UDP ends its flows here too: a datagram has nothing to drain.)"""
        ...

    def abort_all(self) -> int:
        """Close everything still open now; returns how many there were."""
        ...


class _RelayClass(Protocol):
    def __call__(self, mapping: Mapping, port: int, options: RelayOptions, stats: MappingStats,
                 /) -> Relay: ...


_RELAYS: dict[Proto, _RelayClass] = {"tcp": TcpListener, "udp": UdpRelay, "sctp": SctpListener}


def make_relay(mapping: Mapping, port: int, options: RelayOptions, stats: MappingStats) -> Relay:
    """The relay for `mapping`, published on `port`, built from the per-relay options (TCP:
    in C where the build has it and the mapping needs nothing only Python does)."""
    if native.serves(mapping, options):
        return NativeTcpListener(mapping, port, options, stats)
    return _RELAYS[mapping.proto](mapping, port, options, stats)
