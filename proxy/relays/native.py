"""TCP mappings relayed in C: proxy/relays/_native.c, built with PYPROXY_COMPILE=1 (setup.py).

With the relay in Python, a short connection costs about twice Go's user-space work for the
same system calls (benchmarks/README.md, "New connections"): CPython and uvloop, per accept,
dial, read and close. The C relay does all of that for one listener behind one epoll set,
which the event loop watches like any other fd; Python runs once per wake-up, for however
many connections and reads it covers.

It serves a mapping that needs nothing only the Python relay (proxy.relays.tcp) does; any of
-allow, -proxy-protocol, -transparent, -idle-timeout, -dial-retry, the access log or debug
logging keeps that one. PYPROXY_NATIVE=0 keeps it for every mapping (for comparisons, and as
the way out should the C relay ever misbehave).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from proxy.ground import accesslog
from proxy.ground.config import Mapping, RelayOptions
from proxy.ground.logs import mapping_fields
from proxy.ground.sockets import BACKLOG, KEEPALIVE_SECONDS, dial_error
from proxy.ground.stats import DIAL_BUCKETS, MappingStats
from proxy.relays.base import StreamListener

try:
    from proxy.relays._native import Relay as _Core
except ImportError:  # a pure-Python build
    _Core = None

log = logging.getLogger("pyproxy")

# What _native.c reports to on_event (its EV_* constants).
_DIAL_FAILED = 1
_SHORTAGE = 2


def available() -> bool:
    """Whether this install has the C relay, and it is not turned off (PYPROXY_NATIVE=0)."""
    return _Core is not None and os.environ.get("PYPROXY_NATIVE", "") != "0"


def serves(mapping: Mapping, options: RelayOptions) -> bool:
    """Whether the C relay serves this mapping: TCP, and nothing asked of it that only the
    Python relay does (per connection: an address check, a header, a log line, a sweep)."""
    return (mapping.proto == "tcp" and available()
            and not (options.allow or options.proxy_protocol or options.transparent
                     or options.idle_timeout or options.dial_retry)
            and accesslog.current is None and not log.isEnabledFor(logging.DEBUG)
            and "%" not in str(mapping.container_ip))  # a zone: connect() needs its scope id


class NativeTcpListener(StreamListener):
    """Serves one TCP mapping through the C relay; the same Relay as proxy.relays.tcp's."""

    def __init__(self, mapping: Mapping, port: int, options: RelayOptions,
                 stats: MappingStats) -> None:
        super().__init__(mapping, port, options, stats)
        self.backend_text = mapping.backend()
        self._sock: socket.socket | None = None
        self._core: _Core | None = None  # type: ignore[valid-type]
        self._stopped = False

    @property
    def open_count(self) -> int:
        return self._core.open_count if self._core is not None else 0  # type: ignore[attr-defined]

    async def start(self, sock: socket.socket, *, adopted: bool = False) -> None:
        assert _Core is not None
        self.loop = asyncio.get_running_loop()
        # As create_server() does for the Python relay: listen again, with our backlog (an
        # adopted socket keeps the rest of dockerd's choices).
        sock.listen(BACKLOG)
        sock.setblocking(False)
        host, port = self._backend
        core = _Core(sock.fileno(), self.mapping.backend_family, host, port, self.dial_timeout,
                     self.max_conns, KEEPALIVE_SECONDS, self.stats, DIAL_BUCKETS, self._event)
        self._sock, self._core = sock, core
        self.loop.add_reader(core.fileno(), core.run)

    def stop_accepting(self) -> None:
        """Take no new client: what is queued in the kernel stays for the socket's other
        holders (a waiter, the next worker). Our copy of the socket is closed."""
        if self._stopped:
            return
        self._stopped = True
        if self._core is not None:
            self._core.stop_accepting()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def abort_all(self) -> int:
        """Close every open connection now; returns how many there were. Once accepting has
        stopped too, nothing more can happen here: the C relay lets go of its fds."""
        core = self._core
        if core is None:
            return 0
        aborted: int = core.abort_all()
        if self._stopped:
            self.loop.remove_reader(core.fileno())
            core.close()
            self._core = None
        return aborted

    def _event(self, kind: int, client: tuple[str, int] | None, err: int) -> None:
        """What the C relay reports after a run(): a failed dial (err 0: -dial-timeout), or an
        accept that ran out of fds or memory (the loop's handler rate-limits those lines)."""
        if kind == _DIAL_FAILED:
            exc: BaseException = TimeoutError() if err == 0 else OSError(err, os.strerror(err))
            reason = dial_error(exc)
            peer = accesslog.hostport(client)
            log.warning("%s %s: client %s: dial %s: %s", self.mapping.proto,
                        self.mapping.frontend(), peer, self.backend_text, reason,
                        extra={**mapping_fields(self.mapping), "client": peer, "reason": reason})
        elif kind == _SHORTAGE:
            # asyncio's own words for a shortage; anything else is the listener failing.
            shortage = err in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
            self.loop.call_exception_handler({
                "message": ("socket.accept() out of system resource" if shortage
                            else "socket.accept() failed; retrying shortly"),
                "exception": OSError(err, os.strerror(err)),
            })
        else:  # pragma: no cover  (a new event the C relay learnt and this did not)
            log.error("native relay: unknown event %d (errno %s)", kind,
                      errno.errorcode.get(err, err))
