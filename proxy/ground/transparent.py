"""-transparent: dial the container *from the client's own address* (IP_TRANSPARENT), so the
container sees the real client with no header at all, as it would through the kernel's NAT.

This needs CAP_NET_ADMIN, and policy routing on the host that hands the container's replies
(addressed to the client) to the local stack instead of forwarding them; see the README.
"""

from __future__ import annotations

import socket

from proxy.ground.access import client_ip
from proxy.ground.config import IPAddress, family_of
from proxy.ground.sockets import StartupError, go_strerror

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)  # <linux/in.h>
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)  # <linux/in6.h>


def _set_transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def check_allowed(container_ip: IPAddress) -> None:
    """Fail at start, with the reason, rather than on every connection."""
    try:
        with socket.socket(family_of(container_ip), socket.SOCK_STREAM) as probe:
            _set_transparent(probe)
    except OSError as exc:
        raise StartupError(
            f"-transparent: setsockopt IP_TRANSPARENT: {go_strerror(exc)} (needs CAP_NET_ADMIN or CAP_NET_RAW)"
        ) from None


def bind_to_client(sock: socket.socket, client_host: str, container_ip: IPAddress) -> None:
    """Make `sock` (not yet connected) leave from the client's own address.

    Raises ValueError when the client's family differs from the container's (an IPv6 client
    cannot appear as the source of an IPv4 connection).
    """
    source = client_ip(client_host)
    if source.version != container_ip.version:
        raise ValueError(f"client {source} and container {container_ip} differ in IP version")
    _set_transparent(sock)
    sock.bind((str(source), 0))
