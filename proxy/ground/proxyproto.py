"""PROXY protocol headers (HAProxy's spec: v1 text, v2 binary) that tell the backend who the
client really is. Built once per connection (for UDP, once per flow), never parsed here.
"""

from __future__ import annotations

import ipaddress
import struct

from proxy.ground.access import client_ip
from proxy.ground.config import IPAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_COMMAND_PROXY = 0x21  # version 2 in the high nibble, command PROXY in the low one
_V2_FAMILY = {(4, "tcp"): 0x11, (4, "udp"): 0x12, (6, "tcp"): 0x21, (6, "udp"): 0x22}


def _as_v6(ip: IPAddress) -> ipaddress.IPv6Address:
    if ip.version == 6:
        return ip  # type: ignore[return-value]
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)


def header(version: int, proto: str, client: tuple, local: tuple) -> bytes:  # type: ignore[type-arg]
    """The header for a client at socket address `client` that reached us at `local`."""
    src, dst = client_ip(client[0]), client_ip(local[0])
    if src.version != dst.version:  # both ends must share a family: fall back to IPv6 forms
        src, dst = _as_v6(src), _as_v6(dst)
    if version == 1:
        return f"PROXY TCP{src.version} {src} {dst} {client[1]} {local[1]}\r\n".encode()
    body = src.packed + dst.packed + struct.pack("!HH", client[1], local[1])
    family = _V2_FAMILY[src.version, proto]
    return V2_SIGNATURE + struct.pack("!BBH", _V2_COMMAND_PROXY, family, len(body)) + body
