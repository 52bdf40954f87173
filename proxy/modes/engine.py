"""The engine (`pyproxy -engine`): one long-lived process serving the mappings of every
pyproxy that dockerd spawns, so a thousand published ports cost one event loop, not a
thousand interpreters. See proxy.handover for the spawned side of the handshake.

Protocol, over a Unix stream socket (0600, owner only, in a directory only its owner or root
can write), framed as in proxy.ground.wire: the spawned process sends its argv, with fd 4 attached
(SCM_RIGHTS) when it has one; the engine answers 0 with the `docker port` lines, or 1 (or 2,
usage) with the error. After a 0 the connection is the mapping's lifetime: "stop" (answered
"ok" once the port is released) or EOF drops the mapping.

Every request gets an answer and none can end the engine: a peer is the wrong user, slow,
malformed or hostile at worst, and only its own connection pays for it.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import stat
import struct
from typing import Any

from proxy.ground import sdnotify
from proxy.ground.config import Config, Mapping, ProcessOptions
from proxy.ground.flags import UsageError, config_from_args, parse_args
from proxy.ground.heap import freeze_startup
from proxy.ground.sockets import StartupError, go_strerror
from proxy.ground.stats import MappingStats
from proxy.ground.statuspipe import StatusPipe
from proxy.ground.wire import MAX_PAYLOAD, WireError, decode_argv, encode_reply, unframe
from proxy.modes.publication import Publication
from proxy.modes.signals import wait_for_stop_signal

log = logging.getLogger("pyproxy")

REQUEST_TIMEOUT = 5.0  # a spawned pyproxy sends its request at once; an idle peer is dropped
ANSWER_TIMEOUT = 10.0  # dockerd gives up on "0\n" after 16 s: answer well before
_UCRED = struct.Struct("3i")  # pid, uid, gid
_FD_SPACE = socket.CMSG_SPACE(4)  # room for one fd (two, aligned): the kernel closes any more
_PROCESS_DEFAULTS = ProcessOptions()
# The engine process's own options: a registration that asks for its own gets a usage error
# saying why, rather than being served without it. (-engine-socket only says where the
# spawned pyproxy found us.)
_ENGINE_WIDE = {
    "metrics_addr": "the engine serves one /metrics for every mapping; give -metrics-addr "
                    "to `pyproxy -engine`",
    "log_level": "the engine has one log for every mapping; give -log-level to `pyproxy -engine`",
    "log_format": "the engine has one log for every mapping; give -log-format to "
                  "`pyproxy -engine`",
    "log_file": "the engine has one log for every mapping; give -log-file to `pyproxy -engine`",
    "access_log": "the engine has one access log for every mapping; give -access-log to "
                  "`pyproxy -engine`",
    "drain_timeout": "the engine releases a mapping as soon as its pyproxy is stopped",
    "user": "it would change the user of every mapping; run the engine as that user",
    "engine": "this is an engine already",
}
_STANDALONE_HINT = "; to serve it in its own process, run it with PYPROXY_ENGINE_SOCKET= (empty)"


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


async def receive_request(conn: socket.socket, fds: list[int]) -> bytes:
    """One framed request; the first fd that came with it is appended to `fds` (the caller
    closes it), any other is closed at once. Raises WireError if it is not a request."""
    data = b""
    while (payload := unframe(data)) is None:
        await _readable(conn)
        try:
            chunk, ancillary, _, _ = conn.recvmsg(MAX_PAYLOAD + 16, _FD_SPACE)
        except BlockingIOError:
            continue
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4]):
                    if fds:
                        os.close(fd)  # one listening socket per request, no more
                    else:
                        fds.append(fd)
        if not chunk:
            raise WireError("the connection ended before a whole request came")
        data += chunk  # bounded: unframe raises once a frame cannot fit MAX_PAYLOAD
    return payload


def _config_for(request: bytes) -> Config:
    """The Config a registration asks for; UsageError (or WireError) if the engine can't serve it."""
    args = parse_args(decode_argv(request))
    if args.help or args.version:
        raise UsageError("argument -h/-v: help and the version are printed by pyproxy itself, "
                         "not through the engine")
    config = config_from_args(args)
    for name, why in _ENGINE_WIDE.items():
        if getattr(config, name) != getattr(_PROCESS_DEFAULTS, name):
            raise UsageError(f"argument -{name.replace('_', '-')}: not through the engine "
                             f"({why}){_STANDALONE_HINT}")
    return config


def _unsafe_directory(directory: str) -> str | None:
    """Why another user could replace a socket in `directory`, or None if none can: it and
    every directory above it must belong to us or root, and only the socket's own directory
    may not be writable by group or others even with the sticky bit (as /tmp is)."""
    me, path = os.geteuid(), os.path.realpath(directory)
    while True:
        st = os.stat(path)
        if st.st_uid not in (0, me):
            return f"{path} belongs to uid {st.st_uid}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and (path == os.path.realpath(directory) or not st.st_mode & stat.S_ISVTX):
            return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
        if path == "/":
            return None
        path = os.path.dirname(path)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a socket"


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = config.engine_socket
        self.stats: dict[Mapping, MappingStats] = {}  # every registration's, for /metrics
        self.publications: set[Publication] = set()
        self._metrics: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we made

    def _listen(self) -> socket.socket:
        where = f"engine: -engine-socket {self.path}"
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            unsafe = _unsafe_directory(directory)
        except OSError as exc:
            raise StartupError(f"{where}: {directory}: {go_strerror(exc)}") from None
        if unsafe:
            raise StartupError(
                f"{where}: refusing a directory others can write ({unsafe}): another user could "
                "put their own socket there and receive every mapping's traffic; use one only "
                "root or this user can write, such as /run/pyproxy")
        self._remove_stale_socket(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600: owner only
        try:
            sock.bind(self.path)
            st = os.lstat(self.path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"engine: listen unix {self.path}: {go_strerror(exc)}") from None
        finally:
            os.umask(old_umask)
        self._socket_id = (st.st_dev, st.st_ino)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def _remove_stale_socket(self, where: str) -> None:
        """Only ever remove a socket that no engine answers on: never a file, never a live one."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StartupError(f"{where}: {go_strerror(exc)}") from None
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"{where}: is {_kind(mode)}, not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)  # a live engine with a full backlog is still a live engine
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # a stale socket from an engine that died
            return
        except OSError as exc:
            raise StartupError(f"{where}: cannot tell whether an engine serves it: "
                               f"{go_strerror(exc)}") from None
        finally:
            probe.close()
        raise StartupError(f"engine: another engine is already serving {self.path}")

    def _unlink_own_socket(self) -> None:
        """At stop: remove the path only if it is still the socket this engine created."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self.path)
        except OSError:
            pass  # already gone (deleted by hand): nothing of ours to remove

    async def serve(self, status: StatusPipe) -> int:
        try:
            listener = self._listen()
            if self.config.metrics_addr:
                from proxy.ground.metrics import start_metrics  # only paid for when asked

                self._metrics = start_metrics(self.config.metrics_addr, self.stats)
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
        freeze_startup()
        accepting = asyncio.get_running_loop().create_task(self._accept(listener))
        await wait_for_stop_signal()
        sdnotify.stopping()
        accepting.cancel()
        listener.close()
        self._unlink_own_socket()
        if self._metrics is not None:
            from proxy.ground.metrics import stop_metrics

            stop_metrics(self._metrics)
        for publication in list(self.publications):
            await publication.close()
        log.info("engine stopped; released %d mapping(s)", len(self.publications))
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

    def _peer(self, conn: socket.socket) -> tuple[int, int]:
        pid, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        return pid, uid

    async def _registration(self, conn: socket.socket) -> None:
        """One spawned pyproxy: start its mapping, answer, hold it until stop or EOF.

        Whatever the peer does, this ends in a reply (when it can still be sent) and a
        closed connection, never in an exception out of the task or the engine."""
        conn.setblocking(False)
        fds: list[int] = []
        publication: Publication | None = None
        pid = 0
        try:
            pid, uid = self._peer(conn)
            if uid not in (0, os.geteuid()):
                log.warning("engine: refused a registration from pid %d, uid %d", pid, uid)
                await self._reply(conn, 1, "engine: permission denied")
                return
            try:
                request = await asyncio.wait_for(receive_request(conn, fds), REQUEST_TIMEOUT)
                config = _config_for(request)
            except TimeoutError:
                log.warning("engine: pid %d sent no request within %gs; closed", pid,
                            REQUEST_TIMEOUT)
                await self._reply(conn, 1, f"engine: no request within {REQUEST_TIMEOUT:g}s")
                return
            except WireError as exc:
                log.warning("engine: malformed request from pid %d: %s", pid, exc)
                await self._reply(conn, 1, f"engine: malformed request: {exc}")
                return
            except UsageError as exc:
                await self._reply(conn, 2, str(exc))
                return
            try:
                publication = await asyncio.wait_for(self._start(config, fds), ANSWER_TIMEOUT)
            except TimeoutError:
                log.warning("engine: pid %d: could not start %s within %gs", pid,
                            ", ".join(map(str, config.mappings)), ANSWER_TIMEOUT)
                await self._reply(conn, 1, f"engine: could not start the mapping within "
                                  f"{ANSWER_TIMEOUT:g}s")
                return
            except StartupError as exc:
                await self._reply(conn, 1, str(exc))
                return
            finally:
                for fd in fds:  # passed but not adopted: close it now, not at the mapping's end
                    os.close(fd)
                fds.clear()
            lines = publication.lines()
            log.info("serving %s", ", ".join(lines))
            await self._reply(conn, 0, "\n".join(lines))
            stop = await self._held_until_stop(conn)
            await self._release(publication)
            publication = None
            if stop:
                await self._reply_raw(conn, b"ok\n")
        except asyncio.CancelledError:
            raise  # the engine is stopping: serve() releases every mapping
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- one registration must not end the rest
            log.error("engine: registration from pid %d failed: %r", pid, exc)
            await self._reply(conn, 1, f"engine: internal error: {exc!r}")
            if publication is not None:
                await self._release(publication)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _start(self, config: Config, fds: list[int]) -> Publication:
        """Open the mapping (adopting the passed socket if -use-listen-fd); StartupError if not."""
        listen_fd = fds.pop(0) if (config.use_listen_fd and fds) else None
        publication = Publication(config, listen_fd)
        try:
            await publication.open()
        except StartupError:
            if listen_fd is not None and _not_a_socket(listen_fd):
                os.close(listen_fd)  # never wrapped in a socket object, so still ours to close
            raise
        self.publications.add(publication)
        self.stats.update(publication.stats)
        return publication

    async def _release(self, publication: Publication) -> None:
        self.publications.discard(publication)
        for mapping in publication.stats:
            self.stats.pop(mapping, None)
        await publication.close()
        log.info("released %s", ", ".join(publication.lines()))

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
        try:
            reply = encode_reply(status, body)
        except WireError:  # a reply over the frame limit (thousands of mappings)
            reply = encode_reply(1, "engine: the reply does not fit the protocol's frame")
        await self._reply_raw(conn, reply)

    async def _reply_raw(self, conn: socket.socket, data: bytes) -> None:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(conn, data),
                                   ANSWER_TIMEOUT)
        except (OSError, TimeoutError):
            pass  # the spawned process is gone, or reads nothing: nothing to tell


def _not_a_socket(fd: int) -> bool:
    try:
        return not stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
