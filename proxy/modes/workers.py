"""The engine's worker processes (`pyproxy -engine -workers N`): the engine stays the
supervisor, owning its Unix socket, every waiter's connection and every listening socket;
N workers, each its own interpreter and event loop, serve the mappings it hands them.

Each worker is forked from the supervisor (see _fork_worker: it shares the supervisor's
interpreter, modules and start-up heap copy-on-write: ~4 MiB of its own instead of the
~16 MiB of a fresh interpreter), keeps only its end of an AF_UNIX SOCK_SEQPACKET socketpair
and stdio, and shows `pyproxy-engine-worker PID SLOT` in `ps`. Messages are one JSON
object per packet; "add" carries the mapping's listening sockets (SCM_RIGHTS):

  supervisor -> worker   {"op": "add", "id", "key", "argv", "only": [i...]} + sockets
                         {"op": "drop", "id", "key", "drain"}  {"op": "quiesce", "id"}
                         {"op": "stats", "id"}                 {"op": "exit", "id", "drain"}
  worker -> supervisor   {"op": "hello"} once serving, then {"id", "error"?, "stats"?} per request

The argv is the registration's, already checked by the supervisor; the worker builds its
Publication from it exactly as a re-attach does (proxy.ground.sockets.adopt_held_socket), on
the mappings listed in "only". A TCP or SCTP mapping goes to every worker: one listening
socket, one accept queue that every worker's epoll takes from, and that the supervisor keeps
open, so a worker's death loses no queued client. A UDP mapping goes to one worker, so a
client's flow, its backend source port and its timeout stay in one process.

A worker that dies is reaped, counted, logged in one line and started again in its slot, and
given every mapping its slot serves. A worker exits when its supervisor does
(PR_SET_PDEATHSIG, and EOF on its socket).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from proxy.ground.budget import process_budget, share_ports
from proxy.ground.flags import config_from_args, parse_args
from proxy.ground.logs import reopen_log_file
from proxy.ground.sockets import StartupError, go_strerror, wait_fd
from proxy.ground.stats import EngineStats, MappingStats
from proxy.ground.wire import MAX_HELD
from proxy.modes.publication import Publication

log = logging.getLogger("pyproxy")

# A worker's title (`ps`) is "pyproxy" + WORKER_FLAG + " PID SLOT": one word, so that nothing
# taking argv[0] or argv[1] for "pyproxy" (or any word of it for "-engine") counts it as one.
WORKER_FLAG = "-engine-worker"
HELLO_TIMEOUT = 15.0  # a fork starts at once, but a loaded host may not run it soon
CALL_TIMEOUT = 10.0
REPORT_INTERVAL = 1.0  # how stale "lost connections" and the metrics sums may be, at most
_PACKET = 1 << 22
_FD_SPACE = socket.CMSG_SPACE(4 * MAX_HELD)
_BUFFER = 1 << 22  # a stats reply for thousands of mappings is one packet
_FIELDS = [f.name for f in attrs.fields(MappingStats)]
_GAUGES = {"active", "flows_active"}  # what is open now: not carried over from a dead worker
_PR_SET_PDEATHSIG = 1


class WorkerGone(Exception):
    """The worker died before it answered."""


def _stats_values(stats: MappingStats) -> list[Any]:
    return [getattr(stats, name) for name in _FIELDS]


def _add_values(total: MappingStats, values: Sequence[Any], gauges: bool = True) -> None:
    for name, value in zip(_FIELDS, values, strict=True):
        if name in _GAUGES and not gauges:
            continue
        current = getattr(total, name)
        if isinstance(current, list):
            for i, item in enumerate(value):
                current[i] += item
        else:
            setattr(total, name, current + value)


def _reset(stats: MappingStats) -> None:
    for name in _FIELDS:
        current = getattr(stats, name)
        if isinstance(current, list):
            current[:] = [0] * len(current)
        else:
            setattr(stats, name, type(current)(0))


async def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while True:
        try:
            sock.sendmsg([data], ancillary)
            return
        except BlockingIOError:
            await wait_fd(sock.fileno(), writable=True)


async def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the fds that came with it; None at EOF."""
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(_PACKET, _FD_SPACE)
        except BlockingIOError:
            await wait_fd(sock.fileno())
            continue
        except (ConnectionResetError, OSError):
            return None
        fds: list[int] = []
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        return json.loads(data), fds


def _channel_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
    ours.setblocking(False)
    return ours, theirs


# -- the supervisor's side ------------------------------------------------------------------


@attrs.define(eq=False)
class _Entry:
    """One publication as the workers serve it."""

    key: int
    argv: list[str]
    publication: Publication
    targets: dict[int, list[int]]  # worker slot -> the indexes of the mappings it serves
    retired: list[MappingStats]  # per mapping: what dead workers had counted


@attrs.define(eq=False)
class _Slot:
    index: int
    pid: int = 0
    channel: socket.socket | None = None
    pending: dict[int, asyncio.Future[dict[str, Any]]] = attrs.Factory(dict)
    # last stats report: entry key -> per mapping served (in "only" order) its values
    report: dict[int, list[list[Any]]] = attrs.Factory(dict)
    retired_accepted: int = 0
    serving: asyncio.Event = attrs.Factory(asyncio.Event)  # up and given its mappings
    flow_budget: list[int] = attrs.Factory(lambda: [0, 0])  # its UDP flow limit and use
    started: float = 0.0


class WorkerPool:
    """The supervisor's workers: start them, hand each publication to those that serve it,
    sum their counters, restart the ones that die."""

    def __init__(self, count: int, engine_argv: Sequence[str], engine_stats: EngineStats) -> None:
        self.slots = [_Slot(i) for i in range(count)]
        self.engine_argv = list(engine_argv)
        self.engine_stats = engine_stats
        self.entries: dict[int, _Entry] = {}
        self._by_publication: dict[Publication, _Entry] = {}
        self._next_id = 0
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> bool:
        """Start every worker; False (none left running) if one cannot start."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(self._spawn(slot) for slot in self.slots))
        except (OSError, WorkerGone, TimeoutError) as exc:
            log.error("engine: cannot start its workers (%s); serving in its own process",
                      exc if not isinstance(exc, OSError) else go_strerror(exc))
            await self.close(0.0)
            return False
        # logrotate signals the engine alone: its workers write to the same files
        self._loop.add_signal_handler(signal.SIGHUP, self._reopen_logs)
        for slot in self.slots:
            slot.serving.set()
            self._track(self._loop.create_task(self._watch(slot)))
        self._track(self._loop.create_task(self._report_loop()))
        log.info("engine: %d workers serving (pids %s)", len(self.slots),
                 ", ".join(str(slot.pid) for slot in self.slots))
        return True

    def _reopen_logs(self) -> None:
        reopen_log_file()
        for slot in self.slots:
            if slot.channel is not None:
                try:
                    os.kill(slot.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass  # dying: its successor opens the file afresh

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, slot: _Slot) -> None:
        """Start the slot's worker and wait for its hello; OSError, WorkerGone or TimeoutError."""
        ours, theirs = _channel_pair()
        loop_class = type(asyncio.get_running_loop())
        for stream in (sys.stdout, sys.stderr):  # or the child writes what is buffered again
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # nobody reads it (or it is closed): nothing to write twice either
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover -- the worker; it never returns into this frame
            _fork_worker(theirs, slot.index, loop_class)
        theirs.close()
        slot.pid = pid
        slot.channel, slot.report, slot.started = ours, {}, time.monotonic()
        # The engine's own flags (for its log options) and how many workers share its ports.
        await _send(ours, {"op": "config", "argv": self.engine_argv, "workers": len(self.slots)})
        hello = await asyncio.wait_for(_receive(ours), HELLO_TIMEOUT)
        if hello is None or hello[0].get("op") != "hello":
            raise WorkerGone(f"worker {slot.index} (pid {slot.pid}) exited as it started")

    async def _watch(self, slot: _Slot) -> None:
        """Read the slot's replies; when its worker dies, restart it (in a task of its own:
        this reader is what the restart's requests are answered through)."""
        channel = slot.channel
        assert channel is not None
        while (message := await _receive(channel)) is not None:
            reply, fds = message
            for fd in fds:
                os.close(fd)
            future = slot.pending.pop(reply.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(reply)
        if not self._closing:
            self._track(asyncio.get_running_loop().create_task(self._died(slot)))

    async def _died(self, slot: _Slot) -> None:
        slot.serving.clear()
        channel, slot.channel = slot.channel, None
        if channel is not None:
            channel.close()
        for future in slot.pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"worker {slot.index} died"))
        slot.pending.clear()
        loop = asyncio.get_running_loop()
        _, status = await loop.run_in_executor(None, os.waitpid, slot.pid, 0)
        if self._closing:
            return
        lost = 0
        for key, per_mapping in slot.report.items():
            entry = self.entries.get(key)
            if entry is None:
                continue
            for index, values in zip(entry.targets.get(slot.index, []), per_mapping, strict=False):
                record = dict(zip(_FIELDS, values, strict=True))
                lost += record["active"] + record["flows_active"]
                slot.retired_accepted += record["accepted"]
                _add_values(entry.retired[index], values, gauges=False)
        slot.report = {}
        self.engine_stats.worker_connections_lost += lost
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        dead_pid, began = slot.pid, time.monotonic()
        while not self._closing:
            try:
                await self._spawn(slot)
            except (OSError, WorkerGone, TimeoutError) as exc:
                log.error("engine: worker %d cannot be started again: %s; retrying", slot.index,
                          go_strerror(exc) if isinstance(exc, OSError) else exc)
                await self._discard(slot)
                await asyncio.sleep(1.0)
                continue
            self._track(loop.create_task(self._watch(slot)))
            try:
                await self._give_all(slot)
            except (WorkerGone, TimeoutError):
                return  # died again: its watch restarts it once more
            break
        if self._closing:
            return
        self.engine_stats.worker_restarts += 1  # once it serves again: what a watcher waits for
        log.warning("engine: worker %d (pid %d) died (%s): %d open connection(s) lost; "
                    "restarted as pid %d in %.0f ms", slot.index, dead_pid, how, lost, slot.pid,
                    (time.monotonic() - began) * 1000,
                    extra={"reason": how, "worker": slot.index})
        slot.serving.set()

    async def _discard(self, slot: _Slot) -> None:
        """A worker that did not start right: gone, reaped, its channel closed."""
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        try:
            os.kill(slot.pid, signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, os.waitpid, slot.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    async def _give_all(self, slot: _Slot) -> None:
        """A restarted worker: every mapping its slot serves."""
        for entry in list(self.entries.values()):
            if slot.index in entry.targets:
                reply = await self._call_raw(slot, *self._add_message(entry, slot.index))
                if "error" in reply:
                    log.error("engine: worker %d could not serve %s again: %s", slot.index,
                              ", ".join(map(str, entry.publication.published())), reply["error"])

    def _add_message(self, entry: _Entry, index: int) -> tuple[dict[str, Any], list[int]]:
        only = entry.targets[index]
        sockets = entry.publication.sockets
        return ({"op": "add", "key": entry.key, "argv": entry.argv, "only": only},
                [sockets[i].fileno() for i in only])

    async def _call_raw(self, slot: _Slot, message: dict[str, Any],
                        fds: Sequence[int] = ()) -> dict[str, Any]:
        if slot.channel is None:
            raise WorkerGone(f"worker {slot.index} is not running")
        self._next_id += 1
        message["id"] = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        slot.pending[self._next_id] = future
        try:
            await _send(slot.channel, message, fds)
        except OSError as exc:
            slot.pending.pop(self._next_id, None)
            raise WorkerGone(f"worker {slot.index}: {go_strerror(exc)}") from None
        return await asyncio.wait_for(future, CALL_TIMEOUT)

    async def _call(self, slot: _Slot, message: dict[str, Any]) -> dict[str, Any] | None:
        """The worker's reply, or None if it died meanwhile (its restart has what it needs)."""
        try:
            return await self._call_raw(slot, dict(message))
        except WorkerGone:
            return None

    async def add(self, publication: Publication, argv: Sequence[str]) -> None:
        """Serve `publication` (bound or adopted by the supervisor) on the workers; returns once
        every worker that serves it does. StartupError (and nothing served) if one cannot."""
        self._next_id += 1
        mappings = publication.published()
        udp = [i for i, m in enumerate(mappings) if m.proto == "udp"]
        shared = [i for i, m in enumerate(mappings) if m.proto != "udp"]
        targets: dict[int, list[int]] = {slot.index: list(shared) for slot in self.slots}
        targets[-1] = shared  # what every slot has: not a UDP load (taken out below)
        for i in udp:
            owner = min(self.slots, key=lambda s: (self._udp_load(s.index, targets), s.index))
            targets[owner.index].append(i)
        del targets[-1]
        targets = {index: sorted(only) for index, only in targets.items() if only}
        entry = _Entry(self._next_id, list(argv), publication, targets,
                       [MappingStats() for _ in mappings])
        self.entries[entry.key] = entry
        self._by_publication[publication] = entry
        errors = []
        for index in targets:
            slot = self.slots[index]
            while True:
                await slot.serving.wait()
                try:
                    reply = await self._call_raw(slot, *self._add_message(entry, index))
                except WorkerGone:
                    continue  # its restart gives it this mapping too, or we send it again
                if "error" in reply:
                    errors.append(reply["error"])
                break
        if errors:
            await self.remove(publication, 0.0)
            raise StartupError(errors[0])

    def _udp_load(self, index: int, targets: dict[int, list[int]]) -> int:
        """UDP mappings the slot serves, those of the publication being added included."""
        load = len(targets.get(index, ())) - len(targets.get(-1, ()))
        for entry in self.entries.values():
            mappings = entry.publication.published()
            load += sum(1 for i in entry.targets.get(index, ()) if mappings[i].proto == "udp")
        return load

    async def remove(self, publication: Publication, drain: float) -> None:
        """Stop serving `publication` on every worker; returns once each has let it go."""
        entry = self._by_publication.pop(publication, None)
        if entry is None:
            return
        self.entries.pop(entry.key, None)
        await asyncio.gather(*(self._call(self.slots[index], {"op": "drop", "key": entry.key,
                                                               "drain": drain})
                               for index in entry.targets), return_exceptions=True)

    async def quiesce(self) -> None:
        """Every worker stops accepting (a reload: the new engine takes the clients)."""
        await asyncio.gather(*(self._call(slot, {"op": "quiesce"}) for slot in self.slots),
                             return_exceptions=True)

    async def refresh(self) -> None:
        """Ask every worker for its counters (bounded by CALL_TIMEOUT)."""
        replies = await asyncio.gather(*(self._call(slot, {"op": "stats"}) for slot in self.slots),
                                       return_exceptions=True)
        for slot, reply in zip(self.slots, replies, strict=True):
            if isinstance(reply, dict) and "stats" in reply:
                slot.report = {int(key): value for key, value in reply["stats"].items()}
                slot.flow_budget = reply.get("budget", [0, 0])
        self._sum()

    def _sum(self) -> None:
        """Each mapping's MappingStats (what /metrics and -list read) := dead workers' counts
        plus every live worker's last report."""
        for entry in self.entries.values():
            for index, stats in enumerate(entry.publication.stats.values()):
                _reset(stats)
                _add_values(stats, _stats_values(entry.retired[index]))
            stats_list = list(entry.publication.stats.values())
            for slot in self.slots:
                for index, values in zip(entry.targets.get(slot.index, []),
                                         slot.report.get(entry.key, []), strict=False):
                    _add_values(stats_list[index], values)
        for slot in self.slots:
            accepted = slot.retired_accepted
            for per_mapping in slot.report.values():
                accepted += sum(values[0] for values in per_mapping)  # "accepted" is first
            self.engine_stats.worker_accepted[slot.index] = accepted
        self.engine_stats.worker_flow_budget = [sum(slot.flow_budget[i] for slot in self.slots)
                                                for i in (0, 1)]

    def refresh_from_thread(self) -> None:
        """For the /metrics thread: refresh on the engine's loop, waiting a moment at most."""
        if self._loop is None or self._closing:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.refresh(), self._loop).result(2.0)
        except Exception:  # noqa: BLE001 -- a scrape then shows the last report's sums
            pass

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 -- the next round tries again
                log.debug("engine: worker stats: %r", exc)

    async def close(self, drain: float) -> None:
        """Every worker lets its connections finish for up to `drain`, then exits."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        running = [slot for slot in self.slots if slot.pid]
        for slot in running:
            if slot.channel is not None:
                try:
                    await _send(slot.channel, {"op": "exit", "id": 0, "drain": drain})
                except OSError:
                    pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain + 2.0
        for slot in running:
            while loop.time() < deadline:
                pid, _ = os.waitpid(slot.pid, os.WNOHANG)
                if pid:
                    break
                await asyncio.sleep(0.02)
            else:
                try:
                    os.kill(slot.pid, signal.SIGKILL)
                    await loop.run_in_executor(None, os.waitpid, slot.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None


# -- the worker's side ----------------------------------------------------------------------


# What a forked worker inherited and must not let go of: dropping the last reference to the
# supervisor's log handlers or access log would close their fds (see _fork_worker).
_inherited: list[object] = []


def _fork_worker(channel: socket.socket, slot: int,
                 loop_class: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """In the child of os.fork() in WorkerPool._spawn: become the slot's worker, then exit.

    Forked, not a new interpreter: every page of the supervisor's modules and start-up heap
    is shared until one side writes to it (the supervisor froze its start-up objects out of
    the collector's sight before the first fork, so its collections don't touch them; we
    freeze everything we inherit for the same reason). What must not be shared is closed:
    every inherited fd but stdio and the channel becomes /dev/null, so the worker holds no
    waiter's connection (their EOF is how a waiter sees its engine go), no listening socket
    it was not given (a released port must be free) and none of the supervisor's event loop;
    the numbers stay taken, so a Python object of the supervisor's that still names one
    (we never unwind into its frames, but a log handler we replace is freed) closes only a
    /dev/null. This frame and the supervisor's below it are never returned to: os._exit."""
    code = 1
    try:
        gc.freeze()
        for signum in (signal.SIGINT, signal.SIGTERM):  # as a new interpreter's start-up does
            signal.signal(signum, _exit_now)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop reopens logs
        for signum in (signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the supervisor loop's: now a /dev/null, but not ours
        _title(["pyproxy" + WORKER_FLAG, str(os.getppid()), str(slot)])
        _blank_inherited_fds(keep={0, 1, 2, channel.fileno()})
        code = worker_main(channel, os.getppid(), slot, loop_class)
    except BaseException:  # noqa: BLE001 -- never unwind into the supervisor's frames
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _exit_now(signum: int, frame: object) -> None:
    os._exit(0)


def _blank_inherited_fds(keep: set[int]) -> None:
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass  # listdir's own fd, closed by now
    os.close(null)


def _title(words: Sequence[str]) -> None:
    """The command line `ps` shows (/proc/self/cmdline), rewritten in place as setproctitle
    does: a forked worker would show the engine's, and whatever looks for the engine by its
    command line (pgrep, a service check, a test) must not find its workers.
    Cut to the length of the original (the engine's, always the longer)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: proc(5)'s 48, 49
    except (OSError, ValueError, IndexError):
        return  # only `ps` would miss it
    size = end - start
    if size <= 0:
        return
    title = b"\0".join(word.encode() for word in words)[: size - 1]
    ctypes.memmove(start, title + bytes(size - len(title)), size)


def worker_main(channel: socket.socket, supervisor: int, slot: int,
                loop_class: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """A worker: serves what comes on `channel` until the supervisor goes, on a new event loop
    of `loop_class` (the supervisor's kind). Its first message is the engine's own argv (for
    its log options)."""
    from proxy.ground import accesslog
    from proxy.ground.accesslog import flush_access_log, setup_access_log
    from proxy.ground.logs import setup_logging

    libc = ctypes.CDLL(None, use_errno=True)
    # SIGKILL, not SIGTERM: a worker that outlived its supervisor even a moment could accept
    # clients that the waiters re-attaching the sockets would otherwise serve.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the prctl: nothing to serve
        return 0
    channel.settimeout(HELLO_TIMEOUT)
    try:
        first = json.loads(channel.recv(_PACKET))
    except (OSError, ValueError):
        return 1  # the supervisor went before it said anything
    config = config_from_args(parse_args(first["argv"]))
    _inherited.extend([log.handlers[:], logging.getLogger("pyproxy.access").handlers[:],
                       accesslog.current])
    share_ports(first.get("workers", 1))  # the engine's share of ports, split between us
    try:
        setup_logging(config)
        setup_access_log(config)
    except OSError as exc:
        print(f"pyproxy worker: {go_strerror(exc)}", file=sys.stderr)
        return 1
    channel.setblocking(False)
    try:
        with asyncio.Runner(loop_factory=loop_class) as runner:
            return runner.run(_Worker(channel, slot).serve())
    except KeyboardInterrupt:
        return 0
    finally:
        flush_access_log()


class _Worker:
    def __init__(self, channel: socket.socket, slot: int) -> None:
        self.channel = channel
        self.slot = slot
        self.publications: dict[int, Publication] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> int:
        from proxy.ground.logs import LoopErrorReporter
        from proxy.modes.signals import stop_requested

        loop = asyncio.get_running_loop()
        loop.set_exception_handler(LoopErrorReporter())
        stop = stop_requested()
        await _send(self.channel, {"op": "hello", "pid": os.getpid()})
        reading = loop.create_task(self._read())
        either: set[asyncio.Future[Any]] = {stop, reading}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        reading.cancel()
        for publication in self.publications.values():
            await publication.close()
        return 0

    async def _read(self) -> None:
        while True:
            message = await _receive(self.channel)
            if message is None:
                return  # the supervisor is gone
            request, fds = message
            if request.get("op") == "exit":
                await asyncio.gather(*(p.close(request.get("drain", 0.0))
                                       for p in self.publications.values()))
                self.publications.clear()
                return
            task = asyncio.get_running_loop().create_task(self._handle(request, fds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, request: dict[str, Any], fds: list[int]) -> None:
        reply: dict[str, Any] = {"id": request.get("id")}
        op = request.get("op")
        try:
            if op == "add":
                await self._add(request, fds)
            elif op == "drop":
                publication = self.publications.pop(request["key"], None)
                if publication is not None:
                    await publication.close(request.get("drain", 0.0))
            elif op == "quiesce":
                for publication in self.publications.values():
                    publication.stop_accepting()
            elif op == "stats":
                reply["stats"] = {str(key): [_stats_values(s) for s in p.stats.values()]
                                  for key, p in self.publications.items()}
                budget = process_budget()
                reply["budget"] = [budget.limit, budget.used]
        except StartupError as exc:
            reply["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 -- one request must not end the worker
            log.error("engine worker %d: %s failed: %r", self.slot, op, exc)
            reply["error"] = f"engine worker: internal error: {exc!r}"
        finally:
            for fd in fds:
                os.close(fd)
            fds.clear()
        try:
            await _send(self.channel, reply)
        except OSError:
            pass  # the supervisor is gone: we are about to be

    async def _add(self, request: dict[str, Any], fds: list[int]) -> None:
        config = config_from_args(parse_args(request["argv"]))
        only = request["only"]
        config = attrs.evolve(config, mappings=[config.mappings[i] for i in only])
        if len(fds) != len(only):
            raise StartupError(f"engine worker: {len(fds)} socket(s) for {len(only)} mapping(s)")
        held = list(fds)
        fds.clear()  # the Publication takes each one it wraps; the rest are closed below
        publication = Publication(config, None, held=held)
        try:
            await publication.open()
        except BaseException:
            for fd in held:
                os.close(fd)
            raise
        old = self.publications.pop(request["key"], None)
        if old is not None:  # sent again after a lost reply: keep one
            await old.close()
        self.publications[request["key"]] = publication
        log.debug("engine worker %d (pid %d) serves %s", self.slot, os.getpid(),
                  ", ".join(map(str, publication.published())))
