"""Test helpers, the one home for them (conftest.py holds only fixtures and hooks): free ports,
the pyproxy subprocess harness (spawned with dockerd's fd layout), blocking and asyncio
backends, the in-process proxy (a Publication on the test's own loop), and metrics scraping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ClassVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ground.flags import build_parser, config_from_args
from proxy.modes.publication import Publication


def read_text(path: str) -> str:
    """A whole (small, /proc) file, closed at once."""
    with open(path) as f:
        return f.read()


# -- ports and addresses ---------------------------------------------------------------------

def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback on this machine")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, read_text("/proc/sys/net/ipv4/ip_local_port_range").split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_EPHEMERAL = _ephemeral_range()
_rng = random.Random()
_handed_out: set[int] = set()  # a port is free when checked; it must also not be given twice


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A free port *outside* the kernel's ephemeral range: a kernel-chosen port could be taken
    by an outgoing connection (a client's, or the proxy's dial) before the test binds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = 10000 if _EPHEMERAL[0] > 12000 else _EPHEMERAL[1] + 1
    high = _EPHEMERAL[0] - 1 if _EPHEMERAL[0] > 12000 else 65535
    for _ in range(200):
        port = _rng.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(family, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if kind == socket.SOCK_STREAM:  # the UDP twin too, for tests that publish both
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range")


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free TCP ports."""
    for _ in range(100):
        base = free_port(host)
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            _handed_out.update(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


class Proxy:
    """A pyproxy subprocess started with a status pipe on fd 3, as dockerd starts it.
    Every one is killed when its test ends, whatever the test did (see reap_proxies)."""

    started: ClassVar[list[Proxy]] = []

    def __init__(self, args: list[str], *, pass_fds: dict[int, int] | None = None,
                 env: dict[str, str] | None = None, preexec=None, wait_ready: bool = True,
                 prefix: list[str] | None = None, command: list[str] | None = None) -> None:
        read_end, write_end = os.pipe()
        fds = {3: write_end, **(pass_fds or {})}
        self.proc = spawn(args, fds, env=env, preexec=preexec, prefix=prefix, command=command)
        SPAWNED.remove(self.proc)  # a Proxy is reaped through Proxy.started
        Proxy.started.append(self)
        os.close(write_end)
        self.status = read_status(read_end)
        os.close(read_end)
        if wait_ready and self.status != b"0\n":
            out, err = self.stop()
            raise AssertionError(f"pyproxy did not start: {self.status!r} {err!r}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 5) -> tuple[bytes, bytes]:
        """Signal, wait, and return what it printed (stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return output(self.proc)


def fd_limit(n: int):  # type: ignore[no-untyped-def]
    """A preexec_fn: the child's soft and hard RLIMIT_NOFILE, as `ulimit -n n` sets them."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def output(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    """What a spawned pyproxy wrote to stdout and stderr (files, see spawn)."""
    result = []
    for f in proc.output_files:  # type: ignore[attr-defined]
        f.seek(0)
        result.append(f.read())
    return result[0], result[1]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PYPROXY_TEST_INSTALLED=1: test the pyproxy installed in this Python (the compiled build, in
# .ci/run), not this checkout's sources. Proxies are then spawned from a directory with no
# proxy/ in it, and pytest must import the installed one too (`python -P -m pytest
# --import-mode=append`; conftest checks).
INSTALLED = os.environ.get("PYPROXY_TEST_INSTALLED", "") == "1"
PROXY_CWD = tempfile.gettempdir() if INSTALLED else REPO


SPAWNED: list[subprocess.Popen] = []  # spawned by a test directly, not through Proxy


def close_output(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs, and close the files of its output."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in proc.output_files:  # type: ignore[attr-defined]
        f.close()


def reap_spawned() -> None:
    """End every pyproxy a test started (conftest's reap_proxies calls it after each test)."""
    while Proxy.started:
        close_output(Proxy.started.pop().proc)
    while SPAWNED:
        close_output(SPAWNED.pop())


def spawn(args: list[str], fds: dict[int, int], *, env=None, preexec=None,
          prefix: list[str] | None = None, command: list[str] | None = None) -> subprocess.Popen:
    """Run pyproxy (or `command`, such as bin/pyproxy-standalone) with `fds` placed at exactly
    those descriptor numbers in the child (behind `prefix`, such as `ip netns exec NS`, which
    keeps them)."""

    def place_fds() -> None:
        # dup2 via scratch copies so that a source fd equal to a target is not clobbered, then
        # close the sources: a stray copy of the status pipe's write end would hide its EOF.
        scratch = {target: os.dup(src) for target, src in fds.items()}
        for src in set(fds.values()) - set(fds):
            os.close(src)
        for target, dup in scratch.items():
            os.dup2(dup, target, inheritable=True)
            os.close(dup)
        if preexec:
            preexec()

    # Standalone unless a test hands an engine's socket: an engine elsewhere on the machine
    # must not change what a test exercises.
    # An engine a spawn starts (tests/test_autostart.py) logs where its test says, never into
    # this host's /var/log.
    full_env = {**os.environ, "PYPROXY_ENGINE_SOCKET": "", "PYPROXY_ENGINE_LOG_FILE": os.devnull,
                **(env or {})}
    # Output goes to files, not pipes: a child must never block on a pipe nobody reads yet.
    files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
    proc = subprocess.Popen(
        [*(prefix or []), *(command or [sys.executable, "-m", "proxy"]), *args], cwd=PROXY_CWD,
        stdout=files[0], stderr=files[1], close_fds=True,
        # subprocess closes every fd not listed here *after* preexec_fn has placed them
        pass_fds=sorted(set(fds.values()) | set(fds)), preexec_fn=place_fds, env=full_env,
    )
    proc.output_files = files  # type: ignore[attr-defined]
    SPAWNED.append(proc)
    return proc


def read_status(fd: int, timeout: float = 20) -> bytes:
    """What pyproxy wrote on fd 3, read the way dockerd reads it: until EOF."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


# -- the subprocess harness, as dockerd and the engine are used ------------------------------

def exchange(host: str, port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def docker_args(host_port: int, backend_port: int, host_ip: str = "127.0.0.1",
                proto: str = "tcp") -> list[str]:
    """The exact command line dockerd uses."""
    return ["-proto", proto, "-host-ip", host_ip, "-host-port", str(host_port),
            "-container-ip", "127.0.0.1", "-container-port", str(backend_port)]


def spawn_via(path: str, args: list[str], env: dict[str, str] | None = None,
              **kw) -> Proxy:  # type: ignore[no-untyped-def]
    return Proxy(args, env={"PYPROXY_ENGINE_SOCKET": path, **(env or {})}, **kw)


def stopped_cleanly(proc: subprocess.Popen, status_fd: int, port: int) -> None:
    """What a stop signal at any moment of a spawn must leave: exit 0 (never death by the
    signal), nothing or "0\\n" told the runtime on fd 3, the port free, no traceback."""
    status = read_status(status_fd)
    assert proc.wait(timeout=5) == 0
    assert status in (b"", b"0\n")
    assert refused(port)
    assert b"Traceback" not in output(proc)[1]

def cmdline(pid: int) -> str:
    return read_text(f"/proc/{pid}/cmdline").replace("\0", " ")


def refused(port: int) -> bool:
    """Nothing listens on the port. A reset is not that: a listener closing while this
    connect was in its queue resets it (a port being released), so callers that poll
    (released(), until()) try again, and one that asserts at once fails, as it should."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionResetError:
        return False
    except ConnectionRefusedError:
        return True


# -- blocking backends (threads: the test process needs no event loop) ------------------------

class EchoBackend:
    """A threaded blocking echo server, so the test process needs no event loop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()


def udp_exchange(dest: tuple, payload: bytes) -> tuple[bytes, tuple]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(5)
        c.sendto(payload, dest)
        return c.recvfrom(65536)


# -- asyncio backends and the in-process proxy ---------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte as it comes; close after the client's EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer only once the client has half-closed: proves the FIN went through alone."""
    data = await reader.read()
    writer.write(b"got:" + data)
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def backend(handler: Handler = echo, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """A backend on the test's loop; every connection it accepted is closed when it ends, its
    handler done or not (Server.close() closes only the listener, and a handler still running
    when the test ends would leave its socket to the garbage collector: a ResourceWarning)."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, host, 0, backlog=4096)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.sleep(0)  # the transports' connection_lost callbacks close the sockets


def make_config(*argv: str) -> Any:
    return config_from_args(build_parser().parse_args(list(argv)))


@contextlib.asynccontextmanager
async def proxy(*argv: str) -> AsyncIterator[Publication]:
    """pyproxy serving in this process; `server.relays[i].port` are the bound ports."""
    server = Publication(make_config(*argv), None)
    await server.open()
    try:
        yield server
    finally:
        await server.close()


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """The port of a listener whose accept queue is full: Linux drops new SYNs, so a dial to
    it hangs (until the dialler's timeout), on loopback. A backlog of 0 still queues one
    connection; the second waits in SYN-SENT; from then on the port is silent."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(2):
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
        time.sleep(0.1)  # both handshakes under way before anyone dials
        yield silent.getsockname()[1]
    finally:
        for f in [*fillers, silent]:
            f.close()


def tcp_proxy(backend_port: int, *extra: str, host_ip: str = "127.0.0.1",
              container_ip: str = "127.0.0.1") -> Any:
    """A context manager: pyproxy in this process in front of backend_port."""
    return proxy("-host-ip", host_ip, "-host-port", "0", "-container-ip", container_ip,
                 "-container-port", str(backend_port), *extra)


def open_fds() -> set[str]:
    """This process's descriptors, each with what it is (socket:[inode], a file...)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:  # the listdir's own, closed by now
            pass
    return fds


async def fds_back_to(before: set[str]) -> set[str]:
    """The descriptors opened since `before` and still open, once they have had 5 s to close."""
    for _ in range(250):
        if not open_fds() - before:
            break
        await asyncio.sleep(0.02)
    return open_fds() - before


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class UdpBackend(asyncio.DatagramProtocol):
    """Answers each datagram with b"re:" + payload (or the payload alone for big ones) and
    records the source address of every datagram it saw."""

    def __init__(self) -> None:
        self.sources: list[tuple] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        self.sources.append(addr)
        assert self.transport is not None
        self.transport.sendto(data if len(data) > 60000 else b"re:" + data, addr)


@contextlib.asynccontextmanager
async def udp_backend(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[tuple[int, UdpBackend]]:
    loop = asyncio.get_running_loop()
    transport, backend = await loop.create_datagram_endpoint(UdpBackend, local_addr=(host, port))
    try:
        yield transport.get_extra_info("sockname")[1], backend
    finally:
        transport.close()


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    """A UDP socket bound on `host` (IPv4 or IPv6) to an ephemeral port: one client."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def udp_proxy(backend_port: int, *extra: str, host_ip: str = "127.0.0.1",
              container_ip: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    return proxy("-proto", "udp", "-host-ip", host_ip, "-host-port", "0",
                 "-container-ip", container_ip, "-container-port", str(backend_port), *extra)


# -- metrics ----------------------------------------------------------------------------------

def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def signal_mask(pid: int, field: str) -> int:
    """One of /proc/PID/status's signal masks (SigBlk, SigCgt...) as an int. OSError once the
    process is gone, StopIteration if its status has no such line (a zombie's)."""
    line = next(l for l in read_text(f"/proc/{pid}/status").splitlines() if l.startswith(field + ":"))
    return int(line.split()[1], 16)


def mask(*signums: int) -> int:
    """The signals as a mask, bit n-1 for signal n, as /proc/PID/status writes them."""
    return sum(1 << (s - 1) for s in signums)


STOPS = mask(signal.SIGINT, signal.SIGTERM)


def catches_sigterm(pid: int) -> bool:
    """Its own SIGTERM handler is installed (pyproxy's first line has run)."""
    try:
        return bool(signal_mask(pid, "SigCgt") & mask(signal.SIGTERM))
    except (OSError, StopIteration):
        return False


def waiting(pid: int) -> bool:
    """`pid` is a waiter (its title names the mapping) whose stop handler is set (a shell's
    trap): a stop signal from now on is answered, not the end of it by the signal."""
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            if not f.read().startswith("pyproxy-wait"):
                return False
        return signal_mask(pid, "SigCgt") & STOPS == STOPS
    except (OSError, StopIteration):
        return False


def reattaching(pid: int) -> bool:
    """A waiter whose engine died has exec'd pyproxy to re-attach, and its stop handlers are in
    place (SIGTERM: Python catches SIGINT from its start, pyproxy both at its first line)."""
    from proxy.handover import REATTACH_FLAG

    try:
        with open(f"/proc/{pid}/cmdline") as f:
            argv = f.read().split("\0")
        # Its own argv word, and not the waiter's: the shell's -c script names the flag too,
        # pyproxy-wait has it among its words, and a stop signal sent while the waiter is
        # still there, or exec'ing, is not what is tested.
        if argv[0].startswith("pyproxy-wait") or not any(a.startswith(REATTACH_FLAG) for a in argv):
            return False
    except OSError:
        return False
    return catches_sigterm(pid)


def workers_of(pid: int) -> list[int]:
    """The engine's worker processes: its children whose command line says so."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    found = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline") as f:
                if "-engine-worker" in f.read():  # a zombie's cmdline is empty
                    found.append(child)
        except OSError:
            pass
    return sorted(found)


# -- engine survival: probes that a port serves, and a connect loop ---------------------------

def alive(pid: int) -> bool:
    """Running, not gone nor a zombie (whoever adopted it may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except OSError:
        return False


def serves_tcp(port: int) -> bool:
    try:
        return exchange("127.0.0.1", port, b"%d" % port) == b"%d" % port
    except OSError:
        return False


def serves_udp(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(0.5)
        try:
            c.sendto(b"u%d" % port, ("127.0.0.1", port))
            return c.recvfrom(65536)[0] == b"u%d" % port
        except OSError:
            return False


def until(condition, within: float) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `condition()` held; fails the test after `within`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"not within {within}s"
        time.sleep(0.01)
    return time.monotonic() - start


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
                self.sock.sendto(data, addr)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


class ConnectLoop:
    """New TCP connections in a loop, each checked end to end; counts what went wrong."""

    def __init__(self, port: int) -> None:
        self.port, self.done = port, threading.Event()
        self.served = self.refused = self.lost = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=20) as s:
                    s.sendall(b"loop")
                    s.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := s.recv(100):
                        answer += chunk
                if answer == b"loop":
                    self.served += 1
                else:
                    self.lost += 1  # open on the engine that died
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                self.lost += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
