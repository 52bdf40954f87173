"""Client address (PROXY protocol, transparent mode), -allow, -max-conns, dialling, draining."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from proxy.ground.proxyproto import header
from tests.helpers import (
    Proxy,
    UdpBackend,
    backend,
    docker_args,
    free_port,
    needs_ipv6,
    silent_listener,
    tcp_proxy,
    udp_backend,
    udp_proxy,
)
from tests.netns import Lab, needs_netns

pytestmark = pytest.mark.timeout(60)


# -- PROXY protocol ---------------------------------------------------------------------------

def parse_v2(data: bytes) -> tuple[str, int, str, int, str, bytes]:
    """An independent reading of a v2 header, straight from HAProxy's spec."""
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    assert version_command == 0x21  # v2, PROXY
    body = data[16 : 16 + length]
    size = {1: 4, 2: 16}[family >> 4]
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size : 2 * size + 4])
    return str(src), sport, str(dst), dport, {1: "tcp", 2: "udp"}[family & 0xF], data[16 + length :]


@pytest.fixture
def nginx_proxy_protocol():
    """nginx that answers every request with what the PROXY header told it."""
    if not shutil.which("nginx"):
        pytest.skip("needs Debian's nginx-light")
    tmp = tempfile.mkdtemp()
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{port} proxy_protocol;
    location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port"; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "nginx did not start"
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(timeout=5)
    assert proc.stderr is not None
    proc.stderr.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_reads_the_real_client_address(version, nginx_proxy_protocol):
    port = free_port()
    Proxy([*docker_args(port, nginx_proxy_protocol), "-proxy-protocol", version])
    client = socket.socket()
    client.bind(("127.0.0.2", 0))  # not the proxy's own address: nginx must be told
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    response = b""
    while chunk := client.recv(4096):
        response += chunk
    body = response.split(b"\r\n\r\n", 1)[1].decode()
    assert body == f"127.0.0.2 {client.getsockname()[1]}"
    client.close()


@needs_ipv6
async def test_v2_header_over_ipv6() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read())
        writer.close()

    async with backend(record, host="::1") as bport, tcp_proxy(
        bport, "-proxy-protocol", "v2", host_ip="::1", container_ip="::1"
    ) as server:
        port = server.relays[0].port
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"payload")
        writer.write_eof()
        await reader.read()
        local = writer.get_extra_info("sockname")
        writer.close()
    src, sport, dst, dport, proto, rest = parse_v2(seen[0])
    assert (src, sport, dst, dport, proto, rest) == ("::1", local[1], "::1", port, "tcp", b"payload")


async def test_v2_header_prefixes_every_udp_datagram() -> None:
    got: list[bytes] = []

    class Record(UdpBackend):
        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            got.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Record, local_addr=("127.0.0.1", 0))
    bport = transport.get_extra_info("sockname")[1]
    async with udp_proxy(bport, "-proxy-protocol", "v2", host_ip="0.0.0.0") as server:
        port = server.relays[0].port
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.3", 0))
        for payload in (b"one", b"two"):
            c.sendto(payload, ("127.0.0.2", port))
        await asyncio.sleep(0.2)
        for payload, data in zip((b"one", b"two"), got, strict=False):  # len(got) checked below
            # the destination is the address the client sent to, not the wildcard bind address
            assert parse_v2(data) == ("127.0.0.3", c.getsockname()[1], "127.0.0.2", port, "udp", payload)
        assert len(got) == 2
        c.close()
    transport.close()


def test_header_unit_cases() -> None:
    assert header(1, "tcp", ("10.0.0.1", 5000), ("10.0.0.2", 80)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 80\r\n"
    # an IPv4 client on a dual-stack socket appears as IPv4
    assert header(1, "tcp", ("::ffff:10.0.0.1", 5000, 0, 0), ("::ffff:10.0.0.2", 80, 0, 0)) == (
        b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 80\r\n")
    assert parse_v2(header(2, "tcp", ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0)))[:5] == (
        "2001:db8::1", 1, "2001:db8::2", 2, "tcp")


def test_proxy_protocol_v1_with_udp_is_a_usage_error():
    p = Proxy(["-proto", "udp", "-host-port", "53", "-container-port", "53", "-proxy-protocol", "v1"],
              wait_ready=False)
    assert p.proc.wait(timeout=10) == 2


@pytest.mark.parametrize("flag", [["-proxy-protocol", "v2"], ["-transparent"]])
def test_sctp_refuses_what_only_tcp_and_udp_can_carry(flag):
    """PROXY protocol has no SCTP form; -transparent's source binding is TCP/UDP only."""
    p = Proxy(["-proto", "sctp", "-host-port", "3868", "-container-port", "3868", *flag],
              wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    assert p.status == f"1\nargument {flag[0]}: TCP and UDP only, not SCTP".encode()


# -- allow list, connection cap ---------------------------------------------------------------

async def connect_from(source: str, port: int, dest: str = "127.0.0.1") -> bytes:
    """Send b"hi" from `source` and return what comes back (b"" if closed or reset)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (dest, port))
    except ConnectionResetError:  # a refusal may be quicker than the connect's completion
        sock.close()
        return b""
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"hi")
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_allow_list_tcp_v4() -> None:
    async with backend() as bport, tcp_proxy(bport, "-allow", "127.0.0.2/32", host_ip="0.0.0.0") as server:
        port = server.relays[0].port
        assert await connect_from("127.0.0.2", port) == b"hi"
        assert await connect_from("127.0.0.1", port) == b""
        stats = server.relays[0].stats
        assert stats.rejected_denied == 1 and stats.accepted == 2 and stats.dial_failures == 0


@needs_ipv6
async def test_allow_list_tcp_v6() -> None:
    async with backend() as bport:
        async with tcp_proxy(bport, "-allow", "::1/128", host_ip="::1") as server:
            assert await connect_from("::1", server.relays[0].port, "::1") == b"hi"
        async with tcp_proxy(bport, "-allow", "2001:db8::/32", "-allow", "127.0.0.0/8",
                             host_ip="::1") as server:
            assert await connect_from("::1", server.relays[0].port, "::1") == b""
            assert server.relays[0].stats.rejected_denied == 1


@pytest.mark.parametrize("family", ["v4", pytest.param("v6", marks=needs_ipv6)])
async def test_allow_list_udp(family: str) -> None:
    host, allowed, denied_net = ("127.0.0.1", "127.0.0.2", "127.0.0.1/32") if family == "v4" else (
        "::1", "::1", "2001:db8::/32")
    async with udp_backend(host) as (bport, backend_proto), udp_proxy(
        bport, "-allow", allowed if family == "v4" else "::1/128",
        host_ip="0.0.0.0" if family == "v4" else "::1", container_ip=host,
    ) as server:
        port = server.relays[0].port
        fam = socket.AF_INET if family == "v4" else socket.AF_INET6
        ok = socket.socket(fam, socket.SOCK_DGRAM)
        ok.bind((allowed, 0))
        ok.settimeout(3)
        ok.sendto(b"q", (host, port))
        assert await asyncio.to_thread(ok.recv, 100) == b"re:q"
        ok.close()
    if family == "v4":
        async with udp_backend(host) as (bport, backend_proto), udp_proxy(
            bport, "-allow", "127.0.0.2/32", host_ip="0.0.0.0") as server:
            port = server.relays[0].port
            bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            bad.bind(("127.0.0.1", 0))
            bad.sendto(b"q", ("127.0.0.1", port))
            await asyncio.sleep(0.3)
            assert backend_proto.sources == [] and server.relays[0].stats.datagrams_denied == 1
            bad.close()
    else:
        async with udp_backend(host) as (bport, backend_proto), udp_proxy(
            bport, "-allow", denied_net, host_ip="::1", container_ip="::1") as server:
            port = server.relays[0].port
            bad = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            bad.sendto(b"q", ("::1", port))
            await asyncio.sleep(0.3)
            assert backend_proto.sources == [] and server.relays[0].stats.datagrams_denied == 1
            bad.close()


async def test_connection_cap_refuses_extra_connections_only() -> None:
    async with backend() as bport, tcp_proxy(bport, "-max-conns", "2") as server:
        port = server.relays[0].port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, writer in held:
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
        assert await connect_from("127.0.0.1", port) == b""  # the third is closed at once
        for reader, writer in held:  # the open ones are unaffected
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
        held[0][1].close()
        await asyncio.sleep(0.1)
        assert await connect_from("127.0.0.1", port) == b"hi"  # room again
        assert server.relays[0].stats.rejected_limit == 1
        held[1][1].close()


# -- dialling ---------------------------------------------------------------------------------

async def test_dial_retry_gives_up_cleanly_after_the_deadline() -> None:
    bport = free_port()
    async with tcp_proxy(bport, "-dial-retry", "300ms") as server:
        assert await connect_from("127.0.0.1", server.relays[0].port) == b""
        assert server.relays[0].stats.dial_failures == 1
        assert server.relays[0].connections == set()


async def test_dial_timeout_against_a_backend_that_never_answers() -> None:
    with silent_listener() as silent_port:
        async with tcp_proxy(silent_port, "-dial-timeout", "300ms") as server:
            assert await connect_from("127.0.0.1", server.relays[0].port) == b""
            assert server.relays[0].stats.dial_failures == 1


# -- draining ---------------------------------------------------------------------------------

def test_drain_on_sigterm_finishes_an_inflight_transfer():
    payload = os.urandom(6 * 1024 * 1024)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()

    def slow_sender() -> None:
        conn, _ = lsock.accept()
        with conn:
            for i in range(0, len(payload), 64 * 1024):  # ~1 s in all
                conn.sendall(payload[i : i + 64 * 1024])
                time.sleep(0.01)

    threading.Thread(target=slow_sender, daemon=True).start()
    port = free_port()
    p = Proxy([*docker_args(port, lsock.getsockname()[1]), "-drain-timeout", "20s"])
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    received = bytearray(client.recv(65536))
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", port), timeout=2)
    while chunk := client.recv(65536):
        received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    client.close()  # the last open direction ends: the drain is over
    assert p.proc.wait(timeout=10) == 0
    lsock.close()


# -- transparent mode -------------------------------------------------------------------------

PEER_SERVER = r"""
import socket, sys
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", 80)); tcp.listen()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 80))
print("ready", flush=True)
import threading
def serve_udp():
    while True:
        data, addr = udp.recvfrom(100); udp.sendto(addr[0].encode(), addr)
threading.Thread(target=serve_udp, daemon=True).start()
while True:
    conn, addr = tcp.accept(); conn.sendall(addr[0].encode()); conn.close()
"""

ASK = r"""
import socket, sys
kind = sys.argv[1]
if kind == "tcp":
    s = socket.create_connection(("198.18.1.1", 8080), timeout=5); print(s.recv(100).decode())
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(b"q", ("198.18.1.1", 8080)); print(s.recv(100).decode())
"""


@needs_netns
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_transparent_mode_backend_sees_the_client_address(proto):
    """client (198.18.1.2) -> proxy host (198.18.1.1 | 198.18.2.1) -> container (198.18.2.2)."""
    with Lab() as lab:
        client, host, container = lab.host("client"), lab.host("proxy"), lab.host("ctr")
        lab.link(client, "eth0", "198.18.1.2/24", host, "front", "198.18.1.1/24")
        lab.link(host, "back", "198.18.2.1/24", container, "eth0", "198.18.2.2/24")
        client.ip("route", "add", "default", "via", "198.18.1.1")
        container.ip("route", "add", "default", "via", "198.18.2.1")
        # The container answers the client's address; the host must deliver those replies to
        # its own transparent sockets instead of routing them on (the README's recipe).
        host.ip("rule", "add", "iif", "back", "lookup", "100")
        host.ip("route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        server = lab.spawn(container, sys.executable, "-c", PEER_SERVER, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        p = Proxy(["-proto", proto, "-host-ip", "198.18.1.1", "-host-port", "8080",
                   "-container-ip", "198.18.2.2", "-container-port", "80", "-transparent"],
                  prefix=host.prefix())
        try:
            seen = client.run(sys.executable, "-c", ASK, proto).strip()
            assert seen == "198.18.1.2"
        finally:
            p.stop()


def test_transparent_without_cap_net_admin_fails_clearly():
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop CAP_NET_ADMIN")
    prefix = (["setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw"]
              if os.geteuid() == 0 else [])
    p = Proxy([*docker_args(free_port(), 80), "-transparent"], prefix=prefix, wait_ready=False)
    assert p.status.startswith(b"1\n-transparent: setsockopt IP_TRANSPARENT: operation not permitted")
    assert p.proc.wait(timeout=10) == 1
