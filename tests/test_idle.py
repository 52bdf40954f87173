"""-idle-timeout: silent TCP connections are closed (both ends) and counted; a trickle in
either direction keeps one open; a closed one frees its -max-conns slot. Both loops."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy.ground.flags import UsageError, parse_config
from proxy.ground.metrics import make_registry
from tests.helpers import EchoBackend, Proxy, backend, docker_args, echo, free_port, tcp_proxy

pytestmark = pytest.mark.timeout(60)


async def test_silent_connection_is_closed_with_its_backend_and_counted() -> None:
    backend_saw_eof = asyncio.Event()

    async def echo_then_note_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
        backend_saw_eof.set()
        writer.close()

    async with backend(echo_then_note_eof) as bport, tcp_proxy(bport, "-idle-timeout", "300ms") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        quiet_from = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        assert time.monotonic() - quiet_from >= 0.25  # not before the timeout (a jiffy's slack)
        await asyncio.wait_for(backend_saw_eof.wait(), 5)  # the backend connection went too
        writer.close()
        stats = server.relays[0].stats
        assert stats.closed_idle == 1 and stats.active == 0
        labels = {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": str(server.relays[0].port),
                  "container_ip": "127.0.0.1", "container_port": str(bport), "reason": "idle"}
        assert make_registry(server.stats).get_sample_value(
            "pyproxy_connections_closed_total", labels) == 1


@pytest.mark.parametrize("direction", ["client_to_container", "container_to_client"])
async def test_a_trickle_either_way_keeps_the_connection(direction: str) -> None:
    """A byte every 100 ms for three timeouts, one way only: never idle."""
    received = bytearray()

    async def trickle_or_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if direction == "container_to_client":
            for _ in range(12):
                writer.write(b".")
                await asyncio.sleep(0.1)
            writer.write(b"end")
        else:
            received.extend(await reader.readexactly(12))
            writer.write(b"end")
        await reader.read()
        writer.close()

    async with backend(trickle_or_sink) as bport, tcp_proxy(bport, "-idle-timeout", "400ms") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        if direction == "client_to_container":
            for _ in range(12):
                writer.write(b".")
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"end"
            assert received == b"." * 12
        else:
            assert await asyncio.wait_for(reader.readexactly(15), 5) == b"." * 12 + b"end"
        writer.close()
        assert server.relays[0].stats.closed_idle == 0


async def test_idle_close_frees_a_max_conns_slot() -> None:
    async with backend(echo) as bport, tcp_proxy(bport, "-max-conns", "1", "-idle-timeout", "300ms") as server:
        port = server.relays[0].port
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
        silent_w.write(b"x")
        assert await silent_r.readexactly(1) == b"x"
        # the slot is taken: the next client is turned away
        r, w = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        assert await asyncio.wait_for(silent_r.read(), 5) == b""  # idle: closed
        silent_w.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"now")
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"now"
        w.close()
        stats = server.relays[0].stats
        assert stats.closed_idle == 1 and stats.rejected_limit == 1


def test_idle_timeout_through_the_engine(tmp_path, proxy_loop_env):
    """The flag travels in the spawned pyproxy's argv and the engine applies it."""
    path = str(tmp_path / "engine.sock")
    Proxy(["-engine", "-engine-socket", path], env=proxy_loop_env)
    b = EchoBackend()
    port = free_port()
    try:
        Proxy([*docker_args(port, b.port), "-idle-timeout", "300ms"],
              env={"PYPROXY_ENGINE_SOCKET": path})
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"hi")
            assert c.recv(10) == b"hi"
            assert c.recv(10) == b""  # closed for idling, by the engine
    finally:
        b.close()


@pytest.mark.parametrize("value", ["-1s", "soon", "5"])
def test_bad_idle_timeout_names_the_flag(value: str) -> None:
    with pytest.raises(UsageError, match="-idle-timeout"):
        parse_config(["-host-port", "80", "-container-port", "80", f"-idle-timeout={value}"])
