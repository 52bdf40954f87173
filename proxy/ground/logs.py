"""Logging that survives dockerd pointing stderr at /dev/null (-log-file PATH or syslog, text
or JSON), and the event loop's own error reports folded into one line each, never a flood.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import logging.handlers
import os
import stat
import sys
import time
from typing import Any

from proxy.ground.config import Mapping, ProcessOptions

log = logging.getLogger("pyproxy")

# Resource exhaustion (EMFILE in accept) is reported by the loop once per failed accept: with a
# backlog of thousands that is a flood. Say it once per this many seconds instead.
EXHAUSTION_LOG_INTERVAL = 10.0
SYSLOG_SOCKET = "/dev/log"


# What every LogRecord has: anything else on a record came from a call's `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


def mapping_fields(mapping: Mapping) -> dict[str, str]:
    """A mapping as a log line's named fields (the `extra=` of a logging call): host -> container."""
    return {"proto": mapping.proto, "frontend": mapping.frontend(), "backend": mapping.backend()}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, pid, then the fields the call named
    with `extra=` (proto, client, frontend, backend, reason...), so a script never has to
    parse the sentence."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


JSONFormatter.converter = time.gmtime


class ReportOnce(logging.Handler):
    """A handler whose failed writes (a full disk, /dev/full, a syslog daemon gone) are said
    once on stderr, not as logging's traceback per line; said again only after a write has
    succeeded in between. The proxy carries on either way: logs never stop traffic."""

    failing = False  # set while writes fail; True from the start if we already said why
    _failed_now = False
    flag = "-log-file"  # the flag that named this target, for the message

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if not self._failed_now:
            self.failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if self.failing:
            return
        self.failing = True
        exc = sys.exc_info()[1]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        try:
            sys.stderr.write(f"pyproxy: {self.flag} {self.target}: cannot write: {reason}; "
                             "log lines are lost until it works again\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # no stderr either: nowhere to say it
            pass

    @property
    def target(self) -> str:
        return "syslog"


class SyslogHandler(ReportOnce, logging.handlers.SysLogHandler):
    pass


class ReopenableFileHandler(ReportOnce, logging.FileHandler):
    """A log file that logrotate can move away: SIGHUP makes us open PATH afresh."""

    @property
    def target(self) -> str:
        return self.baseFilename

    def _open(self):  # type: ignore[no-untyped-def]
        """Opened without blocking: open(2) of a FIFO waits for a reader, which would hang
        start-up before fd 3 is answered. Only a regular file or a character device (a tty,
        /dev/null) is taken: a FIFO, socket or directory is refused, naming what it is."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.baseFilename, flags, 0o666)  # less the umask, as open() does
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads yet: say what it is
                _refuse_unless_file(os.stat(self.baseFilename).st_mode)
            raise
        try:
            _refuse_unless_file(os.fstat(fd).st_mode)
            os.set_blocking(fd, True)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> None:
        try:
            stream = self._open()
        except OSError as exc:  # e.g. after -user, a new file we may not create: keep the old
            log.warning("%s %s: reopen: %s; still writing to the old file",
                        self.flag, self.baseFilename, exc.strerror or exc)
            return
        old = self.setStream(stream)
        if old is not None:
            old.close()


def _refuse_unless_file(mode: int) -> None:
    if stat.S_ISREG(mode) or stat.S_ISCHR(mode):
        return
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a block device" if stat.S_ISBLK(mode) else "not a file")
    raise OSError(f"is {kind}; give a regular file, a character device or 'syslog'")


def open_syslog(flag: str) -> SyslogHandler:
    """A handler for syslog, as `flag` (-log-file, -access-log) asked."""
    # Like openlog(3), a syslog daemon that is not there yet is not an error: each message
    # tries again. But say so once, where someone starting us by hand will see it.
    syslog = SyslogHandler(address=SYSLOG_SOCKET)
    syslog.flag = flag
    if not os.path.exists(SYSLOG_SOCKET):
        sys.stderr.write(f"pyproxy: {flag} syslog: {SYSLOG_SOCKET} does not exist; "
                         "logs are dropped until a syslog daemon listens there\n")
        syslog.failing = True  # just said so: not again for every line
    syslog.ident = f"pyproxy[{os.getpid()}]: "
    return syslog


def setup_logging(config: ProcessOptions) -> None:
    """Configure the "pyproxy" logger; raises OSError naming the file if it can't be opened."""
    handler: logging.Handler
    if config.log_file == "syslog":
        handler = open_syslog("-log-file")
    elif config.log_file:
        handler = ReopenableFileHandler(config.log_file)
    else:
        handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JSONFormatter())
    elif config.log_file == "syslog":
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(config.log_level.upper())
    log.propagate = False


def reopen_log_file() -> None:
    """SIGHUP: open -log-file and -access-log (the "pyproxy.access" logger) afresh."""
    for handler in (*log.handlers, *logging.getLogger("pyproxy.access").handlers):
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


class Throttle:
    """At most one log line per `interval` seconds for one recurring condition, so that a
    flood of failures (one per accept, one per new UDP client) is a line every few seconds
    saying how many more there were."""

    __slots__ = ("interval", "next_at", "held")

    def __init__(self, interval: float = EXHAUSTION_LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = float("-inf")
        self.held = 0  # occurrences not logged since the last line

    def ready(self, now: float) -> int | None:
        """How many occurrences were held back, if a line may be written at `now`; else None
        (and this occurrence is held back too)."""
        if now < self.next_at:
            self.held += 1
            return None
        held, self.held = self.held, 0
        self.next_at = now + self.interval
        return held


class LoopErrorReporter:
    """An event loop exception handler: one log line per error, exhaustion rate-limited."""

    def __init__(self) -> None:
        self._exhaustion = Throttle()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = context.get("message", "event loop error")
        exc = context.get("exception")
        if "out of system resource" in message:
            if self._exhaustion.ready(time.monotonic()) is not None:
                log.warning("accept: %s; backing off and retrying", getattr(exc, "strerror", exc))
            return
        log.error("%s: %r", message, exc)
