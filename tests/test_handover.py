"""The spawned side of the engine hand-over, and start-up under signals: what fd 3 and fd 4
are, who the engine is, the waiter (pyproxy-wait or a shell), and a stop at any moment of
start-up. pyproxy-wait itself, run directly: tests/test_waiter.py.

Every pyproxy here is a real subprocess with dockerd's fd layout (fd 3 the status pipe,
fd 4 free, as dockerd < 28 spawns it) unless a test says otherwise.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from proxy.handover import (
    BUSYBOX_SH_SUFFIX,
    WAIT_SHELL_ENV,
    WAITER_DIR,
    statically_linked,
    wait_shell,
    waiter_binary,
    waiter_program,
)
from tests.helpers import (
    REPO,
    EchoBackend,
    Proxy,
    catches_sigterm,
    docker_args,
    exchange,
    free_port,
    output,
    read_status,
    refused,
    spawn,
    spawn_via,
    stopped_cleanly,
)

pytestmark = pytest.mark.timeout(120)

def released(port: int, within: float = 5.0) -> bool:
    """The port is refused within `within` seconds (the engine releases it on EOF)."""
    deadline = time.monotonic() + within
    while not refused(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_a_waiter_killed_without_saying_stop_frees_its_port(engine, signum, waiter_env):
    """fd 4 is free, so the engine connection lands there: it must never be sent to the
    engine as the listen socket, or the engine holds its own connection open for good.
    SIGHUP keeps its default action in the waiter (only the stop signals are handled)."""
    path, _ = engine
    backend = EchoBackend()
    try:
        for _ in range(10):
            port = free_port()
            p = spawn_via(path, docker_args(port, backend.port), env=waiter_env)
            assert exchange("127.0.0.1", port) == b"ping"
            p.proc.send_signal(signum)
            assert p.proc.wait(timeout=5) == -signum
            assert released(port)
    finally:
        backend.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_right_after_ready_frees_the_port_and_exits_0(engine, waiter_env, signum):
    path, _ = engine
    backend = EchoBackend()
    try:
        for _ in range(10):
            port = free_port()
            p = spawn_via(path, docker_args(port, backend.port), env=waiter_env)  # "0\n", EOF
            p.proc.send_signal(signum)
            assert p.proc.wait(timeout=5) == 0
            assert refused(port)  # released before the process exited
            assert b"Traceback" not in output(p.proc)[1]
    finally:
        backend.close()


@pytest.mark.parametrize("shell", ["", "/bin/dash", "/bin/busybox", "pyproxy-wait"])
def test_waiter_names_its_mapping_and_holds_only_the_engine_connection(engine, shell):
    """In each program a waiter can be ("": the default, pyproxy-wait where there is one for
    this machine; "pyproxy-wait": the binary named by PYPROXY_WAIT_SHELL), and a stop frees
    the port."""
    if shell == "pyproxy-wait":
        shell = waiter_binary() or ""
        if not shell:
            pytest.skip(f"no pyproxy-wait for {os.uname().machine}")
    if shell and not os.access(shell, os.X_OK):
        pytest.skip(f"no {shell} here")
    path, _ = engine
    backend = EchoBackend()
    port = free_port()
    p = Proxy(docker_args(port, backend.port), env={"PYPROXY_ENGINE_SOCKET": path,
                                                    WAIT_SHELL_ENV: shell})
    try:
        program = os.path.realpath(shell or waiter_program() or "")
        assert os.path.realpath(f"/proc/{p.proc.pid}/exe") == program
        with open(f"/proc/{p.proc.pid}/cmdline") as f:
            cmdline = f.read().split("\0")
        title = f"pyproxy-wait {backend.port}/tcp -> 127.0.0.1:{port}"  # `ps`
        busybox = os.path.basename(program) == "busybox"
        assert cmdline[0] == title + (BUSYBOX_SH_SUFFIX if busybox else "")
        fds = {fd: os.readlink(f"/proc/{p.proc.pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{p.proc.pid}/fd")}
        assert "3" not in fds  # fd 3 answered and closed
        assert fds["0"] == fds["1"] and fds["0"].startswith("socket:")
        assert exchange("127.0.0.1", port) == b"ping"
        p.proc.send_signal(signal.SIGINT)
        assert p.proc.wait(timeout=5) == 0
        assert refused(port)  # released before the process exited
    finally:
        p.stop(signal.SIGINT)
        backend.close()


def test_pyproxy_wait_is_the_waiter_where_one_is_shipped_and_a_shell_stands_in(monkeypatch,
                                                                                 tmp_path):
    """pyproxy-wait for this machine when it is there and executable, unless PYPROXY_WAIT_SHELL
    names a program; a shell otherwise (another machine, or the binary lost its mode)."""
    monkeypatch.delenv(WAIT_SHELL_ENV, raising=False)
    shipped = os.path.join(WAITER_DIR, os.uname().machine, "pyproxy-wait")
    if os.uname().machine == "x86_64":
        assert waiter_binary() == shipped and os.access(shipped, os.X_OK)
    if waiter_binary() is None:
        pytest.skip(f"no pyproxy-wait for {os.uname().machine}")
    assert waiter_program() == shipped
    monkeypatch.setenv(WAIT_SHELL_ENV, "/bin/sh")
    assert waiter_program() == "/bin/sh"
    monkeypatch.setenv(WAIT_SHELL_ENV, "")  # empty: as if unset
    assert waiter_program() == shipped
    # The package moved somewhere the binary is not executable (or not there): a shell.
    machine = tmp_path / os.uname().machine
    machine.mkdir()
    (machine / "pyproxy-wait").write_bytes(b"")
    (machine / "pyproxy-wait").chmod(0o644)
    monkeypatch.setattr("proxy.handover.WAITER_DIR", str(tmp_path))
    assert waiter_binary() is None and waiter_program() == wait_shell()
    monkeypatch.setattr("proxy.handover.WAITER_DIR", str(tmp_path / "gone"))
    assert waiter_binary() is None and waiter_program() == wait_shell()


def test_a_static_busybox_is_the_first_wait_shell(monkeypatch):
    """It costs the least per waiter (no libc to relocate): see proxy.handover.WAIT_SHELLS."""
    monkeypatch.delenv(WAIT_SHELL_ENV, raising=False)
    static = [b for b in ("/bin/busybox", "/usr/bin/busybox")
              if os.access(b, os.X_OK) and statically_linked(b)]
    if not static:
        pytest.skip("no statically linked busybox here (Debian: busybox-static)")
    assert wait_shell() == static[0]
    assert not statically_linked(os.path.realpath(sys.executable))  # it has an ld.so
    assert not statically_linked(__file__)  # not an ELF file at all
    monkeypatch.setenv(WAIT_SHELL_ENV, "/bin/sh")
    assert wait_shell() == "/bin/sh"  # named: only that one


def test_run_by_hand_with_fd3_free_while_an_engine_runs(engine):
    """No status pipe: the engine connection takes fd 3, and must not be taken for the pipe."""
    path, _ = engine
    backend = EchoBackend()
    port = free_port()
    proc = spawn(docker_args(port, backend.port), {}, env={"PYPROXY_ENGINE_SOCKET": path})
    try:
        deadline = time.monotonic() + 10
        while refused(port):
            assert proc.poll() is None, output(proc)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert exchange("127.0.0.1", port) == b"ping"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
        assert refused(port)
        out, err = output(proc)
        assert f"127.0.0.1:{port}".encode() in out
        assert err == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        backend.close()


def test_no_shell_to_wait_in_is_reported_on_fd3(engine):
    path, _ = engine
    port = free_port()
    p = Proxy(docker_args(port, 80), env={"PYPROXY_ENGINE_SOCKET": path,
                                          "PYPROXY_WAIT_SHELL": "/nonexistent/sh"},
              wait_ready=False)
    assert p.status == b"1\npyproxy engine: no POSIX shell to wait in (tried /nonexistent/sh)"
    assert p.proc.wait(timeout=5) == 1
    assert refused(port)  # nothing was registered


def test_a_shell_that_cannot_run_is_reported_on_fd3_and_the_port_released(engine, tmp_path):
    path, _ = engine
    broken = tmp_path / "sh"
    broken.write_bytes(b"\x7fELF not really")
    broken.chmod(0o755)
    port = free_port()
    p = Proxy(docker_args(port, 80), env={"PYPROXY_ENGINE_SOCKET": path,
                                          "PYPROXY_WAIT_SHELL": str(broken)},
              wait_ready=False)
    assert p.status.startswith(f"1\npyproxy engine: cannot run the waiter {broken}: ".encode())
    assert p.proc.wait(timeout=5) == 1
    assert released(port)


# -- who the engine is ---------------------------------------------------------------------------

# A fake engine: bind as root, become `uid` (SO_PEERCRED is taken at listen()), then report
# what the first client sent: bytes and ancillary messages (an fd would come as one).
FAKE_ENGINE = r"""
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.bind(path)
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
s.listen()
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(20)
data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64))
print(len(data), len(ancillary), flush=True)
"""


def fake_engine(path: str, uid: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_ENGINE, path, str(uid)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
    return proc


def refused_by(directory: str, uid: int, use_listen_fd: bool = True) -> tuple[Proxy, str]:
    """A spawned pyproxy (with a listen socket on fd 4) against a fake engine in `directory`."""
    import socket

    path = os.path.join(directory, "engine.sock")
    fake = fake_engine(path, uid)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    try:
        p = spawn_via(path, [*docker_args(port, 80), "-use-listen-fd"],
                      pass_fds={4: lsock.fileno()}, wait_ready=False)
        seen, _ = fake.communicate(timeout=20)
    finally:
        lsock.close()
        if fake.poll() is None:
            fake.kill()
            fake.wait()
    return p, seen


def test_an_engine_socket_served_by_another_user_is_refused(tmp_path):
    os.chmod(tmp_path, 0o755)  # root's, and only root may write: the directory is fine
    p, seen = refused_by(str(tmp_path), 65534)
    assert seen == "0 0\n"  # no argv, no fd reached it
    assert p.status == (f"1\nengine socket {tmp_path}/engine.sock: refused: it is served by "
                        f"uid 65534, not by root or this user (uid 0); nothing was sent to it"
                        ).encode()
    assert p.proc.wait(timeout=5) == 1
    assert b"pyproxy: engine socket" in output(p.proc)[1]


@pytest.mark.parametrize("mode, owner", [(0o1777, 0), (0o777, 0), (0o775, 0), (0o755, 65534)])
def test_an_engine_socket_in_a_directory_others_can_write_is_refused(tmp_path, mode, owner):
    directory = tmp_path / "run"
    directory.mkdir()
    os.chown(directory, owner, owner)
    os.chmod(directory, mode)
    p, seen = refused_by(str(directory), 0)  # even an engine that is root's: anyone could
    assert seen == "0 0\n"                   # have bound that path first
    assert p.status.startswith(f"1\nengine socket {directory}/engine.sock: refused: directory "
                               f"{directory} can be written by other users".encode())
    assert p.proc.wait(timeout=5) == 1


# -- a stop signal at any moment of start-up -------------------------------------------------------

def _spawned_with_its_handlers(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """pyproxy spawned as dockerd does (a status pipe on fd 3), returned the moment its first
    line has run (its SIGTERM handler is installed; polled every millisecond, so a stop can
    come as early as that): the process and the pipe's read end."""
    read_end, write_end = os.pipe()
    proc = spawn(args, {3: write_end}, env=env)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 10
        while not catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
    except BaseException:
        os.close(read_end)
        raise
    return proc, read_end


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_at_any_moment_of_standalone_start_up(signum, proxy_loop_env):
    """From pyproxy's first line on, SIGINT/SIGTERM end start-up with exit 0 and no traceback,
    with nothing on fd 3 (or "0\\n" if it was already ready); SIGHUP does not end it."""
    backend = EchoBackend()
    rng = random.Random()
    try:
        for _ in range(7):
            port = free_port()
            proc, read_end = _spawned_with_its_handlers(docker_args(port, backend.port),
                                                        proxy_loop_env)
            try:
                time.sleep(rng.uniform(0, 0.25))  # start-up, and past "0\n" at times
                proc.send_signal(signum)
                if signum == signal.SIGHUP:
                    assert read_status(read_end) == b"0\n"  # it goes on starting, and serves
                    assert exchange("127.0.0.1", port) == b"ping"
                    proc.send_signal(signal.SIGTERM)
                    status = b"0\n"
                else:
                    status = read_status(read_end)
                assert proc.wait(timeout=5) == 0
                assert status in (b"", b"0\n")
                err = output(proc)[1]
                assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
            finally:
                os.close(read_end)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        backend.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_at_any_moment_of_a_handover_into_pyproxy_wait(engine, signum):
    """From pyproxy's first line through the registration, the exec and pyproxy-wait's start:
    exit 0, never death by the signal (the binary is exec'd with the stop signals blocked, so
    a shell's instant between its exec and its trap does not exist), the port free once the
    process is gone, "0\n" or nothing on fd 3."""
    if waiter_binary() is None:
        pytest.skip(f"no pyproxy-wait for {os.uname().machine}")
    path, _ = engine
    rng = random.Random()
    for _ in range(15):
        port = free_port()
        proc, read_end = _spawned_with_its_handlers(
            docker_args(port, 9), {"PYPROXY_ENGINE_SOCKET": path, WAIT_SHELL_ENV: ""})
        try:
            time.sleep(rng.uniform(0, 0.06))  # through the handover, at times past "0\n"
            proc.send_signal(signum)
            stopped_cleanly(proc, read_end, port)
        finally:
            os.close(read_end)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_pending_from_a_parent_that_blocked_it_exits_0(signum):
    """pyproxy-door execs pyproxy with the stop signals blocked (and any parent may): the
    first line unblocks them once its handlers are set, so a stop pending since before the
    exec exits 0 there, and one sent later is not held back for good (it was, before)."""
    for pending in (True, False):
        read_end, write_end = os.pipe()
        proc = spawn(docker_args(free_port(), 9), {3: write_end},
                     preexec=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signum}))
        os.close(write_end)
        try:
            if pending:
                proc.send_signal(signum)  # Popen returned: it is exec'd, the signal blocked
            else:
                assert read_status(read_end, timeout=20) == b"0\n"
                proc.send_signal(signum)
            assert proc.wait(timeout=10) == 0
            if pending:
                assert read_status(read_end) == b""  # stopped at its first line
            assert b"Traceback" not in output(proc)[1]
        finally:
            os.close(read_end)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_right_after_ready(signum, proxy_loop_env):
    """The handlers are in place before "0\\n": a stop right after it exits 0, SIGHUP (a log
    reopen) does not end the process."""
    backend = EchoBackend()
    try:
        for _ in range(10):
            p = Proxy(docker_args(free_port(), backend.port), env=proxy_loop_env)
            p.proc.send_signal(signum)
            if signum == signal.SIGHUP:
                time.sleep(0.1)
                assert p.proc.poll() is None
                p.proc.send_signal(signal.SIGTERM)
            assert p.proc.wait(timeout=5) == 0
            assert b"Traceback" not in output(p.proc)[1]
    finally:
        backend.close()


def test_the_installed_command_is_the_lean_launcher():
    """bin/pyproxy (pip rewrites its #!python) goes straight to proxy.launch.main, whose first
    line catches the stop signals: no `import re` window as in pip's console-script wrapper."""
    launcher = os.path.join(REPO, "bin", "pyproxy")
    with open(launcher) as f:
        assert f.readline() == "#!python\n"
    assert os.access(launcher, os.X_OK)
    done = subprocess.run([sys.executable, launcher, "-v"], cwd=REPO, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and done.stdout.startswith(b"pyproxy version ")


# What importing the handover path may load beyond what the interpreter already has: C
# modules and pyproxy's own import-light ones. typing (re, enum) or collections.abc
# (collections, operator) here cost ~8 ms of every spawn's time to "0\n".
HANDOVER_PATH_IMPORTS = {"__future__", "_signal", "_socket", "time"}


def test_the_handover_path_imports_nothing_heavy():
    probe = ("import sys; before = set(sys.modules); import proxy.launch; "
             "print(' '.join(sorted(set(sys.modules) - before)))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          timeout=30, check=True)
    added = set(done.stdout.decode().split())
    assert {name for name in added if name != "proxy" and not name.startswith("proxy.")} \
        <= HANDOVER_PATH_IMPORTS, added
