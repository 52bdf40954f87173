"""The TCP relay on real loopback sockets, on uvloop and on the standard loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import socket
import struct

import pytest

from proxy.relays.tcp import EARLY_DATA_LIMIT, HIGH_WATER, ClientSide, ContainerSide, Dial
from tests.helpers import (
    backend,
    echo_after_eof,
    fds_back_to,
    free_port,
    needs_ipv6,
    open_fds,
    sha,
    silent_listener,
    tcp_proxy,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("tcp_relay")]


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


async def test_slow_reader_keeps_proxy_buffers_bounded(tcp_relay: str) -> None:
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
            for client in list(getattr(listener, "connections", ())):  # the C relay holds
                peak = max(peak, client.transport.get_write_buffer_size())  # one read at most
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        sock.close()
        assert sha(bytes(received)) == sha(payload)
        # the buffer towards the slow client never holds much more than the high-water mark;
        # once the flow is spliced, the bound is the pipe's, in the kernel
        assert peak <= HIGH_WATER + 256 * 1024
        assert peak > 0 or listener.stats.spliced == 1 or tcp_relay == "native"


async def test_500_concurrent_connections_each_get_their_own_bytes() -> None:
    async with backend() as bport, tcp_proxy(bport) as server:
        port = server.relays[0].port

        async def one(i: int) -> bool:
            payload = f"client {i} ".encode() * 100
            return await roundtrip("127.0.0.1", port, payload) == payload

        results = await asyncio.gather(*(one(i) for i in range(500)))
        assert all(results)
        await asyncio.sleep(0.1)
        assert server.relays[0].open_count == 0


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


def relayed_sockets(port: int, bport: int) -> list[socket.socket]:
    """The relay's two sockets of a connection in this process, found by address (so whichever
    relay made them): the one accepted on `port`, and the one dialled to `bport`. Duplicates,
    for the caller to close."""
    found, seen = [], set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
            if not what.startswith("socket:") or what in seen:  # a socket, once (a loop may dup)
                continue
            seen.add(what)
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                name, peer = sock.getsockname(), sock.getpeername()
                if name[1] == port or peer[1] == bport:
                    found.append(sock)
                    continue
        except OSError:
            pass  # a listener, not connected
        sock.close()
    return found


async def test_both_sockets_get_nodelay_and_15s_keepalive() -> None:
    async with backend() as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        sockets = relayed_sockets(server.relays[0].port, bport)
        assert len(sockets) == 2
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
            sock.close()
        writer.close()


async def test_bulk_directions_switch_to_splice_and_arrive_intact() -> None:
    """A bulk download then an upload on one connection: both directions splice, every
    byte arrives in order, and the half-close in between still works."""
    down = os.urandom(32 * 1024 * 1024)
    up_size = 24 * 1024 * 1024

    async def download_then_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(down)
        await writer.drain()
        writer.write_eof()  # our direction is done; the client's keeps flowing
        received = hashlib.sha256()
        total = 0
        while chunk := await reader.read(1 << 20):
            received.update(chunk)
            total += len(chunk)
        writer.close()
        results.append((total, received.hexdigest()))

    results: list[tuple[int, str]] = []
    async with backend(download_then_count) as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        got = await reader.read()  # until the backend's FIN, passed on by the proxy
        assert sha(got) == sha(down)
        up = os.urandom(up_size)
        for i in range(0, up_size, 1 << 20):
            writer.write(up[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()
        for _ in range(200):
            if results:
                break
            await asyncio.sleep(0.05)
        writer.close()
        assert results == [(up_size, hashlib.sha256(up).hexdigest())]
        stats = server.relays[0].stats
        assert stats.spliced == 2  # both directions went zero-copy
        assert stats.bytes_from_container == len(down) and stats.bytes_from_client == up_size


async def test_reset_during_a_spliced_transfer_reaches_the_client() -> None:
    async def flood_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(os.urandom(16 * 1024 * 1024))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        writer.transport.abort()

    async with backend(flood_then_reset) as bport, tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(1 << 20), 10):
                await asyncio.sleep(0.001)  # a slowish reader: the reset finds data in flight
        writer.close()
        assert server.relays[0].stats.spliced == 1


async def test_a_refused_dial_is_logged_in_the_same_words_on_both_loops(caplog) -> None:
    """The log line says what the errno says, in Go's words as docker-proxy's would, on either
    loop (their own wording differs: the standard loop's sock_connect says "Connect call
    failed (...)"); the SCTP relay words it the same way."""
    absent = free_port()
    caplog.set_level(logging.WARNING, logger="pyproxy")
    async with tcp_proxy(absent) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        with pytest.raises(ConnectionResetError):  # the client is reset, as the dial failed
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert f"dial 127.0.0.1:{absent}: connection refused" in caplog.text


# -- the dial: callbacks, no Task ----------------------------------------------------------------

def leave(writer: asyncio.StreamWriter) -> None:
    """Close with a reset: a client gone (a FIN alone is a half-close that awaits an answer)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_a_dial_under_way_is_no_task_and_a_leaving_client_cancels_it() -> None:
    """The dial is driven by callbacks (a Task per connection cost more than the connect).
    A client that leaves mid-dial stops it: no dial failure, nothing left behind."""
    with silent_listener() as silent_port:
        async with tcp_proxy(silent_port) as server:
            relay = server.relays[0]
            tasks_before = asyncio.all_tasks()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            for _ in range(100):
                if relay.open_count:
                    break
                await asyncio.sleep(0.01)
            assert relay.open_count == 1
            assert len(getattr(relay, "dialing", [None])) == 1  # the C relay's are not Python's
            assert asyncio.all_tasks() == tasks_before
            leave(writer)
            for _ in range(200):
                if not relay.open_count:
                    break
                await asyncio.sleep(0.01)
            assert relay.open_count == 0 and getattr(relay, "dialing", {}) == {}
            assert relay.stats.dial_failures == 0 and relay.stats.active == 0


async def test_dial_retry_reaches_a_backend_that_starts_late() -> None:
    """Refusals are retried on a timer until the container listens; early data waits."""
    bport = free_port()
    async with tcp_proxy(bport, "-dial-retry", "5s") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"early")
        writer.write_eof()
        await asyncio.sleep(0.2)  # a few refusals
        async def echo_all(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read())
            await w.drain()
            w.close()

        late = await asyncio.start_server(echo_all, "127.0.0.1", bport)
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b"early"
        finally:
            late.close()
        writer.close()
        assert server.relays[0].stats.dial_failures == 0


async def test_a_client_leaving_between_retries_ends_the_dial_quietly() -> None:
    bport = free_port()
    async with tcp_proxy(bport, "-dial-retry", "5s") as server:
        relay = server.relays[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        await asyncio.sleep(0.2)  # refused, waiting to retry
        leave(writer)
        for _ in range(200):
            if not relay.connections:
                break
            await asyncio.sleep(0.01)
        assert relay.connections == set() and relay.dialing == {}
        await asyncio.sleep(0.6)  # past the next retry: it must not run
        assert relay.stats.dial_failures == 0


async def test_finished_connections_leave_no_cycles_for_the_gc(tcp_relay: str) -> None:
    """Relayed, refused and dial-failed connections are freed by reference counting alone:
    what only the cyclic GC can free makes its passes longer (keep-alive tail latency)."""
    if tcp_relay == "native":
        pytest.skip("the C relay makes no Python object per connection")
    gc.collect()
    gc.disable()
    try:
        async with backend() as bport, tcp_proxy(bport) as server:
            for _ in range(20):
                assert await roundtrip("127.0.0.1", server.relays[0].port, b"x") == b"x"
        async with tcp_proxy(free_port()) as server:  # refused: the dial fails
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
        with silent_listener() as silent_port:  # the dial times out, then is cancelled
            async with tcp_proxy(silent_port, "-dial-timeout", "200ms") as server:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
                assert server.relays[0].stats.dial_failures == 1
        await asyncio.sleep(0.1)
        left = [o for o in gc.get_objects() if isinstance(o, (ClientSide, ContainerSide, Dial))]
        assert left == []
    finally:
        gc.enable()


# -- stopping while a client is half accepted -------------------------------------------------
#
# The standard loop takes a client off the kernel's queue in its accept callback and builds
# its transport a loop turn later; a stop in between used to lose the client (CPython
# gh-109564: neither served nor closed, it hung, then was reset). Each test stops at every
# turn from 0 to 5 after the client connected, so one of them lands in that window. The
# listening socket has a second holder (`other`), as in the engine: the waiter, or the
# supervisor of a worker.

async def _client_end(client: socket.socket) -> bytes:
    """What the client reads until its connection ends (EOF or reset)."""
    loop, data = asyncio.get_running_loop(), b""
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 100), 5):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _still_queued(other: socket.socket) -> bool:
    """Whether the client is still in the kernel's queue, for the other holder to take."""
    try:
        other.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("turns", range(6))
async def test_a_client_accepted_as_the_listener_stops_is_served_or_left_queued(turns):
    """A reload's quiesce (or a worker's drop with a drain): the client is served here, or
    left in the queue for the socket's other holder; never taken and dropped."""
    async with backend() as bport, tcp_proxy(bport) as server:
        other = server.sockets[0].dup()
        other.setblocking(False)
        with other, socket.create_connection(("127.0.0.1", server.relays[0].port)) as client:
            client.sendall(b"hi")
            client.shutdown(socket.SHUT_WR)
            client.setblocking(False)
            for _ in range(turns):
                await asyncio.sleep(0)
            server.stop_accepting()
            await asyncio.sleep(0)  # the stop's own deferred part
            if not _still_queued(other):
                assert await _client_end(client) == b"hi"


@pytest.mark.parametrize("turns", range(6))
async def test_a_client_accepted_as_the_listener_closes_is_closed_too(turns):
    """close() with no drain: the client is closed with the rest (or left queued), never left
    hanging nor served on by a closed listener."""
    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        other = server.sockets[0].dup()
        other.setblocking(False)
        with other, socket.create_connection(("127.0.0.1", relay.port)) as client:
            client.sendall(b"hi")  # and no FIN: served, it would stay open
            client.setblocking(False)
            for _ in range(turns):
                await asyncio.sleep(0)
            await server.close()
            await asyncio.sleep(0)
            if not _still_queued(other):
                await _client_end(client)  # within its bound: it ends
            assert relay.open_count == 0


# -- every way a connection ends closes both its sockets ---------------------------------------

async def talk(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    return reader, writer


async def gone(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):  # reset, as the case may be
        await writer.wait_closed()


@pytest.mark.parametrize("end", ["client-fin", "client-reset", "backend-reset", "refused-max-conns",
                                 "idle-timeout", "shutdown"])
async def test_each_way_a_connection_ends_closes_its_sockets(end: str) -> None:
    """The relay's sockets are closed when the connection ends, not left to the garbage
    collector (a ResourceWarning, and an fd held until a GC pass): counted in /proc/self/fd
    while the proxy still serves (or once it has shut down)."""
    backends: list[asyncio.StreamWriter] = []

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backends.append(writer)  # for the test to reset
        writer.write(await reader.read(1))
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    extra = {"refused-max-conns": ["-max-conns", "1"], "idle-timeout": ["-idle-timeout", "200ms"]}
    async with backend(echo_once) as bport:
        before = open_fds()
        async with tcp_proxy(bport, *extra.get(end, [])) as server:
            port = server.relays[0].port
            serving = open_fds()  # the listener
            reader, writer = await talk(port)
            if end == "client-fin":
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b""
                await gone(writer)
            elif end == "client-reset":
                leave(writer)
                await gone(writer)
            elif end == "backend-reset":
                leave(backends[0])
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                await gone(writer)
            elif end == "refused-max-conns":
                # The reset may come before the client's connect() returns (the C relay
                # refuses in its accept) or after.
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
                    try:
                        await asyncio.wait_for(r2.readexactly(1), 5)
                    finally:
                        await gone(w2)
                await gone(writer)
                assert server.relays[0].stats.rejected_limit == 1
            elif end == "idle-timeout":
                assert await asyncio.wait_for(reader.read(), 5) == b""
                await gone(writer)
                assert server.relays[0].stats.closed_idle == 1
            if end != "shutdown":
                assert await fds_back_to(serving) == set()
                assert server.relays[0].open_count == 0
        if end == "shutdown":  # the proxy closed with the connection open
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await gone(writer)
        assert await fds_back_to(before) == set()
