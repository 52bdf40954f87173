"""The proxy's lifecycle: open every listener (all or nothing), tell the runtime on fd 3,
serve until SIGINT/SIGTERM, then close listeners and connections and exit 0 promptly.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import threading
from typing import Any, Union

from proxy.config import Config, Mapping, format_hostport
from proxy import transparent
from proxy.listeners import (
    LISTEN_FD,
    StartupError,
    adopt_listen_fd,
    bind_listener,
    go_strerror,
)
from proxy.privileges import drop_to
from proxy.accesslog import flush_access_log, setup_access_log
from proxy.logs import LoopErrorReporter, reopen_log_file, setup_logging
from proxy.stats import MappingStats
from proxy.statuspipe import StatusPipe
from proxy.sctp import SctpListener
from proxy.tcp import TcpListener
from proxy.udp import UdpRelay

log = logging.getLogger("pyproxy")

StreamListener = Union[TcpListener, SctpListener]  # accept, dial, relay; abort_all() at exit
Relay = Union[StreamListener, UdpRelay]


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go does at start and dockerd relies on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def event_loop_runner() -> Any:
    """uvloop, unless PYPROXY_LOOP=asyncio asks for the standard loop (the tests run both)."""
    if os.environ.get("PYPROXY_LOOP") == "asyncio":
        return asyncio.run
    import uvloop

    return uvloop.run


class Server:
    """Owns the relays of one process and their shutdown."""

    def __init__(self, config: Config, status: StatusPipe, listen_fd: int | None = LISTEN_FD) -> None:
        self.config = config
        self.status = status
        self.listen_fd = listen_fd  # where -use-listen-fd finds its socket
        self.relays: list[Relay] = []
        self.stats: dict[Mapping, MappingStats] = {}
        self._metrics_server: Any = None

    async def start(self) -> None:
        """Open every mapping; if one fails, close the others and raise (all or nothing)."""
        try:
            for mapping in self.config.mappings:
                await self._open(mapping)
            if self.config.metrics_addr:
                self._metrics_server = start_metrics(self.config.metrics_addr, self.stats)
            if self.config.user:
                drop_to(self.config.user)  # every port is bound: root is no longer needed
        except BaseException:
            self.close_listeners()
            raise

    async def _open(self, mapping: Mapping) -> None:
        if self.config.transparent:
            transparent.check_allowed(mapping.container_ip)
        adopted = self.config.use_listen_fd
        if adopted:
            sock, port = adopt_listen_fd(mapping, self.listen_fd), mapping.host_port
        else:
            sock, port = _bind_first_free(mapping)
        published = mapping.with_port(port)
        stats = self.stats.setdefault(published, MappingStats())
        relay: Relay
        if mapping.proto == "udp":
            relay = UdpRelay(published, port, self.config, stats)
            await relay.start(sock, adopted=adopted)
        else:
            listener = TcpListener if mapping.proto == "tcp" else SctpListener
            relay = listener(published, port, self.config, stats)
            await relay.start(sock)
        self.relays.append(relay)

    def close_listeners(self) -> None:
        if self._metrics_server is not None:
            # shutdown() waits up to the server's 0.5 s poll interval: never make exit wait.
            metrics, self._metrics_server = self._metrics_server, None
            threading.Thread(target=lambda: (metrics.shutdown(), metrics.server_close()),
                             daemon=True).start()
        for relay in self.relays:
            if isinstance(relay, UdpRelay):
                relay.stop()
            else:
                relay.stop_accepting()

    def mapping_lines(self) -> list[str]:
        """What this server publishes, in `docker port` format."""
        return [relay.mapping.docker_port_line(relay.port) for relay in self.relays]

    async def serve(self) -> int:
        stop = stop_requested()  # before start(): a stop during start-up is not lost
        try:
            await self.start()
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            self.status.fail(str(exc))
            return 1
        if stop.done():  # stopped while starting: exit 0, nothing on fd 3 (dockerd sees EOF)
            self.close_listeners()
            return 0
        for line, relay in zip(self.mapping_lines(), self.relays, strict=True):
            print(line, flush=True)  # before "ready": whoever waits on fd 3 can read them
            log.info("serving %s -> %s", line, relay.mapping.backend())
        self.status.ready()
        signum = await stop
        await self.shutdown(drain=signum == signal.SIGTERM)
        return 0

    async def shutdown(self, *, drain: bool) -> None:
        """Stop accepting; on SIGTERM with -drain-timeout, let connections finish; close the rest."""
        self.close_listeners()
        streams = [r for r in self.relays if not isinstance(r, UdpRelay)]
        if drain and self.config.drain_timeout > 0:
            deadline = asyncio.get_running_loop().time() + self.config.drain_timeout
            while any(r.connections for r in streams) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        aborted = sum(r.abort_all() for r in streams)
        log.info("stopped; closed %d open connection(s)", aborted)
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run


_stop: tuple[asyncio.AbstractEventLoop, asyncio.Future[int]] | None = None


def stop_requested() -> asyncio.Future[int]:
    """The running loop's stop: resolved with the first SIGINT or SIGTERM. The first call
    installs the handlers (SIGHUP meanwhile reopens the log file); later calls share them."""
    global _stop
    loop = asyncio.get_running_loop()
    if _stop is not None and _stop[0] is loop:
        return _stop[1]
    stop: asyncio.Future[int] = loop.create_future()

    def on_stop(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, reopen_log_file)  # after logrotate moved it
    _stop = (loop, stop)
    return stop


async def wait_for_stop_signal() -> int:
    """Serve until SIGINT or SIGTERM (returned)."""
    return await stop_requested()


def start_metrics(addr: tuple[str, int], stats: dict[Mapping, MappingStats]) -> Any:
    """The /metrics endpoint over `stats` (read at scrape time); returns its HTTP server."""
    from proxy.metrics import make_registry, serve_metrics  # only paid for when asked

    try:
        server, _ = serve_metrics(addr, make_registry(stats))
    except OSError as exc:
        where = f"metrics: listen tcp {format_hostport(addr[0], addr[1])}"
        raise StartupError(f"{where}: bind: {go_strerror(exc)}") from None
    return server


def _bind_first_free(mapping: Mapping) -> tuple[Any, int]:
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


async def _main(config: Config, status: StatusPipe) -> int:
    asyncio.get_running_loop().set_exception_handler(LoopErrorReporter())
    stop_requested()  # first: from here a stop signal resolves it, whatever is starting
    if config.engine:
        from proxy.engine import Engine

        return await Engine(config).serve(status)
    return await Server(config, status).serve()


def run(config: Config, status: StatusPipe) -> int:
    raise_nofile_limit()
    try:
        setup_logging(config)
    except OSError as exc:
        status.fail(f"-log-file {config.log_file}: {go_strerror(exc)}")
        return 1
    try:
        setup_access_log(config)
    except OSError as exc:
        status.fail(f"-access-log {config.access_log}: {go_strerror(exc)}")
        return 1
    try:
        return event_loop_runner()(_main(config, status))  # type: ignore[no-any-return]
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    finally:
        flush_access_log()

