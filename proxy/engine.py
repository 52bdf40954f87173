"""The engine (`pyproxy -engine`): one long-lived process serving the mappings of every
pyproxy that dockerd spawns, so a thousand published ports cost one event loop, not a
thousand interpreters. See proxy.launch for the spawned side of the handshake.

Protocol, over a Unix stream socket (0600, owner only), framed as in proxy.launch: the
spawned process sends its argv, with fd 4 attached (SCM_RIGHTS) when it has one; the engine
answers 0 with the `docker port` lines, or 1 (or 2, usage) with the error. After a 0 the
connection is the mapping's lifetime: "stop" (answered "ok" once the port is released) or
EOF drops the mapping.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from typing import cast
import attrs

from proxy import sdnotify
from proxy.cli import UsageError, parse_config
from proxy.config import Config, Mapping
from proxy.launch import decode_argv, encode_reply, unframe
from proxy.listeners import StartupError
from proxy.server import Server, start_metrics, wait_for_stop_signal
from proxy.stats import MappingStats
from proxy.statuspipe import StatusPipe

log = logging.getLogger("pyproxy")

MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("3i")  # pid, uid, gid


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


async def receive_request(conn: socket.socket) -> tuple[bytes | None, list[int]]:
    """One framed request (None if the peer left or sent too much) and the fds that came."""
    data, fds = b"", cast("list[int]", [])
    while (payload := unframe(data)) is None:
        await _readable(conn)
        try:
            chunk, ancillary, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            continue
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4])
        if not chunk or len(data) + len(chunk) > MAX_REQUEST:
            return None, fds
        data += chunk
    return payload, fds


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.engine_socket
        self.stats: dict[Mapping, MappingStats] = {}  # every registration's, for /metrics
        self.servers: set[Server] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _listen(self) -> socket.socket:
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise StartupError(f"engine: another engine is already serving {self.path}")
            except OSError:
                os.unlink(self.path)  # a stale socket from an engine that died
            finally:
                probe.close()
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600: owner only
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"engine: listen unix {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def serve(self, status: StatusPipe) -> int:
        try:
            listener = self._listen()
            if self.config.metrics_addr:
                start_metrics(self.config.metrics_addr, self.stats)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            status.fail(str(exc))
            return 1
        status.ready()
        # READY=1 lets systemd start dockerd, and stop us: sent (call_soon) only once
        # wait_for_stop_signal below has its handlers, or an early SIGTERM would kill us (-15).
        asyncio.get_running_loop().call_soon(sdnotify.ready, f"serving {self.path}")
        print(f"pyproxy engine serving {self.path}", flush=True)
        log.info("engine serving %s", self.path)
        accepting = asyncio.get_running_loop().create_task(self._accept(listener))
        await wait_for_stop_signal()
        sdnotify.stopping()
        accepting.cancel()
        listener.close()
        os.unlink(self.path)
        for server in list(self.servers):
            await server.shutdown(drain=False)
        log.info("engine stopped; released %d mapping(s)", len(self.servers))
        return 0

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of fds: back off rather than spin
                log.warning("engine: accept: %s", exc.strerror)
                await asyncio.sleep(0.5)
                continue
            task = loop.create_task(self._registration(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _permitted(self, conn: socket.socket) -> bool:
        _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return uid in (0, os.geteuid())

    async def _registration(self, conn: socket.socket) -> None:
        """One spawned pyproxy: start its mapping, answer, hold it until stop or EOF."""
        conn.setblocking(False)
        fds: list[int] = []
        try:
            if not self._permitted(conn):
                await self._reply(conn, 1, "engine: permission denied")
                return
            request, fds = await receive_request(conn)
            server = await self._start(request, fds, conn)
            if server is None:
                return
            stop = await self._held_until_stop(conn)
            await server.shutdown(drain=False)
            self.servers.discard(server)
            for mapping in server.stats:
                self.stats.pop(mapping, None)
            log.info("released %s", ", ".join(server.mapping_lines()))
            if stop:
                await self._reply_raw(conn, b"ok\n")
        finally:
            for fd in fds:  # passed but not adopted (the adopted one was taken out of fds)
                os.close(fd)
            conn.close()

    async def _start(self, request: bytes | None, fds: list[int], conn: socket.socket
                     ) -> Server | None:
        try:
            if request is None:
                raise ValueError("incomplete request")
            config = parse_config(decode_argv(request))
        except UsageError as exc:
            await self._reply(conn, 2, str(exc))
            return None
        except ValueError:
            await self._reply(conn, 1, "engine: malformed request")
            return None
        if config is None:
            await self._reply(conn, 2, "nothing to serve")
            return None
        if config.user:
            await self._reply(conn, 2, "argument -user: not through the engine (it would change "
                              "the user of every mapping); run the engine as that user")
            return None
        # One metrics endpoint for the engine: a registration's own -metrics-addr is ignored.
        config = attrs.evolve(config, metrics_addr=None)
        listen_fd = fds.pop(0) if (config.use_listen_fd and fds) else None
        server = Server(config, StatusPipe(None), listen_fd=listen_fd)
        try:
            await server.start()
        except StartupError as exc:
            await self._reply(conn, 1, str(exc))
            return None
        self.servers.add(server)
        self.stats.update(server.stats)
        lines = server.mapping_lines()
        log.info("serving %s", ", ".join(lines))
        await self._reply(conn, 0, "\n".join(lines))
        return server

    async def _held_until_stop(self, conn: socket.socket) -> bool:
        """True if the waiter asked to stop, False if the connection just ended."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(conn, 4096)
            except OSError:
                return False
            if not data:
                return False
            if b"stop" in data:
                return True

    async def _reply(self, conn: socket.socket, status: int, body: str) -> None:
        await self._reply_raw(conn, encode_reply(status, body))

    async def _reply_raw(self, conn: socket.socket, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(conn, data)
        except OSError:
            pass  # the spawned process is gone; nothing to tell
