"""pyproxy-door, the native front door (proxy/waiter/door_x86_64.c, in pyproxy-wait's binary):
a plain registration handed to a live engine without starting Python, the spawn becoming the
waiter; anything else handed to the Python pyproxy beside it, which behaves as it always did.

Each test runs a copy of the binary named pyproxy-door in a directory of its own, beside a
`pyproxy` that runs this checkout (or the installed package) as bin/pyproxy does: what the
door execs on a fall-back and what a waiter execs to re-attach. Real subprocesses with
dockerd's fd layouts (fd 3 the status pipe; fd 4 free, or the listening socket with
-use-listen-fd as Docker >= 28 passes it).
"""

from __future__ import annotations

import glob
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy import __version__
from proxy.ground.wire import WireError, pyproxy_command, unframe
from proxy.handover import REATTACH_FLAG, WAIT_SHELL_ENV, waiter_binary
from tests.helpers import (
    PROXY_CWD,
    REPO,
    STOPS,
    EchoBackend,
    Proxy,
    docker_args,
    exchange,
    free_port,
    mask,
    output,
    read_status,
    read_text,
    reattaching,
    refused,
    serves_tcp,
    signal_mask,
    spawn,
    stopped_cleanly,
    until,
    waiting,
)
from tests.test_autostart import engines
from tests.test_survive import kill9, start_engine

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.uname().machine != "x86_64" or waiter_binary() is None,
                                 reason="pyproxy-door is built for x86-64 only")]


class Door:
    """A directory holding pyproxy-door (a copy of the binary) and the `pyproxy` it falls
    back to."""

    def __init__(self, directory: str) -> None:
        binary = waiter_binary()
        assert binary is not None
        self.path = os.path.join(directory, "pyproxy-door")
        shutil.copy(binary, self.path)
        self.pyproxy = os.path.join(directory, "pyproxy")
        with open(self.pyproxy, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.join(pyproxy_command([]))} \"$@\"\n")
        os.chmod(self.pyproxy, 0o755)

    def proxy(self, args: list[str], env: dict[str, str] | None = None, **kw) -> Proxy:  # type: ignore[no-untyped-def]
        """Spawned as dockerd spawns it: fd 3 the status pipe (read until EOF)."""
        return Proxy(args, env=env, command=[self.path], **kw)

    def is_its_waiter(self, pid: int) -> bool:
        """The door's own exec of itself: Python's hand-over execs the package's binary."""
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(self.path)


@pytest.fixture
def door(tmp_path) -> Door:
    directory = tmp_path / "bin"
    directory.mkdir()
    return Door(str(directory))


def fds_of(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def listening(port: int) -> socket.socket:
    """The socket dockerd >= 28 binds and passes on fd 4."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", port))
    lsock.listen()
    return lsock


# -- a plain registration: the door does it -------------------------------------------------

@pytest.mark.parametrize("use_listen_fd", [False, True], ids=["fd4-free", "fd4-socket"])
def test_a_registration_through_the_door_makes_it_the_waiter(door, engine, use_listen_fd):
    path, _ = engine
    backend = EchoBackend()
    port = free_port()
    args, fds = docker_args(port, backend.port), {}
    lsock = listening(port) if use_listen_fd else None
    if lsock is not None:
        args, fds = [*args, "-use-listen-fd"], {4: lsock.fileno()}
    try:
        p = door.proxy(args, env={"PYPROXY_ENGINE_SOCKET": path}, pass_fds=fds)
        if lsock is not None:
            lsock.close()  # dockerd keeps no copy
        assert p.status == b"0\n"
        assert door.is_its_waiter(p.proc.pid)
        mapping = f"{backend.port}/tcp -> 127.0.0.1:{port}"
        with open(f"/proc/{p.proc.pid}/cmdline") as f:
            argv = f.read().split("\0")
        # [title, "ready", the re-attach command: pyproxy beside the door, the held fds, argv]
        assert argv[:3] == [f"pyproxy-wait {mapping}", "ready", door.pyproxy]
        assert argv[3].startswith(REATTACH_FLAG + "=") and argv[4:-1] == args
        fds_now = fds_of(p.proc.pid)
        [held] = set(fds_now) - {0, 1, 2}  # fd 3 answered and closed, fd 4 (ours) not kept
        assert argv[3] == f"{REATTACH_FLAG}={held}"
        assert fds_now[0] == fds_now[1] and fds_now[0].startswith("socket:")
        # "0\n" goes out with them still blocked: a stop meanwhile waits for the handler
        until(lambda: signal_mask(p.proc.pid, "SigBlk") & STOPS == 0, within=5)
        # SIGPIPE ignored, as in a waiter that CPython exec'd (spawned here with it default)
        assert signal_mask(p.proc.pid, "SigIgn") & mask(signal.SIGPIPE)
        assert exchange("127.0.0.1", port) == b"ping"
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=5) == 0
        assert refused(port)  # released before the process exited
        assert output(p.proc) == (f"{mapping}\n".encode(), b"")  # as the Python path prints
    finally:
        if lsock is not None:
            lsock.close()
        backend.close()


def test_a_registration_run_by_hand_leaves_fd3_alone(door, engine):
    """No status pipe: the waiter is told not to answer ("-"), as Python tells it."""
    path, _ = engine
    port = free_port()
    proc = spawn(docker_args(port, 9), {}, env={"PYPROXY_ENGINE_SOCKET": path},
                 command=[door.path])
    until(lambda: waiting(proc.pid), within=10)
    assert door.is_its_waiter(proc.pid)
    with open(f"/proc/{proc.pid}/cmdline") as f:
        assert f.read().split("\0")[1] == "-"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0
    assert refused(port)


# -- anything else: Python, as before -------------------------------------------------------

def test_no_engine_a_spawn_falls_back_and_python_starts_one(door, tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = str(directory / "engine.sock")
    backend = EchoBackend()
    port = free_port()
    try:
        p = door.proxy(docker_args(port, backend.port),
                       env={"PYPROXY_ENGINE_SOCKET": path, "PYPROXY_ENGINE_IDLE_EXIT": "60s"})
        assert p.status == b"0\n"
        assert len(engines(path)) == 1  # started by the Python pyproxy the door fell back to
        assert waiting(p.proc.pid) and not door.is_its_waiter(p.proc.pid)
        assert exchange("127.0.0.1", port) == b"ping"
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=5) == 0
        assert refused(port)
    finally:
        backend.close()
        for pid in engines(path):
            os.kill(pid, signal.SIGKILL)


def test_no_engine_and_no_status_pipe_python_serves_here(door, tmp_path):
    backend = EchoBackend()
    port = free_port()
    proc = spawn(docker_args(port, backend.port), {},
                 env={"PYPROXY_ENGINE_SOCKET": str(tmp_path / "none.sock")}, command=[door.path])
    try:
        until(lambda: serves_tcp(port), within=20)
        with open(f"/proc/{proc.pid}/cmdline") as f:
            assert "proxy.launch" in f.read()  # the Python pyproxy, serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert refused(port)
    finally:
        backend.close()


@pytest.mark.parametrize("flag", ["-v", "--version", "-version"])
def test_version_falls_back(door, flag):
    done = subprocess.run([door.path, flag], capture_output=True, timeout=30, check=False,
                          env={**os.environ, "PYPROXY_ENGINE_SOCKET": ""})
    assert (done.returncode, done.stdout) == (0, f"pyproxy version {__version__}\n".encode())


def test_help_falls_back_even_with_an_engine(door, engine):
    path, _ = engine
    done = subprocess.run([door.path, "-host-port", "1", "-h"], capture_output=True, timeout=30,
                          check=False, env={**os.environ, "PYPROXY_ENGINE_SOCKET": path})
    assert done.returncode == 0 and b"-container-port" in done.stdout


def test_a_reattach_falls_back(door):
    done = subprocess.run([door.path, f"{REATTACH_FLAG}=99", "-host-port", "1"],
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr == f"pyproxy: {REATTACH_FLAG}=99: not a list of held socket fds\n".encode()


@pytest.mark.parametrize("how", ["wait-shell", "engine-socket-flag", "engine-socket-empty",
                                 "relative-path", "no-argv"])
def test_what_is_not_a_plain_registration_falls_back(door, engine, how):
    """Each reaches Python, which does what it always did with it."""
    path, _ = engine
    backend = EchoBackend()
    port = free_port()
    args, env = docker_args(port, backend.port), {"PYPROXY_ENGINE_SOCKET": path}
    if how == "wait-shell":  # Python registers, and waits in the shell named
        env[WAIT_SHELL_ENV] = "/bin/sh"
    elif how == "engine-socket-flag":
        args += ["--engine-socket", path]
    elif how == "engine-socket-empty":  # never an engine: standalone
        env["PYPROXY_ENGINE_SOCKET"] = ""
    elif how == "relative-path":  # Python connects to it relative to its cwd
        env["PYPROXY_ENGINE_SOCKET"] = os.path.relpath(path, PROXY_CWD)
    else:  # no argv[1]: Python's usage error
        p = door.proxy([], env=env, wait_ready=False)
        assert p.proc.wait(timeout=10) == 2 and p.status.startswith(b"1\n")
        backend.close()
        return
    try:
        p = door.proxy(args, env=env)
        assert not door.is_its_waiter(p.proc.pid)
        if how == "wait-shell":
            assert os.path.realpath(f"/proc/{p.proc.pid}/exe") == os.path.realpath("/bin/sh")
        elif how == "relative-path":
            assert waiting(p.proc.pid)  # registered through the relative path, by Python
        else:
            with open(f"/proc/{p.proc.pid}/cmdline") as f:
                assert "proxy.launch" in f.read()  # serving here
        assert exchange("127.0.0.1", port) == b"ping"
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=5) == 0
        assert refused(port)
    finally:
        backend.close()


class Listener:
    """A Unix socket listener in this process (root's, as the test runs): what each connection
    sent, bytes and ancillary messages."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen()
        self.seen: list[tuple[int, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64))
                except OSError:
                    data, ancillary = b"?", []
                self.seen.append((len(data), len(ancillary)))


@pytest.mark.parametrize("mode", [0o775, 0o1777])
def test_an_engine_socket_in_a_directory_others_can_write_is_refused_as_before(door, tmp_path, mode):
    """The door sends nothing to it and falls back; Python refuses it with the same words."""
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, mode)
    path = str(directory / "engine.sock")
    fake = Listener(path)
    lsock = listening(free_port())
    try:
        p = door.proxy([*docker_args(lsock.getsockname()[1], 80), "-use-listen-fd"],
                       env={"PYPROXY_ENGINE_SOCKET": path}, pass_fds={4: lsock.fileno()},
                       wait_ready=False)
        assert p.status.startswith(f"1\nengine socket {path}: refused: directory {directory} "
                                   "can be written by other users".encode())
        assert p.proc.wait(timeout=5) == 1
        until(lambda: len(fake.seen) == 2, within=5)  # the door's connection, then Python's
        assert fake.seen == [(0, 0), (0, 0)]  # neither sent a byte or an fd
    finally:
        fake.sock.close()
        lsock.close()


# A fake engine of another user: bind as root, become uid 65534 (SO_PEERCRED is taken at
# listen()), then say what each of two connections sent (bytes, ancillary messages).
OTHER_USERS_ENGINE = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s.listen()
print("listening", flush=True)
for _ in range(2):
    conn, _ = s.accept()
    conn.settimeout(20)
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64))
    print(len(data), len(ancillary), flush=True)
"""


def test_an_engine_socket_served_by_another_user_is_refused_as_before(door, tmp_path):
    os.chmod(tmp_path, 0o755)  # root's, and only root may write: the directory is fine
    path = str(tmp_path / "engine.sock")
    fake = subprocess.Popen([sys.executable, "-c", OTHER_USERS_ENGINE, path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "listening\n"
        lsock = listening(free_port())
        p = door.proxy([*docker_args(lsock.getsockname()[1], 80), "-use-listen-fd"],
                       env={"PYPROXY_ENGINE_SOCKET": path}, pass_fds={4: lsock.fileno()},
                       wait_ready=False)
        lsock.close()
        assert p.status == (f"1\nengine socket {path}: refused: it is served by uid 65534, not "
                            "by root or this user (uid 0); nothing was sent to it").encode()
        assert p.proc.wait(timeout=5) == 1
        seen, _ = fake.communicate(timeout=20)
        assert seen == "0 0\n0 0\n"  # the door's connection, then Python's: nothing sent
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait()


def test_an_engine_refusal_is_reported_as_before(door, engine, busy_port):
    path, _ = engine
    p = door.proxy(docker_args(busy_port, 80), env={"PYPROXY_ENGINE_SOCKET": path},
                   wait_ready=False)
    assert p.status == f"1\nlisten tcp4 127.0.0.1:{busy_port}: bind: address already in use".encode()
    assert p.proc.wait(timeout=10) == 1
    bad = door.proxy(["-host-port", "8080", "-container-port", "x"],
                     env={"PYPROXY_ENGINE_SOCKET": path}, wait_ready=False)
    assert bad.proc.wait(timeout=10) == 2
    assert bad.status.startswith(b"1\nargument -container-port")


def test_no_pyproxy_beside_it_is_reported_on_fd3(door):
    os.remove(door.pyproxy)
    p = door.proxy(["-v"], wait_ready=False)
    why = f"pyproxy-door: cannot run {door.pyproxy}: no such file or directory"
    assert p.status == f"1\n{why}".encode()
    assert p.proc.wait(timeout=5) == 1
    assert output(p.proc)[1] == f"pyproxy: {why}\n".encode()


# -- a stop at any moment -------------------------------------------------------------------

def block_stop_signals() -> None:
    """In the child before its exec: the stop signals blocked from the instant the door
    exists (its own first system call blocks them too, but a signal before that one would
    end it by its default action, as it would any program dockerd starts)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.parametrize("path_taken", ["door", "fallback"])
def test_a_stop_at_any_moment_from_spawn_on_exits_0_and_frees_the_port(door, engine, path_taken):
    """Through the door into the waiter, or through the door into Python (PYPROXY_WAIT_SHELL
    names the binary: Python registers and execs it): exit 0, never death by the signal,
    "0\\n" or nothing on fd 3, the port free once the process is gone."""
    path, _ = engine
    env = {"PYPROXY_ENGINE_SOCKET": path}
    if path_taken == "fallback":
        env[WAIT_SHELL_ENV] = waiter_binary() or ""
    rng = random.Random()
    for i in range(15):
        port = free_port()
        read_end, write_end = os.pipe()
        proc = spawn(docker_args(port, 9), {3: write_end}, env=env, command=[door.path],
                     preexec=block_stop_signals)
        os.close(write_end)
        try:
            time.sleep(rng.uniform(0, 0.005 if path_taken == "door" else 0.08))
            proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
            stopped_cleanly(proc, read_end, port)
        finally:
            os.close(read_end)


# -- an engine that takes the connection but never answers ----------------------------------

def in_system_call(pid: int, number: int) -> bool:
    """The process is blocked in system call `number` (x86-64's numbering)."""
    try:
        return read_text(f"/proc/{pid}/syscall").split()[0] == str(number)
    except (OSError, IndexError):
        return False


def read_registration(conn: socket.socket) -> bytes:
    """What a spawn sent, up to the end of its argv (its last NUL), or up to EOF."""
    request = b""
    while not request.endswith(b"\0"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        request += chunk
    return request


_POLL, _CONNECT = 7, 42


def test_a_stop_while_the_engine_never_answers_still_exits_0(door, tmp_path):
    """An engine that accepted the connection (or whose backlog did: stopped, wedged) and never
    answers: the door waits for the answer with the stop signals blocked, so it must hear them
    another way, or a stop would leave it unkillable but by SIGKILL (and dockerd, which waits
    for the process it interrupted, waiting with it). It asks the engine to release, as
    Python's _stop_now does, and exits 0 within handover.STOP_TIMEOUT."""
    path = str(tmp_path / "engine.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen()
    read_end, write_end = os.pipe()
    proc = spawn(docker_args(free_port(), 9), {3: write_end}, env={"PYPROXY_ENGINE_SOCKET": path},
                 command=[door.path])
    os.close(write_end)
    try:
        conn, _ = silent.accept()
        conn.settimeout(10)
        assert read_registration(conn).endswith(b"\0")  # the whole registration
        until(lambda: in_system_call(proc.pid, _POLL), within=5)
        assert door.is_its_waiter(proc.pid)  # still the door: it never fell back to Python
        proc.send_signal(signal.SIGTERM)
        assert conn.recv(64) == b"stop\n"  # release the port, if you hold it
        conn.close()  # as the engine closes once it has released
        assert proc.wait(timeout=5) == 0
        assert read_status(read_end) == b""  # nothing said to the runtime
    finally:
        os.close(read_end)
        silent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stop_while_the_engines_backlog_is_full_still_exits_0(door, tmp_path):
    """A connect to a full backlog would block: the door does not wait there with the stop
    signals blocked, it goes on to Python, whose connect a stop interrupts (exit 0)."""
    path = str(tmp_path / "engine.sock")
    stuck = socket.socket(socket.AF_UNIX)
    stuck.bind(path)
    stuck.listen(0)
    queued = []
    try:
        while True:  # fill the backlog
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            queued.append(client)
            client.connect(path)
    except BlockingIOError:
        pass
    read_end, write_end = os.pipe()
    proc = spawn(docker_args(free_port(), 9), {3: write_end}, env={"PYPROXY_ENGINE_SOCKET": path},
                 command=[door.path])
    os.close(write_end)
    try:
        until(lambda: in_system_call(proc.pid, _CONNECT), within=10)  # Python's, blocked
        assert not door.is_its_waiter(proc.pid)  # the door went on to Python
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert read_status(read_end) == b""
        assert b"Traceback" not in output(proc)[1]
    finally:
        os.close(read_end)
        for client in queued:
            client.close()
        stuck.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- junk for an answer --------------------------------------------------------------------

class JunkEngine:
    """Answers every registration with the bytes it is given, then closes (in this process,
    root's, in a directory only root can write: an engine the door trusts)."""

    def __init__(self, path: str, answer: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen()
        self.answer = answer

    def serve_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            if read_registration(conn).endswith(b"\0"):
                conn.sendall(self.answer)


def frame(payload: bytes, zeros: int, after: bytes) -> bytes:
    """`payload` framed with its length (behind `zeros` leading zeros), then `after`."""
    return b"0" * zeros + str(len(payload)).encode() + b"\n" + payload + after


BODIES = st.binary(max_size=40)
AFTER = st.binary(max_size=8)
STATUSES = st.sampled_from([b"0\n", b"1\n", b"2\n", b"0", b"00\n", b"3\n", b"", b"\n"])
REPLIES = st.one_of(
    st.binary(max_size=64),
    # registrations, and their lengths zero-padded up to and past the 5 digits allowed
    st.builds(frame, BODIES.map(lambda body: b"0\n" + body), st.integers(0, 4), AFTER),
    # the right length around any status line
    st.builds(frame, st.builds(bytes.__add__, STATUSES | st.binary(max_size=3), BODIES), st.just(0), AFTER),
    # lengths wrong, too long or not digits, or no whole frame at all
    st.builds(lambda head, payload: head + b"\n" + payload,
              st.from_regex(rb"\A[0-9]{0,7}\Z") | st.binary(max_size=6), BODIES),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(answer=REPLIES)
def test_junk_for_an_answer_goes_on_to_python_unless_it_is_a_registration(door, tmp_path, answer):
    """Whatever an engine (the door trusts it) answers, the door goes on to the waiter exactly
    when proxy.ground.wire reads the bytes as a whole status-0 reply (the Python path's own
    decision), and otherwise hands the spawn to Python; it never crashes or hangs. Here the
    `pyproxy` beside it only says it was reached (exit 3)."""
    directory = tmp_path / f"junk-{os.urandom(4).hex()}"
    directory.mkdir(mode=0o700)
    with open(door.pyproxy, "w") as f:
        f.write("#!/bin/sh\nexit 3\n")
    engine = JunkEngine(str(directory / "engine.sock"), answer)
    try:
        payload = unframe(answer)
    except WireError:
        payload = None
    registered = payload is not None and payload.startswith(b"0\n")
    event("a registration" if registered else "not one")
    read_end, write_end = os.pipe()
    proc = spawn(docker_args(free_port(), 9), {3: write_end},
                 env={"PYPROXY_ENGINE_SOCKET": engine.sock.getsockname()}, command=[door.path])
    os.close(write_end)
    try:
        engine.serve_one()
        status = read_status(read_end)
        code = proc.wait(timeout=10)
        # the waiter answers "0\n", then finds the connection closed and, holding nothing,
        # exits 1; or Python was reached (3) and nothing was said on fd 3
        assert (status, code) == ((b"0\n", 1) if registered else (b"", 3)), (answer, status, code)
    finally:
        os.close(read_end)
        engine.sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the engine goes away -------------------------------------------------------------------

def test_engine_killed_the_doors_waiters_reattach_through_pyproxy_beside_it(door, tmp_path,
                                                                          proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    ports = [free_port(), free_port()]
    lsock = listening(ports[1])
    try:
        env = {"PYPROXY_ENGINE_SOCKET": path}
        waiters = [door.proxy(docker_args(ports[0], backend.port), env=env),
                   door.proxy([*docker_args(ports[1], backend.port), "-use-listen-fd"], env=env,
                              pass_fds={4: lsock.fileno()})]
        lsock.close()
        assert all(door.is_its_waiter(w.proc.pid) for w in waiters)
        pids = [w.proc.pid for w in waiters]
        for pid in pids:  # the command it execs once the connection ends: the one beside it
            with open(f"/proc/{pid}/cmdline") as f:
                assert f.read().split("\0")[2] == door.pyproxy
        kill9(engine)
        until(lambda: all(reattaching(pid) for pid in pids), within=10)
        engine = start_engine(path, proxy_loop_env)
        until(lambda: all(serves_tcp(port) for port in ports), within=10)
        until(lambda: all(waiting(pid) for pid in pids), within=5)
        for w, port in zip(waiters, ports, strict=True):
            assert w.proc.pid in pids and w.proc.poll() is None  # dockerd's children, still
            w.proc.send_signal(signal.SIGTERM)
            assert w.proc.wait(timeout=5) == 0
            assert refused(port)
    finally:
        lsock.close()
        engine.stop(signal.SIGKILL)
        backend.close()


# -- installed beside pyproxy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                           REPO], capture_output=True, timeout=300, check=False)
    if done.returncode != 0 and b"setuptools" in done.stderr and b"find" in done.stderr:
        pytest.skip("pip cannot fetch the build backend (setuptools>=77) here")
    assert done.returncode == 0, done.stderr.decode()
    [built] = glob.glob(str(out / "*.whl"))
    with zipfile.ZipFile(built) as z:
        yield z


def test_the_wheel_installs_pyproxy_door_beside_pyproxy(wheel):
    """Its bytes as they are (setup.py's build_scripts copies it, pip leaves a file that
    does not start with #!python alone), executable."""
    scripts = {os.path.basename(i.filename): i for i in wheel.infolist() if ".data/scripts/" in i.filename}
    assert {"pyproxy", "pyproxy-door"} <= set(scripts)
    door = scripts["pyproxy-door"]
    assert door.external_attr >> 16 & 0o777 == 0o755
    assert wheel.read(door) == wheel.read("proxy/waiter/x86_64/pyproxy-wait")
    with open(os.path.join(REPO, "proxy", "waiter", "x86_64", "pyproxy-wait"), "rb") as f:
        assert wheel.read(door) == f.read()
