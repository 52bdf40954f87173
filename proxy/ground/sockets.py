"""Sockets, the project's shared vocabulary for them: StartupError and Go-worded errors, the
socket options every relay sets, opening a mapping's frontend socket (bind it ourselves, or
adopt the one on fd 4), closing with a reset, and the -dial-retry backoff.

Errors read like docker-proxy's (Go's net package), because dockerd shows them to the user
verbatim: "listen tcp4 0.0.0.0:80: bind: address already in use".

The socket kind of each protocol (_KINDS) is the one table here that knows the protocols.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from ipaddress import ip_address
from time import perf_counter
from typing import TYPE_CHECKING

from attrs import frozen

from proxy.ground.config import IPAddress, Mapping, Proto, is_decimal
from proxy.ground.statuspipe import LISTEN_FD

if TYPE_CHECKING:
    from asyncio import Transport

BACKLOG = 4096  # capped by net.core.somaxconn
KEEPALIVE_SECONDS = 15  # Go's default TCP keepalive period, which docker-proxy inherits


class StartupError(Exception):
    """The proxy cannot serve a mapping; the text goes to the status pipe as is. `errno` is
    the system error behind it, when there is one."""

    def __init__(self, text: str, errno: int | None = None) -> None:
        super().__init__(text)
        self.errno = errno


def go_strerror(err: OSError) -> str:
    """Go spells errno texts in lower case: "address already in use"."""
    text = os.strerror(err.errno) if err.errno else str(err)
    return text[:1].lower() + text[1:]


def _network(mapping: Mapping) -> str:
    return f"{mapping.proto}{'6' if mapping.family == socket.AF_INET6 else '4'}"


@frozen
class _Kind:
    """How a protocol's frontend socket is made and checked."""

    type: int  # SOCK_STREAM or SOCK_DGRAM
    proto: int  # socket()'s protocol argument (0: the type's default)
    ip_proto: int  # what an adopted socket's SO_PROTOCOL must be
    stream_options: bool  # TCP_NODELAY and keepalive, inherited by every accepted socket
    missing: str = ""  # what to say when the kernel has no such socket


_KINDS: dict[Proto, _Kind] = {
    "tcp": _Kind(socket.SOCK_STREAM, 0, socket.IPPROTO_TCP, True),
    "udp": _Kind(socket.SOCK_DGRAM, 0, socket.IPPROTO_UDP, False),
    "sctp": _Kind(socket.SOCK_STREAM, socket.IPPROTO_SCTP, socket.IPPROTO_SCTP, False,
                  " (this kernel has no SCTP; load the sctp module)"),
}
_SOCKET_NAMES = {socket.IPPROTO_TCP: "a TCP socket", socket.IPPROTO_UDP: "a UDP socket",
                 socket.IPPROTO_SCTP: "an SCTP socket"}


def set_stream_options(sock: socket.socket) -> None:
    """TCP_NODELAY and 15 s keepalive, as Go (so docker-proxy) sets them on every TCP
    connection: a peer that vanished without a FIN is found and its connection closed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock)


def set_keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_SECONDS)


# <asm-generic/socket.h>; in the socket module from Python 3.12
_FORCED = {socket.SO_RCVBUF: getattr(socket, "SO_RCVBUFFORCE", 33),
           socket.SO_SNDBUF: getattr(socket, "SO_SNDBUFFORCE", 32)}


def set_buffer_size(sock: socket.socket, option: int, size: int) -> None:
    """SO_RCVBUF or SO_SNDBUF to `size` (the kernel doubles it for its bookkeeping). Root may
    go past net.core.rmem_max / wmem_max with the FORCE variant; anyone else gets up to them."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _FORCED[option], size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, option, size)


def _zone_exists(ip: IPAddress) -> bool:
    """An IPv6 zone ("fe80::1%eth0") names an interface this host has. Checked here because
    getaddrinfo, which resolves the zone inside bind() and connect(), reports a missing one as
    EAI_NONAME, which reads "unknown error -2"."""
    zone = getattr(ip, "scope_id", None)
    if not zone or is_decimal(zone):  # an index: the kernel checks it (ENODEV)
        return True
    try:
        socket.if_nametoindex(zone)
    except OSError:
        return False
    return True


def check_zones(mapping: Mapping, where: str) -> None:
    """Both addresses' IPv6 zones name interfaces that exist, or a StartupError says which not."""
    for ip, what in ((mapping.host_ip, where),
                     (mapping.container_ip, f"{where}: container address {mapping.container_ip}")):
        if not _zone_exists(ip):
            raise StartupError(f"{what}: no such network interface {ip.scope_id!r}")  # type: ignore[union-attr]


def bind_listener(mapping: Mapping, port: int) -> socket.socket:
    """A bound (and for streams, listening) socket for the mapping on `port`."""
    spec = _KINDS[mapping.proto]
    kind = spec.type
    where = f"listen {_network(mapping)} {mapping.frontend(port)}"
    check_zones(mapping, where)
    try:
        sock = socket.socket(mapping.family, kind, spec.proto)
    except OSError as exc:
        missing = exc.errno in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT)
        raise StartupError(
            f"{where}: socket: {go_strerror(exc)}{spec.missing if missing else ''}") from None
    try:
        if mapping.family == socket.AF_INET6:
            # "::" means IPv6 only: an IPv4 client must never reach a port published for IPv6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.stream_options:
            set_stream_options(sock)  # copied by Linux into every accepted socket: no per-accept cost
        if mapping.interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, mapping.interface.encode())
        sock.bind((str(mapping.host_ip), port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        step = "listen" if exc.errno == errno.EOPNOTSUPP else "bind"
        if mapping.interface and exc.errno == errno.ENODEV:
            raise StartupError(f"{where}: no such interface {mapping.interface!r}") from None
        if exc.errno == errno.ENODEV:  # an IPv6 zone given as an index nothing has
            raise StartupError(f"{where}: bind: no such network interface", exc.errno) from None
        raise StartupError(f"{where}: {step}: {go_strerror(exc)}", exc.errno) from None
    sock.setblocking(False)
    return sock


def adopt_listen_fd(mapping: Mapping, fd: int | None = LISTEN_FD) -> socket.socket:
    """The socket dockerd bound and passed on fd 4 (-use-listen-fd), used exactly as it is.

    `fd` is where that socket is now: 4 in the spawned process, another number in the engine
    it was handed to, None if none was passed. Messages name fd 4, which is what users know.
    """
    where = f"listen fd {LISTEN_FD} for {mapping.proto}"
    check_zones(mapping, where)
    if fd is None:
        raise StartupError(f"{where}: {go_strerror(OSError(errno.EBADF, ''))}")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise StartupError(f"{where}: {go_strerror(exc)}") from None
    os.set_inheritable(fd, False)
    spec = _KINDS[mapping.proto]
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto != spec.ip_proto:
        wanted = mapping.proto.upper()
        got = _SOCKET_NAMES.get(sock.proto) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        # Close our copy: dockerd keeps its own, and in the engine this copy would leak.
        sock.close()
        what = f"{got}, not {wanted}" if got else f"not an IP socket of {wanted}"
        raise StartupError(f"{where}: fd {LISTEN_FD} is {what}")
    if spec.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise StartupError(f"{where}: fd {LISTEN_FD} is not listening")
    if spec.stream_options:
        set_stream_options(sock)
    sock.setblocking(False)
    return sock


def adopt_held_socket(mapping: Mapping, fd: int) -> socket.socket:
    """A listening socket a waiter held while no engine served it, handed back on re-attach.

    Trusted no more than a registration: it must be exactly the socket this mapping would
    have, family, type, protocol, bound address, a port the mapping allows, listening (TCP,
    SCTP) or unconnected (UDP), the mapping's interface, or it is closed and refused."""
    where = f"re-attach {_network(mapping)} {mapping.frontend()}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise StartupError(f"{where}: {go_strerror(exc)}") from None
    spec = _KINDS[mapping.proto]
    try:
        wrong = _held_mismatch(mapping, sock, spec)
    except OSError as exc:
        wrong = go_strerror(exc)
    if wrong:
        sock.close()
        raise StartupError(f"{where}: refused the socket held for it: {wrong}")
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return sock


def _held_mismatch(mapping: Mapping, sock: socket.socket, spec: _Kind) -> str | None:
    """What makes `sock` not this mapping's frontend socket, None if nothing."""
    if sock.family != mapping.family or sock.type != spec.type or sock.proto != spec.ip_proto:
        return "not a socket of this protocol and address family"
    host, port = sock.getsockname()[:2]
    if str(ip_address(host.partition("%")[0])) != str(mapping.host_ip).partition("%")[0]:
        return f"bound to {host}, not {mapping.host_ip}"
    ports = mapping.host_ports  # port 0: the kernel picked one, any will do
    if ports.start and not ports.start <= port <= ports.end:
        return f"bound to port {port}, not {ports}"
    if spec.type == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
    else:
        try:
            sock.getpeername()
            return "connected to a peer"
        except OSError:
            pass  # unconnected, as a frontend socket is
    device = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
    if device != (mapping.interface or "").encode():
        return f"bound to interface {device.decode(errors='replace')!r}"
    return None


# -- closing with a reset ----------------------------------------------------------------------

_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends an RST (TCP) or an ABORT (SCTP)


def linger_reset(sock: socket.socket) -> None:
    """Make this socket's close a reset rather than a FIN (SCTP: an ABORT, not a SHUTDOWN),
    so the peer can tell a failure from a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


def reset(transport: Transport) -> None:
    """Close a transport's connection with a reset (see linger_reset)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_reset(sock)
    transport.abort()


def abort(sock: socket.socket) -> None:
    """Close a socket with a reset (see linger_reset)."""
    linger_reset(sock)
    sock.close()


# -- dialling the backend ----------------------------------------------------------------------

# -dial-retry: wait between attempts at a backend that refuses (doubling up to the cap).
RETRY_FIRST, RETRY_CAP = 0.05, 0.5


def dial_error(exc: BaseException) -> str:
    """Why a dial failed, in Go's words ("connection refused"). The loops word the same
    failure differently (the standard loop's sock_connect says "Connect call failed (...)");
    the errno says it plainly."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return go_strerror(exc)
    return str(exc)


class Backoff:
    """-dial-retry's schedule for one dial: after a refusal, wait 50 ms, doubling up to 0.5 s,
    until the next wait would end past `retry` seconds from `started` (a perf_counter())."""

    __slots__ = ("deadline", "wait")

    def __init__(self, started: float, retry: float) -> None:
        self.deadline = started + retry
        self.wait = RETRY_FIRST

    def next_wait(self) -> float | None:
        """Seconds to wait before the next attempt, or None if it would end past the deadline."""
        wait = self.wait
        if perf_counter() + wait > self.deadline:
            return None
        self.wait = min(wait * 2, RETRY_CAP)
        return wait

    async def retry(self) -> bool:
        """Wait before the next attempt; False (at once) if it would end past the deadline."""
        wait = self.next_wait()
        if wait is None:
            return False
        await asyncio.sleep(wait)
        return True


async def wait_fd(fd: int, writable: bool = False) -> None:
    """Until `fd` is readable (or writable): for the engine's and its workers' own sockets and
    pipes, which they read and write themselves (messages with fds, not a stream)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)
