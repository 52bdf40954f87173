"""The access log: one line per finished TCP connection / UDP flow, its fields in text and
JSON for each way a connection can end (both loops), and the flag end to end: stdout, a file
reopened on SIGHUP, the engine's, a path that can't be opened."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.ground import accesslog
from proxy.ground.accesslog import AccessLog
from proxy.relays.splice import SPLICE_AFTER, SPLICE_MIN_READ
from proxy.relays.tcp import ClientSide, ContainerSide, LoggedClientSide, LoggedContainerSide
from tests.helpers import (
    Proxy,
    backend,
    free_port,
    needs_ipv6,
    read_status,
    silent_listener,
    spawn,
    spawn_via,
    tcp_proxy,
    udp_backend,
    udp_client,
    udp_proxy,
)

pytestmark = pytest.mark.timeout(60)

FIELDS = ("time", "proto", "client", "frontend", "backend", "bytes_from_client",
          "bytes_from_backend", "duration", "end", "error")


def parse(line: str) -> dict[str, Any]:
    """A line of either format as the JSON form's fields (the text form's order is fixed)."""
    if line.startswith("{"):
        entry = json.loads(line)
        assert tuple(entry) == FIELDS
        return entry  # type: ignore[no-any-return]
    parts = line.split(" ", 9)
    entry = dict(zip(FIELDS, parts + [None] * (10 - len(parts)), strict=True))
    entry["bytes_from_client"] = int(entry["bytes_from_client"])
    entry["bytes_from_backend"] = int(entry["bytes_from_backend"])
    assert entry["duration"].endswith("s")
    entry["duration"] = float(entry["duration"][:-1])
    return entry


class Lines:
    """The lines written to an access log file, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen = 0

    def all(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    async def next(self, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.all()
            if len(lines) > self.seen:
                self.seen += 1
                return parse(lines[self.seen - 1])
            await asyncio.sleep(0.02)
        raise AssertionError(f"no access log line after {self.seen}: {self.all()}")


@pytest.fixture(params=["text", "json"])
def access(tmp_path: Path, request: pytest.FixtureRequest,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Lines]:
    """The process's access log on, to a file, for relays built in this test (its batches
    written sooner than a second after, for the tests' sake)."""
    monkeypatch.setattr(accesslog, "FLUSH_AFTER", 0.05)
    path = tmp_path / "access.log"
    log = accesslog.current = AccessLog(str(path), request.param)
    try:
        yield Lines(path)
    finally:
        accesslog.current = None
        log.handler.close()  # its file, not left to the garbage collector


@contextlib.asynccontextmanager
async def held_backend(host: str = "127.0.0.1") -> AsyncIterator[tuple[int, asyncio.Queue]]:
    """A backend that hands each accepted connection (reader, writer) to the test."""
    conns: asyncio.Queue = asyncio.Queue()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await conns.put((reader, writer))  # backend() closes it at the end

    async with backend(hold, host) as port:
        yield port, conns


def rst(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
    writer.transport.abort()


def addr(writer: asyncio.StreamWriter, which: str) -> str:
    host, port = writer.get_extra_info(which)[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def test_client_fin_first(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
        port = server.relays[0].port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        writer.write_eof()
        breader, bwriter = await conns.get()
        assert await breader.read() == b"hello"
        bwriter.write(b"bye!!!")
        bwriter.close()
        assert await reader.read() == b"bye!!!"
        writer.close()
        entry = await access.next()
    assert entry["proto"] == "tcp" and entry["end"] == "client-fin" and entry["error"] is None
    assert entry["client"] == addr(writer, "sockname")
    assert entry["frontend"] == f"127.0.0.1:{port}" and entry["backend"] == f"127.0.0.1:{bport}"
    assert (entry["bytes_from_client"], entry["bytes_from_backend"]) == (5, 6)
    assert entry["time"].endswith("Z") and 0 <= entry["duration"] < 30


async def test_backend_fin_first(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"q")
        breader, bwriter = await conns.get()
        assert await breader.readexactly(1) == b"q"
        bwriter.write(b"answer")
        bwriter.write_eof()
        assert await reader.read() == b"answer"
        writer.close()
        entry = await access.next()
    assert entry["end"] == "backend-fin"
    assert (entry["bytes_from_client"], entry["bytes_from_backend"]) == (1, 6)


async def test_client_reset(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"abc")
        breader, _bwriter = await conns.get()
        assert await breader.readexactly(3) == b"abc"
        rst(writer)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(breader.read(), 5) == b""
        entry = await access.next()
    assert entry["end"] == "client-reset" and entry["bytes_from_client"] == 3


async def test_backend_reset(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        _breader, bwriter = await conns.get()
        bwriter.write(b"xy")
        assert await reader.readexactly(2) == b"xy"
        rst(bwriter)
        with pytest.raises(ConnectionResetError):  # passed on as a reset
            await asyncio.wait_for(reader.read(), 5)
        entry = await access.next()
        writer.close()
    assert entry["end"] == "backend-reset" and entry["bytes_from_backend"] == 2


async def test_dial_refused(access: Lines) -> None:
    async with tcp_proxy(free_port()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        entry = await access.next()
        writer.close()
    assert entry["end"] == "dial-failed" and entry["error"] == "connection refused"


async def test_dial_timeout(access: Lines) -> None:
    """A backend whose accept queue is full: Linux drops the SYN, so the dial hangs."""
    with silent_listener() as silent_port:
        async with tcp_proxy(silent_port, "-dial-timeout", "300ms") as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 10)
            entry = await access.next()
            writer.close()
    assert entry["end"] == "dial-failed" and entry["error"] == "timed out"


async def test_refused_by_allow(access: Lines) -> None:
    async with held_backend() as (bport, _), tcp_proxy(bport, "-allow", "10.0.0.0/8") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        entry = await access.next()
        writer.close()
    assert entry["end"] == "refused-allow"
    assert (entry["bytes_from_client"], entry["bytes_from_backend"]) == (0, 0)


async def test_refused_by_max_conns(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport, "-max-conns", "1") as server:
        port = server.relays[0].port
        _first_r, first_w = await asyncio.open_connection("127.0.0.1", port)
        await conns.get()  # the first one is served
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        entry = await access.next()
        assert entry["end"] == "refused-max-conns" and entry["client"] == addr(writer, "sockname")
        writer.close()
        first_w.close()


async def test_idle_timeout(access: Lines) -> None:
    async with held_backend() as (bport, conns), tcp_proxy(bport, "-idle-timeout", "200ms") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        writer.write(b"1234")
        breader, _ = await conns.get()
        await breader.readexactly(4)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        entry = await access.next()
        writer.close()
    assert entry["end"] == "idle-timeout" and entry["bytes_from_client"] == 4


async def test_shutdown_with_a_connection_open(access: Lines) -> None:
    async with held_backend() as (bport, conns):
        async with tcp_proxy(bport) as server:
            _reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
            writer.write(b"zz")
            breader, _ = await conns.get()
            await breader.readexactly(2)
        entry = await access.next()  # the proxy has shut down
        writer.close()
    assert entry["end"] == "shutdown" and entry["bytes_from_client"] == 2


@needs_ipv6
async def test_ipv6_client_is_bracketed(access: Lines) -> None:
    async with held_backend("::1") as (bport, conns), tcp_proxy(
            bport, host_ip="::1", container_ip="::1") as server:
        port = server.relays[0].port
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write_eof()
        _, bwriter = await conns.get()
        bwriter.close()
        assert await reader.read() == b""
        writer.close()
        entry = await access.next()
    assert entry["client"] == addr(writer, "sockname") and entry["client"].startswith("[::1]:")
    assert entry["frontend"] == f"[::1]:{port}" and entry["backend"] == f"[::1]:{bport}"


async def test_wildcard_listener_names_the_address_reached(access: Lines) -> None:
    """A specific listener's frontend is formatted once; a wildcard's is each socket's own."""
    async with held_backend() as (bport, conns), tcp_proxy(bport, host_ip="0.0.0.0") as server:
        port = server.relays[0].port
        reader, writer = await asyncio.open_connection("127.0.0.2", port)
        writer.write_eof()
        _, bwriter = await conns.get()
        bwriter.close()
        assert await reader.read() == b""
        writer.close()
        entry = await access.next()
    assert entry["frontend"] == f"127.0.0.2:{port}" and entry["client"].startswith("127.0.0.1:")


async def test_byte_counts_exact_through_splice(access: Lines) -> None:
    """Both ways large enough to switch to splice: the kernel's counts are still exact."""
    up = os.urandom(SPLICE_MIN_READ * SPLICE_AFTER * 8 + 12345)
    down = os.urandom(SPLICE_MIN_READ * SPLICE_AFTER * 6 + 777)
    async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
        breader, bwriter = await conns.get()

        async def send_up() -> None:
            writer.write(up)
            await writer.drain()
            writer.write_eof()

        async def send_down() -> None:
            bwriter.write(down)
            await bwriter.drain()
            bwriter.write_eof()

        results = await asyncio.gather(send_up(), send_down(), breader.read(), reader.read())
        assert results[2] == up and results[3] == down
        writer.close()
        bwriter.close()
        entry = await access.next()
        assert server.relays[0].stats.spliced >= 1  # the case this test is about
    assert (entry["bytes_from_client"], entry["bytes_from_backend"]) == (len(up), len(down))
    assert entry["end"] in ("client-fin", "backend-fin")


@pytest.mark.parametrize("logged", [False, True])
async def test_sides_count_bytes_only_with_the_log_on(tmp_path: Path, logged: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Off, a connection is served by the plain sides, whose reads count nothing more; on,
    by the logged ones (each read adds its size to the line). (The Python relay's: off, a
    build with the C relay serves the mapping with that, proxy.relays.native.)"""
    monkeypatch.setenv("PYPROXY_NATIVE", "0")
    log = accesslog.current = AccessLog(str(tmp_path / "a.log"), "text") if logged else None
    try:
        async with held_backend() as (bport, conns), tcp_proxy(bport) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.relays[0].port)
            writer.write(b"x")
            breader, bwriter = await conns.get()
            await breader.readexactly(1)
            (client,) = server.relays[0].connections
            assert type(client) is (LoggedClientSide if logged else ClientSide)
            assert type(client.peer) is (LoggedContainerSide if logged else ContainerSide)
            writer.close()
            bwriter.close()
    finally:
        accesslog.current = None
        if log is not None:
            log.handler.close()


async def test_udp_flow_expiry(access: Lines) -> None:
    async with udp_backend() as (bport, _), udp_proxy(bport, "-udp-timeout", "200ms") as server:
        port = server.relays[0].port
        with udp_client() as c:
            c.settimeout(3)
            c.sendto(b"hello", ("127.0.0.1", port))
            assert (await asyncio.to_thread(c.recvfrom, 100))[0] == b"re:hello"
            entry = await access.next()
            assert entry["client"] == f"127.0.0.1:{c.getsockname()[1]}"
    assert entry["proto"] == "udp" and entry["end"] == "expired"
    assert entry["frontend"] == f"127.0.0.1:{port}" and entry["backend"] == f"127.0.0.1:{bport}"
    assert (entry["bytes_from_client"], entry["bytes_from_backend"]) == (5, 8)


async def test_udp_flow_eviction_and_shutdown(access: Lines) -> None:
    async with udp_backend() as (bport, _):
        async with udp_proxy(bport, "-udp-max-flows", "1") as server:
            port = server.relays[0].port
            with udp_client() as first, udp_client() as second:
                for c in (first, second):
                    c.settimeout(3)
                    c.sendto(b"x", ("127.0.0.1", port))
                    assert (await asyncio.to_thread(c.recvfrom, 100))[0] == b"re:x"
                evicted = await access.next()
                assert evicted["end"] == "evicted"
                assert evicted["client"] == f"127.0.0.1:{first.getsockname()[1]}"
                assert (evicted["bytes_from_client"], evicted["bytes_from_backend"]) == (1, 4)
        stopped = await access.next()
    assert stopped["end"] == "shutdown" and stopped["proto"] == "udp"


# -- formatting and writing, without a proxy -------------------------------------------------------


def _closed_record(log: AccessLog, lasted: float,
                   client: tuple = ("127.0.0.1", 40000)) -> accesslog.Record:
    r = log.open(log.route("tcp", ("127.0.0.1", 8080), "172.17.0.2:80"), client)
    r.ended(accesslog.CLIENT_FIN)
    r.from_client, r.from_backend, r.closed = 12, 3456, r.started + round(lasted * 1e9)
    return r


def _line(log: AccessLog, r: accesslog.Record, wall: float) -> str:
    """The line of `r` as though it closed at `wall` (seconds since the epoch)."""
    (line,) = log.format([r], round(wall * 1e9) - r.closed)
    return line


@pytest.mark.parametrize(("lasted", "shown"), [(0.0004, "0.000s"), (61.0006, "61.001s"),
                                               (2.9996, "3.000s"), (0.25, "0.250s")])
def test_text_line_rounds_duration_to_the_millisecond(tmp_path: Path, lasted: float,
                                                       shown: str) -> None:
    log = AccessLog(str(tmp_path / "a.log"), "text")
    try:
        line = _line(log, _closed_record(log, lasted), 1_700_000_000.9996)
    finally:
        log.handler.close()
    # The time's milliseconds are cut (never rounded up into the next second), as before.
    assert line == ("2023-11-14T22:13:20.999Z tcp 127.0.0.1:40000 127.0.0.1:8080 172.17.0.2:80 "
                    f"12 3456 {shown} client-fin")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_each_line_of_a_batch_has_its_own_second(tmp_path: Path, fmt: str) -> None:
    """format() finds a line's second from the bounds of the one before it (no division per
    line): lines that cross into the next second, skip seconds or go back still get their
    own time, cut to the millisecond, and their own duration (to the millisecond in text,
    the microsecond in JSON), under a second or not."""
    log = AccessLog(str(tmp_path / "a.log"), fmt)
    epoch_at = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z, as monotonic_ns() 10**12
    closes = [998_000_000, 999_999_999, 1_000_000_000, 1_500_000_000, 3_000_999_999,
              2_000_000_000, 2_000_000_001]  # ns after epoch_at
    lasted = [400_000, 999_600_000, 1_234_567_890, 0, 61_000_600_000, 999_999_500, 1_999]
    records = []
    for close, took in zip(closes, lasted, strict=True):
        r = _closed_record(log, 0)
        r.closed = 10**12 + close
        r.started = r.closed - took
        records.append(r)
    try:
        lines = log.format(records, epoch_at - 10**12)
    finally:
        log.handler.close()
    for line, close, took in zip(lines, closes, lasted, strict=True):
        wall = epoch_at + close
        stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall // 10**9))
                 + f".{wall // 10**6 % 1000:03d}Z")
        if fmt == "text":
            millis = (took + 500_000) // 10**6
            assert line == (f"{stamp} tcp 127.0.0.1:40000 127.0.0.1:8080 172.17.0.2:80 12 3456 "
                            f"{millis // 1000}.{millis % 1000:03d}s client-fin")
        else:
            micros = (took + 500) // 1000
            assert json.loads(line)["time"] == stamp
            assert f'"duration": {micros // 10**6}.{micros % 10**6:06d},' in line


def test_json_line_is_json_dumps_own(tmp_path: Path) -> None:
    """The JSON line is written by hand; it must be what json.dumps makes of its fields (the
    duration always has six decimals, which json.dumps writes only when they are needed)."""
    log = AccessLog(str(tmp_path / "a.log"), "json")
    try:
        # an interface name may hold what JSON escapes
        r = _closed_record(log, 0.1234567, ("fe80::1%we\"ird\\", 1, 0, 5))
        r.ended(accesslog.BACKEND_ERROR, 'no route "to"\nhost \u00e9')
        line = _line(log, r, 1_700_000_000.5)
        round_one = _line(log, _closed_record(log, 1.5, ("::ffff:10.0.0.1", 2, 0, 0)), 1e9)
    finally:
        log.handler.close()
    fields = json.loads(line)
    assert line == json.dumps(fields)
    assert tuple(fields) == FIELDS and fields["client"] == "[fe80::1%we\"ird\\]:1"
    assert fields["error"] == r.error and fields["duration"] == 0.123457
    assert fields["time"] == "2023-11-14T22:13:20.500Z"
    assert '"duration": 1.500000,' in round_one
    assert json.loads(round_one)["duration"] == 1.5 and json.loads(round_one)["client"] == "10.0.0.1:2"


async def test_a_batch_is_one_write_with_each_line_its_own(tmp_path: Path) -> None:
    """Lines are formatted when their batch is flushed, each with its own close's duration."""
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "json")
    try:
        for lasted in (1.5, 0.25):
            record = _closed_record(log, 0)
            record.started -= round(lasted * 1e9)  # its close is now, when it is written
            log.write(record)
        assert not path.read_text()  # nothing until the batch is flushed
        written = Lines(path)
        lines = [await written.next(), await written.next()]
    finally:
        log.handler.close()
    assert 1.5 <= lines[0]["duration"] < 6 and 0.25 <= lines[1]["duration"] < 1.5
    assert all(line["end"] == "client-fin" and line["bytes_from_backend"] == 3456
               for line in lines)


def test_a_failing_write_is_said_once(capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/full: every batch fails with ENOSPC; said once on stderr, no traceback."""
    log = AccessLog("/dev/full", "text")
    try:
        for _ in range(3):
            log.write(_closed_record(log, 0.1))  # no running loop: each is flushed at once
    finally:
        with contextlib.suppress(OSError):  # what is still buffered fails again
            log.handler.close()
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "Traceback" not in err, err
    assert "-access-log /dev/full: cannot write: No space left on device" in err


# -- the flag, end to end (subprocesses) ---------------------------------------------------------


def _talk(port: int, payload: bytes = b"ping") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(100) == payload
        assert c.recv(100) == b""


def _wait_lines(path: Path, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"wanted {count} lines in {path}, got {lines}")


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """An echo backend in a thread (subprocess tests have no event loop of their own)."""
    import socketserver
    import threading

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_access_log_to_stdout(proxy_loop_env: dict[str, str]) -> None:
    port = free_port()
    with echo_server() as bport:
        p = Proxy(["-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip",
                   "127.0.0.1", "-container-port", str(bport), "-access-log", "-",
                   "-log-format", "json"], env=proxy_loop_env)
        _talk(port)
        time.sleep(0.3)
        out, err = p.stop()
    lines = out.decode().splitlines()
    assert lines[0] == f"{bport}/tcp -> 127.0.0.1:{port}"  # the mapping line, as before
    entry = parse(lines[1])
    assert entry["end"] == "client-fin" and entry["bytes_from_client"] == 4
    assert b"Traceback" not in err


def test_access_log_file_is_reopened_on_sighup(tmp_path: Path,
                                               proxy_loop_env: dict[str, str]) -> None:
    path = tmp_path / "access.log"
    port = free_port()
    with echo_server() as bport:
        p = Proxy(["-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip",
                   "127.0.0.1", "-container-port", str(bport), "-access-log", str(path)],
                  env=proxy_loop_env)
        _talk(port, b"one")
        assert len(_wait_lines(path, 1)) == 1
        path.rename(tmp_path / "access.log.1")  # as logrotate does
        p.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        _talk(port, b"second")
        lines = _wait_lines(path, 1)
        p.stop()
    assert [parse(line)["bytes_from_client"] for line in lines] == [6]
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1


def test_access_log_through_the_engine(tmp_path: Path, proxy_loop_env: dict[str, str]) -> None:
    sock_path = str(tmp_path / "engine.sock")
    log_path = tmp_path / "access.log"
    engine = Proxy(["-engine", "-engine-socket", sock_path, "-access-log", str(log_path)],
                   env=proxy_loop_env)
    try:
        port = free_port()
        with echo_server() as bport:
            args = ["-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip",
                    "127.0.0.1", "-container-port", str(bport)]
            # Per registration it is refused, naming the engine-wide flag.
            refused = spawn_via(sock_path, [*args, "-access-log", str(tmp_path / "x.log")],
                                wait_ready=False)
            assert refused.status.startswith(b"1\n") and b"-access-log" in refused.status
            assert refused.proc.wait(10) == 2
            waiter = spawn_via(sock_path, args)
            _talk(port, b"via engine")
            entry = parse(_wait_lines(log_path, 1)[0])
            waiter.stop()
    finally:
        engine.stop()
    assert entry["end"] == "client-fin" and entry["bytes_from_client"] == 10
    assert entry["frontend"] == f"127.0.0.1:{port}"


def test_unopenable_access_log_fails_start_up(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    proc = spawn(["-host-port", "0", "-container-port", "80", "-access-log",
                  str(tmp_path / "no" / "such" / "dir")], {3: write_end})
    os.close(write_end)
    status = read_status(read_end)
    os.close(read_end)
    assert proc.wait(10) == 1
    assert status.startswith(b"1\n-access-log ") and b"no such file or directory" in status
