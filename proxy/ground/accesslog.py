"""The access log (-access-log PATH|syslog|-): one line per finished TCP connection, SCTP
association or UDP flow, saying who, where, how much, how long and how it ended.

Off by default and then free: the relays hold `None` and test it only at a connection's
events (accept, FIN, close), never per read. While it is on, each relay adds up the bytes it
reads from either side (TCP and SCTP in classes of their own, chosen once per listener; UDP
flows behind one test per datagram): the counts are what the proxy relayed, as HAProxy's.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from json.encoder import encode_basestring_ascii as _quote  # type: ignore[attr-defined]
from typing import Any

from attrs import define

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
# (and for a file one flush) per batch rather than per connection.
FLUSH_AFTER = 0.05

# "000" to "999": the milliseconds of a line's time and duration.
_MILLIS = tuple(f"{n:03d}" for n in range(1000))

def hostport(addr: Any) -> str:
    """A socket address as ip:port ([v6]:port); an IPv4 client on a dual-stack socket as IPv4.
    (String work, not ipaddress: this runs for every connection.)"""
    if not addr:
        return "-"
    host = addr[0]
    if ":" not in host:
        return f"{host}:{addr[1]}"
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{addr[1]}"
    return f"[{host}]:{addr[1]}"


@define(eq=False)
class Record:
    """One connection's line, filled in as its events happen (never per read)."""

    log: AccessLog
    proto: str
    client: str
    frontend: str
    backend: str
    started: float  # time.monotonic()
    end: str | None = None
    error: str = ""  # the reason, in Go's words, for a dial failure or a socket error
    from_client: int = 0
    from_backend: int = 0
    open_sides: int = 1  # TCP: the line is written when the last of its sockets has closed
    closed: float = 0.0  # time.monotonic() when it was written; formatted at the batch's flush

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
        self._second = -1  # the whole second _stamp is for: one strftime per second
        self._stamp = ""

    def open(self, proto: str, client: Any, frontend: Any | str, backend: str) -> Record:
        """A connection's record; `frontend` an address, or the listener's text for it."""
        if not isinstance(frontend, str):
            frontend = hostport(frontend)
        return Record(self, proto, hostport(client), frontend, backend, time.monotonic())

    def write(self, record: Record) -> None:
        # Only the close's time here: the line is formatted when its batch is flushed.
        record.closed = time.monotonic()
        self.pending.append(record)
        if len(self.pending) == 1:
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (a unit test): write at once
                self.flush()

    def flush(self) -> None:
        records, self.pending = self.pending, []
        if not records:
            return
        to_wall = time.time() - time.monotonic()  # one clock pair per batch, not per line
        lines = [self.format(r, r.closed + to_wall) for r in records]
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

    def format(self, r: Record, now: float) -> str:
        """The line of `r`, closed at `now` (wall-clock time). Milliseconds are looked up, not
        formatted: a float's format or round() costs more than the rest of the line."""
        end = r.end or "closed"  # every way to end names itself; this is never expected
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        stamp = f"{self._stamp}{_MILLIS[int((now - second) * 1000)]}Z"
        if self.json:
            # json.dumps' exact output, without building a dict and an encoder per line: the
            # strings that could hold anything (an address with a scope, the error) quoted by
            # json's own C function; the rest are our constants and numbers.
            error = _quote(r.error) if r.error else "null"
            return (f'{{"time": "{stamp}", "proto": "{r.proto}", "client": {_quote(r.client)}, '
                    f'"frontend": {_quote(r.frontend)}, "backend": {_quote(r.backend)}, '
                    f'"bytes_from_client": {r.from_client}, '
                    f'"bytes_from_backend": {r.from_backend}, '
                    f'"duration": {round(r.closed - r.started, 6)!r}, "end": "{end}", '
                    f'"error": {error}}}')
        ms = int((r.closed - r.started) * 1000 + 0.5)  # rounded to the millisecond, as %.3f
        # HAProxy's tcplog order, one line: fixed fields, the error (free text) last.
        line = (f"{stamp} {r.proto} {r.client} {r.frontend} {r.backend} {r.from_client} "
                f"{r.from_backend} {ms // 1000}.{_MILLIS[ms % 1000]}s {end}")
        return f"{line} {r.error}" if r.error else line


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
