"""Shared fixtures: both event loops, echo backends on loopback, and a real pyproxy subprocess."""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import uvloop

LOOPS = ["uvloop", "asyncio"]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Every async test runs on uvloop and on the standard loop."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


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
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
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

    started: list[Proxy] = []

    def __init__(self, args: list[str], *, pass_fds: dict[int, int] | None = None,
                 env: dict[str, str] | None = None, preexec=None, wait_ready: bool = True,
                 prefix: list[str] | None = None) -> None:
        read_end, write_end = os.pipe()
        fds = {3: write_end, **(pass_fds or {})}
        self.proc = spawn(args, fds, env=env, preexec=preexec, prefix=prefix)
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


def output(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    """What a spawned pyproxy wrote to stdout and stderr (files, see spawn)."""
    result = []
    for f in proc.output_files:  # type: ignore[attr-defined]
        f.seek(0)
        result.append(f.read())
    return result[0], result[1]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(args: list[str], fds: dict[int, int], *, env=None, preexec=None,
          prefix: list[str] | None = None) -> subprocess.Popen:
    """Run pyproxy with `fds` placed at exactly those descriptor numbers in the child
    (behind `prefix`, such as `ip netns exec NS`, which keeps them)."""

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
    full_env = {**os.environ, "PYPROXY_ENGINE_SOCKET": "", **(env or {})}
    # Output goes to files, not pipes: a child must never block on a pipe nobody reads yet.
    files = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "proxy", *args], cwd=REPO,
        stdout=files[0], stderr=files[1], close_fds=True,
        # subprocess closes every fd not listed here *after* preexec_fn has placed them
        pass_fds=sorted(set(fds.values()) | set(fds)), preexec_fn=place_fds, env=full_env,
    )
    proc.output_files = files  # type: ignore[attr-defined]
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


@pytest.fixture(params=LOOPS)
def proxy_loop_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Subprocess tests run pyproxy on both loops too."""
    return {"PYPROXY_LOOP": request.param}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds for the whole test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    """A list to keep proxies in; reap_proxies kills them (and every other) at the end."""
    yield []


@pytest.fixture(autouse=True)
def reap_proxies() -> Iterator[None]:
    yield
    while Proxy.started:
        p = Proxy.started.pop()
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
