"""Fixtures and hooks only (helpers live in tests/helpers.py): both event loops, echo
backends, a running engine, and the reaping of every pyproxy subprocess a test started."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator

import pytest
import uvloop

import proxy
from proxy.handover import WAIT_SHELL_ENV, wait_shell, waiter_binary
from proxy.relays import native
from tests.helpers import INSTALLED, REPO, EchoBackend, Proxy, free_port, reap_spawned

LOOPS = ["uvloop", "asyncio"]
# The TCP relays a build has: the C one only where it was compiled (PYPROXY_COMPILE=1).
TCP_RELAYS = ["python", "native"] if native.available() else ["python"]


def pytest_configure(config: pytest.Config) -> None:
    """A run on the installed build must not test the checkout's sources by mistake."""
    if INSTALLED and os.path.abspath(proxy.__file__).startswith(os.path.join(REPO, "")):
        raise pytest.UsageError(f"PYPROXY_TEST_INSTALLED=1, but proxy comes from {proxy.__file__}: "
                                "run `python -P -m pytest --import-mode=append` from the checkout")


def pytest_report_header(config: pytest.Config) -> str:
    return f"pyproxy under test: {os.path.dirname(proxy.__file__)} (compiled relays: {proxy.compiled()})"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    """Every async test runs on uvloop and on the standard loop."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=LOOPS)
def proxy_loop_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Subprocess tests run pyproxy on both loops too."""
    return {"PYPROXY_LOOP": request.param}


@pytest.fixture(params=TCP_RELAYS)
def tcp_relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """In-process TCP proxies on each TCP relay this build has (proxy.relays.native says which
    one a mapping gets; PYPROXY_NATIVE=0 keeps the Python one). Pyproxies the test spawns
    inherit the choice."""
    monkeypatch.setenv("PYPROXY_NATIVE", "1" if request.param == "native" else "0")
    return str(request.param)


@pytest.fixture(params=["binary", "shell"])
def waiter_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Spawns that become the engine's waiter, in each kind of waiter: pyproxy-wait (the
    default where one is shipped for this machine) and the shell that would stand in for it
    (PYPROXY_WAIT_SHELL names it; empty: the default, whatever this environment says)."""
    if request.param == "binary":
        if waiter_binary() is None:
            pytest.skip(f"no pyproxy-wait for {os.uname().machine}")
        return {WAIT_SHELL_ENV: ""}
    shell = wait_shell()
    if shell is None:
        pytest.skip("no POSIX shell here")
    return {WAIT_SHELL_ENV: shell}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds for the whole test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture(autouse=True)
def reap_proxies() -> Iterator[None]:
    """Every pyproxy a test spawned ends with the test, whatever the test did."""
    yield
    reap_spawned()


@pytest.fixture
def echo_backend():
    b = EchoBackend()
    yield b
    b.close()


@pytest.fixture
def udp_echo_backend():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, addr = sock.recvfrom(65536)
                sock.sendto(data, addr)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def engine(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    metrics = free_port()
    p = Proxy(["-engine", "-engine-socket", path, "-metrics-addr", f"127.0.0.1:{metrics}"],
              env=proxy_loop_env)
    p.metrics_port = metrics  # type: ignore[attr-defined]
    yield path, p
    p.stop(signal.SIGKILL)
