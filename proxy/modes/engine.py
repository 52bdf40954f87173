"""The engine (`pyproxy -engine`): one long-lived process serving the mappings of every
pyproxy that dockerd spawns, so a thousand published ports cost one event loop, not a
thousand interpreters. See proxy.handover for the spawned side of the handshake.

Protocol, over a Unix stream socket (0600, owner only, in a directory only its owner or root
can write), framed as in proxy.ground.wire: the spawned process sends its argv, with fd 4 attached
(SCM_RIGHTS) when it has one; the engine answers 0 with the `docker port` lines, or 1 (or 2,
usage) with the error. A 0 carries (SCM_RIGHTS) the mapping's listening sockets, which the
waiter holds, so they outlive this process. After a 0 the connection is the mapping's
lifetime: "stop" (answered "ok" once the port is released) or EOF drops the mapping.

When an engine dies, each waiter re-execs pyproxy, which registers again with whichever engine
serves the path next: a re-attach (proxy.ground.wire.REATTACH), the same argv with the sockets
it holds attached. It is checked exactly as a registration is, and each socket must be the one
its mapping would have (proxy.ground.sockets.adopt_held_socket), or all are closed and it is
refused; the engine then adopts them instead of binding, so clients queued in the kernel
meanwhile are served. `pyproxy -list` sends
LIST_REQUEST instead of an argv and gets every mapping's row (proxy.ground.listing), under
the same check of who is asking.

SIGUSR2 reloads: the installed pyproxy is started with this engine's command line and its
listening socket (LISTEN_FD_ENV), which it adopts, so the path never disappears and no spawn
is reset or starts a rival engine; once it says "0", this one stops accepting, hands every
waiter over (each re-attaches to it) and drains (see serve, _reload, _hand_over).

With -engine-idle-exit D (what a spawned pyproxy that starts the engine passes), the engine
exits once no registration has been open for D: it unlinks its socket first, then takes what
is already queued on it, so a spawn racing the exit is served here or starts a new engine.

Every request gets an answer and none can end the engine: a peer is the wrong user, slow,
malformed or hostile at worst, and only its own connection pays for it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import signal
import socket
import stat
import struct
import sys
from typing import Any

from proxy.ground import sdnotify
from proxy.ground.config import Config, Mapping, ProcessOptions, available_cpus
from proxy.ground.flags import UsageError, config_from_args, parse_args
from proxy.ground.heap import freeze_startup
from proxy.ground.listing import rows_from_stats
from proxy.ground.logs import mapping_fields
from proxy.ground.sockets import StartupError, go_strerror, wait_fd
from proxy.ground.stats import EngineStats, MappingStats
from proxy.ground.statuspipe import STATUS_FD, StatusPipe
from proxy.ground.wire import (
    LIST_REQUEST,
    MAX_HELD,
    MAX_PAYLOAD,
    WireError,
    decode_request,
    encode_list_reply,
    encode_reply,
    pyproxy_command,
    unframe,
)
from proxy.modes.publication import Publication
from proxy.modes.signals import stop_requested
from proxy.modes.workers import WorkerPool

log = logging.getLogger("pyproxy")

REQUEST_TIMEOUT = 5.0  # a spawned pyproxy sends its request at once; an idle peer is dropped
ANSWER_TIMEOUT = 10.0  # dockerd gives up on "0\n" after 16 s: answer well before
RELOAD_TIMEOUT = 20.0
SETTLE_TIMEOUT = REQUEST_TIMEOUT + ANSWER_TIMEOUT  # the longest a registration takes to answer
# A reload hands the engine's listening socket to the new engine on this fd, named in its
# environment (see Engine._reload): the path never disappears, so no spawn starts a rival.
LISTEN_FD_ENV = "PYPROXY_ENGINE_LISTEN_FD"
_RELOAD_LISTEN_FD = 4
RETIRE_GRACE = 0.5  # an idle engine accepts this long after unlinking its socket (see serve)
_UCRED = struct.Struct("3i")  # pid, uid, gid
# Room for a re-attach's sockets, one per mapping: the kernel closes any more that come.
_FD_SPACE = socket.CMSG_SPACE(4 * MAX_HELD)
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
    "engine_idle_exit": "it is how long the engine itself lives; give it to `pyproxy -engine`",
    "workers": "the engine's workers serve every mapping; give -workers to `pyproxy -engine`",
}
_STANDALONE_HINT = "; to serve it in its own process, run it with PYPROXY_ENGINE_SOCKET= (empty)"


async def _read_to_eof(fd: int) -> bytes:
    """All a pipe gives until its writer closes it (a status pipe: "0\\n" or "1\\n<error>")."""
    data = b""
    while True:
        await wait_fd(fd)
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


async def receive_request(conn: socket.socket, fds: list[int]) -> tuple[bytes, bytes]:
    """One framed request, and the bytes read after it (a waiter stopped as it registered
    sends "stop" at once); the fds that came with its first message are appended to `fds`
    (the caller closes them), any that come later are closed at once. Raises WireError if it
    is not a request."""
    data = b""
    while (payload := unframe(data)) is None:
        await wait_fd(conn.fileno())
        try:
            chunk, ancillary, _, _ = conn.recvmsg(MAX_PAYLOAD + 16, _FD_SPACE)
        except BlockingIOError:
            continue
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i", fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4])
                if data or fds:  # sockets come with the request's first bytes, or not at all
                    for fd in received:
                        os.close(fd)
                else:
                    fds.extend(received)
        if not chunk:
            raise WireError("the connection ended before a whole request came")
        data += chunk  # bounded: unframe raises once a frame cannot fit MAX_PAYLOAD
    return payload, data[data.index(b"\n") + 1 + len(payload):]


def _config_for(request: bytes) -> tuple[Config, bool, list[str]]:
    """The Config a registration (or re-attach: True) asks for, and its argv; UsageError (or
    WireError) if the engine can't serve it."""
    argv, reattach = decode_request(request)
    args = parse_args(argv)
    if args.help or args.version:
        raise UsageError("argument -h/-v: help and the version are printed by pyproxy itself, "
                         "not through the engine")
    config = config_from_args(args)
    for name, why in _ENGINE_WIDE.items():
        if getattr(config, name) != getattr(_PROCESS_DEFAULTS, name):
            raise UsageError(f"argument -{name.replace('_', '-')}: not through the engine "
                             f"({why}){_STANDALONE_HINT}")
    return config, reattach, list(argv)


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
        self.engine_stats = EngineStats()
        self.publications: set[Publication] = set()
        self._metrics: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we own
        # The socket file of a listener adopted from the engine we replace: ours to remove
        # only once we have said "0" (until then the old engine serves on it, see serve).
        self._adopted_id: tuple[int, int] | None = None
        self._settling: set[asyncio.Task[None]] = set()  # registrations not yet answered
        self._settled: asyncio.Future[None] | None = None
        self._last_busy = 0.0  # loop time when the last registration ended (-engine-idle-exit)
        self._became_idle: asyncio.Future[None] | None = None
        self.pool: WorkerPool | None = None  # the worker processes, if any (-workers)

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

    def _adopt(self, value: str) -> socket.socket:
        """The listening socket the engine we replace handed us (LISTEN_FD_ENV): only an
        AF_UNIX stream socket listening at exactly our -engine-socket path."""
        where = f"engine: {LISTEN_FD_ENV}={value}"
        try:
            fd = int(value)
            if fd < 0:
                raise ValueError(value)
            mode = os.fstat(fd).st_mode
        except ValueError:
            raise StartupError(f"{where}: not a file descriptor") from None
        except OSError as exc:
            raise StartupError(f"{where}: {go_strerror(exc)}") from None
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"{where}: not a socket")
        sock = socket.socket(fileno=fd)
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            name = sock.getsockname()
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
                raise StartupError(f"{where}: not a listening Unix stream socket")
            if name != self.path:
                raise StartupError(f"{where}: listens at {name!r}, not at -engine-socket "
                                   f"{self.path}")
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise StartupError(f"{where}: {self.path} is {_kind(st.st_mode)}, not a socket")
        except OSError as exc:
            sock.detach()
            raise StartupError(f"{where}: {go_strerror(exc)}") from None
        except StartupError:
            sock.detach()  # not ours to close: whatever it is, it was not handed to us
            raise
        self._adopted_id = (st.st_dev, st.st_ino)
        sock.set_inheritable(False)  # nothing we start (a later reload's engine) may hold it
        sock.setblocking(False)
        return sock

    def _unlink_own_socket(self) -> None:
        """At stop: remove the path only if it is still the socket this engine created."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self.path)
        except OSError:
            pass  # already gone (deleted by hand): nothing of ours to remove

    def _open(self) -> socket.socket:
        """The engine socket (bound here, or adopted from the engine we replace), and /metrics
        if asked for; StartupError if either fails."""
        # Out of the environment at once: nothing we start may take the name for its own.
        handed = os.environ.pop(LISTEN_FD_ENV, None)
        listener = self._listen() if handed is None else self._adopt(handed)
        try:
            self._open_metrics()
        except StartupError:
            listener.close()
            self._unlink_own_socket()  # only one we bound: an adopted one is still the old engine's
            raise
        return listener

    def _open_metrics(self) -> None:
        if self.config.metrics_addr:
            from proxy.ground.metrics import start_metrics  # only paid for when asked

            self._metrics = start_metrics(self.config.metrics_addr, self.stats,
                                          self.engine_stats, self._refresh_from_thread)

    def _refresh_from_thread(self) -> None:
        if self.pool is not None:
            self.pool.refresh_from_thread()

    async def _start_workers(self) -> None:
        """The worker processes (-workers N, default auto: one per CPU we may run on), unless
        that is 1; if they cannot start, serve here."""
        count = self.config.workers or available_cpus()
        if count <= 1:
            return
        # Before the workers are forked: the start-up objects they share with us stay shared
        # only if our collections never touch them again (proxy.modes.workers._fork_worker).
        freeze_startup()
        pool = WorkerPool(count, sys.argv[1:], self.engine_stats)
        if await pool.start():
            self.pool = pool

    async def serve(self, status: StatusPipe) -> int:
        try:
            listener = self._open()
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            status.fail(str(exc))
            return 1
        try:
            await self._start_workers()  # before the first mapping, and before "0"
        except BaseException:
            listener.close()
            self._unlink_own_socket()
            raise
        status.ready()
        if self._adopted_id is not None:
            self._socket_id = self._adopted_id  # the old engine lets go of it now: ours to remove
        print(f"pyproxy engine serving {self.path} (pid {os.getpid()})", flush=True)
        log.info("engine serving %s (pid %d)", self.path, os.getpid(), extra={"socket": self.path})
        loop = asyncio.get_running_loop()
        # READY=1 lets systemd start dockerd, and stop us: sent once the loop runs, with the
        # stop handlers (stop_requested, installed first thing in launch) in place.
        loop.call_soon(sdnotify.ready, f"serving {self.path}")
        freeze_startup()
        stop = stop_requested()
        reload_wanted = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR2, reload_wanted.set)
        self._last_busy = loop.time()
        accepting = loop.create_task(self._accept(listener))
        while True:
            reload_asked = loop.create_task(reload_wanted.wait())
            either: set[asyncio.Future[Any]] = {stop, reload_asked}
            idle = None
            if self.config.engine_idle_exit:  # an engine a spawn started goes once unused
                idle = loop.create_task(self._idle_for(self.config.engine_idle_exit))
                either.add(idle)
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            reload_asked.cancel()
            if idle is not None and not idle.cancel() and not stop.done():  # it had finished
                await self._retire(listener, accepting, stop)
                sdnotify.stopping()
                await self._close_metrics(wait=False)
                break
            if stop.done():
                await self._stop_accepting(listener, accepting)
                self._unlink_own_socket()
                sdnotify.stopping()
                await self._close_metrics(wait=False)
                break
            reload_wanted.clear()
            await self._close_metrics(wait=True)  # the new engine binds the same address
            # We accept on meanwhile: a spawn registers here (and re-attaches with the rest
            # below) or stays queued on the socket for the new engine, which accepts on it too.
            if await self._reload(listener):
                await self._stop_accepting(listener, accepting)
                self._socket_id = None  # the new engine's now: never ours to remove
                await self._hand_over()
                # The waiters re-attach to the new engine; what is open here may finish.
                await asyncio.gather(*(publication.close(self.config.drain_timeout)
                                       for publication in list(self.publications)))
                if self.pool is not None:
                    await self.pool.close(self.config.drain_timeout)
                log.info("engine reloaded; this one (pid %d) is done", os.getpid())
                return 0
            try:
                self._open_metrics()  # serve on, as if nothing had been asked
            except StartupError as exc:
                log.error("reload failed, and /metrics cannot be served again: %s", exc)
        for publication in list(self.publications):
            await publication.close()
        if self.pool is not None:
            await self.pool.close(0.0)
        log.info("engine stopped; released %d mapping(s)", len(self.publications))
        return 0

    @staticmethod
    async def _stop_accepting(listener: socket.socket, accepting: asyncio.Task[None]) -> None:
        accepting.cancel()
        await asyncio.wait((accepting,))  # its reader is off the listener's fd: then close
        listener.close()

    async def _close_metrics(self, wait: bool) -> None:
        """Stop /metrics; with `wait`, only once its port is free again."""
        server, self._metrics = self._metrics, None
        if server is None:
            return
        if wait:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: (server.shutdown(), server.server_close()))
        else:
            from proxy.ground.metrics import stop_metrics

            stop_metrics(server)

    async def _reload(self, listener: socket.socket) -> bool:
        """Start the installed pyproxy with this engine's command line, handing it `listener`
        (on _RELOAD_LISTEN_FD, named by LISTEN_FD_ENV in its environment only), and wait for
        its "0" on a status pipe: True if it came, False if it did not start."""
        loop = asyncio.get_running_loop()
        command = pyproxy_command(sys.argv[1:])
        read_end, write_end = os.pipe()
        if write_end == STATUS_FD:  # dup2 onto itself would keep close-on-exec
            write_end = os.dup(STATUS_FD)
            os.close(STATUS_FD)
        try:
            # A copy above both targets: neither dup2 in the child overwrites the other's source.
            handed = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, _RELOAD_LISTEN_FD + 1)
        except OSError as exc:  # out of fds
            log.error("reload: cannot hand the engine socket over: %s", go_strerror(exc))
            os.close(read_end)
            os.close(write_end)
            return False
        try:
            pid = os.posix_spawn(command[0], command,
                                 {**os.environ, LISTEN_FD_ENV: str(_RELOAD_LISTEN_FD)},
                                 file_actions=[(os.POSIX_SPAWN_DUP2, write_end, STATUS_FD),
                                               (os.POSIX_SPAWN_DUP2, handed, _RELOAD_LISTEN_FD)])
        except OSError as exc:
            log.error("reload: cannot start %s: %s", command[0], go_strerror(exc))
            os.close(read_end)
            return False
        finally:
            os.close(write_end)
            os.close(handed)
        try:
            answer = await asyncio.wait_for(_read_to_eof(read_end), RELOAD_TIMEOUT)
        except TimeoutError:
            answer = b"1\nno answer within %gs" % RELOAD_TIMEOUT
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(read_end)
        if answer != b"0\n":
            log.error("reload: the new engine (pid %d) did not start: %s", pid,
                      answer[2:].decode(errors="replace") or "it exited")
            await loop.run_in_executor(None, os.waitpid, pid, 0)  # no zombie left behind
            return False
        log.info("reload: engine pid %d serves %s; handing %d mapping(s) over to it", pid,
                 self.path, len(self.publications))
        return True

    async def _hand_over(self) -> None:
        """Once we accept no more: let every registration being served get its answer, then
        stop accepting on every mapping and end every waiter's connection, so each re-attaches
        its held sockets to the new engine (clients queue in the kernel meanwhile). Cancelling
        one not yet answered would fail its spawn (it reads EOF, not "0")."""
        if self._settling:
            self._settled = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._settled,), timeout=SETTLE_TIMEOUT)
        for publication in self.publications:
            publication.stop_accepting()  # our copies of the sockets: the waiters hold theirs
        if self.pool is not None:
            await self.pool.quiesce()  # and the workers': from now on the new engine accepts
        for task in list(self._tasks):
            task.cancel()  # closes each waiter's connection: it re-attaches

    async def _retire(self, listener: socket.socket, accepting: asyncio.Task[None],
                      stop: asyncio.Future[int]) -> None:
        """No registration has been open for -engine-idle-exit: go, without losing one that
        races the exit."""
        log.info("engine: no mapping for %gs: exiting", self.config.engine_idle_exit)
        # From here a spawned pyproxy finds no socket and starts a new engine (under the lock
        # beside the socket, proxy.handover); one that connected before the unlink is still
        # queued on our listener: keep accepting a moment, take what is queued, then close.
        self._unlink_own_socket()
        await asyncio.wait((stop,), timeout=RETIRE_GRACE)
        accepting.cancel()
        # Its reader must be off the listener's fd before the listener closes, or a socket
        # that gets the fd number next would find it taken (and the loop fails its transport).
        await asyncio.wait((accepting,))
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # BlockingIOError: the queue is empty
                break
            self._register(conn)
        listener.close()
        drained = asyncio.get_running_loop().create_task(self._idle_for(0))
        await asyncio.wait((stop, drained), return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()

    async def _idle_for(self, delay: float) -> None:
        """Return once no registration (being read, starting or held) has been open for `delay`."""
        loop = asyncio.get_running_loop()
        while True:
            if self._tasks:
                self._became_idle = loop.create_future()
                await self._became_idle
                continue
            left = self._last_busy + delay - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def _accept(self, listener: socket.socket) -> None:
        """Register every spawn that connects, until cancelled (an idle exit, a reload).

        The kernel's accept and the registration happen in one step, so a cancel leaves each
        spawn registered or still queued on the socket. Not loop.sock_accept(): it accepts
        in a callback and resumes us a turn later, and a cancel in between loses the
        connection (the spawn reads EOF and fails)."""
        while True:
            await wait_fd(listener.fileno())
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break  # the queue is empty
                except OSError as exc:  # out of fds: back off rather than spin
                    log.warning("engine: accept: %s", exc.strerror,
                                extra={"reason": exc.strerror})
                    await asyncio.sleep(0.5)
                    break
                self._register(conn)

    def _register(self, conn: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._registration(conn))
        self._tasks.add(task)
        self._settling.add(task)
        task.add_done_callback(self._registration_done)

    def _answered(self, task: asyncio.Task[Any] | None) -> None:
        """`task`'s registration has its answer (or ended): a reload may hand it over now."""
        if task is not None:
            self._settling.discard(task)
        if not self._settling and self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    def _registration_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._answered(task)
        self._last_busy = asyncio.get_running_loop().time()
        if not self._tasks and self._became_idle is not None and not self._became_idle.done():
            self._became_idle.set_result(None)

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
            peer = {"peer_pid": pid, "peer_uid": uid}
            if uid not in (0, os.geteuid()):
                log.warning("engine: refused pid %d, uid %d: only root or uid %d may register "
                            "or list", pid, uid, os.geteuid(),
                            extra={**peer, "reason": "permission denied"})
                await self._reply(conn, 1, "engine: permission denied")
                return
            try:
                request, early = await asyncio.wait_for(receive_request(conn, fds),
                                                        REQUEST_TIMEOUT)
                if request == LIST_REQUEST:
                    if self.pool is not None:
                        await asyncio.wait_for(self.pool.refresh(), REQUEST_TIMEOUT)
                    log.debug("engine: pid %d asked for the list of %d mapping(s)", pid,
                              len(self.stats), extra=peer)
                    await self._reply_raw(conn, encode_list_reply(
                        [row.to_json() for row in rows_from_stats(self.stats)]))
                    return
                config, reattach, argv = _config_for(request)
            except TimeoutError:
                log.warning("engine: pid %d sent no request within %gs; closed", pid,
                            REQUEST_TIMEOUT, extra={**peer, "reason": "no request"})
                await self._reply(conn, 1, f"engine: no request within {REQUEST_TIMEOUT:g}s")
                return
            except WireError as exc:
                log.warning("engine: malformed request from pid %d: %s", pid, exc,
                            extra={**peer, "reason": str(exc)})
                await self._reply(conn, 1, f"engine: malformed request: {exc}")
                return
            except UsageError as exc:
                log.debug("engine: pid %d: refused its command line: %s", pid, exc,
                          extra={**peer, "reason": str(exc)})
                await self._reply(conn, 2, str(exc))
                return
            log.debug("engine: pid %d %s %s", pid, "re-attaches" if reattach else "registers",
                      ", ".join(map(str, config.mappings)), extra=peer)
            if reattach and len(fds) != len(config.mappings):
                log.warning("engine: refused a re-attach from pid %d: %d socket(s) for %d "
                            "mapping(s)", pid, len(fds), len(config.mappings),
                            extra={**peer, "reason": "socket count"})
                await self._reply(conn, 1, f"engine: re-attach: {len(fds)} socket(s) held for "
                                  f"{len(config.mappings)} mapping(s)")
                return
            while not reattach and len(fds) > 1:
                os.close(fds.pop())  # one listening socket per registration, no more
            try:
                publication = await asyncio.wait_for(self._start(config, fds, reattach, argv),
                                                     ANSWER_TIMEOUT)
            except TimeoutError:
                log.warning("engine: pid %d: could not start %s within %gs", pid,
                            ", ".join(map(str, config.mappings)), ANSWER_TIMEOUT,
                            extra={**peer, "reason": "timeout"})
                await self._reply(conn, 1, f"engine: could not start the mapping within "
                                  f"{ANSWER_TIMEOUT:g}s")
                return
            except StartupError as exc:
                if reattach:
                    log.warning("engine: refused a re-attach from pid %d: %s", pid, exc,
                                extra={**peer, "reason": str(exc)})
                else:
                    log.debug("engine: pid %d: cannot start: %s", pid, exc,
                              extra={**peer, "reason": str(exc)})
                await self._reply(conn, 1, str(exc))
                return
            finally:
                for fd in fds:  # passed but not adopted: close it now, not at the mapping's end
                    os.close(fd)
                fds.clear()
            lines = publication.lines()
            if reattach:
                # What the dead engine had open on these mappings is lost, and no one left
                # knows how much: only the mappings themselves are counted.
                self.engine_stats.reattached_mappings += len(lines)
                for mapping in publication.published():
                    log.info("re-attached %s (pid %d)", mapping, pid,
                             extra={**peer, **mapping_fields(mapping)})
                await self._reply(conn, 0, "\n".join(lines))
            else:
                for mapping in publication.published():
                    log.info("serving %s", mapping, extra={**peer, **mapping_fields(mapping)})
                # The waiter holds a copy of each listening socket, so they outlive us.
                await self._reply(conn, 0, "\n".join(lines),
                                  [sock.fileno() for sock in publication.sockets])
            self._answered(asyncio.current_task())
            stop = b"stop" in early or await self._held_until_stop(conn)
            await self._release(publication)
            publication = None
            if stop:
                await self._reply_raw(conn, b"ok\n")
        except asyncio.CancelledError:
            raise  # the engine is stopping: serve() releases every mapping
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- one registration must not end the rest
            log.error("engine: registration from pid %d failed: %r", pid, exc,
                      extra={"peer_pid": pid, "reason": repr(exc)})
            await self._reply(conn, 1, f"engine: internal error: {exc!r}")
            if publication is not None:
                await self._release(publication)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _start(self, config: Config, fds: list[int], reattach: bool,
                     argv: list[str]) -> Publication:
        """Open the mapping (adopting the passed socket if -use-listen-fd, the held ones on a
        re-attach), on the workers if there are; StartupError if not."""
        serve = self.pool is None  # with workers, this process only binds and holds
        if reattach:
            publication = Publication(config, None, held=fds, serve=serve)  # takes each fd it wraps
            await publication.open()
        else:
            listen_fd = fds.pop(0) if (config.use_listen_fd and fds) else None
            publication = Publication(config, listen_fd, serve=serve)
            try:
                await publication.open()
            except StartupError:
                if listen_fd is not None and _not_a_socket(listen_fd):
                    os.close(listen_fd)  # never wrapped in a socket object, so still ours to close
                raise
        if self.pool is not None:
            try:
                await self.pool.add(publication, argv)
            except BaseException:
                await publication.close()
                raise
        self.publications.add(publication)
        self.stats.update(publication.stats)
        return publication

    async def _release(self, publication: Publication) -> None:
        self.publications.discard(publication)
        for mapping in publication.stats:
            self.stats.pop(mapping, None)
        if self.pool is not None:
            await self.pool.remove(publication, 0.0)
        await publication.close()
        for mapping in publication.published():
            log.info("released %s", mapping, extra=mapping_fields(mapping))

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

    async def _reply(self, conn: socket.socket, status: int, body: str,
                     fds: list[int] | None = None) -> None:
        try:
            reply = encode_reply(status, body)
        except WireError:  # a reply over the frame limit (thousands of mappings)
            reply, fds = encode_reply(1, "engine: the reply does not fit the protocol's frame"), None
        if fds:
            # The first bytes carry the fds; the reply is this connection's first send, so
            # its buffer is empty and it goes at once (the rest, if any, as any reply).
            try:
                sent = conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", fds).tobytes())])
            except BlockingIOError:
                sent = 0  # cannot happen on an empty buffer; the waiter then holds nothing
            except OSError:
                return  # the spawned process is gone
            reply = reply[sent:]
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
