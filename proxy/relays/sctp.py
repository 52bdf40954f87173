"""SCTP relay: forward messages from the frontend (host) to the backend (container) and back,
one SCTP message at a time, each keeping its stream id, payload protocol id and unordered flag.

asyncio's transports treat SCTP as a byte stream: they would merge and split messages and drop
the per-message metadata. So both sockets of an association are driven directly, with
recvmsg()/sendmsg() from the loop's add_reader/add_writer callbacks, and the metadata travels in
SCTP_RCVINFO / SCTP_SNDINFO ancillary data (RFC 6458, section 5.3).

Each direction holds at most one message: while the receiving peer's send buffer is full, that
direction stops reading, and the kernel's receive window pushes back on the sender. SCTP has no
half-close, so the end of either side (SHUTDOWN) closes the association on both (gracefully: the
kernel still delivers what is queued), and an ABORT on one side is passed on as an ABORT.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from time import perf_counter

from proxy.ground import accesslog
from proxy.ground.config import Mapping, RelayOptions
from proxy.ground.logs import mapping_fields
from proxy.ground.sockets import Backoff, abort, dial_error, go_strerror, set_buffer_size
from proxy.ground.stats import MappingStats
from proxy.relays.base import StreamListener
from proxy.relays.idle import IdleSweeper

log = logging.getLogger("pyproxy")

# <linux/sctp.h>; the socket module names none of these.
SOL_SCTP = socket.IPPROTO_SCTP
SCTP_INITMSG = 2
SCTP_NODELAY = 3
SCTP_STATUS = 14
SCTP_RECVRCVINFO = 32
SCTP_SNDINFO = 2  # ancillary data types
SCTP_RCVINFO = 3
SCTP_UNORDERED = 1
MSG_NOTIFICATION = 0x8000

RCVINFO = struct.Struct("HHHIIIIi")  # sid, ssn, flags, ppid, tsn, cumtsn, context, assoc_id
SNDINFO = struct.Struct("HHIIi")  # sid, flags, ppid, context, assoc_id
INITMSG = struct.Struct("HHHH")  # num_ostreams, max_instreams, max_attempts, max_init_timeo
STATUS_HEAD = struct.Struct("iiIHHHHI")  # assoc_id, state, rwnd, unackdata, penddata,
#                                          instrms, outstrms, fragmentation_point, ...
STATUS_SIZE = 256  # sizeof(struct sctp_status) is 152 on x86_64; the kernel wants at least that

RECEIVE_SIZE = 65536  # per recvmsg(); a larger message arrives in parts and is put together
ANCILLARY_SPACE = socket.CMSG_SPACE(RCVINFO.size)
# A message is relayed whole, so it is held whole: past this size the association is aborted
# rather than the proxy buffering without bound (or splitting it, which would corrupt it).
MAX_MESSAGE = 16 * 1024 * 1024
BURST = 64  # messages per wake-up before other sockets get a turn
# Outbound streams we offer clients. The kernel's default is 10, which would stop a container
# from answering on stream 10 and up; each stream costs the kernel a few dozen bytes per
# association, only for streams the client also accepts.
CLIENT_STREAMS = 1024
_DEFAULT_SNDINFO = SNDINFO.pack(0, 0, 0, 0, 0)


def set_association_options(sock: socket.socket) -> None:
    """Per-message metadata on every recvmsg(), and no Nagle-style bundling delay (a proxy
    must not add latency to a request/response protocol)."""
    sock.setsockopt(SOL_SCTP, SCTP_RECVRCVINFO, 1)
    sock.setsockopt(SOL_SCTP, SCTP_NODELAY, 1)


def set_listener_options(sock: socket.socket) -> None:
    """Set once on the listener: Linux copies them into every association it accepts."""
    set_association_options(sock)
    sock.setsockopt(SOL_SCTP, SCTP_INITMSG, INITMSG.pack(CLIENT_STREAMS, 0xFFFF, 0, 0))


def stream_counts(sock: socket.socket) -> tuple[int, int]:
    """(inbound, outbound) streams of a connected one-to-one socket's association."""
    status = sock.getsockopt(SOL_SCTP, SCTP_STATUS, STATUS_SIZE)
    fields = STATUS_HEAD.unpack_from(status)
    return fields[5], fields[6]


def send_info(ancillary: list[tuple[int, int, bytes]]) -> bytes:
    """SCTP_SNDINFO that sends a message as it arrived: same stream, PPID, unordered flag."""
    for level, kind, data in ancillary:
        if level == SOL_SCTP and kind == SCTP_RCVINFO:
            sid, _, flags, ppid, *_ = RCVINFO.unpack_from(data)
            return SNDINFO.pack(sid, flags & SCTP_UNORDERED, ppid, 0, 0)
    return _DEFAULT_SNDINFO


class _Direction:
    """Messages from one socket of an association to the other."""

    __slots__ = ("assoc", "src", "dst", "loop", "parts", "parts_size", "first_info", "pending",
                 "from_client")

    def __init__(self, assoc: Association, src: socket.socket, dst: socket.socket,
                 from_client: bool) -> None:
        self.assoc = assoc
        self.src = src
        self.dst = dst
        self.loop = assoc.loop
        self.from_client = from_client
        self.parts: list[bytes] = []  # a message arriving in parts (partial delivery)
        self.parts_size = 0
        self.first_info = _DEFAULT_SNDINFO
        self.pending: tuple[bytes, bytes] | None = None  # a message waiting for send space

    def start(self) -> None:
        self.loop.add_reader(self.src.fileno(), self.readable)

    def stop(self) -> None:
        """Forget both sockets' callbacks for this direction (before they are closed)."""
        self.loop.remove_reader(self.src.fileno())
        if self.pending is not None:
            self.loop.remove_writer(self.dst.fileno())

    def readable(self) -> None:
        src = self.src
        for _ in range(BURST):
            try:
                data, ancillary, flags, _ = src.recvmsg(RECEIVE_SIZE, ANCILLARY_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                return self.assoc.failed(self, exc)
            if not data:
                return self.assoc.ended(self)  # the peer shut the association down
            if flags & MSG_NOTIFICATION:
                continue  # none are subscribed to; never relay one as data
            if not flags & socket.MSG_EOR:
                if not self.parts:
                    self.first_info = send_info(ancillary)
                self.parts.append(data)
                self.parts_size += len(data)
                if self.parts_size > MAX_MESSAGE:
                    return self.assoc.failed(self, OSError(errno.EMSGSIZE, "message too long"))
                continue
            if self.parts:
                self.parts.append(data)
                data, info = b"".join(self.parts), self.first_info
                self.parts, self.parts_size = [], 0
            else:
                info = send_info(ancillary)
            if not self.send(data, info):
                return

    def send(self, data: bytes, info: bytes) -> bool:
        """Pass one whole message on; False when it must wait (reading stops until then)."""
        try:
            try:
                self.dst.sendmsg([data], [(SOL_SCTP, SCTP_SNDINFO, info)])
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:
                    raise
                # Linux takes no message larger than the socket's send buffer (208 KiB by
                # default). The sender had room for it, so make room for it here too.
                set_buffer_size(self.dst, socket.SO_SNDBUF, len(data))
                self.dst.sendmsg([data], [(SOL_SCTP, SCTP_SNDINFO, info)])
        except (BlockingIOError, InterruptedError):
            if self.pending is None:
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self.writable)
            self.pending = (data, info)
            return False
        except OSError as exc:
            self.assoc.failed(self, exc, sending=True)
            return False
        self.assoc.count(self.from_client, len(data))
        return True

    def writable(self) -> None:
        assert self.pending is not None
        if not self.send(*self.pending):
            return  # still no room (it stays pending), or the association failed
        self.pending = None
        self.loop.remove_writer(self.dst.fileno())
        if self.assoc.closing:
            self.assoc.close()  # that message was all that was left to do
        else:
            self.start()
            self.readable()  # what arrived meanwhile: the reader may not fire again for it


class Association:
    """A client's association and the one dialled to the container for it."""

    __slots__ = ("listener", "loop", "client", "peer", "container", "directions", "dial",
                 "closing", "closed", "messages", "messages_seen", "quiet_since", "record")

    def __init__(self, listener: SctpListener, client: socket.socket, peer: tuple) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.client = client
        self.peer = peer
        self.container: socket.socket | None = None
        self.directions: tuple[_Direction, ...] = ()
        self.dial: asyncio.Task[None] | None = None
        self.closing = False  # one side has ended: close once the last message is out
        self.closed = False
        # -idle-timeout: messages relayed, and the count and time at which a sweep last saw
        # it change (SCTP has no tcp_info clock to ask).
        self.messages = 0
        self.messages_seen = 0
        self.quiet_since = 0.0
        self.record: accesslog.Record | None = None  # set by LoggedAssociation

    def connected(self, container: socket.socket) -> None:
        """The backend answered: relay both ways. Until now the client's messages waited in
        its socket's receive queue (the kernel's window holds the client back)."""
        self.container = container
        self.directions = (_Direction(self, self.client, container, True),
                           _Direction(self, container, self.client, False))
        for direction in self.directions:
            direction.start()

    def count(self, from_client: bool, size: int) -> None:
        stats = self.listener.stats
        self.messages += 1
        if from_client:
            stats.bytes_from_client += size
            stats.messages_from_client += 1
        else:
            stats.bytes_from_container += size
            stats.messages_from_container += 1

    def quiet_for(self, now: float) -> float:
        """For -idle-timeout: quiet since the first sweep that saw no new message, so at most
        one sweep interval short of the truth (0 until the backend answers)."""
        if self.container is None:
            return 0.0
        if self.messages != self.messages_seen or not self.quiet_since:
            self.messages_seen = self.messages
            self.quiet_since = now
            return 0.0
        return now - self.quiet_since

    def close_idle(self) -> None:
        if self.record is not None:
            self.record.ended(accesslog.IDLE_TIMEOUT)  # unless abort_all said "shutdown"
        self.close()

    def ended(self, direction: _Direction) -> None:
        """One side sent SHUTDOWN. SCTP has no half-close: once the message still waiting in
        that direction (if any) is out, close both sides."""
        self.loop.remove_reader(direction.src.fileno())
        self.closing = True
        if self.record is not None:
            self.record.ended(accesslog.CLIENT_FIN if direction.from_client
                              else accesslog.BACKEND_FIN)
        if direction.pending is None:
            self.close()

    def failed(self, direction: _Direction, exc: OSError, *, sending: bool = False) -> None:
        """An ABORT, an error, a message we can't pass on: abort both sides, say why once."""
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE):  # a peer's ABORT needs no line
            side = "container" if direction.from_client == sending else "client"
            peer = accesslog.hostport(self.peer)
            log.warning("sctp %s: client %s: %s %s: %s", self.listener.mapping.frontend(), peer,
                        "send to" if sending else "receive from", side, go_strerror(exc),
                        extra={**mapping_fields(self.listener.mapping), "client": peer,
                               "reason": go_strerror(exc)})
        if self.record is not None:
            client = direction.from_client != sending
            if exc.errno == errno.ECONNRESET:
                self.record.ended(accesslog.CLIENT_RESET if client else accesslog.BACKEND_RESET)
            else:
                self.record.ended(accesslog.CLIENT_ERROR if client else accesslog.BACKEND_ERROR,
                                  go_strerror(exc))
        self.close(abort_all=True)

    def close(self, *, abort_all: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.dial is not None and not self.dial.done():
            self.dial.cancel()
        for direction in self.directions:
            direction.stop()
        for sock in (self.client, self.container):
            if sock is None:
                continue
            if abort_all:
                abort(sock)
            else:
                sock.close()
        self.listener.forget(self)
        if self.record is not None:
            self.record.side_closed()


class LoggedAssociation(Association):
    """An association that adds up its bytes for the access log: a class of its own, so that
    with the log off not even a test is added per message."""

    __slots__ = ()

    def count(self, from_client: bool, size: int) -> None:
        super().count(from_client, size)
        if from_client:
            self.record.from_client += size  # type: ignore[union-attr]
        else:
            self.record.from_backend += size  # type: ignore[union-attr]


class SctpListener(StreamListener):
    """Serves one SCTP mapping: accepts associations, dials the container for each, relays."""

    def __init__(self, mapping: Mapping, port: int, config: RelayOptions, stats: MappingStats) -> None:
        super().__init__(mapping, port, config, stats)
        self.connections: set[Association] = set()
        self._sock: socket.socket | None = None
        self._paused: asyncio.TimerHandle | None = None

    @property
    def open_count(self) -> int:
        return len(self.connections)

    async def start(self, sock: socket.socket, *, adopted: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self._sock = sock
        set_listener_options(sock)
        self.loop.add_reader(sock.fileno(), self._accept)
        if self.idle_timeout:
            self._idle = IdleSweeper(self.loop, self.idle_timeout, self.connections, self.stats)

    def stop_accepting(self) -> None:
        if self._idle is not None:
            self._idle.stop()
        if self._sock is None:
            return
        if self._paused is not None:
            self._paused.cancel()
        else:
            self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    def abort_all(self) -> int:
        """Abort every open association now; returns how many there were."""
        open_now = list(self.connections)
        for assoc in open_now:
            if assoc.record is not None:
                assoc.record.ended(accesslog.SHUTDOWN)
            assoc.close(abort_all=True)
        return len(open_now)

    def forget(self, assoc: Association) -> None:
        if assoc in self.connections:
            self.connections.discard(assoc)
            self.stats.active -= 1
            if self.debug:
                self.log_event("closed", assoc.peer)

    def log_event(self, event: str, peer: tuple) -> None:
        """-log-level debug: an association accepted, refused or closed (never a message)."""
        client = accesslog.hostport(peer)
        log.debug("sctp %s: client %s %s", self.mapping.frontend(), client, event,
                  extra={**mapping_fields(self.mapping), "client": client})

    def _accept(self) -> None:
        listener = self._sock
        assert listener is not None
        for _ in range(BURST):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: say so (rate-limited by the loop's error reporter),
                    # and leave the backlog alone for a second rather than spin on it.
                    self.loop.call_exception_handler(
                        {"message": "socket.accept() out of system resource", "exception": exc})
                    self.loop.remove_reader(listener.fileno())
                    self._paused = self.loop.call_later(1.0, self._resume_accepting)
                    return
                continue  # the client went away before we accepted it
            sock.setblocking(False)
            self._serve(sock, peer)

    def _resume_accepting(self) -> None:
        self._paused = None
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        stats = self.stats
        stats.accepted += 1
        record = None
        if self.access is not None:
            record = self.access.open(self.access.route(self.mapping.proto, sock.getsockname(),
                                                        self.mapping.backend()), peer)
        refused = None
        if self.allow and not self.allow.permits(peer[0]):
            stats.rejected_denied += 1
            refused = accesslog.REFUSED_ALLOW
        elif self.max_conns and len(self.connections) >= self.max_conns:
            stats.rejected_limit += 1
            refused = accesslog.REFUSED_MAX_CONNS
        if refused is not None:
            if self.debug:
                self.log_event(f"refused ({refused})", peer)
            abort(sock)
            if record is not None:
                record.ended(refused)
                record.side_closed()
            return
        assoc = (Association if record is None else LoggedAssociation)(self, sock, peer)
        assoc.record = record
        self.connections.add(assoc)
        stats.active += 1
        assoc.dial = self.loop.create_task(self._dial(assoc))
        if self.debug:
            self.log_event("accepted", peer)

    async def _dial(self, assoc: Association) -> None:
        """Connect to the container for `assoc`, retrying a refusal for up to -dial-retry.
        (A plain asyncio.timeout() per dial: TCP's one-sweeper-per-listener saves a timer per
        connection on its hot path, and is bound to its Protocol pair; associations are few.)"""
        started = perf_counter()  # not loop.time(): see TcpListener.dial
        backoff = Backoff(started, self.dial_retry)
        try:
            async with asyncio.timeout(self.dial_timeout or None):
                while True:
                    try:
                        container = await self._connect(assoc.client)
                        break
                    except ConnectionRefusedError:
                        if not await backoff.retry():
                            raise
        except (OSError, ValueError) as exc:  # TimeoutError is an OSError
            return self._dial_failed(assoc, exc)
        assoc.dial = None
        self.stats.observe_dial(perf_counter() - started)
        assoc.connected(container)

    async def _connect(self, client: socket.socket) -> socket.socket:
        """A connected backend socket whose streams mirror the client's association: as many
        outbound as the client may use toward us, no more inbound than we can pass on."""
        inbound, outbound = stream_counts(client)
        sock = socket.socket(self.mapping.backend_family, socket.SOCK_STREAM, SOL_SCTP)
        try:
            sock.setblocking(False)
            set_association_options(sock)
            sock.setsockopt(SOL_SCTP, SCTP_INITMSG, INITMSG.pack(inbound, outbound, 0, 0))
            await self.loop.sock_connect(sock, self._backend)
        except BaseException:
            sock.close()
            raise
        return sock

    def _dial_failed(self, assoc: Association, exc: OSError | ValueError) -> None:
        assoc.dial = None  # ending now, not to be cancelled by close()
        self.stats.dial_failures += 1
        peer = accesslog.hostport(assoc.peer)
        log.warning("sctp %s: client %s: dial %s: %s", self.mapping.frontend(), peer,
                    self.mapping.backend(), dial_error(exc),
                    extra={**mapping_fields(self.mapping), "client": peer,
                           "reason": dial_error(exc)})
        if assoc.record is not None:
            assoc.record.ended(accesslog.DIAL_FAILED, dial_error(exc))
        assoc.close(abort_all=True)
