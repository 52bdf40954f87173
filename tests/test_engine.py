"""Engine mode: dockerd's one-process-per-port contract kept exactly, served by one engine."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import pytest

from tests.conftest import Proxy, free_port, output
from tests.test_contract import EchoBackend, docker_args, exchange

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engine(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    metrics = free_port()
    p = Proxy(["-engine", "-engine-socket", path, "-metrics-addr", f"127.0.0.1:{metrics}"],
              env=proxy_loop_env)
    p.metrics_port = metrics  # type: ignore[attr-defined]
    yield path, p
    p.stop(signal.SIGKILL)


def spawn_via(path: str, args: list[str], **kw) -> Proxy:  # type: ignore[no-untyped-def]
    return Proxy(args, env={"PYPROXY_ENGINE_SOCKET": path}, **kw)


def cmdline(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_fifty_spawns_each_ready_each_serving_and_stopped_one_by_one(engine):
    path, _ = engine
    backend = EchoBackend()
    ports = [free_port() for _ in range(50)]
    spawned = [spawn_via(path, docker_args(port, backend.port)) for port in ports]
    try:
        for p, port in zip(spawned, ports):
            assert p.status == b"0\n"
            assert cmdline(p.proc.pid).startswith("pyproxy-wait")  # a tiny waiter, not Python
            assert exchange("127.0.0.1", port, b"%d" % port) == b"%d" % port
        # SIGINT, as dockerd stops it: that port goes, at once, and only that one
        victim = spawned[17]
        victim.proc.send_signal(signal.SIGINT)
        assert victim.proc.wait(timeout=5) == 0
        assert refused(ports[17])  # released before the process exited
        for i in (0, 16, 18, 49):
            assert exchange("127.0.0.1", ports[i]) == b"ping"
    finally:
        for p in spawned:
            p.stop(signal.SIGINT)
        backend.close()
    assert all(p.proc.returncode == 0 for p in spawned)
    assert all(refused(port) for port in ports)


def test_listen_fd_is_handed_to_the_engine(engine):
    path, _ = engine
    backend = EchoBackend()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    p = spawn_via(path, [*docker_args(port, backend.port), "-use-listen-fd"], pass_fds={4: lsock.fileno()})
    lsock.close()
    try:
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        p.stop(signal.SIGINT)
        backend.close()


def test_errors_come_back_through_the_status_pipe(busy_port, engine):
    path, _ = engine
    busy = busy_port
    p = spawn_via(path, docker_args(busy, 80), wait_ready=False)
    assert p.status == f"1\nlisten tcp4 127.0.0.1:{busy}: bind: address already in use".encode()
    assert p.proc.wait(timeout=10) == 1
    bad = spawn_via(path, ["-host-port", "8080", "-container-port", "x"], wait_ready=False)
    assert bad.proc.wait(timeout=10) == 2
    assert bad.status.startswith(b"1\nargument -container-port")
    _, err = output(bad.proc)
    assert b"-container-port" in err


def test_one_metrics_endpoint_covers_every_mapping(engine):
    path, eng = engine
    backend = EchoBackend()
    ports = [free_port() for _ in range(3)]
    spawned = [spawn_via(path, docker_args(port, backend.port)) for port in ports]
    try:
        for port in ports:
            exchange("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{eng.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for port in ports:
            assert f'host_port="{port}"' in text
    finally:
        for p in spawned:
            p.stop(signal.SIGINT)
        backend.close()


def test_no_engine_means_serving_standalone(tmp_path):
    backend = EchoBackend()
    port = free_port()
    p = spawn_via(str(tmp_path / "absent.sock"), docker_args(port, backend.port))
    try:
        assert "proxy" in cmdline(p.proc.pid) and "pyproxy-wait" not in cmdline(p.proc.pid)
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        p.stop(signal.SIGINT)
        backend.close()


def test_engine_death_ends_the_spawned_processes_and_frees_the_ports(engine):
    path, eng = engine
    backend = EchoBackend()
    ports = [free_port() for _ in range(5)]
    spawned = [spawn_via(path, docker_args(port, backend.port)) for port in ports]
    eng.proc.kill()
    eng.proc.wait()
    for p in spawned:
        assert p.proc.wait(timeout=5) != 0  # they notice, and leave
    assert all(refused(port) for port in ports)
    backend.close()


def test_second_engine_on_the_same_socket_is_refused(engine):
    path, _ = engine
    p = Proxy(["-engine", "-engine-socket", path], wait_ready=False)
    assert p.status.startswith(b"1\nengine: another engine is already serving")
    assert p.proc.wait(timeout=10) == 1
    _, err = output(p.proc)
    assert b"pyproxy: engine: another engine is already serving" in err  # a person sees it too


def test_engine_socket_is_private(engine):
    path, _ = engine
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_rejected_listen_fds_are_not_kept_by_the_engine(engine):
    """A registration whose fd 4 is the wrong kind fails cleanly, and the engine does not
    keep its copy of that socket: a runtime retrying must not drain the engine's fds."""
    path, eng = engine
    before = len(os.listdir(f"/proc/{eng.proc.pid}/fd"))
    for _ in range(5):
        wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # -proto tcp wants a listener
        p = spawn_via(path, [*docker_args(free_port(), 80), "-use-listen-fd"],
                      pass_fds={4: wrong.fileno()}, wait_ready=False)
        wrong.close()
        assert p.status.startswith(b"1\nlisten fd 4 for tcp: fd 4 is a UDP socket, not TCP")
        assert p.proc.wait(timeout=10) == 1
    time.sleep(0.2)
    assert len(os.listdir(f"/proc/{eng.proc.pid}/fd")) == before
