"""The access log (-access-log PATH|syslog|-): one line per finished TCP connection, SCTP
association or UDP flow, saying who, where, how much, how long and how it ended.

Off by default and then free: the relays hold `None` and test it only at a connection's
events (accept, FIN, close), never per read. While it is on, each relay adds up the bytes it
reads from either side (TCP sides and SCTP associations of classes of their own; UDP flows
behind one test per datagram): the counts are what the proxy relayed, as HAProxy's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from time import monotonic_ns
from typing import Any

from proxy.ground.config import ProcessOptions
from proxy.ground.logs import ReopenableFileHandler, ReportOnce, open_syslog

# How a connection ended: the `end` field. A FIN is the normal end and the weakest word: a
# reset, a timeout or a shutdown that follows it says more about why the connection is gone.
CLIENT_FIN, BACKEND_FIN = "client-fin", "backend-fin"
CLIENT_RESET, BACKEND_RESET = "client-reset", "backend-reset"
CLIENT_ERROR, BACKEND_ERROR = "client-error", "backend-error"
DIAL_FAILED = "dial-failed"
IDLE_TIMEOUT = "idle-timeout"
REFUSED_ALLOW, REFUSED_MAX_CONNS = "refused-allow", "refused-max-conns"
SHUTDOWN = "shutdown"
UDP_EXPIRED, UDP_EVICTED = "expired", "evicted"
_FINS = (None, CLIENT_FIN, BACKEND_FIN)
# Lines are written in batches, at most this long after their connection ended: one write
# (and for a file one flush) per batch rather than per connection. A second, as nginx's
# buffered access_log's flush=: at 100 connections a second a batch of 0.05 s cost a
# connection more than its own line did.
FLUSH_AFTER = 1.0

# "000" to "999": the milliseconds (and microseconds) of a line's time and duration.
_MILLIS = tuple(f"{n:03d}" for n in range(1000))
# "0.000" to "0.999": a duration under a second, the common case, to the millisecond.
_SUBSECOND = tuple(f"0.{n:03d}" for n in range(1000))

# A line's fixed parts for the connections of one listener (of one local address, for a
# wildcard listener), formatted once: the text between the time and the client's address,
# and the text after it up to the first byte count.
Route = tuple[str, str]


def _host(host: str) -> str:
    """An IPv6 address as written before a port ([v6]); IPv4 on a dual-stack socket as IPv4."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return f"[{host}]"


def hostport(addr: Any) -> str:
    """A socket address as ip:port ([v6]:port); an IPv4 client on a dual-stack socket as IPv4.
    (String work, not ipaddress: this runs for every connection.)"""
    if not addr:
        return "-"
    host = addr[0]
    if ":" in host:
        host = _host(host)
    return f"{host}:{addr[1]}"


class Record:
    """One connection's line, filled in as its events happen (never per read), formatted
    when its batch is written: the client's address is kept as the socket gave it, the times
    as monotonic_ns(), so that the connection itself pays for no string work.

    Made only by AccessLog.open(), which sets every field: a class without an __init__ of
    its own, since calling one (or attrs') cost a Python frame per connection."""

    __slots__ = ("log", "route", "client", "started", "end", "error", "from_client",
                 "from_backend", "open_sides", "closed")
    log: AccessLog
    route: Route
    client: Any  # the client's socket address
    started: int  # monotonic_ns()
    end: str | None
    error: str  # the reason, in Go's words, for a dial failure or a socket error
    from_client: int
    from_backend: int
    open_sides: int  # TCP: the line is written when the last of its sockets has closed
    closed: int  # monotonic_ns() when it was written

    def ended(self, end: str, error: str = "") -> None:
        """Why it ends; a FIN is replaced by anything more telling that follows it."""
        if self.end in _FINS and (end not in _FINS or self.end is None):
            self.end, self.error = end, error

    def side_closed(self) -> None:
        self.open_sides -= 1
        if self.open_sides == 0:
            self.log.write(self)


class AccessLog:
    """Where the lines go, and in which format (-log-format: text or json)."""

    def __init__(self, target: str, fmt: str) -> None:
        self.target = target
        self.json = fmt == "json"
        handler: logging.Handler
        if target == "syslog":
            handler = open_syslog("-access-log")
        elif target == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            handler = ReopenableFileHandler(target)  # raises OSError naming what is wrong
            handler.flag = "-access-log"
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.handler = handler
        self.batched = target != "syslog"  # a syslog message is one line
        # Held by a logger of its own, a child of "pyproxy", so that SIGHUP's reopen finds the
        # file; lines go to the handler directly (a LogRecord per batch, not per connection).
        logger = logging.getLogger("pyproxy.access")
        logger.handlers[:] = [handler]
        logger.propagate = False
        self.pending: list[Record] = []
        # Bounded: a relay's frontends are its listener's address, or a wildcard's local ones.
        self._routes: dict[tuple[str, Any, str], Route] = {}
        self._second_number = -1  # the second since the epoch that _stamp is for
        self._stamp = ""

    def route(self, proto: str, frontend: Any, backend: str) -> Route:
        """The fixed parts of the lines of `proto` connections that reached `frontend` (a
        socket address) and were relayed to `backend`."""
        key = (proto, frontend, backend)
        route = self._routes.get(key)
        if route is None:
            front = hostport(frontend)
            if self.json:
                route = (f'Z", "proto": "{proto}", "client": "',
                         f'", "frontend": {_quote(front)}, "backend": {_quote(backend)}, '
                         '"bytes_from_client": ')
            else:
                route = (f"Z {proto} ", f" {front} {backend} ")
            self._routes[key] = route
        return route

    def open(self, route: Route, client: Any) -> Record:
        """A connection's record, from its route and its client's socket address."""
        r = Record()
        r.log = self
        r.route = route
        r.client = client
        r.started = monotonic_ns()
        r.end = None
        r.error = ""
        r.from_client = r.from_backend = 0
        r.open_sides = 1
        return r  # `closed` is set by write(), before anything reads it

    def write(self, record: Record) -> None:
        # Only the close's time here: the line is formatted when its batch is flushed.
        record.closed = monotonic_ns()
        pending = self.pending
        first = not pending  # the batch's first line starts its timer (no len() call)
        pending.append(record)
        if first:
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (a unit test): write at once
                self.flush()

    def flush(self) -> None:
        records, self.pending = self.pending, []
        if not records:
            return
        # One clock pair per batch, not per line.
        lines = self.format(records, time.time_ns() - monotonic_ns())
        handler = self.handler
        if not self.batched:
            for text in lines:
                handler.handle(logging.makeLogRecord({"msg": text, "levelno": logging.INFO,
                                                      "levelname": "INFO"}))
            return
        # A file or stdout: the batch written to the handler's stream as its emit() would, but
        # without a LogRecord (~7 µs to make: pid, thread, process name...) unless it fails.
        text = "\n".join(lines)
        handler.acquire()
        try:
            stream: Any = handler.stream  # type: ignore[union-attr]  # batched: a stream
            stream.write(text + "\n")
            stream.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": text}))
        else:
            if isinstance(handler, ReportOnce):
                handler.failing = False  # a write worked: the next failure is said again
        finally:
            handler.release()

    def format(self, records: list[Record], to_wall: int) -> list[str]:
        """The lines of `records`; `to_wall` turns their monotonic_ns() into time_ns().

        This is most of what the log costs a connection, so each line is one f-string of
        parts that are cheap to get (callgrind's counts, per line: an int written in decimal
        ~700 instructions, a piece of an f-string ~150, an operation on a nanosecond count
        ~300): the fixed parts formatted once (the route), the client's host and port put in
        the line rather than joined first, milliseconds looked up rather than formatted, a
        duration under a second looked up whole, and the time's second found by comparing the
        close with the current second's bounds, not by dividing (see _second)."""
        lines: list[str] = []
        append = lines.append
        # The wall-clock second the last line fell in, as monotonic_ns() bounds: a batch's
        # lines come in the order their connections closed, so most stay within it.
        second_at = second_end = 0
        stamp = ""
        if self.json:
            for r in records:
                closed = r.closed
                if not second_at <= closed < second_end:
                    second_at, stamp = self._second(closed, to_wall)
                    second_end = second_at + 1_000_000_000
                micros = (closed - r.started + 500) // 1000
                millis = micros // 1000
                head, tail = r.route
                client = r.client
                if client and ":" not in client[0]:  # IPv4: nothing in it that JSON escapes
                    host, sep, port = client[0], ":", client[1]
                else:  # IPv6 (a scope's name may hold what JSON escapes), or none known
                    host, sep, port = _quote(hostport(client))[1:-1], "", ""
                # json.dumps' own quoting for the strings that could hold anything (done once
                # in the route for the frontend and backend); the duration with six decimals.
                error = _quote(r.error) if r.error else "null"
                append(f'{{"time": "{stamp}{_MILLIS[(closed - second_at) // 1_000_000]}'
                       f'{head}{host}{sep}{port}{tail}{r.from_client}, "bytes_from_backend": '
                       f'{r.from_backend}, "duration": '
                       f'{_SUBSECOND[millis] if millis < 1000 else _seconds(millis)}'
                       f'{_MILLIS[micros % 1000]}, "end": "{r.end or "closed"}", '
                       f'"error": {error}}}')
            return lines
        for r in records:
            closed = r.closed
            if not second_at <= closed < second_end:
                second_at, stamp = self._second(closed, to_wall)
                second_end = second_at + 1_000_000_000
            millis = (closed - r.started + 500_000) // 1_000_000  # rounded, as %.3f would
            head, tail = r.route
            client = r.client
            if client and ":" not in client[0]:  # IPv4
                host, sep, port = client[0], ":", client[1]
            else:  # IPv6, or none known
                host, sep, port = hostport(client), "", ""
            # HAProxy's tcplog order, one line: fixed fields, the error (free text) last. Every
            # way to end names itself: "closed" is never expected.
            line = (f"{stamp}{_MILLIS[(closed - second_at) // 1_000_000]}{head}{host}{sep}"
                    f"{port}{tail}{r.from_client} {r.from_backend} "
                    f"{_SUBSECOND[millis] if millis < 1000 else _seconds(millis)}s "
                    f"{r.end or 'closed'}")
            append(f"{line} {r.error}" if r.error else line)
        return lines

    def _second(self, at: int, to_wall: int) -> tuple[int, str]:
        """The wall-clock second that monotonic_ns() `at` falls in: when it began (in
        monotonic_ns()) and the lines' time up to its milliseconds (one strftime a second)."""
        second = (at + to_wall) // 1_000_000_000
        if second != self._second_number:
            self._second_number = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return second * 1_000_000_000 - to_wall, self._stamp


def _seconds(millis: int) -> str:
    """A duration of a second or more, to the millisecond: 61.001."""
    return f"{millis // 1000}.{_MILLIS[millis % 1000]}"


# The process's access log, or None (off). Process-wide like the log file: set once by
# proxy.launch.run before any relay exists; each relay reads it when it is built.
current: AccessLog | None = None


def setup_access_log(config: ProcessOptions) -> None:
    """Open -access-log if given; raises OSError naming what is wrong with the file."""
    global current
    current = AccessLog(config.access_log, config.log_format) if config.access_log else None


def flush_access_log() -> None:
    """At exit: the lines of the last connections, still waiting for their batch."""
    if current is not None:
        current.flush()
