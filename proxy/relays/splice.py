"""Zero-copy relaying for bulk flows: socket -> pipe -> socket with splice(2).

Through the transports, every byte is copied into a Python bytes object and out again. For
a sustained transfer that copying is most of the proxy's CPU, so once a direction has shown
it is bulk (several full-size reads over the connection's life, not necessarily in a row) it
switches to splice: the data never leaves the kernel. Chatty connections never switch: for
small messages splice costs the same two system calls as read and write, plus a pipe.

A Splicer takes over one direction. The source transport stops reading (we read through a
dup of its fd, since event loops refuse a reader on a transport's own fd); the destination
transport's write buffer is empty when we start and stays unused in this direction, so
ordering holds. Backpressure is the pipe: when the destination is full, we stop reading
the source until it drains. EOF, errors and closing follow the transport relay's rules.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Protocol

from proxy.ground.sockets import reset
from proxy.ground.stats import MappingStats


class Spliceable(Protocol):
    """The side of a relayed connection a Splicer drives (proxy.relays.tcp's sides): it reads
    through `transport`, writes to `peer`, and counts what the Splicer moves with count()."""

    splicer: Splicer | None

    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def peer(self) -> Spliceable | None: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def stats(self) -> MappingStats: ...

    def count(self, size: int) -> None: ...

    def ended(self) -> None: ...

    def failed(self, exc: BaseException) -> None: ...  # for the access log


# Switch after this many reads of at least SPLICE_MIN_READ bytes (see benchmarks/README.md
# for how the point was measured).
SPLICE_MIN_READ = 64 * 1024
SPLICE_AFTER = 4
PIPE_SIZE = 1024 * 1024  # fewer, larger splices; /proc/sys/fs/pipe-max-size allows 1 MiB
F_SETPIPE_SZ = 1031
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Splicer:
    """Relays src's incoming bytes to src.peer with splice, until EOF, an error or a close."""

    def __init__(self, src: Spliceable) -> None:
        dst = src.peer
        assert dst is not None and src.transport is not None and dst.transport is not None
        self.src, self.dst = src, dst
        self.count = src.count
        self.loop = src.loop
        self.pending = 0  # bytes in the pipe
        self.src_fd = self.dst_fd = self.pipe_r = self.pipe_w = -1
        try:
            self.src_fd = os.dup(src.transport.get_extra_info("socket").fileno())
            self.dst_fd = os.dup(dst.transport.get_extra_info("socket").fileno())
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._close_fds()  # out of fds, say: stay on the copying path
            raise
        try:
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe works too, with more system calls
        src.transport.pause_reading()
        self.loop.add_reader(self.src_fd, self._pump)
        src.stats.spliced += 1

    def _pump(self) -> None:
        """Source readable (or destination writable again): move bytes until one side blocks."""
        count = self.count
        while True:
            if self.pending == 0:
                try:
                    moved = os.splice(self.src_fd, self.pipe_w, PIPE_SIZE, flags=_FLAGS)
                except BlockingIOError:
                    return  # nothing more to read for now
                except OSError as exc:
                    return self._failed(exc, self.src)
                if moved == 0:
                    return self._source_ended()
                self.pending = moved
                count(moved)
            try:
                self.pending -= os.splice(self.pipe_r, self.dst_fd, self.pending, flags=_FLAGS)
            except BlockingIOError:
                # The destination is full: stop reading until it drains (backpressure).
                self.loop.remove_reader(self.src_fd)
                self.loop.add_writer(self.dst_fd, self._drain)
                return
            except OSError as exc:
                return self._failed(exc, self.dst)

    def _drain(self) -> None:
        try:
            self.pending -= os.splice(self.pipe_r, self.dst_fd, self.pending, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._failed(exc, self.dst)
        if self.pending == 0:
            self.loop.remove_writer(self.dst_fd)
            self.loop.add_reader(self.src_fd, self._pump)

    def _source_ended(self) -> None:
        src = self.src
        self.stop()
        src.ended()  # the FIN goes on, as with the transports

    def _failed(self, exc: OSError, side: Spliceable) -> None:
        """`side`'s socket failed: the transports never see it, so say it for the access log."""
        src, dst = self.src, self.dst
        side.failed(exc)
        self.stop()
        # as connection_lost(exc) would: an error on one side is a reset on the other
        if dst.transport is not None:
            reset(dst.transport)
        if src.transport is not None:
            src.transport.abort()

    def stop(self) -> None:
        """Hand the direction back (or just let go, when the connection is closing)."""
        if self.src.splicer is not self:
            return
        self.src.splicer = None
        if self.src_fd >= 0:
            self.loop.remove_reader(self.src_fd)
        if self.dst_fd >= 0:
            self.loop.remove_writer(self.dst_fd)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.src_fd, self.dst_fd, self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.src_fd = self.dst_fd = self.pipe_r = self.pipe_w = -1
