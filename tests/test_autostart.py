"""The engine on by default: a runtime's spawn starts it when none answers (one, however many
race), it outlives that spawn, exits once idle, and a spawn racing the exit is still served;
a pyproxy typed at a shell, pyproxy-standalone and an empty PYPROXY_ENGINE_SOCKET never start one.

Spawned as dockerd 20.10 does: fds 0-2 on /dev/null, fd 3 the status pipe, fd 4 free. Every
socket lives in a private 0700 tmp directory, never /run/pyproxy, and every engine a test
started is killed when it ends (found by its socket path in /proc/*/cmdline).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.helpers import (
    REPO,
    EchoBackend,
    Proxy,
    alive,
    cmdline,
    docker_args,
    exchange,
    free_port,
    output,
    read_status,
    refused,
    spawn,
    workers_of,
)

pytestmark = pytest.mark.timeout(120)


def engines(path: str) -> list[int]:
    """pids of the engine processes serving `path` (zombies have no cmdline: not counted)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-engine" in argv and os.fsencode(path) in argv:
            found.append(int(pid))
    return found


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


def wait_until(predicate, timeout: float = 10) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def site(tmp_path) -> Iterator[dict[str, str]]:
    """A private engine path (0700 directory, as the checks require) and the environment that
    points a spawn at it; every engine started there is killed at the end."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = str(directory / "engine.sock")
    env = {"PYPROXY_ENGINE_SOCKET": path, "PYPROXY_ENGINE_LOG_FILE": str(tmp_path / "engine.log"),
           "PYPROXY_ENGINE_IDLE_EXIT": "60s"}
    yield env
    for pid in engines(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Spawned:
    """A pyproxy spawned exactly as dockerd 20.10 spawns it; `status` is read by `wait()`."""

    def __init__(self, args: list[str], env: dict[str, str], *, status_pipe: bool = True,
                 script: str | None = None) -> None:
        null = os.open(os.devnull, os.O_RDWR)
        self.read_end, write_end = os.pipe() if status_pipe else (-1, -1)
        fds = {0: null, 1: null, 2: null, **({3: write_end} if status_pipe else {})}
        command = [sys.executable, os.path.join(REPO, "bin", script)] if script else None
        self.proc = spawn(args, fds, env={**env, "PYTHONPATH": REPO}, command=command)
        os.close(null)
        if status_pipe:
            os.close(write_end)
        self.status = b""

    def wait(self) -> bytes:
        self.status = read_status(self.read_end)
        os.close(self.read_end)
        return self.status


def test_a_hundred_spawns_at_once_start_exactly_one_engine_and_all_serve(site):
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    ports = [free_port() for _ in range(100)]
    spawned = [Spawned(docker_args(port, backend.port), site) for port in ports]
    try:
        statuses = [s.wait() for s in spawned]
        assert statuses == [b"0\n"] * 100
        assert len(engines(path)) == 1
        for s, port in zip(spawned, ports, strict=True):
            assert cmdline(s.proc.pid).startswith("pyproxy-wait")  # handed over, not alone
            assert exchange("127.0.0.1", port, b"%d" % port) == b"%d" % port
    finally:
        for s in spawned:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGINT)
        codes = [s.proc.wait(timeout=10) for s in spawned]
        backend.close()
    assert codes == [0] * 100
    assert all(refused(port) for port in ports)


def test_the_engine_exits_once_idle_and_removes_its_socket(site, proxy_loop_env):
    env = {**site, **proxy_loop_env, "PYPROXY_ENGINE_IDLE_EXIT": "1s"}
    path = env["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    port = free_port()
    s = Spawned(docker_args(port, backend.port), env)
    try:
        assert s.wait() == b"0\n"
        [engine] = engines(path)
        # started with the default -workers: one per CPU it may run on (none with one CPU)
        cpus = len(os.sched_getaffinity(0))
        workers = workers_of(engine)
        assert len(workers) == (cpus if cpus > 1 else 0)
        time.sleep(1.5)  # longer than the idle exit, but a mapping is held: it stays
        assert engines(path) == [engine]
        assert exchange("127.0.0.1", port) == b"ping"
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=5) == 0
        assert wait_until(lambda: not engines(path))
        assert wait_until(lambda: not any(alive(pid) for pid in workers))  # they go with it
        assert not os.path.exists(path)
        with open(site["PYPROXY_ENGINE_LOG_FILE"]) as log:
            assert "engine: no mapping for 1s: exiting" in log.read()
    finally:
        backend.close()


def test_spawns_racing_the_idle_exit_are_all_served(site, proxy_loop_env):
    """Registrations queued on the engine's socket as its idle time runs out (it is stopped
    meanwhile, so they wait in its accept queue), then a stream of spawns across its exit:
    each is served by the old engine or by one it starts once the socket is gone; none is lost."""
    env = {**site, **proxy_loop_env, "PYPROXY_ENGINE_IDLE_EXIT": "1s"}
    path = env["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    first = Spawned(docker_args(free_port(), backend.port), env)
    assert first.wait() == b"0\n"
    [old] = engines(path)
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(timeout=5) == 0
    os.kill(old, signal.SIGSTOP)
    ports = [free_port() for _ in range(16)]
    racing = [Spawned(docker_args(port, backend.port), env) for port in ports[:8]]
    time.sleep(1.5)  # past its idle deadline; the spawns have connected and wait in its queue
    os.kill(old, signal.SIGCONT)
    for port in ports[8:]:
        racing.append(Spawned(docker_args(port, backend.port), env))
        time.sleep(0.05)
    try:
        assert [s.wait() for s in racing] == [b"0\n"] * len(racing)
        for s, port in zip(racing, ports, strict=True):
            assert cmdline(s.proc.pid).startswith("pyproxy-wait")
            assert exchange("127.0.0.1", port) == b"ping"
    finally:
        for s in racing:
            s.proc.send_signal(signal.SIGINT)
            s.proc.wait(timeout=5)
        backend.close()
    assert wait_until(lambda: not engines(path))  # every engine retires once idle
    assert not os.path.exists(path)


def test_the_engine_outlives_the_spawn_that_started_it_and_is_not_its_parents_child(site):
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    ports = [free_port(), free_port()]
    starter = Spawned(docker_args(ports[0], backend.port), site)
    assert starter.wait() == b"0\n"
    [engine] = engines(path)
    other = Spawned(docker_args(ports[1], backend.port), site)
    assert other.wait() == b"0\n"
    try:
        assert ppid(engine) not in (os.getpid(), starter.proc.pid)  # not "dockerd's" child
        # a session of its own (its leader, the first fork, is gone): a signal to our process
        # group or a hangup of our terminal never reaches it
        assert os.getsid(engine) not in (os.getsid(0), os.getsid(starter.proc.pid))
        assert os.getpgid(engine) != os.getpgid(0)
        starter.proc.kill()
        starter.proc.wait(timeout=5)
        assert wait_until(lambda: refused(ports[0]))  # the killed one's port is released
        assert engines(path) == [engine]
        assert exchange("127.0.0.1", ports[1]) == b"ping"
    finally:
        other.proc.send_signal(signal.SIGINT)
        assert other.proc.wait(timeout=5) == 0
        backend.close()


def test_a_running_engine_is_used_not_duplicated(site, proxy_loop_env):
    path = site["PYPROXY_ENGINE_SOCKET"]
    engine = Proxy(["-engine", "-engine-socket", path], env=proxy_loop_env)
    backend = EchoBackend()
    ports = [free_port() for _ in range(5)]
    spawned = [Spawned(docker_args(port, backend.port), site) for port in ports]
    try:
        assert [s.wait() for s in spawned] == [b"0\n"] * 5
        assert engines(path) == [engine.proc.pid]
        assert all(cmdline(s.proc.pid).startswith("pyproxy-wait") for s in spawned)
    finally:
        for s in spawned:
            s.proc.send_signal(signal.SIGINT)
            s.proc.wait(timeout=5)
        backend.close()
        engine.stop()


def test_a_pyproxy_typed_at_a_shell_serves_alone_and_starts_no_engine(site):
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    port = free_port()
    s = Spawned(docker_args(port, backend.port), site, status_pipe=False)
    try:
        assert wait_until(lambda: not refused(port))
        assert exchange("127.0.0.1", port) == b"ping"
        assert not engines(path) and not os.path.exists(path)
        assert "pyproxy-wait" not in cmdline(s.proc.pid)
        s.proc.send_signal(signal.SIGINT)  # Ctrl-C stops what the user started
        assert s.proc.wait(timeout=5) == 0
        assert refused(port)
    finally:
        backend.close()


@pytest.mark.parametrize("how", ["pyproxy-standalone", "empty PYPROXY_ENGINE_SOCKET"])
def test_the_opt_outs_never_start_or_use_an_engine(site, how):
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    ports = [free_port(), free_port()]
    env = site if how == "pyproxy-standalone" else {**site, "PYPROXY_ENGINE_SOCKET": ""}
    script = "pyproxy-standalone" if how == "pyproxy-standalone" else None
    try:
        alone = Spawned(docker_args(ports[0], backend.port), env, script=script)
        assert alone.wait() == b"0\n"
        assert not engines(path) and not os.path.exists(path)
        assert exchange("127.0.0.1", ports[0]) == b"ping"
        Proxy(["-engine", "-engine-socket", path])  # and with one running: not used either
        beside = Spawned(docker_args(ports[1], backend.port), env, script=script)
        assert beside.wait() == b"0\n"
        assert "pyproxy-wait" not in cmdline(beside.proc.pid)
        assert exchange("127.0.0.1", ports[1]) == b"ping"
    finally:
        backend.close()


@pytest.mark.parametrize("why", ["a directory others can write", "the engine fails at start"])
def test_an_engine_that_cannot_start_leaves_the_spawn_serving_alone(tmp_path, why):
    """The spawn says why on stderr and serves the mapping itself, reporting 0 as a standalone
    pyproxy would; the spawns right behind it do not each try again."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    log_file = tmp_path / "engine.log"
    if why == "a directory others can write":
        directory.chmod(0o770)
        expected = [f"refusing a directory others can write: {directory} (mode 0770"] * 2
    else:
        log_file.mkdir()  # the engine's -log-file: a directory, so it exits 1 at start
        expected = [f"-log-file {log_file}: is a directory", "it failed moments ago: -log-file"]
    path = str(directory / "engine.sock")
    backend = EchoBackend()
    try:
        for text in expected:
            port = free_port()
            read_end, write_end = os.pipe()
            proc = spawn(docker_args(port, backend.port), {3: write_end},
                         env={"PYPROXY_ENGINE_SOCKET": path, "PYPROXY_ENGINE_LOG_FILE": str(log_file)})
            os.close(write_end)
            assert read_status(read_end) == b"0\n"
            os.close(read_end)
            assert exchange("127.0.0.1", port) == b"ping"
            assert "pyproxy-wait" not in cmdline(proc.pid) and not engines(path)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 0
            _, err = output(proc)
            assert err.startswith(f"pyproxy: engine {path}: cannot start one (".encode()), err
            assert text.encode() in err
            assert b"; serving this mapping in this process" in err
    finally:
        backend.close()


def test_an_engine_killed_outright_is_started_again_by_its_waiters(site):
    """An auto-started engine has no service manager to restart it: once none comes back
    (REATTACH_START_AFTER), a waiter that held its sockets through the death starts one, as a
    spawn does, and re-attaches; the next spawn uses that engine."""
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    first_port = free_port()
    first = Spawned(docker_args(first_port, backend.port), site)
    second = None
    try:
        assert first.wait() == b"0\n"
        [killed] = engines(path)
        os.kill(killed, signal.SIGKILL)
        assert wait_until(lambda: killed not in engines(path))
        assert wait_until(lambda: len(engines(path)) == 1, timeout=20)  # started again
        assert first.proc.poll() is None  # the process dockerd spawned is still there
        assert exchange("127.0.0.1", first_port) == b"ping"  # queued in the kernel, then served
        port = free_port()
        second = Spawned(docker_args(port, backend.port), site)
        assert second.wait() == b"0\n"
        assert len(engines(path)) == 1 and killed not in engines(path)
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        for spawned in (first, second):
            if spawned is not None and spawned.proc.poll() is None:
                spawned.proc.send_signal(signal.SIGINT)
                assert spawned.proc.wait(timeout=10) == 0
        backend.close()


def test_engine_socket_flag_of_a_spawn_is_where_it_starts_the_engine(site, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path = str(elsewhere / "e.sock")
    backend = EchoBackend()
    port = free_port()
    s = Spawned([*docker_args(port, backend.port), "-engine-socket", path], site)
    try:
        assert s.wait() == b"0\n"
        assert len(engines(path)) == 1 and not engines(site["PYPROXY_ENGINE_SOCKET"])
        assert os.path.exists(str(elsewhere / "e.lock"))
    finally:
        s.proc.send_signal(signal.SIGINT)
        s.proc.wait(timeout=5)
        backend.close()
        for pid in engines(path):
            os.kill(pid, signal.SIGKILL)


def test_engine_idle_exit_is_only_for_the_engine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "proxy", *docker_args(free_port(), 80),
                           "-engine-idle-exit", "1s"], cwd=REPO, capture_output=True,
                          timeout=30, env={**os.environ, "PYPROXY_ENGINE_SOCKET": ""})
    assert proc.returncode == 2
    assert b"argument -engine-idle-exit: only with -engine" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "proxy", "-engine", "-engine-idle-exit", "-1s",
                          "-engine-socket", str(tmp_path / "e.sock")], cwd=REPO,
                         capture_output=True, timeout=30)
    assert bad.returncode == 2 and b"-engine-idle-exit" in bad.stderr


# A stand-in for dockerd: spawns a pyproxy with PR_SET_PDEATHSIG=SIGKILL, as dockerd does
# (SysProcAttr.Pdeathsig), prints its status and pid, then exits.
FAKE_DOCKERD = r"""
import ctypes, os, signal, sys
sys.path.insert(0, os.getcwd())
from tests.helpers import docker_args, read_status, spawn
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
r, w = os.pipe()
proc = spawn(docker_args(int(sys.argv[1]), int(sys.argv[2])), {3: w},
             env={k: v for k, v in os.environ.items() if k.startswith("PYPROXY_")},
             preexec=lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL))
os.close(w)
print(read_status(r), proc.pid, flush=True)
os._exit(0)  # as dockerd dying: its children get their parent-death signal
"""


def test_the_engine_survives_the_parent_death_signal_of_the_spawn(site):
    """dockerd spawns with a parent-death signal: when dockerd goes, its pyproxy is killed,
    but the engine that pyproxy started (forked, so the setting is cleared) stays."""
    path = site["PYPROXY_ENGINE_SOCKET"]
    backend = EchoBackend()
    port = free_port()
    try:
        fake = subprocess.run([sys.executable, "-c", FAKE_DOCKERD, str(port), str(backend.port)],
                              cwd=REPO, env={**os.environ, **site}, capture_output=True, text=True,
                              timeout=60)
        status, pid = fake.stdout.split()
        assert status == repr(b"0\n")
        [engine] = engines(path)
        assert wait_until(lambda: not alive(int(pid)))  # killed by its parent-death signal
        assert wait_until(lambda: refused(port))  # the engine saw its waiter die
        time.sleep(0.5)
        assert engines(path) == [engine]
    finally:
        backend.close()
