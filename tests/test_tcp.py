"""The TCP relay on real loopback sockets, on uvloop and on the standard loop."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from proxy.tcp import EARLY_DATA_LIMIT, HIGH_WATER
from tests.conftest import free_port, needs_ipv6
from tests.helpers import backend, echo_after_eof, sha, tcp_proxy

pytestmark = pytest.mark.timeout(60)


async def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.parametrize(
    "host_ip, container_ip",
    [
        ("127.0.0.1", "127.0.0.1"),
        pytest.param("::1", "::1", marks=needs_ipv6),
        pytest.param("::1", "127.0.0.1", marks=needs_ipv6),  # IPv6 frontend, IPv4 container
    ],
)
async def test_echo_roundtrip(host_ip: str, container_ip: str) -> None:
    async with backend(host=container_ip) as bport, tcp_proxy(
        bport, host_ip=host_ip, container_ip=container_ip
    ) as server:
        port = server.relays[0].port
        assert await roundtrip(host_ip, port, b"hello through the proxy") == b"hello through the proxy"


async def test_specific_host_ip_refuses_other_addresses() -> None:
    async with backend() as bport, tcp_proxy(bport, host_ip="127.0.0.2") as server:
        port = server.relays[0].port
        assert await roundtrip("127.0.0.2", port, b"x") == b"x"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_half_close_reaches_backend_and_reply_still_flows() -> None:
    async with backend(echo_after_eof) as bport, tcp_proxy(bport) as server:
        data = await roundtrip("127.0.0.1", server.relays[0].port, b"question")
        assert data == b"got:question"


async def test_backend_closing_first_reaches_client_as_eof() -> None:
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    async with backend(greet_and_close) as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        # and the client can still send: its direction was only half-closed by the backend
        writer.close()


async def test_64_mib_each_way_arrives_intact() -> None:
    payload = os.urandom(64 * 1024 * 1024)
    async with backend() as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                writer.write(view[i : i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await reader.read()
        await sender
        writer.close()
        assert len(received) == len(payload)
        assert sha(received) == sha(payload)
        stats = server.stats[next(iter(server.stats))]
        assert stats.bytes_from_client == stats.bytes_from_container == len(payload)


async def test_slow_reader_keeps_proxy_buffers_bounded() -> None:
    """The backend floods, the client reads slowly: the proxy must stop reading the backend."""
    size = 24 * 1024 * 1024
    payload = os.urandom(size)

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    async with backend(flood) as bport, tcp_proxy(bport) as server:
        listener = server.relays[0]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a small window: slow to drain
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listener.port))
        received = bytearray()
        peak = 0
        while True:
            await asyncio.sleep(0.002)
            for client in list(listener.connections):
                peak = max(peak, client.transport.get_write_buffer_size())
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        sock.close()
        assert sha(bytes(received)) == sha(payload)
        # the buffer towards the slow client never holds much more than the high-water mark
        assert 0 < peak <= HIGH_WATER + 256 * 1024


async def test_500_concurrent_connections_each_get_their_own_bytes() -> None:
    async with backend() as bport, tcp_proxy(bport) as server:
        port = server.relays[0].port

        async def one(i: int) -> bool:
            payload = f"client {i} ".encode() * 100
            return await roundtrip("127.0.0.1", port, payload) == payload

        results = await asyncio.gather(*(one(i) for i in range(500)))
        assert all(results)
        await asyncio.sleep(0.1)
        assert server.relays[0].connections == set()


async def test_refused_backend_closes_client_and_keeps_serving() -> None:
    bport = free_port()
    async with tcp_proxy(bport) as server:
        port = server.relays[0].port
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            except ConnectionResetError:
                pass  # a reset is the expected way to say "no backend"
            writer.close()
        assert server.stats[next(iter(server.stats))].dial_failures == 3
        # the backend comes up on that port: the same listener now relays
        listener = await asyncio.start_server(
            lambda r, w: (w.write(b"up"), w.close()), "127.0.0.1", bport
        )
        async with listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b"up"
            writer.close()


async def test_early_data_is_held_and_delivered_in_order() -> None:
    """With -dial-retry, the client talks before the container listens; nothing is lost."""
    bport = free_port()
    async with tcp_proxy(bport, "-dial-retry", "10s") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        early = b"".join(b"%06d," % i for i in range(EARLY_DATA_LIMIT // 4))  # ~1.7x the limit
        writer.write(early)
        writer.write_eof()
        await asyncio.sleep(0.3)
        srv = await asyncio.start_server(echo_after_eof, "127.0.0.1", bport)
        async with srv:
            data = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        assert data == b"got:" + early


async def test_backend_reset_reaches_client_as_reset() -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.transport.abort()

    async with backend(reset_after_hello) as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()


async def test_both_sockets_get_nodelay_and_15s_keepalive() -> None:
    async with backend() as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        [client] = server.relays[0].connections
        for side in (client, client.peer):
            sock = side.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
        writer.close()
