"""pyproxy as the userland proxy of a real dockerd 20.10, standalone, through the engine
(with two worker processes, one of which a test kills), and through the engine entered by
pyproxy-door, the native front door."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from proxy.handover import BUSYBOX_SH_SUFFIX
from tests.dockerlab import DockerLab, docker_available
from tests.helpers import REPO, Proxy, close_output, free_port, free_port_block, workers_of

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not docker_available(), reason="needs root, docker.io, containerd, runc, busybox-static"),
]

PYPROXY = os.path.join(os.path.dirname(sys.executable), "pyproxy")  # the installed console script
# The native front door, installed beside it on x86-64: dockerd spawns it, it registers with
# the engine itself (anything else goes on to the pyproxy beside it).
DOOR = os.path.join(os.path.dirname(sys.executable), "pyproxy-door")


@pytest.fixture(scope="module", params=["standalone", "engine", "door"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    if request.param == "door" and not os.access(DOOR, os.X_OK):
        pytest.skip(f"no pyproxy-door installed beside {PYPROXY} (x86-64 only)")
    # The console script imports whichever pyproxy is installed; PYTHONPATH makes dockerd's
    # spawns run this checkout, as the engine below does.
    env = {"PYPROXY_ENGINE_SOCKET": "", "PYTHONPATH": REPO}
    engine = None
    if request.param in ("engine", "door"):
        path = str(tmp_path_factory.mktemp("engine") / "engine.sock")
        # Two workers whatever the CPUs (the default, auto, gives as many as there are):
        # test_killed_worker_... kills one while the other must serve.
        engine = Proxy(["-engine", "-engine-socket", path, "-workers", "2"])
        Proxy.started.remove(engine)  # lives for the module, not one test
        env = {**env, "PYPROXY_ENGINE_SOCKET": path}
    lab = DockerLab(DOOR if request.param == "door" else PYPROXY, env=env)
    lab.mode = request.param  # type: ignore[attr-defined]
    lab.engine = engine  # type: ignore[attr-defined]
    try:
        lab.import_busybox()
        lab.import_dnsmasq()
        yield lab
    finally:
        lab.close()
        if engine is not None:
            engine.stop()
            close_output(engine.proc)


def http_get(host: str, port: int) -> str:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # httpd inside the container may still be starting


def proxy_processes() -> list[list[str]]:
    """Command lines of every pyproxy process (standalone, or its waiter in engine mode)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode() for a in argv if a]
        waiter = bool(args) and args[0].startswith("pyproxy-wait")  # argv[0] names the mapping
        if (any(a.endswith("pyproxy") for a in args[:2]) or waiter) and "-engine" not in args:
            found.append(args)
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is fine
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_tcp_published_ports_reach_the_container(lab: DockerLab) -> None:
    p, q = free_port(), free_port()
    lab.docker("run", "-d", "--name", "web", "-p", f"127.0.0.1:{p}:80", "-p", f"{q}:80",
               "pp-busybox:test", "httpd", "-f", "-p", "80", "-h", "/www")
    try:
        for host, port in (("127.0.0.1", p), ("127.0.0.1", q), ("::1", q)):
            assert http_get(host, port) == "hello from the container\n"
        # dockerd spawned one pyproxy per port and family, with docker-proxy's flags
        if lab.mode == "standalone":  # type: ignore[attr-defined]
            lines = [" ".join(a[a.index("-proto"):]) for a in proxy_processes() if "-proto" in a]
            container_ip = lab.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web").stdout.decode().strip()
            for host_ip, port in (("127.0.0.1", p), ("0.0.0.0", q), ("::", q)):
                assert (f"-proto tcp -host-ip {host_ip} -host-port {port} -container-ip {container_ip} "
                        f"-container-port 80") in lines
        else:  # each spawned pyproxy became a tiny waiter holding its mapping in the engine
            # (argv[0] names the mapping, so `ps` tells which process is which port)
            waiters = {a[0].removesuffix(BUSYBOX_SH_SUFFIX) for a in proxy_processes()
                       if a and a[0].startswith("pyproxy-wait ")}
            for host_ip, port in (("127.0.0.1", p), ("0.0.0.0", q), ("[::]", q)):
                assert f"pyproxy-wait 80/tcp -> {host_ip}:{port}" in waiters, waiters
            if lab.mode == "door":  # type: ignore[attr-defined]
                # registered by the door itself, which became the waiter: no Python in between
                # (the Python pyproxy would have exec'd the package's pyproxy-wait)
                for pid in waiter_pids(p) | waiter_pids(q):
                    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(DOOR)
        # docker stop: pyproxy exits on dockerd's SIGINT at once, and every port is free after
        started = time.monotonic()
        lab.docker("stop", "-t", "0", "web")
        assert time.monotonic() - started < 10
        assert port_is_free(p) and port_is_free(q) and port_is_free(q, "::")
    finally:
        lab.docker("rm", "-f", "web", check=False)


def test_udp_published_port_answers_through_the_proxy(lab: DockerLab) -> None:
    u = free_port(kind=socket.SOCK_DGRAM)
    lab.docker("run", "-d", "--name", "dns", "-p", f"127.0.0.1:{u}:53/udp", "pp-dnsmasq:test",
               "/usr/sbin/dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
               "--address=/pyproxy.test/192.0.2.7", "--user=root", "--pid-file=")
    try:
        deadline = time.monotonic() + 15
        while True:
            dig = subprocess.run(["dig", "@127.0.0.1", "-p", str(u), "pyproxy.test", "+short",
                                  "+tries=1", "+timeout=2"], capture_output=True, text=True, timeout=10)
            if dig.stdout.strip() == "192.0.2.7" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert dig.stdout.strip() == "192.0.2.7", dig.stdout + dig.stderr
    finally:
        lab.docker("rm", "-f", "dns", check=False)


def test_taken_host_port_fails_docker_run_with_pyproxys_error(busy_port, lab: DockerLab) -> None:
    port = busy_port
    try:
        run = lab.docker("run", "-d", "--name", "clash", "-p", f"127.0.0.1:{port}:80",
                         "pp-busybox:test", "httpd", "-f", "-p", "80", check=False)
        assert run.returncode != 0
        assert (f"Error starting userland proxy: listen tcp4 127.0.0.1:{port}: bind: "
                "address already in use").encode() in run.stderr
    finally:
        lab.docker("rm", "-f", "clash", check=False)


def test_published_range(lab: DockerLab) -> None:
    base = free_port_block(4)
    lab.docker("run", "-d", "--name", "range", "-p", f"127.0.0.1:{base}-{base + 3}:{base}-{base + 3}",
               "pp-busybox:test", "httpd", "-f", "-p", str(base + 2), "-h", "/www")
    try:
        assert http_get("127.0.0.1", base + 2) == "hello from the container\n"
    finally:
        lab.docker("rm", "-f", "range", check=False)
    for port in range(base, base + 4):
        assert port_is_free(port)


def waiter_pids(port: int) -> set[int]:
    """The processes dockerd spawned for `port` (each became a waiter holding its mapping)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        argv0 = argv0.removesuffix(BUSYBOX_SH_SUFFIX)  # a busybox waiter (pyproxy-wait: none)
        if argv0.startswith("pyproxy-wait ") and argv0.endswith(f":{port}"):
            found.add(int(pid))
    return found


def get_once(port: int) -> str:
    """One GET, no retry: a refused or reset connection fails the caller."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return r.read().decode()


def test_killed_worker_loses_no_client_and_no_spawned_process(lab: DockerLab) -> None:
    """kill -9 of one of the engine's two workers between two GETs: the next GETs are served
    (the supervisor keeps the listening socket, the other worker accepts), the worker comes
    back, nothing dockerd spawned exits, and `docker rm -f` still frees the port."""
    if lab.engine is None:  # type: ignore[attr-defined]
        pytest.skip("workers are the engine's")
    engine = lab.engine  # type: ignore[attr-defined]
    p = free_port()
    lab.docker("run", "-d", "--name", "killw", "-p", f"127.0.0.1:{p}:80", "pp-busybox:test",
               "httpd", "-f", "-p", "80", "-h", "/www")
    try:
        assert http_get("127.0.0.1", p) == "hello from the container\n"
        spawned = waiter_pids(p)
        assert len(spawned) == 1, spawned
        before = workers_of(engine.proc.pid)
        assert len(before) == 2, before
        os.kill(before[0], signal.SIGKILL)
        for _ in range(5):  # at once: never refused, served by the other worker
            assert get_once(p) == "hello from the container\n"
        deadline = time.monotonic() + 20
        while len(set(workers_of(engine.proc.pid)) - set(before)) != 1:
            assert time.monotonic() < deadline, "the killed worker was not started again"
            time.sleep(0.1)
        for _ in range(5):
            assert get_once(p) == "hello from the container\n"
        assert waiter_pids(p) == spawned  # no process dockerd spawned exited
        assert engine.proc.poll() is None
        lab.docker("rm", "-f", "killw")
        deadline = time.monotonic() + 10
        while not port_is_free(p):
            assert time.monotonic() < deadline, f"port {p} still taken after docker rm -f"
            time.sleep(0.1)
        assert not waiter_pids(p)
    finally:
        lab.docker("rm", "-f", "killw", check=False)
