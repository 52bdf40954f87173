"""Faults, bad input and the security properties a published port must keep."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ground.config import parse_cidr
from proxy.relays.tcp import HIGH_WATER
from tests.helpers import (
    EchoBackend,
    Proxy,
    backend,
    docker_args,
    exchange,
    free_port,
    needs_ipv6,
    output,
    read_text,
    tcp_proxy,
)

pytestmark = pytest.mark.timeout(90)


# -- security --------------------------------------------------------------------------------

@needs_ipv6
def test_ipv4_wildcard_never_accepts_ipv6_and_back():
    b = EchoBackend()
    port4, port6 = free_port(), free_port("::1")
    Proxy(docker_args(port4, b.port, host_ip="0.0.0.0"))
    Proxy(docker_args(port6, b.port, host_ip="::"))
    assert exchange("127.0.0.1", port4) == b"ping"
    assert exchange("::1", port6) == b"ping"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("::1", port4), timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port6), timeout=2)
    b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_user_drops_root_after_binding_a_privileged_port():
    b = EchoBackend()
    port = 81  # below 1024: only root can bind it, and it must be bound before the drop
    p = Proxy([*docker_args(port, b.port), "-user", "nobody"])
    status = read_text(f"/proc/{p.proc.pid}/status")
    uids = next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1:]
    groups = next(l for l in status.splitlines() if l.startswith("Groups:")).split()[1:]
    assert uids == ["65534"] * 4 and groups == []
    assert exchange("127.0.0.1", port) == b"ping"
    b.close()


def test_user_that_does_not_exist_fails_start():
    p = Proxy([*docker_args(free_port(), 80), "-user", "no-such-user-here"], wait_ready=False)
    assert p.status == b"1\n-user no-such-user-here: no such user"
    assert p.proc.wait(timeout=10) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdef.:/", max_size=45))
def test_any_cidr_parses_or_says_why(text: str) -> None:
    try:
        network = parse_cidr(text)
    except ValueError as exc:
        assert "CIDR" in str(exc)
    else:
        assert network.prefixlen <= network.max_prefixlen


# -- faults -----------------------------------------------------------------------------------

STUBBORN_BACKEND = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
conn, _ = s.accept()
while True:  # stream, and never read what the client sends
    conn.sendall(b"x" * 65536); time.sleep(0.01)
"""


def start_stubborn_backend(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_BACKEND, str(port)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_backend_killed_mid_transfer_reaches_the_client_as_a_reset():
    """Killed with unread data, the backend's kernel answers RST: the client must see a
    failed transfer, not a clean end it could mistake for success."""
    bport = free_port()
    stubborn = start_stubborn_backend(bport)
    port = free_port()
    Proxy(docker_args(port, bport))
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"never read" * 100)
    assert len(client.recv(65536)) > 0  # the transfer is under way
    stubborn.kill()
    stubborn.wait()
    if stubborn.stdout is not None:
        stubborn.stdout.close()
    with pytest.raises(ConnectionResetError):
        while client.recv(65536):
            pass
    client.close()


def test_backend_restarting_is_served_again_without_restarting_the_proxy():
    b = EchoBackend()
    port = free_port()
    p = Proxy(docker_args(port, b.port))
    assert exchange("127.0.0.1", port) == b"ping"
    backend_port = b.port
    b.close()
    for _ in range(3):  # backend down: each client is reset, the proxy stays
        try:
            assert exchange("127.0.0.1", port) == b""
        except ConnectionResetError:
            pass
    again = socket.socket()
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.bind(("127.0.0.1", backend_port))
    again.listen()

    def serve_one() -> None:
        conn, _ = again.accept()
        conn.sendall(conn.recv(100))
        conn.close()

    threading.Thread(target=serve_one, daemon=True).start()
    assert exchange("127.0.0.1", port, b"back") == b"back"
    assert p.proc.poll() is None
    again.close()


@pytest.mark.usefixtures("tcp_relay")
async def test_backend_that_never_reads_gets_backpressure_not_buffering() -> None:
    """The client pushes, the backend accepts and never reads: the proxy's buffer towards
    the backend stays bounded and the client's writes stall."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await asyncio.sleep(3600)

    async with backend(hold) as bport, tcp_proxy(bport) as server:
        listener = server.relays[0]
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listener.port))
        sent, chunk = 0, b"y" * 65536
        peak = 0
        stalled_since = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break  # the client has been held back for a second: backpressure works
                await asyncio.sleep(0.01)
            for client in getattr(listener, "connections", ()):  # the C relay holds one read
                if client.peer is not None:
                    peak = max(peak, client.peer.transport.get_write_buffer_size())
        assert stalled_since is not None, "the client was never held back"
        assert peak <= HIGH_WATER + 256 * 1024
        assert sent < 64 * 1024 * 1024  # kernel buffers plus our bounded one, not everything
        sock.close()
        for w in accepted:
            w.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_under_load_exits_0_within_a_second(signum, proxy_loop_env):
    b = EchoBackend()
    port = free_port()
    p = Proxy(docker_args(port, b.port), env=proxy_loop_env)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"z" * 200000)
                    s.recv(65536)
            except OSError:
                pass

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    started = time.monotonic()
    p.proc.send_signal(signum)
    code = p.proc.wait(timeout=5)
    elapsed = time.monotonic() - started
    stop.set()
    _, err = output(p.proc)
    assert code == 0 and elapsed < 1.0
    assert b"Traceback" not in err
    b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_log_reopen_after_user_drop_keeps_logging_when_the_new_file_is_not_writable(tmp_path):
    """After -user, SIGHUP's reopen may not be allowed to create the file: the old one stays."""
    os.chmod(tmp_path, 0o755)  # nobody may write neither here nor a new file
    log = tmp_path / "pyproxy.log"
    b = EchoBackend()
    p = Proxy([*docker_args(free_port(), b.port), "-user", "nobody", "-log-file", str(log)])
    rotated = tmp_path / "pyproxy.log.1"
    log.rename(rotated)
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert p.proc.poll() is None
    assert not log.exists()
    assert "reopen: Permission denied; still writing to the old file" in rotated.read_text()
    b.close()
