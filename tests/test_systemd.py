"""The engine under systemd: the shipped units pass `systemd-analyze verify`, and the engine
speaks the notify protocol (READY=1 once its socket listens, STOPPING=1 on SIGTERM)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ground import sdnotify
from proxy.ground.flags import parse_config
from proxy.ground.wire import DEFAULT_ENGINE_SOCKET
from tests.helpers import REPO, EchoBackend, Proxy, docker_args, exchange, free_port, output, spawn

pytestmark = pytest.mark.timeout(60)

UNITS = os.path.join(REPO, "contrib", "systemd")
ENGINE_UNIT = os.path.join(UNITS, "pyproxy-engine.service")
DOCKER_DROP_IN = os.path.join(UNITS, "docker.service.d", "pyproxy-engine.conf")
INSTALLED = "/usr/local/bin/pyproxy"  # the README's install path, as the unit and daemon.json name it
_UCRED = struct.Struct("3i")
# Should these tests run inside a systemd service, its SYSTEMD_EXEC_PID (not the engine's pid)
# would make the engine ignore the test's NOTIFY_SOCKET: empty, as from a systemd before 248.
AS_STARTED_BY_SYSTEMD = {"SYSTEMD_EXEC_PID": ""}


def unit_values(path: str, key: str) -> list[str]:
    """Every value of `key` in a unit file (systemd's syntax: Key=value, # comments)."""
    values = []
    for line in Path(path).read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not line.startswith(("#", ";")) and name == key:
            values.append(value)
    return values


# -- the unit files ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is absent (Debian's systemd package has it)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify fails a unit whose ExecStart binary does not exist, and /usr/local/bin/pyproxy is
    # where an install puts it, not this checkout: check a copy that runs this checkout instead.
    # docker.service is a stand-in so that the drop-in is checked in its place, next to the unit.
    text = Path(ENGINE_UNIT).read_text()
    assert f"ExecStart={INSTALLED} " in text
    here = f"{shlex.quote(sys.executable)} -m proxy"
    (tmp_path / "pyproxy-engine.service").write_text(text.replace(INSTALLED, here))
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "docker.service.d").mkdir()
    shutil.copy(DOCKER_DROP_IN, tmp_path / "docker.service.d")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no",
         str(tmp_path / "pyproxy-engine.service"), str(tmp_path / "docker.service")],
        check=False, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    # An unknown key or a bad value is only a warning (exit 0): any output is a failure here.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_runs_the_engine_where_spawned_pyproxies_look_for_it():
    (exec_start,) = unit_values(ENGINE_UNIT, "ExecStart")
    command, *args = shlex.split(exec_start)
    assert command == INSTALLED
    config = parse_config(args)
    assert config is not None and config.engine
    assert config.engine_socket == DEFAULT_ENGINE_SOCKET  # what a spawned pyproxy connects to
    runtime_dir = "/run/" + unit_values(ENGINE_UNIT, "RuntimeDirectory")[0]
    assert os.path.dirname(DEFAULT_ENGINE_SOCKET) == runtime_dir
    assert runtime_dir in unit_values(ENGINE_UNIT, "ReadWritePaths")  # writable under ProtectSystem
    assert unit_values(ENGINE_UNIT, "Type") == ["notify"]
    daemon = json.loads(Path(UNITS, "daemon.json").read_text())
    assert daemon == {"userland-proxy-path": INSTALLED}


# -- the notify protocol, against a real engine ------------------------------------------------------

class NotifySocket:
    """A datagram socket standing in for systemd's: it learns each sender's pid (SO_PASSCRED),
    which is how systemd enforces NotifyAccess=main."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.env_value = env_value

    def receive(self, timeout: float = 20) -> tuple[dict[str, str], int]:
        """The next message's fields and the sender's pid."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = next(_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return fields, pid

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
            return True
        except BlockingIOError:
            return False


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path) -> Iterator[NotifySocket]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        ns = NotifySocket(path, path)
    else:
        name = f"pyproxy-test-{uuid.uuid4().hex}"
        ns = NotifySocket(b"\0" + name.encode(), "@" + name)
    yield ns
    ns.sock.close()


def engine_process(path: str, env: dict[str, str]) -> subprocess.Popen:
    """The engine as systemd starts it: fds 0-2 only, no status pipe."""
    return spawn(["-engine", "-engine-socket", path], {}, env={**AS_STARTED_BY_SYSTEMD, **env})


def test_ready_once_listening_then_stopping_on_sigterm(notify_socket, tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    proc = engine_process(path, {**proxy_loop_env, "NOTIFY_SOCKET": notify_socket.env_value})
    try:
        fields, sender = notify_socket.receive()
        # READY=1 means "start docker.service now": the socket must take connections already
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)
        assert fields["READY"] == "1"
        assert fields["STATUS"] == f"serving {path}"
        assert int(fields["MAINPID"]) == proc.pid == sender  # from the main process itself
        assert not notify_socket.pending()  # one message, not one per field
        proc.send_signal(signal.SIGTERM)
        fields, sender = notify_socket.receive()
        assert fields["STOPPING"] == "1" and sender == proc.pid
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert b"Traceback" not in output(proc)[1]


def test_an_engine_spawned_by_another_service_process_stays_silent(notify_socket, tmp_path):
    """As an engine started by a pyproxy that dockerd spawned would be: docker.service's
    NOTIFY_SOCKET and SYSTEMD_EXEC_PID (dockerd's pid) inherited."""
    # served_through_engine serves a mapping (READY=1 would precede the accept loop) and stops it
    served_through_engine(tmp_path, {"NOTIFY_SOCKET": notify_socket.env_value,
                                     "SYSTEMD_EXEC_PID": str(os.getpid())})
    assert not notify_socket.pending()  # neither READY=1 nor STOPPING=1 went to dockerd's


def test_an_engine_that_cannot_start_never_says_ready(notify_socket, tmp_path):
    path = str(tmp_path / "engine.sock")
    first = Proxy(["-engine", "-engine-socket", path])
    second = engine_process(path, {"NOTIFY_SOCKET": notify_socket.env_value})
    try:
        assert second.wait(timeout=20) == 1  # another engine serves that socket
        assert not notify_socket.pending()  # systemd sees the exit, not a READY=1 before it
    finally:
        second.kill()
        second.wait()
        first.stop()


@pytest.mark.parametrize("target", ["absent", "refused", "relative", "abstract-nobody", "too-long"])
def test_a_notify_socket_naming_nothing_does_not_break_start(target, tmp_path, proxy_loop_env):
    value = {
        "absent": str(tmp_path / "absent"),                       # ENOENT
        "relative": "notify.sock",                                # not a form sd_notify speaks
        "abstract-nobody": f"@pyproxy-nobody-{uuid.uuid4().hex}",  # ECONNREFUSED
        "too-long": "/" + "x" * 200,                              # longer than sun_path
    }.get(target)
    if target == "refused":  # a socket file whose owner is gone: ECONNREFUSED
        value = str(tmp_path / "refused")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(value)
    assert value is not None
    served_through_engine(tmp_path, {**proxy_loop_env, "NOTIFY_SOCKET": value})


def test_without_notify_socket_the_engine_is_as_before(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    served_through_engine(tmp_path, {})


def served_through_engine(tmp_path, env: dict[str, str]) -> None:
    """An engine started with `env` reports 0 on fd 3, serves a spawned mapping, stops with 0."""
    path = str(tmp_path / "engine.sock")
    engine = Proxy(["-engine", "-engine-socket", path], env={**AS_STARTED_BY_SYSTEMD, **env})
    backend = EchoBackend()
    port = free_port()
    spawned = Proxy(docker_args(port, backend.port), env={"PYPROXY_ENGINE_SOCKET": path})
    try:
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        spawned.stop(signal.SIGINT)
        backend.close()
    _, err = engine.stop(signal.SIGTERM)
    assert engine.proc.returncode == 0
    assert b"Traceback" not in err


# -- the module on its own ----------------------------------------------------------------------------

@pytest.fixture
def fresh_notify(monkeypatch) -> Iterator[None]:
    """NOTIFY_SOCKET is read once per process: forget what this process read, before and after."""
    monkeypatch.delenv("SYSTEMD_EXEC_PID", raising=False)
    sdnotify.notify_address.cache_clear()
    yield
    sdnotify.notify_address.cache_clear()


def test_the_variable_is_gone_after_use_so_children_cannot_speak_for_us(fresh_notify, monkeypatch, tmp_path):
    ns = NotifySocket(str(tmp_path / "notify"), str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    assert sdnotify.ready("serving here")
    assert "NOTIFY_SOCKET" not in os.environ
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('NOTIFY_SOCKET'))"],
                           check=False, capture_output=True, text=True, timeout=30)
    assert child.stdout.strip() == "None"
    assert sdnotify.stopping()  # the address was kept for the engine's own later messages
    assert ns.receive()[0]["READY"] == "1"
    assert ns.receive()[0]["STOPPING"] == "1"
    ns.sock.close()


def test_a_notify_socket_inherited_from_another_service_process_is_not_ours(
        fresh_notify, monkeypatch, tmp_path):
    """dockerd's NOTIFY_SOCKET reaches the pyproxies it spawns: they must not speak for it."""
    ns = NotifySocket(str(tmp_path / "notify"), str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getppid()))  # systemd started our parent
    assert sdnotify.ready("serving") is False
    assert "NOTIFY_SOCKET" not in os.environ and not ns.pending()
    sdnotify.notify_address.cache_clear()
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid()))  # systemd started us
    assert sdnotify.ready("serving") is True
    ns.sock.close()


def test_no_notify_socket_is_a_no_op(fresh_notify, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("serving") is False
    assert sdnotify.stopping() is False


@pytest.mark.parametrize("value", ["", "relative", "vsock:2:1234", "/" + "x" * 200, "/nonexistent/notify"])
def test_a_bad_notify_socket_never_raises(fresh_notify, monkeypatch, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False
    assert "NOTIFY_SOCKET" not in os.environ
