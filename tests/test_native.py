"""The C relay (proxy/relays/_native.c): which mappings it serves, and what it does on its
own rather than through the event loop (its dial timer, its accept under fd exhaustion, its
counters), attacked with a storm of clients ending every way at once.

What it shares with the Python relay (half-close, resets passed on, backpressure, splice, the
dial, -max-conns, stopping) is tested in test_tcp.py on both relays (the tcp_relay fixture),
and every subprocess test of a build that has it runs it: it is the default.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
import struct
import time

import pytest

from proxy.ground import accesslog
from proxy.ground.config import RelayOptions, parse_ip, parse_publish
from proxy.relays import native
from proxy.relays.native import NativeTcpListener
from proxy.relays.tcp import TcpListener
from tests.helpers import (
    EchoBackend,
    Proxy,
    backend,
    exchange,
    fd_limit,
    free_port,
    open_fds,
    scrape,
    sha,
    silent_listener,
    tcp_proxy,
    value,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not native.available(), reason="this build has no C relay (PYPROXY_COMPILE=1)"),
]


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def reset_close(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


# -- which relay a mapping gets -------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "relay"), [
    ([], NativeTcpListener),
    (["-max-conns", "10", "-dial-timeout", "2s"], NativeTcpListener),
    (["-allow", "127.0.0.0/8"], TcpListener),
    (["-proxy-protocol", "v1"], TcpListener),
    (["-idle-timeout", "5s"], TcpListener),
    (["-dial-retry", "1s"], TcpListener),
])
async def test_a_mapping_gets_the_c_relay_unless_it_asks_for_what_only_python_does(
        extra: list[str], relay: type) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(200)  # a PROXY header, if any, then the client's FIN
        writer.write(b"hi")
        writer.close()

    async with backend(greet) as bport, tcp_proxy(bport, *extra) as server:
        assert type(server.relays[0]) is relay
        assert await roundtrip(server.relays[0].port, b"") == b"hi"


def test_the_access_log_debug_logging_and_pyproxy_native_0_keep_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    [mapping] = parse_publish("127.0.0.1:8080:80/tcp", parse_ip("127.0.0.1"))
    options = RelayOptions()
    assert native.serves(mapping, options)
    with monkeypatch.context() as m:
        m.setattr(accesslog, "current", object())
        assert not native.serves(mapping, options)
    logger = logging.getLogger("pyproxy")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # (setLevel, not the attribute: it clears the level cache)
    try:
        assert not native.serves(mapping, options)
    finally:
        logger.setLevel(level)
    with monkeypatch.context() as m:
        m.setenv("PYPROXY_NATIVE", "0")
        assert not native.serves(mapping, options)


# -- the dial ---------------------------------------------------------------------------------------

async def test_a_dial_that_times_out_resets_its_client_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """-dial-timeout on the C relay's own timer: the client is reset, the failure counted and
    logged in the Python relay's words, and the connection's fds are gone."""
    with silent_listener() as silent_port:
        async with tcp_proxy(silent_port, "-dial-timeout", "200ms") as server:
            relay = server.relays[0]
            started = asyncio.get_running_loop().time()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)
            assert asyncio.get_running_loop().time() - started >= 0.19
            writer.close()
            assert relay.stats.dial_failures == 1 and relay.stats.active == 0
            assert relay.open_count == 0
    [line] = [r.getMessage() for r in caplog.records if "dial" in r.getMessage()]
    assert line.endswith(f"dial 127.0.0.1:{silent_port}: timed out"), line


async def test_a_refused_dial_resets_its_client_and_the_relay_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    bport = free_port()
    async with tcp_proxy(bport) as server:
        relay = server.relays[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()
        assert relay.stats.dial_failures == 1
        assert any(r.getMessage().endswith("connection refused") for r in caplog.records)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)  # still serving
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        writer.close()
        assert relay.stats.dial_failures == 2
    assert relay.open_count == 0


async def test_counters_reach_the_mapping_stats() -> None:
    """What /metrics and -list read: the C relay adds its counts to MappingStats after each
    batch of events."""
    payload = os.urandom(300_000)
    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        assert await roundtrip(relay.port, payload) == payload
        for _ in range(100):
            if relay.stats.active == 0:
                break
            await asyncio.sleep(0.01)
        stats = relay.stats
        assert (stats.accepted, stats.active) == (1, 0)
        assert stats.bytes_from_client == stats.bytes_from_container == len(payload)
        assert sum(stats.dial_bucket_counts) == 1 and 0 < stats.dial_seconds_sum < 5


# -- stopping ---------------------------------------------------------------------------------------

async def test_stop_accepting_frees_the_port_and_open_connections_keep_flowing() -> None:
    """A drain: the listener is closed at once (the port can be bound again), a connection
    already open still relays, and abort_all() then closes it and lets go of the relay."""
    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        port = relay.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
        relay.stop_accepting()
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
        writer.write(b"b")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"b"
        assert relay.abort_all() == 1
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert relay.open_count == 0


def test_a_relay_dropped_in_a_reference_cycle_is_collected_and_lets_go_of_its_fds() -> None:
    """The listener holds its C relay and the relay holds the listener's bound method: a
    cycle that only the garbage collector can break, so the relay must take part in it (or a
    listener dropped without abort_all() keeps its epoll set and timer for good)."""
    from proxy.ground.stats import DIAL_BUCKETS, MappingStats
    from proxy.relays._native import Relay

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        before = open_fds()

        def a_cycle() -> None:
            holder: list[object] = []
            core = Relay(sock.fileno(), socket.AF_INET, "127.0.0.1", 9, 0.0, 0, 60,
                         MappingStats(), DIAL_BUCKETS, lambda *event: holder)
            holder.append(core)
            assert gc.is_tracked(core) and len(open_fds() - before) == 2  # epoll set, timer

        a_cycle()
        gc.collect()
        assert open_fds() == before


# -- attacks ----------------------------------------------------------------------------------------

async def test_a_storm_of_clients_ending_every_way_leaves_the_well_behaved_ones_intact() -> None:
    """300 clients at once: echoes of 1 B to 1 MiB, half-closes, resets mid-transfer, clients
    that leave before the dial completes, slow readers. Every client that stays gets exactly
    its bytes back; afterwards nothing is open and no fd is left."""
    rng = random.Random(17)

    async def one(port: int, kind: str) -> bool:
        size = rng.choice([1, 100, 5000, 70_000, 300_000, 1 << 20])
        payload = os.urandom(size)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if kind == "leave":
                reset_close(writer)
                return True
            writer.write(payload)
            if kind == "reset":
                await asyncio.sleep(rng.random() / 100)
                reset_close(writer)
                return True
            writer.write_eof()
            if kind == "slow":
                got = bytearray()
                while chunk := await asyncio.wait_for(reader.read(4096), 20):
                    got += chunk
                    if len(got) % 65536 < 4096:
                        await asyncio.sleep(0.001)
            else:
                got = bytearray(await asyncio.wait_for(reader.read(), 20))
            writer.close()
            return sha(bytes(got)) == sha(payload)
        except ConnectionError:
            writer.close()
            return kind in ("leave", "reset")

    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        assert await roundtrip(relay.port, b"warm") == b"warm"  # the loops' lazy fds made
        before = len(os.listdir("/proc/self/fd"))
        kinds = [rng.choice(["echo", "echo", "slow", "reset", "leave"]) for _ in range(300)]
        results = await asyncio.gather(*(one(relay.port, kind) for kind in kinds))
        assert all(results), [k for k, ok in zip(kinds, results, strict=True) if not ok]
        for _ in range(300):
            if relay.open_count == 0:
                break
            await asyncio.sleep(0.01)
        assert relay.open_count == 0 and relay.stats.active == 0
        assert await roundtrip(relay.port, b"still here") == b"still here"
        for _ in range(100):
            if len(os.listdir("/proc/self/fd")) <= before:
                break
            await asyncio.sleep(0.02)
        assert len(os.listdir("/proc/self/fd")) <= before


def test_out_of_fds_the_relay_backs_off_and_serves_again_once_they_are_free(tmp_path) -> None:
    """Under `ulimit -n 40`, 40 clients held open exhaust the process's fds: some are served,
    the others wait in the accept queue or are reset; none crash the process, the log says it
    a few times rather than per accept, and once they leave a new client is served."""
    echo = EchoBackend()
    port = free_port()
    log_file = tmp_path / "pyproxy.log"
    p = Proxy(["-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip", "127.0.0.1",
               "-container-port", str(echo.port), "-log-file", str(log_file)], preexec=fd_limit(40))
    held = []
    try:
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(c)
        served = 0
        for c in held:
            try:
                c.settimeout(0.5)
                c.sendall(b"x")
                served += c.recv(1) == b"x"
            except OSError:
                pass
        assert 0 < served < 40
        for c in held:
            c.close()
        held = []
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"again")
                    c.shutdown(socket.SHUT_WR)
                    c.settimeout(2)
                    if c.recv(10) == b"again":
                        break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("not served once the fds were free")
        assert p.proc.poll() is None
    finally:
        for c in held:
            c.close()
        echo.close()
    out, err = p.stop()
    assert p.proc.returncode == 0 and b"Traceback" not in err
    lines = log_file.read_text().splitlines()
    assert len(lines) < 60, lines[:10]


def test_metrics_of_a_c_relayed_mapping(tmp_path) -> None:
    """/metrics of a pyproxy whose mapping the C relay serves: connections, bytes both ways,
    the dial histogram and failures, as the Python relay counts them."""
    echo = EchoBackend()
    port, metrics = free_port(), free_port()
    p = Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{port}:{echo.port}",
               "-metrics-addr", f"127.0.0.1:{metrics}"])
    try:
        big = os.urandom(2 * 1024 * 1024)
        for payload in (b"one", b"two", big):
            assert exchange("127.0.0.1", port, payload) == payload
        m = scrape(metrics)
    finally:
        echo.close()
    p.stop()
    mapping = {"host_port": str(port)}
    assert value(m, "pyproxy_connections_accepted_total", **mapping) == 3
    assert value(m, "pyproxy_connections_active", **mapping) == 0
    assert value(m, "pyproxy_bytes_total", **mapping) == 2 * (6 + len(big))
    assert value(m, "pyproxy_backend_dial_duration_seconds_count", **mapping) == 3
    assert value(m, "pyproxy_backend_dial_failures_total", **mapping) == 0
