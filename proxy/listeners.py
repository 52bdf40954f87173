"""Opening the frontend socket of a mapping: bind it ourselves, or adopt the one on fd 4.

Errors read like docker-proxy's (Go's net package), because dockerd shows them to the user
verbatim: "listen tcp4 0.0.0.0:80: bind: address already in use".
"""

from __future__ import annotations

import errno
import os
import socket

from proxy.config import IPAddress, Mapping, is_decimal

LISTEN_FD = 4
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


_IP_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": socket.IPPROTO_SCTP}
_SOCKET_NAMES = {socket.IPPROTO_TCP: "a TCP socket", socket.IPPROTO_UDP: "a UDP socket",
                 socket.IPPROTO_SCTP: "an SCTP socket"}


def _sock_type(mapping: Mapping) -> tuple[int, int]:
    if mapping.proto == "udp":
        return socket.SOCK_DGRAM, 0
    if mapping.proto == "sctp":
        return socket.SOCK_STREAM, socket.IPPROTO_SCTP
    return socket.SOCK_STREAM, 0


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
    kind, proto = _sock_type(mapping)
    where = f"listen {_network(mapping)} {mapping.frontend(port)}"
    check_zones(mapping, where)
    try:
        sock = socket.socket(mapping.family, kind, proto)
    except OSError as exc:
        if mapping.proto == "sctp" and exc.errno in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
            raise StartupError(
                f"{where}: socket: {go_strerror(exc)} (this kernel has no SCTP; load the sctp module)"
            ) from None
        raise StartupError(f"{where}: socket: {go_strerror(exc)}") from None
    try:
        if mapping.family == socket.AF_INET6:
            # "::" means IPv6 only: an IPv4 client must never reach a port published for IPv6.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mapping.proto == "tcp":
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
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.proto != _IP_PROTOCOLS[mapping.proto]:
        wanted = mapping.proto.upper()
        got = _SOCKET_NAMES.get(sock.proto) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
        # Close our copy: dockerd keeps its own, and in the engine this copy would leak.
        sock.close()
        what = f"{got}, not {wanted}" if got else f"not an IP socket of {wanted}"
        raise StartupError(f"{where}: fd {LISTEN_FD} is {what}")
    expected_kind, _ = _sock_type(mapping)
    if expected_kind == socket.SOCK_STREAM:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.close()
            raise StartupError(f"{where}: fd {LISTEN_FD} is not listening")
    if mapping.proto == "tcp":
        set_stream_options(sock)
    sock.setblocking(False)
    return sock
