"""A publication: the relays of one command line, opened all or nothing, described by their
`docker port` lines, closed together. Standalone serves one; the engine one per registration.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from proxy.ground import transparent
from proxy.ground.config import Config, Mapping
from proxy.ground.sockets import StartupError, adopt_held_socket, adopt_listen_fd, bind_listener
from proxy.ground.stats import MappingStats
from proxy.relays import Relay, make_relay

log = logging.getLogger("pyproxy")


class Publication:
    """The relays of one command line. `listen_fd` is where -use-listen-fd finds its socket
    (4 in a spawned process, another fd in the engine, None if none was passed). `held`: on a
    re-attach, the listening sockets its waiter held, one per mapping in order; each is taken
    off the list once it is a socket object (which closes it from then on). `serve=False`:
    only bind (or adopt) the sockets, for an engine whose worker processes serve them."""

    def __init__(self, config: Config, listen_fd: int | None,
                 held: list[int] | None = None, *, serve: bool = True) -> None:
        self.mappings = config.mappings
        self.options = config.relay_options()
        self.use_listen_fd = config.use_listen_fd
        self.listen_fd = listen_fd
        self.held = held
        self.serve = serve
        self.served: list[tuple[Mapping, int]] = []  # (mapping as published, its port)
        self.relays: list[Relay] = []
        self.sockets: list[socket.socket] = []  # each relay's frontend, for the engine to hand out
        self.stats: dict[Mapping, MappingStats] = {}

    async def open(self) -> None:
        """Open every mapping; if one fails, close the others and raise (all or nothing)."""
        try:
            for mapping in self.mappings:
                await self._open(mapping)
        except BaseException:
            self.stop_accepting()
            for relay in self.relays:
                relay.abort_all()  # the C relay's epoll set and timer too, not only the listener
            # A TCP listener on the standard loop closes its socket a loop turn later (see
            # proxy.relays.tcp._stop_serving): the ports are free before the error is told.
            await asyncio.sleep(0)
            raise

    async def _open(self, mapping: Mapping) -> None:
        if self.options.transparent:
            transparent.check_allowed(mapping.container_ip)
        adopted = self.use_listen_fd
        if self.held is not None:
            if not self.held:
                raise StartupError(f"re-attach {mapping.frontend()}: no socket held for it")
            sock = adopt_held_socket(mapping, self.held.pop(0))
            port = sock.getsockname()[1]
        elif adopted:
            sock, port = adopt_listen_fd(mapping, self.listen_fd), mapping.host_port
        else:
            sock, port = bind_first_free(mapping)
        published = mapping.with_port(port)
        stats = self.stats.setdefault(published, MappingStats())
        if not self.serve:
            self.sockets.append(sock)
            self.served.append((published, port))
            return
        relay = make_relay(published, port, self.options, stats)
        await relay.start(sock, adopted=adopted)
        self.relays.append(relay)
        self.sockets.append(sock)
        self.served.append((relay.mapping, relay.port))

    def published(self) -> list[Mapping]:
        """Each mapping as it is served: the port it got, the interface it was bound by."""
        return [mapping for mapping, _ in self.served]

    def lines(self) -> list[str]:
        """What this publishes, in `docker port` format."""
        return [mapping.docker_port_line(port) for mapping, port in self.served]

    def stop_accepting(self) -> None:
        for relay in self.relays:
            relay.stop_accepting()
        if not self.serve:
            for sock in self.sockets:  # only bound here: closing them is all there is to stop
                sock.close()

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; with a drain_timeout, let connections finish for up to that long;
        close the rest."""
        self.stop_accepting()
        if drain_timeout > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout
            while any(r.open_count for r in self.relays) and loop.time() < deadline:
                await asyncio.sleep(0.05)
        aborted = sum(r.abort_all() for r in self.relays)
        log.info("stopped; closed %d open connection(s)", aborted)
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run


def bind_first_free(mapping: Mapping) -> tuple[socket.socket, int]:
    """Bind the mapping's port, or the first free one of its range (docker's 8000-8010:80)."""
    last_error: StartupError | None = None
    for port in mapping.host_ports:
        try:
            sock = bind_listener(mapping, port)
        except StartupError as exc:
            last_error = exc
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        return sock, sock.getsockname()[1]
    assert last_error is not None
    if len(mapping.host_ports) > 1:
        raise StartupError(f"{last_error} (every port of {mapping.host_ports} is taken)")
    raise last_error
