"""UDP relay: a flow per client (address, port), each with its own connected backend socket.

The container sees one stable source port per client, and its replies go back to that client
from the address the client sent to (IP_PKTINFO / IPV6_PKTINFO). Flows idle out after
-udp-timeout, counted from the last datagram in either direction; when the table is full the
idlest flow makes room. Flows of every mapping in the process also draw on one budget
(proxy.ground.budget): when it is spent, or the system has no socket or port left, the busiest
mapping's idlest flow makes room, so a flood can't take the fds or ports that others need.
Datagrams are read with recvmsg() in a loop until the socket is empty, so one wake-up of the
event loop serves a whole burst.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol

from proxy.ground import accesslog, proxyproto, transparent
from proxy.ground.budget import FlowBudget, process_budget
from proxy.ground.config import Mapping, RelayOptions
from proxy.ground.logs import Throttle, mapping_fields
from proxy.ground.sockets import go_strerror, set_buffer_size
from proxy.ground.stats import MappingStats
from proxy.relays.base import RelayBase

log = logging.getLogger("pyproxy")

# Final: compiled (setup.py), these are read as C statics rather than looked up by name.
MAX_DATAGRAM: Final = 65536  # larger than any UDP payload (65507 on IPv4, 65527 on IPv6)
ANCILLARY_SPACE: Final = socket.CMSG_SPACE(20)  # one in6_pktinfo (20 bytes) or in_pktinfo (12)
BURST: Final = 256  # datagrams per wake-up before letting other sockets have a turn
# The frontend's receive queue. The default (~208 KiB) holds a few hundred small datagrams: a
# burst from many clients would be dropped by the kernel before we could read it.
RECEIVE_BUFFER: Final = 4 * 1024 * 1024

# UDP segmentation offload (Linux >= 4.18): one sendmsg() carries a run of equal-sized
# datagrams, which the kernel splits as late as it can (on loopback, at the receiving
# socket). A datagram costs the proxy a system call and a trip down the stack otherwise.
SOL_UDP: Final = getattr(socket, "SOL_UDP", 17)
# <linux/udp.h>; in the socket module from 3.12. Not Final: a test stands an unknown type in.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
MAX_SEGMENTS: Final = 64  # UDP_MAX_SEGMENTS of older kernels (128 from 6.x)
MAX_SEGMENT: Final = 1000  # larger datagrams go one by one: a segment must fit the path's MTU
MAX_RUN: Final = MAX_SEGMENTS * MAX_SEGMENT  # under 65507, the most one UDP send may carry
# What a kernel without UDP_SEGMENT (or a device that cannot take it) fails a run with. A
# segment over the path's MTU fails with EMSGSIZE instead: the kernel never fragments a
# segment, where it fragments a lone datagram of the same size.
NO_SEGMENTING: Final = frozenset({errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO})
_NATIVE: Final = sys.byteorder  # UDP_SEGMENT's value is a u16 in the host's order

Ancillary = list[tuple[int, int, bytes]]
NO_ANCILLARY: Final[Ancillary] = []  # never added to
WILDCARDS: Final = ("0.0.0.0", "::")

# Datagrams are read into these and sent on as slices of them: no 64 KiB bytes object per
# datagram. The kernel copies a datagram when it is sent, so one buffer per direction serves
# every relay of the process; two, because evicting a flow to make room for a client's
# datagram drains the flow's replies while that datagram still waits in _FROM_CLIENTS.
# A run starts where the last one ended, while that leaves room for a whole run and the next
# datagram after it; past that, back at 0.
_FROM_CLIENTS: Final = bytearray(2 * MAX_RUN + MAX_DATAGRAM)
_FROM_CLIENTS_VIEW: Final = memoryview(_FROM_CLIENTS)
_FROM_CONTAINER: Final = bytearray(MAX_DATAGRAM)
_FROM_CONTAINER_VIEW: Final = memoryview(_FROM_CONTAINER)

# What socket() or connect() fail with when fds, memory or ephemeral ports run out: giving up
# an idle flow frees one of each, so one retry is worth it.
SHORTAGE: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                             errno.EAGAIN, errno.EADDRNOTAVAIL})

IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; in the socket module from 3.12


class Flow:
    """One client's flow. A plain slotted class, not attrs: compiled by mypyc (setup.py), it
    becomes a native class whose fields the per-datagram path reads directly, where an attrs
    class stays interpreted and is reached through generic getattr calls."""

    __slots__ = ("client", "sock", "last", "reply_ancillary", "pktinfo_seen", "header", "record")

    def __init__(self, client: Any, sock: socket.socket, last: float) -> None:
        self.client = client  # the client's socket address tuple, as recvfrom returned it
        self.sock = sock
        self.last = last
        self.reply_ancillary: Ancillary | None = None  # source address for replies
        self.pktinfo_seen = b""
        self.header: bytes | None = None  # PROXY v2 header prefixed to every datagram, if on
        self.record: accesslog.Record | None = None  # the access log's line, if it is on


class FlowTable:
    """Flows by client address, ordered from least to most recently active (a flow moves to
    the end when it relays a burst), so the idlest flow is always first: eviction and expiry
    never scan the whole table. An OrderedDict held, not subclassed: mypyc can compile this
    class, where a compiled OrderedDict subclass crashes in the GC."""

    def __init__(self, max_flows: int) -> None:
        self.by_client: OrderedDict[Any, Flow] = OrderedDict()
        self.max_flows = max_flows

    def __len__(self) -> int:
        return len(self.by_client)

    def __contains__(self, client: object) -> bool:
        return client in self.by_client

    def make_room(self) -> Flow | None:
        """The flow to evict so that one more fits, if the table is full."""
        if self.max_flows and len(self.by_client) >= self.max_flows:
            return self.by_client.popitem(last=False)[1]
        return None

    def pop_idlest(self) -> Flow | None:
        return self.by_client.popitem(last=False)[1] if self.by_client else None

    def expire(self, now: float, timeout: float) -> list[Flow]:
        """Remove and return every flow idle for `timeout` or longer."""
        by_client, gone = self.by_client, []
        while by_client:
            flow = next(iter(by_client.values()))
            if now - flow.last < timeout:
                break
            gone.append(by_client.popitem(last=False)[1])
        return gone


def _reply_pktinfo(level: int, kind: int, data: bytes) -> Ancillary:
    """Ancillary data that sends a reply from the address the client's datagram was sent to."""
    if level == socket.IPPROTO_IP:
        # in_pktinfo {ifindex, spec_dst, addr}: source = addr; leave the interface to routing.
        return [(level, kind, b"\0\0\0\0" + data[8:12] + b"\0\0\0\0")]
    # in6_pktinfo {addr, ifindex}: keep the interface, which a link-local address needs.
    return [(level, kind, data[:20])]


def deepen_receive_queue(sock: socket.socket) -> None:
    set_buffer_size(sock, socket.SO_RCVBUF, RECEIVE_BUFFER)


def enable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


class _Loop(Protocol):
    """What the relay uses of its event loop. uvloop's remove_reader() returns None where
    typeshed says bool, and mypyc's compiled code checks a declared return type at run time."""

    def time(self) -> float: ...
    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None: ...
    def remove_reader(self, fd: int) -> object: ...
    def call_later(self, delay: float, callback: Callable[..., object],
                   *args: Any) -> asyncio.TimerHandle: ...


class UdpRelay(RelayBase):
    """Serves one UDP mapping."""

    def __init__(self, mapping: Mapping, port: int, config: RelayOptions, stats: MappingStats,
                 budget: FlowBudget | None = None) -> None:
        super().__init__(mapping, port, config, stats)
        self.timeout = config.udp_timeout
        self.flows = FlowTable(config.udp_max_flows)
        self.budget = budget if budget is not None else process_budget()
        # A flood fails the same way for every new client: a line per mapping now and then.
        self._no_flow_log = Throttle()
        self._budget_log = Throttle()
        self.proxy_protocol = config.proxy_protocol
        self.transparent = config.transparent
        self._backend_family = mapping.backend_family
        self._loop: _Loop | None = None
        self._sock: socket.socket | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._pktinfo = False  # ask for the destination address of every datagram
        # Runs of datagrams up to this size go out with UDP_SEGMENT; lowered when a run's
        # segment is over the path's MTU, 0 once the kernel refuses UDP_SEGMENT altogether.
        self._max_segment = MAX_SEGMENT

    async def start(self, sock: socket.socket, *, adopted: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        # Only a wildcard socket needs to learn which address a client sent to: one bound to
        # an address replies from it anyway, so reading the ancillary data (a list and a
        # tuple per datagram) would buy nothing.
        self._pktinfo = sock.getsockname()[0] in WILDCARDS
        if self._pktinfo and not adopted:  # a socket passed on fd 4 keeps dockerd's choice
            enable_pktinfo(sock)
        deepen_receive_queue(sock)
        self.budget.join(self)
        self._loop.add_reader(sock.fileno(), self._from_clients)
        self._schedule_sweep()

    @property
    def open_count(self) -> int:
        return len(self.flows)

    def abort_all(self) -> int:
        """Nothing left to abort: stop_accepting() has ended every flow already (a datagram
        flow has nothing to drain)."""
        return 0

    def stop_accepting(self) -> None:
        """Stop reading the frontend socket and end every flow."""
        if self._loop is None or self._sock is None:
            return
        self._loop.remove_reader(self._sock.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.budget.leave(self)
        for flow in self.flows.by_client.values():
            self._close_flow(flow, accesslog.SHUTDOWN)
        self.flows.by_client.clear()
        self._sock.close()
        self._sock = None

    # -- client -> container ------------------------------------------------------------------

    def _from_clients(self) -> None:
        sock, flows, stats = self._sock, self.flows, self.stats
        assert sock is not None and self._loop is not None
        recvmsg_into, recvfrom_into = sock.recvmsg_into, sock.recvfrom_into
        into, view = _FROM_CLIENTS, _FROM_CLIENTS_VIEW
        pktinfo, ancillary = self._pktinfo, NO_ANCILLARY
        get, move_to_end = flows.by_client.get, flows.by_client.move_to_end
        # One clock reading per burst: a flow already stamped with it is already last in the
        # table, so a burst moves each flow once, not once per datagram.
        now = self._loop.time()
        counting = self.access is not None  # sizes are added up only for the access log
        datagrams = octets = 0  # added to the stats once per burst
        # A run: consecutive datagrams of one flow and one size, side by side in the buffer
        # from `start` to `end`, sent to the container in one system call (UDP_SEGMENT: the
        # kernel cuts them apart again, and the container receives each datagram as it was sent).
        run: Flow | None = None
        start = end = segment = count = 0
        max_segment = self._max_segment
        for _ in range(BURST):
            try:  # the datagram lands at `end`, after the run
                if pktinfo:
                    size, ancillary, _flags, client = recvmsg_into([view[end:]], ANCILLARY_SPACE)
                else:
                    size, client = recvfrom_into(view[end:] if end else into)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # a queued ICMP error for an earlier reply; the socket is fine
            flow = get(client)
            if flow is None:
                if run is not None:  # the new flow may evict the run's: send the run first
                    self._to_container(run, view[start:end], segment, count)
                    run = None
                flow = self._new_flow(client, now, ancillary)
                if flow is None:
                    end = 0
                    continue
            elif flow.last != now:
                move_to_end(client)
                flow.last = now
            if ancillary:
                level, kind, info = ancillary[0]
                if info != flow.pktinfo_seen:  # the client may send to another local address
                    flow.pktinfo_seen = info
                    flow.reply_ancillary = _reply_pktinfo(level, kind, info)
            datagrams += 1
            octets += size
            if counting:
                flow.record.from_client += size  # type: ignore[union-attr]
            if run is not None:
                if flow is run and size == segment and count < MAX_SEGMENTS:
                    end += size
                    count += 1
                    continue
                self._to_container(run, view[start:end], segment, count)
                run = None
            # (not an empty datagram: a segment of 0 would send one datagram for the run)
            if 0 < size <= max_segment and flow.header is None:
                if end > MAX_RUN:  # no room for a whole run after it: move it to the start
                    into[:size] = view[end:end + size]  # apart: end > MAX_RUN >= size
                    end = 0
                run, start, end, segment, count = flow, end, end + size, size, 1
            else:
                self._to_container(flow, view[end:end + size], size, 1)
                end = 0
        if run is not None:
            self._to_container(run, view[start:end], segment, count)
        stats.datagrams_from_client += datagrams
        stats.bytes_from_client += octets

    def _to_container(self, flow: Flow, data: memoryview, segment: int, count: int,
                      retry: bool = True) -> None:
        """Send `count` datagrams of `segment` bytes each (one, of any size, if count is 1)."""
        try:
            if count > 1:
                flow.sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, _NATIVE))])
            elif flow.header is None:
                flow.sock.send(data)
            else:
                flow.sock.sendmsg([flow.header, data])
        except ConnectionRefusedError:
            # A stale ICMP port unreachable from an earlier datagram (the container was not
            # listening yet) fails this send; the error is consumed, so one retry delivers.
            if retry:
                self._to_container(flow, data, segment, count, False)
            else:
                self.stats.datagrams_dropped += count
        except OSError as exc:
            if count > 1 and exc.errno == errno.EMSGSIZE:
                # A path whose MTU is under the segment (a container behind a small-MTU link):
                # from now on runs of smaller datagrams only.
                self._max_segment = min(self._max_segment, segment - 1)
            elif count > 1 and exc.errno in NO_SEGMENTING:
                self._max_segment = 0  # a kernel without UDP_SEGMENT: always one by one
            else:
                self.stats.datagrams_dropped += count
                return
            # This run goes one by one, each datagram fragmented if need be.
            for at in range(0, len(data), segment):
                self._to_container(flow, data[at:at + segment], segment, 1)

    def _new_flow(self, client: Any, now: float, ancillary: Ancillary) -> Flow | None:
        stats = self.stats
        if self.allow and not self.allow.permits(client[0]):
            stats.datagrams_denied += 1
            return None
        evicted = self.flows.make_room()
        if evicted is not None:
            self._evict(evicted)
        elif self.budget.exhausted():
            held = self._budget_log.ready(now)
            if held is not None:
                log.warning("udp %s: the process's %d UDP flows are all in use: evicting the "
                            "busiest mapping's idlest flows (%d more since the last line)",
                            self.mapping.frontend(self.port), self.budget.limit, held,
                            extra={**mapping_fields(self.mapping), "reason": "flow budget"})
            if not self.budget.evict_one():
                stats.datagrams_no_flow += 1
                return None
        for attempt in (1, 2):
            try:
                sock = self._flow_socket(client)
                break
            except (OSError, ValueError) as exc:
                # Out of fds or ports (another part of the process, or the host, took them):
                # an idle flow's socket is worth less than a new client's.
                if (attempt == 1 and getattr(exc, "errno", None) in SHORTAGE
                        and self.budget.evict_one()):
                    continue
                stats.datagrams_no_flow += 1
                held = self._no_flow_log.ready(now)
                if held is not None:
                    reason = go_strerror(exc) if isinstance(exc, OSError) else str(exc)
                    peer = accesslog.hostport(client)
                    log.warning("udp %s: client %s: no flow to %s: %s (%d more since the last "
                                "line)", self.mapping.frontend(), peer, self.mapping.backend(),
                                reason, held, extra={**mapping_fields(self.mapping),
                                                     "client": peer, "reason": reason})
                return None
        flow = Flow(client, sock, now)
        if self.proxy_protocol:
            flow.header = proxyproto.header(2, "udp", client, self._destination(ancillary))
        if self.access is not None:
            route = self.access.route(self.mapping.proto, self._destination(ancillary),
                                      self.mapping.backend())
            flow.record = self.access.open(route, client)
        self.flows.by_client[client] = flow
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._from_container, flow)
        self.budget.used += 1
        stats.flows_created += 1
        stats.flows_active += 1
        if self.debug:
            self._log_flow(client, "created")
        return flow

    def _log_flow(self, client: Any, event: str) -> None:
        """-log-level debug: a flow created, expired, evicted or shut down (never a datagram)."""
        peer = accesslog.hostport(client)
        log.debug("udp %s: client %s: flow %s", self.mapping.frontend(), peer, event,
                  extra={**mapping_fields(self.mapping), "client": peer, "event": event})

    def _flow_socket(self, client: Any) -> socket.socket:
        """A socket connected to the container, for a new flow of `client`."""
        sock = socket.socket(self._backend_family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.transparent:
                transparent.bind_to_client(sock, client[0], self.mapping.container_ip)
            sock.connect(self._backend)
        except BaseException:
            sock.close()
            raise
        return sock

    def _destination(self, ancillary: Ancillary) -> tuple[str, int]:
        """The address and port the client sent to: PKTINFO's, else the socket's own."""
        assert self._sock is not None
        if ancillary:
            level, _, info = ancillary[0]
            if level == socket.IPPROTO_IP:
                return socket.inet_ntop(socket.AF_INET, info[8:12]), self.port
            return socket.inet_ntop(socket.AF_INET6, info[:16]), self.port
        return self._sock.getsockname()[:2]  # type: ignore[no-any-return]

    # -- container -> client ------------------------------------------------------------------

    def _from_container(self, flow: Flow) -> None:
        sock, stats, loop = self._sock, self.stats, self._loop
        assert sock is not None and loop is not None
        recv_into, view = flow.sock.recv_into, _FROM_CONTAINER_VIEW
        client = flow.client
        record = flow.record
        socket_error = False
        datagrams = octets = 0  # added to the stats once per burst
        for _ in range(BURST):
            try:
                size = recv_into(_FROM_CONTAINER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP port unreachable from the container: it is not listening (yet). The
                # flow stays; the client's next datagram may well find it up.
                socket_error = True
                continue
            datagrams += 1
            octets += size
            data = view[:size]
            try:
                if flow.reply_ancillary is not None:
                    sock.sendmsg([data], flow.reply_ancillary, 0, client)
                else:
                    sock.sendto(data, client)
            except OSError:
                stats.datagrams_dropped += 1
        stats.datagrams_from_container += datagrams
        stats.bytes_from_container += octets
        if record is not None:
            record.from_backend += octets
        if self.flows.by_client.get(client) is flow:
            if socket_error:
                # libuv (uvloop) stops watching a socket once it reports EPOLLERR, silently;
                # watch it again so the flow hears the container once it is up.
                loop.remove_reader(flow.sock.fileno())
                loop.add_reader(flow.sock.fileno(), self._from_container, flow)
            self.flows.by_client.move_to_end(client)
            flow.last = loop.time()

    # -- idle flows -----------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        assert self._loop is not None
        # A quarter of the timeout keeps expiry within 25 % of it without waking up often.
        interval = min(max(self.timeout / 4, 0.01), 5.0)
        self._sweeper = self._loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        assert self._loop is not None
        for flow in self.flows.expire(self._loop.time(), self.timeout):
            self._close_flow(flow, accesslog.UDP_EXPIRED)
            self.stats.flows_expired += 1
        self._schedule_sweep()

    # -- making room ----------------------------------------------------------------------------

    def flow_count(self) -> int:
        return len(self.flows)

    def evict_idlest(self) -> bool:
        """Give up this mapping's idlest flow, for a new one here or in another mapping."""
        flow = self.flows.pop_idlest()
        if flow is None:
            return False
        self._evict(flow)
        return True

    def _evict(self, flow: Flow) -> None:
        # Replies already queued for it still reach the client: under a flood a flow may be
        # evicted within a millisecond of its request, often with the answer in its socket.
        self._from_container(flow)
        self._close_flow(flow, accesslog.UDP_EVICTED)
        self.stats.flows_evicted += 1

    def _close_flow(self, flow: Flow, why: str) -> None:
        assert self._loop is not None
        self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.budget.used -= 1
        self.stats.flows_active -= 1
        if self.debug:
            self._log_flow(flow.client, why)
        if flow.record is not None:
            flow.record.ended(why)
            flow.record.side_closed()

