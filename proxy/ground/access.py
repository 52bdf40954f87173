"""Which clients may use a published port (-allow), decided from the client's address alone."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from proxy.ground.config import IPAddress, IPNetwork


def client_ip(host: str) -> IPAddress:
    """The client's address, with an IPv4 client on a dual-stack socket (::ffff:a.b.c.d) as IPv4."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AllowList:
    """An empty list allows everyone; otherwise a client must be inside one of the networks."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def permits(self, host: str) -> bool:
        if not self._networks:
            return True
        ip = client_ip(host)
        return any(ip in net for net in self._networks if net.version == ip.version)
