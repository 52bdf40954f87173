"""TCP relay: forward traffic from the frontend (host) to the backend (container) and back.

Each accepted client gets one backend connection, dialled after accept. The pair is two
asyncio Protocols that write each received bytes object straight into the other transport:
no stream readers, no per-connection task on the data path. Flow control is the transports'
own: when one side's write buffer passes its high-water mark, the other side stops reading.
A direction that turns out to be a bulk transfer is handed to proxy.relays.splice (zero-copy).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from proxy.ground import accesslog, proxyproto, transparent
from proxy.ground.config import Mapping, RelayOptions
from proxy.ground.logs import mapping_fields
from proxy.ground.sockets import BACKLOG, Backoff, dial_error, reset, set_keepalive
from proxy.ground.stats import MappingStats
from proxy.relays.base import StreamListener
from proxy.relays.idle import IdleSweeper
from proxy.relays.splice import SPLICE_AFTER, SPLICE_MIN_READ, Splicer

if TYPE_CHECKING:
    from asyncio import BaseTransport, Transport
    from collections.abc import Coroutine

log = logging.getLogger("pyproxy")

# Bytes a write buffer may hold before the peer stops reading. Large enough that a bulk
# transfer rarely stalls on flow control, small enough that 10,000 stuck connections stay
# within a few GiB in the very worst case.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Bytes a client may send before its backend connection exists; beyond this we stop reading.
EARLY_DATA_LIMIT = 256 * 1024
# struct tcp_info (<linux/tcp.h>): tcpi_last_data_recv, milliseconds since data last arrived.
_LAST_DATA_RECV = struct.Struct("I")
_LAST_DATA_RECV_OFFSET = 52


def quiet_seconds(transport: Transport) -> float:
    """Seconds since data last arrived on this connection, by the kernel's clock: what
    -idle-timeout checks, without the relay timing every read (spliced reads included)."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _LAST_DATA_RECV_OFFSET + 4)
    except (OSError, AttributeError):  # closed meanwhile: the close is under way already
        return 0.0
    return _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0] / 1000


class _Side(asyncio.Protocol):
    """One end of a relayed connection. `peer` is the other end, once it exists."""

    __slots__ = ("transport", "peer", "eof", "stats", "loop", "big_reads", "can_splice",
                 "splicer", "record")
    FROM_CLIENT = False  # which way this side's bytes go, for the access log

    def __init__(self, stats: MappingStats, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.stats = stats
        self.loop = loop
        self.big_reads = 0  # full-size reads seen: a bulk direction switches to splice
        self.can_splice = True  # False once a Splicer could not be made (no fds for it)
        self.splicer: Splicer | None = None
        self.record: accesslog.Record | None = None  # the access log's line, if it is on

    def connection_made(self, transport: BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.ended()
        return True  # keep our transport open; we close it once both directions are done

    def ended(self) -> None:
        """Our peer sent its FIN. Half-close: pass it on and keep the reverse direction
        flowing; once both directions have ended, close both ends."""
        self.eof = True
        record = self.record
        if record is not None and record.end is None:  # Record.ended() for a FIN, without a call
            record.end = accesslog.CLIENT_FIN if self.FROM_CLIENT else accesslog.BACKEND_FIN
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if peer.eof:
                self.close()
            else:
                peer.transport.write_eof()

    def count(self, size: int) -> None:
        """Count `size` bytes received on this side (the Splicer counts what it moves here)."""
        raise NotImplementedError

    def big_read(self) -> None:
        """A full-size read: after a few, relay this direction with splice if we can."""
        self.big_reads += 1
        peer = self.peer
        if (self.big_reads >= SPLICE_AFTER and self.splicer is None and self.can_splice
                and peer is not None and peer.transport is not None
                and peer.transport.get_write_buffer_size() == 0):
            try:
                self.splicer = Splicer(self)
            except OSError:
                self.can_splice = False  # no fds for it: stay on the copying path

    # Backpressure: our transport's buffer is full, so stop reading what fills it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        record = self.record
        if record is not None:  # the access log's line is written once both sockets are closed
            if exc is not None:
                self.failed(exc)
            record.open_sides -= 1  # Record.side_closed(), without a call: twice per connection
            if not record.open_sides:
                record.log.write(record)
        peer, self.peer = self.peer, None
        for side in (self, peer):  # neither direction can splice through a closed socket
            if side is not None and side.splicer is not None:
                side.splicer.stop()
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                # An error on one side (a reset, a timeout) reaches the other as a reset.
                if exc is not None:
                    reset(peer.transport)
                else:
                    peer.transport.close()

    def failed(self, exc: BaseException) -> None:
        """For the access log: this side's socket failed (a reset, or another error)."""
        if self.record is not None:
            if isinstance(exc, ConnectionResetError):
                self.record.ended(accesslog.CLIENT_RESET if self.FROM_CLIENT
                                  else accesslog.BACKEND_RESET)
            else:
                self.record.ended(accesslog.CLIENT_ERROR if self.FROM_CLIENT
                                  else accesslog.BACKEND_ERROR, dial_error(exc))

    def close(self) -> None:
        """Both directions done: close both ends after their buffers drain."""
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.close()


class ContainerSide(_Side):
    """The backend connection; what it receives goes to the client."""

    __slots__ = ("header",)

    def __init__(self, client: ClientSide, header: bytes | None) -> None:
        super().__init__(client.stats, client.loop)
        self.peer = client
        self.header = header
        self.record = client.record

    def connection_made(self, transport: BaseTransport) -> None:
        # Pair up here, not after create_connection() returns: the event loop may deliver the
        # container's first bytes before the dialling task resumes.
        super().connection_made(transport)
        client = cast(ClientSide, self.peer)  # a ContainerSide is always dialled for a client
        # Keepalive, which the accepted side inherits from the listener and this one can't (both
        # loops set TCP_NODELAY on the connections they make). Set on one socket object over the
        # transport's fd: the loop's socket wrapper would make and validate (getsockname) a new
        # one for every option.
        wrapper = transport.get_extra_info("socket")
        if wrapper is not None:
            sock = socket.socket(client.listener.mapping.backend_family, socket.SOCK_STREAM,
                                 socket.IPPROTO_TCP, wrapper.fileno())
            try:
                set_keepalive(sock)
            finally:
                sock.detach()
        if client.transport is None or client.transport.is_closing():
            self.peer = self.record = None
            cast("Transport", transport).abort()  # the client left while we were dialling
            return
        if self.record is not None:
            self.record.open_sides += 1
        client.connected(self, self.header)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]
        self.stats.bytes_from_container += len(data)
        if len(data) >= SPLICE_MIN_READ:
            self.big_read()

    def count(self, size: int) -> None:
        self.stats.bytes_from_container += size


class ClientSide(_Side):
    """An accepted client; dials the container, and holds early data until that succeeds."""

    __slots__ = ("listener", "early", "early_size", "dial", "dial_timed_out")
    FROM_CLIENT = True

    def __init__(self, listener: TcpListener) -> None:
        super().__init__(listener.stats, listener.loop)
        self.listener = listener
        self.early: list[bytes] = []
        self.early_size = 0
        self.dial: Dial | None = None
        self.dial_timed_out = False

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        listener = self.listener
        stats = self.stats
        stats.accepted += 1
        access = listener.access
        if access is not None:
            self.record = access.open(
                listener.route or access.route(listener.mapping.proto,
                                               transport.get_extra_info("sockname"),
                                               listener.backend_text),
                transport.get_extra_info("peername"))
        if listener.allow:
            client = transport.get_extra_info("peername")
            if not listener.allow.permits(client[0]):
                stats.rejected_denied += 1
                return self._refuse(accesslog.REFUSED_ALLOW)
        if listener.max_conns and len(listener.connections) >= listener.max_conns:
            stats.rejected_limit += 1
            return self._refuse(accesslog.REFUSED_MAX_CONNS)
        if listener.aborted:  # accepted before the stop, but made after abort_all(): closed too
            return self._refuse(accesslog.SHUTDOWN)
        listener.connections.add(self)
        stats.active += 1
        listener.dial(self)
        if listener.debug:
            listener.log_event("accepted", transport)

    def _refuse(self, why: str) -> None:
        """Reset a client we won't serve; it never counts as active (see connection_lost)."""
        transport, self.transport = self.transport, None
        assert transport is not None
        if self.listener.debug:
            self.listener.log_event(f"refused ({why})", transport)
        reset(transport)
        if self.record is not None:
            self.record.ended(why)
            self.record.side_closed()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
            if len(data) >= SPLICE_MIN_READ:
                self.big_read()
        else:
            self.early.append(data)
            self.early_size += len(data)
            if self.early_size > EARLY_DATA_LIMIT:
                self.transport.pause_reading()  # type: ignore[union-attr]
        self.stats.bytes_from_client += len(data)

    def count(self, size: int) -> None:
        self.stats.bytes_from_client += size

    def eof_received(self) -> bool:
        if self.peer is None:
            if self.record is not None:
                self.record.ended(accesslog.CLIENT_FIN)
            self.eof = True  # delivered after the early data once the backend is connected
            return True
        return super().eof_received()  # ended() says client-fin

    def connected(self, container: ContainerSide, header: bytes | None) -> None:
        """The backend answered: flush what the client sent meanwhile, then relay directly."""
        self.peer = container
        backend = container.transport
        assert backend is not None and self.transport is not None
        if header:
            backend.write(header)
        for chunk in self.early:
            backend.write(chunk)
        self.early = []
        if self.early_size > EARLY_DATA_LIMIT:
            self.transport.resume_reading()
        self.early_size = 0
        if self.eof:
            backend.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused in connection_made: never counted as active
        listener = self.listener
        listener.connections.discard(self)
        self.stats.active -= 1
        if listener.debug:
            listener.log_event("closed", self.transport, exc)
        if self.dial is not None and not self.dial.done():
            self.dial.cancel()
        super().connection_lost(exc)

    def quiet_for(self, now: float) -> float:
        """For -idle-timeout: quiet both ways for how long (0 until the backend answers)."""
        peer = self.peer
        if self.transport is None or peer is None or peer.transport is None:
            return 0.0
        return min(quiet_seconds(self.transport), quiet_seconds(peer.transport))

    def close_idle(self) -> None:
        """Close both ends now (the peers see a FIN; nothing is waiting to be sent)."""
        if self.record is not None:
            self.record.ended(accesslog.IDLE_TIMEOUT)  # unless abort_all said "shutdown"
        for side in (self, self.peer):
            if side is not None and side.transport is not None:
                side.transport.abort()


# With the access log on, the sides are these: each read also adds its size to the line's
# count for its direction. Classes of their own, chosen once per listener, so that with the
# log off a read costs exactly what it did. Their data_received() are their parents' with the
# count added and len() taken once (calling the parent's instead would cost a call per read,
# a tenth of a keep-alive request). The counts are what the proxy read from each side,
# spliced bytes too (through count()), which is what it relayed unless the other side was
# gone: what HAProxy's tcplog counts, where the kernel's would include what a reset left unread.


class LoggedContainerSide(ContainerSide):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]
        self.stats.bytes_from_container += size
        self.record.from_backend += size  # type: ignore[union-attr]  # set while logged
        if size >= SPLICE_MIN_READ:
            self.big_read()

    def count(self, size: int) -> None:
        self.record.from_backend += size  # type: ignore[union-attr]
        ContainerSide.count(self, size)


class LoggedClientSide(ClientSide):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        size = len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)  # type: ignore[union-attr]
            if size >= SPLICE_MIN_READ:
                self.big_read()
        else:
            self.early.append(data)
            self.early_size += size
            if self.early_size > EARLY_DATA_LIMIT:
                self.transport.pause_reading()  # type: ignore[union-attr]
        self.stats.bytes_from_client += size
        self.record.from_client += size  # type: ignore[union-attr]  # set at accept

    def count(self, size: int) -> None:
        self.record.from_client += size  # type: ignore[union-attr]
        ClientSide.count(self, size)


class TcpListener(StreamListener):
    """Serves one TCP mapping: accepts clients, dials the container for each, relays."""

    def __init__(self, mapping: Mapping, port: int, config: RelayOptions, stats: MappingStats) -> None:
        super().__init__(mapping, port, config, stats)
        self.proxy_protocol = config.proxy_protocol
        self.transparent = config.transparent
        self.backend_text = mapping.backend()  # for its lines, formatted once
        # The access log's fixed parts of a line, when every client reaches the same address
        # (not a wildcard listener): made once in start(), not asked of each socket.
        self.route: accesslog.Route | None = None
        self._container_side = ContainerSide if self.access is None else LoggedContainerSide
        self.connections: set[ClientSide] = set()
        # Dials under way, by when their current attempt began; oldest first (see _sweep_dials).
        self.dialing: dict[ClientSide, float] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.aborted = False  # abort_all() was called: a client that shows up late is closed

    @property
    def open_count(self) -> int:
        return len(self.connections)

    def log_event(self, event: str, transport: BaseTransport, exc: BaseException | None = None,
                  ) -> None:
        """-log-level debug: a connection accepted, refused or closed (never a read)."""
        client = accesslog.hostport(transport.get_extra_info("peername"))
        reason = {"reason": dial_error(exc)} if exc is not None else {}
        log.debug("%s %s: client %s %s%s", self.mapping.proto, self.mapping.frontend(), client,
                  event, f": {reason['reason']}" if reason else "",
                  extra={**mapping_fields(self.mapping), "client": client, **reason})

    async def start(self, sock: socket.socket, *, adopted: bool = False) -> None:
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self.loop = asyncio.get_running_loop()
        if self.access is not None:
            bound = sock.getsockname()
            if bound[0] not in ("0.0.0.0", "::"):
                self.route = self.access.route(self.mapping.proto, bound, self.backend_text)
        # create_server listens again; without our backlog it would shrink the queue to 100.
        side = ClientSide if self.access is None else LoggedClientSide
        self._server = await self.loop.create_server(lambda: side(self), sock=sock,
                                                     backlog=BACKLOG)
        if self.dial_timeout:
            self._schedule_sweep()
        if self.idle_timeout:
            self._idle = IdleSweeper(self.loop, self.idle_timeout, self.connections, self.stats)

    def stop_accepting(self) -> None:
        if self._server is not None:
            _stop_serving(self.loop, self._server)
            self._server = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._idle is not None:
            self._idle.stop()

    def abort_all(self) -> int:
        """Close every open connection now; returns how many there were."""
        # A client accepted just before stop_accepting() may have no connection_made() yet
        # (both loops call it a turn after the accept; see _stop_serving): it closes itself then.
        self.aborted = True
        open_now = list(self.connections)
        for client in open_now:
            if client.record is not None:
                client.record.ended(accesslog.SHUTDOWN)
            client.close_idle()
        return len(open_now)

    # -- dialling the container -----------------------------------------------------------------
    #
    # -dial-timeout is enforced by one sweeper per listener rather than a timer per connection:
    # a per-dial asyncio.timeout() costs a Timeout object, a timer handle and a current_task()
    # lookup on every connection, for a limit that almost never fires. The sweeper wakes a few
    # times per timeout period and cancels the dials that have run too long; since `dialing`
    # is in start order, it stops at the first one that hasn't.

    def _schedule_sweep(self) -> None:
        interval = min(max(self.dial_timeout / 8, 0.01), 1.0)
        self._sweeper = self.loop.call_later(interval, self._sweep_dials)

    def _sweep_dials(self) -> None:
        cutoff = self.loop.time() - self.dial_timeout
        expired = []
        for client, started in self.dialing.items():
            if started > cutoff:
                break
            expired.append(client)
        for client in expired:
            del self.dialing[client]
            if client.dial is not None and not client.dial.done():
                client.dial_timed_out = True
                client.dial.cancel()
        self._schedule_sweep()

    def dial(self, client: ClientSide) -> None:
        """Connect to the container for `client`, retrying a refusal for up to -dial-retry."""
        header = None
        if self.proxy_protocol:
            t = client.transport
            assert t is not None
            header = proxyproto.header(
                self.proxy_protocol, "tcp", t.get_extra_info("peername"), t.get_extra_info("sockname")
            )
        client.dial = dial = Dial(self, client, header)
        dial.attempt()

    def connect(self, client: ClientSide, header: bytes | None) -> Coroutine[Any, Any, Any]:
        """One attempt at the container, as a coroutine for a Dial to drive."""
        side = self._container_side
        if not self.transparent:
            return self.loop.create_connection(lambda: side(client, header), *self._backend)
        return self._connect_transparent(client, header)

    async def _connect_transparent(self, client: ClientSide, header: bytes | None) -> None:
        loop = self.loop
        # From the client's address: we make and bind the socket, the loop does the rest.
        # (IPPROTO_TCP, not 0: the standard loop sets TCP_NODELAY only on sockets that say TCP.)
        sock = socket.socket(self.mapping.backend_family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            assert client.transport is not None
            peer = client.transport.get_extra_info("peername")
            transparent.bind_to_client(sock, peer[0], self.mapping.container_ip)
            await loop.sock_connect(sock, self._backend)
        except BaseException:
            sock.close()
            raise
        side = self._container_side
        await loop.create_connection(lambda: side(client, header), sock=sock)

    def dial_failed(self, client: ClientSide, exc: BaseException) -> None:
        self.stats.dial_failures += 1
        reason = dial_error(exc)
        if isinstance(exc, TimeoutError) and self.transparent:
            reason += " (with -transparent: is the policy routing for replies in place?)"
        if client.record is not None:
            client.record.ended(accesslog.DIAL_FAILED, reason)
        peer = accesslog.hostport(client.transport.get_extra_info("peername")
                                  if client.transport else None)
        log.warning("%s %s: client %s: dial %s: %s", self.mapping.proto, self.mapping.frontend(),
                    peer, self.backend_text, reason,
                    extra={**mapping_fields(self.mapping), "client": peer, "reason": reason})
        if client.transport is not None:
            reset(client.transport)


def _stop_serving(loop: asyncio.AbstractEventLoop, server: asyncio.AbstractServer) -> None:
    """Take no new client, and lose none already taken off the kernel's accept queue.

    The standard loop's accept callback takes a batch of clients and builds each one's
    transport in a task of its own, which runs a loop iteration later; a Server.close() in
    between makes that build fail (asyncio asserts that the server still has its sockets,
    CPython gh-109564, open), and the client is then neither served nor closed: it hangs,
    then is reset. That is the reload's quiesce and a worker's drop, with every other holder
    of the socket still serving it. So stop the accept callback now (what is still queued
    stays in the kernel, for whoever else holds the socket), and close the server only once
    the transport tasks already scheduled have run: they were scheduled before this, and the
    loop runs callbacks in order. uvloop builds the transport inside its accept callback."""
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        for sock in cast(asyncio.Server, server).sockets:
            loop.remove_reader(sock.fileno())
        loop.call_soon(server.close)
    else:
        server.close()


class Dial:
    """One client's dial of the container, driven by callbacks rather than a Task.

    A Task and a coroutine of our own per connection cost more than the connect itself (the
    Task registers in asyncio's WeakSet of all tasks, and schedules its steps); so the loop's
    create_connection() coroutine is stepped here directly: sent into once, then again each
    time the future it waits on is done, exactly as a Task would. Refusals are retried on a
    timer (-dial-retry); -dial-timeout's sweeper and a client that leaves call cancel().
    """

    __slots__ = ("listener", "client", "header", "started", "backoff", "coro", "waiting",
                 "timer", "finished", "cancelling")

    def __init__(self, listener: TcpListener, client: ClientSide, header: bytes | None) -> None:
        self.listener = listener
        self.client = client
        self.header = header
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds, and a dial
        # on loopback or a bridge takes tens of microseconds (the histogram would see only 0).
        self.started = perf_counter()
        self.backoff: Backoff | None = None  # made at the first refusal
        self.coro: Coroutine[Any, Any, Any] | None = None
        self.waiting: asyncio.Future[Any] | None = None  # what the attempt waits on
        self.timer: asyncio.TimerHandle | None = None  # the wait before a retry
        self.finished = False
        self.cancelling = False

    def done(self) -> bool:
        return self.finished

    def attempt(self) -> None:
        listener = self.listener
        self.timer = None
        listener.dialing[self.client] = listener.loop.time()
        self.coro = listener.connect(self.client, self.header)
        self.step()

    def step(self, waited: object = None) -> None:
        """Run the attempt up to its next wait, or to its end."""
        coro = self.coro
        assert coro is not None
        self.waiting = None
        try:
            waits = coro.throw(asyncio.CancelledError()) if self.cancelling else coro.send(None)
        except StopIteration:
            self.end()
            self.listener.stats.observe_dial(perf_counter() - self.started)
        except ConnectionRefusedError as exc:
            self.refused(exc)
        except asyncio.CancelledError:
            self.cancelled()
        except (OSError, ValueError) as exc:
            self.end()
            self.listener.dial_failed(self.client, exc)
        except BaseException:
            self.end()
            raise
        else:
            if waits is None:  # a bare yield: asks to be resumed on the next iteration
                self.listener.loop.call_soon(self.step)
            else:
                self.waiting = waits
                waits.add_done_callback(self.step)
        finally:
            # A failed attempt's exception holds this frame (in its traceback), and both the
            # coroutine and the future it waited on hold the exception: dropped here, or
            # they make a cycle with it that only the cyclic GC would free.
            del coro, waited

    def refused(self, exc: ConnectionRefusedError) -> None:
        listener = self.listener
        listener.dialing.pop(self.client, None)  # not dialling while it waits to retry
        self.coro = None
        if self.backoff is None:
            self.backoff = Backoff(self.started, listener.dial_retry)
        wait = self.backoff.next_wait()
        if wait is None:
            self.end()
            listener.dial_failed(self.client, exc)
        else:
            self.timer = listener.loop.call_later(wait, self.attempt)

    def cancel(self) -> None:
        """Stop dialling: the client left, we shut down, or the sweeper says it timed out."""
        if self.finished:
            return
        if self.timer is not None:  # between attempts
            self.timer.cancel()
            self.cancelled()
            return
        self.cancelling = True
        if self.waiting is not None:
            self.waiting.cancel()  # its done callback throws into the attempt, which cleans up

    def cancelled(self) -> None:
        self.end()
        if self.client.dial_timed_out:
            self.listener.dial_failed(self.client, TimeoutError())

    def end(self) -> None:
        self.finished = True
        self.coro = self.waiting = self.timer = None
        client = self.client
        self.listener.dialing.pop(client, None)
        # Drop the client's reference back to us: a cycle would leave both (and the client's
        # transport) to the cyclic GC, whose passes grow with what they find (tail latency).
        client.dial = None
