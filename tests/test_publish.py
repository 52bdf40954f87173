"""Many mappings in one process (-p, ranges, kernel-chosen ports, interfaces), all or nothing."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from proxy.ground.sockets import StartupError
from tests.helpers import (
    EchoBackend,
    Proxy,
    backend,
    exchange,
    free_port,
    free_port_block,
    make_config,
    output,
    proxy,
)
from tests.netns import Lab, needs_netns

pytestmark = pytest.mark.timeout(60)


def test_ephemeral_ports_are_printed_in_docker_port_format():
    b = EchoBackend()
    p = Proxy(["-p", "127.0.0.1::" + str(b.port), "-p", f"127.0.0.1::{b.port}/udp",
               "-container-ip", "127.0.0.1"])
    out, _ = output(p.proc)
    lines = out.decode().splitlines()
    assert len(lines) == 2
    tcp_line, udp_line = lines
    assert tcp_line.startswith(f"{b.port}/tcp -> 127.0.0.1:") and udp_line.startswith(f"{b.port}/udp -> 127.0.0.1:")
    tcp_port = int(tcp_line.rsplit(":", 1)[1])
    assert tcp_port != 0 and exchange("127.0.0.1", tcp_port) == b"ping"
    b.close()


async def test_port_ranges_map_one_to_one() -> None:
    b1 = free_port_block(2)
    servers = [await asyncio.start_server(lambda r, w, i=i: (w.write(b"%d" % i), w.close()),
                                          "127.0.0.1", b1 + i) for i in range(2)]
    host = free_port_block(2)
    async with proxy("-p", f"127.0.0.1:{host}-{host + 1}:{b1}-{b1 + 1}", "-container-ip", "127.0.0.1") as server:
        assert [r.port for r in server.relays] == [host, host + 1]
        for i in range(2):  # each host port reaches its own container port
            reader, writer = await asyncio.open_connection("127.0.0.1", host + i)
            assert await reader.read() == b"%d" % i
            writer.close()
    for s in servers:
        s.close()


async def test_host_range_with_one_container_port_takes_the_first_free_port(busy_port) -> None:
    first = busy_port
    async with backend() as bport, proxy(
        "-p", f"127.0.0.1:{first}-{first + 5}:{bport}", "-container-ip", "127.0.0.1"
    ) as server:
        [relay] = server.relays
        assert first < relay.port <= first + 5
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"ok")
        assert await reader.readexactly(2) == b"ok"
        writer.close()


async def test_docker_flags_with_ranges() -> None:
    async with backend() as b:
        host = free_port()
        config = make_config("-host-ip", "127.0.0.1", "-host-port", f"{host}-{host + 2}",
                             "-container-ip", "127.0.0.1", "-container-port", f"{b}-{b + 2}")
        assert [(m.host_port, m.container_port) for m in config.mappings] == [
            (host + i, b + i) for i in range(3)]


def test_repeatable_p_mixes_tcp_and_udp():
    b = EchoBackend()
    ubackend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ubackend.bind(("127.0.0.1", 0))
    tcp_port, udp_port = free_port(), free_port(kind=socket.SOCK_DGRAM)
    Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{tcp_port}:{b.port}",
                          "-p", f"127.0.0.1:{udp_port}:{ubackend.getsockname()[1]}/udp"])
    assert exchange("127.0.0.1", tcp_port) == b"ping"
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.sendto(b"u", ("127.0.0.1", udp_port))
    data, addr = ubackend.recvfrom(10)
    ubackend.sendto(b"U", addr)
    c.settimeout(5)
    assert c.recvfrom(10) == (b"U", ("127.0.0.1", udp_port))
    c.close()
    ubackend.close()
    b.close()


async def test_all_or_nothing_when_one_mapping_cannot_bind(busy_port) -> None:
    busy = busy_port
    free = free_port()
    from proxy.modes.publication import Publication

    server = Publication(make_config("-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{free}:80",
                                     "-p", f"127.0.0.1:{busy}:81"), None)
    with pytest.raises(StartupError, match=f"listen tcp4 127.0.0.1:{busy}: bind: address already in use"):
        await server.open()
    # the mapping that did bind was closed again
    again = socket.socket()
    again.bind(("127.0.0.1", free))
    again.close()


def test_all_or_nothing_reports_the_failing_mapping_on_fd3(busy_port):
    busy = busy_port
    p = Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{free_port()}:80", "-p", f"127.0.0.1:{busy}:81"],
              wait_ready=False)
    assert p.status == f"1\nlisten tcp4 127.0.0.1:{busy}: bind: address already in use".encode()
    assert p.proc.wait(timeout=10) == 1


ECHO = r"""
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7)); s.listen()
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.recv(100)); c.close()
"""

ASK = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 8080), timeout=3)
    s.sendall(b"hi"); print(s.recv(10).decode() or "closed")
except OSError as e:
    print(type(e).__name__)
"""


@needs_netns
def test_interface_name_serves_only_traffic_arriving_on_it():
    """Host with two interfaces; -p front-a:8080:7 must answer on front-a and not on front-b."""
    import subprocess

    with Lab() as lab:
        a, host, b = lab.host("a"), lab.host("host"), lab.host("b")
        lab.link(a, "eth0", "198.18.3.2/24", host, "front-a", "198.18.3.1/24")
        lab.link(b, "eth0", "198.18.4.2/24", host, "front-b", "198.18.4.1/24")
        b.ip("route", "add", "default", "via", "198.18.4.1")  # b may even aim at a's address
        echo = lab.spawn(host, sys.executable, "-c", ECHO, stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        p = Proxy(["-p", "front-a:8080:7", "-container-ip", "127.0.0.1"], prefix=host.prefix())
        try:
            assert a.run(sys.executable, "-c", ASK, "198.18.3.1").strip() == "hi"
            assert b.run(sys.executable, "-c", ASK, "198.18.4.1").strip() == "ConnectionRefusedError"
            assert b.run(sys.executable, "-c", ASK, "198.18.3.1").strip() == "ConnectionRefusedError"
        finally:
            p.stop()


def test_unknown_interface_fails_clearly():
    p = Proxy(["-p", "nosuchif0:8080:80", "-container-ip", "127.0.0.1"], wait_ready=False)
    assert p.status.startswith(b"1\nlisten tcp4 nosuchif0%0.0.0.0:8080: no such interface")
    assert p.proc.wait(timeout=10) == 1
