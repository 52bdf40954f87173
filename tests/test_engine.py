"""Engine mode: dockerd's one-process-per-port contract kept exactly, served by one engine."""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import time
import urllib.request

import pytest

from proxy.ground.wire import decode_reply, encode_argv, frame, unframe
from proxy.modes.engine import Engine
from tests.helpers import (
    EchoBackend,
    Proxy,
    cmdline,
    docker_args,
    exchange,
    free_port,
    make_config,
    output,
    reattaching,
    refused,
    spawn_via,
)

pytestmark = pytest.mark.timeout(120)


def test_fifty_spawns_each_ready_each_serving_and_stopped_one_by_one(engine):
    path, _ = engine
    backend = EchoBackend()
    ports = [free_port() for _ in range(50)]
    spawned = [spawn_via(path, docker_args(port, backend.port)) for port in ports]
    try:
        for p, port in zip(spawned, ports, strict=True):
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


def test_no_engine_and_none_can_start_means_serving_standalone(tmp_path):
    """(A runtime's spawn starts an engine when none answers: tests/test_autostart.py.) Here
    its directory cannot be made (a file is in the way), so the spawn serves alone."""
    backend = EchoBackend()
    port = free_port()
    (tmp_path / "file").write_text("")
    p = spawn_via(str(tmp_path / "file" / "absent.sock"), docker_args(port, backend.port))
    try:
        assert "proxy" in cmdline(p.proc.pid) and "pyproxy-wait" not in cmdline(p.proc.pid)
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        p.stop(signal.SIGINT)
        backend.close()


def test_engine_death_keeps_the_spawned_processes_and_their_ports(engine):
    """The waiters hold the listening sockets and wait for the next engine (tests/test_survive.py);
    a stop signal still frees each port."""
    path, eng = engine
    backend = EchoBackend()
    ports = [free_port() for _ in range(5)]
    spawned = [spawn_via(path, docker_args(port, backend.port)) for port in ports]
    eng.proc.kill()
    eng.proc.wait()
    deadline = time.monotonic() + 10
    while not all(reattaching(p.proc.pid) for p in spawned):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert all(p.proc.poll() is None for p in spawned)  # dockerd's children stay
    assert not any(refused(port) for port in ports)  # clients queue in the kernel
    for p, port in zip(spawned, ports, strict=True):
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=5) == 0
        assert refused(port)
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


# -- the engine as the wrong peer sees it: junk, floods, help, flags it cannot honour ---------

def raw(path: str, data: bytes, fds: tuple[int, ...] = (), timeout: float = 15) -> bytes:
    """Send `data` (with `fds` attached) as a client of the engine; all it answers, to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        c.sendmsg([data], ancillary if fds else [])
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
        return answer


def engine_fds(eng: Proxy) -> int:
    return len(os.listdir(f"/proc/{eng.proc.pid}/fd"))


def assert_alive_and_serving(path: str, eng: Proxy) -> None:
    assert eng.proc.poll() is None
    backend = EchoBackend()
    port = free_port()
    p = spawn_via(path, docker_args(port, backend.port))
    try:
        assert exchange("127.0.0.1", port) == b"ping"
    finally:
        p.stop(signal.SIGINT)
        backend.close()


@pytest.mark.parametrize("flag", ["-hv", "-vh", "-hh", "-vv", "-help=1"])
def test_chained_flags_are_a_usage_error_and_the_engine_lives(engine, flag):
    path, eng = engine
    backend = EchoBackend()
    port = free_port()
    before = spawn_via(path, docker_args(port, backend.port))  # a mapping that must survive
    try:
        p = spawn_via(path, [flag], wait_ready=False)
        assert p.proc.wait(timeout=10) == 2
        assert p.status.startswith(b"1\n") and flag.encode()[:3] in p.status
        assert exchange("127.0.0.1", port) == b"ping"
        assert_alive_and_serving(path, eng)
    finally:
        before.stop(signal.SIGINT)
        backend.close()


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["-v"], ["-version"], ["-engine"],
                                  ["-engine", "-engine-socket", "/tmp/x.sock"]])
def test_help_version_and_engine_requests_get_a_reply_not_an_exit(engine, argv):
    """The spawned side answers these itself; a raw client sending them gets a usage error."""
    path, eng = engine
    answer = raw(path, frame(encode_argv(argv)))
    code, text = decode_reply(unframe(answer) or b"")
    assert code == 2, text
    assert_alive_and_serving(path, eng)
    out, err = output(eng.proc)
    assert b"usage:" not in out + err  # nothing printed by the engine for a peer


def test_a_stop_sent_with_the_request_is_answered_once_the_port_is_released(engine):
    """A pyproxy stopped just as it registers sends "stop" at once (proxy.handover._stop_now),
    so the engine may read it with the request: the port is released, then "ok", at once, not
    once the connection ends (here it never would: the client waits for EOF)."""
    path, _ = engine
    port = free_port()
    answer = raw(path, frame(encode_argv(docker_args(port, 9))) + b"stop\n", timeout=5)
    code, text = decode_reply(unframe(answer) or b"")
    assert code == 0 and text.endswith(f"127.0.0.1:{port}"), text
    assert answer.endswith(b"ok\n")
    assert refused(port)


@pytest.mark.parametrize("junk", [
    b"junk\n", b"9" * 5000 + b"\n", b"-3\nabc", b"5_0\n" + b"x" * 50, b"\xff\xfe\n",
    b"5\nhello",  # a frame, but not NUL-terminated arguments
    b"3\na\0b",
])
def test_malformed_requests_get_a_clear_error_and_nothing_else_breaks(engine, junk):
    path, eng = engine
    answer = raw(path, junk)
    code, text = decode_reply(unframe(answer) or b"")
    assert code == 1 and text.startswith("engine: malformed request: "), text
    assert_alive_and_serving(path, eng)
    _, err = output(eng.proc)
    assert b"Task exception" not in err and b"Traceback" not in err


@pytest.mark.parametrize("args, error", [
    (["-host-port", "8080", "-container-port", "\udcff"], b"argument -container-port: invalid"),
    (["-p", "8080:80", "\udcff"], b"unrecognized arguments: \\udcff"),  # quoted unescaped
    (["-\udcff"], b"flag provided but not defined: -\\udcff"),
])
def test_a_non_utf8_argument_is_a_usage_error(engine, args, error):
    path, eng = engine
    p = spawn_via(path, args, wait_ready=False)  # "\udcff": byte 0xff, as sys.argv holds it
    assert p.proc.wait(timeout=10) == 2
    assert p.status.startswith(b"1\n" + error)
    assert_alive_and_serving(path, eng)


def test_extra_fds_are_closed_at_once(engine):
    """Fds a registration did not need are not held for the mapping's lifetime."""
    path, eng = engine
    backend = EchoBackend()
    before = engine_fds(eng)
    conns = []
    try:
        for _ in range(10):
            pipes = [os.pipe() for _ in range(2)]
            fds = tuple(fd for pair in pipes for fd in pair)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(path)
            c.sendmsg([frame(encode_argv(docker_args(free_port(), backend.port)))],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
            for fd in fds:
                os.close(fd)
            assert decode_reply(unframe(c.recv(4096)) or b"")[0] == 0
            conns.append(c)
        # each held mapping costs its connection and its listener, not the 4 fds it sent
        assert engine_fds(eng) - before <= 10 * 2 + 2
    finally:
        for c in conns:
            c.close()
        backend.close()


def test_an_idle_connection_is_closed_after_the_bound(engine):
    path, eng = engine
    before = engine_fds(eng)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(20)
        c.connect(path)
        answer = b""
        while chunk := c.recv(4096):  # EOF comes: the engine closed it
            answer += chunk
    assert decode_reply(unframe(answer) or b"") == (1, "engine: no request within 5s")
    time.sleep(0.2)
    assert engine_fds(eng) == before


def test_a_request_cut_short_is_closed_after_the_bound(engine):
    path, _ = engine
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(20)
        c.connect(path)
        c.sendall(b"100\nonly part of it")
        assert decode_reply(unframe(c.recv(4096)) or b"")[0] == 1


@pytest.mark.parametrize("flag", [["-metrics-addr", "127.0.0.1:9999"], ["-log-level", "debug"],
                                  ["-log-format", "json"], ["-log-file", "/tmp/pp.log"],
                                  ["-drain-timeout", "5s"]])
def test_per_mapping_flags_the_engine_cannot_honour_are_refused(engine, flag):
    path, _ = engine
    p = spawn_via(path, [*docker_args(free_port(), 80), *flag], wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    assert p.status.startswith(f"1\nargument {flag[0]}: not through the engine (".encode())
    assert b"PYPROXY_ENGINE_SOCKET=" in p.status  # and how to have it anyway


# -- the socket path: only ever remove a socket no engine answers on ---------------------------

def start_engine(path: str) -> Proxy:
    return Proxy(["-engine", "-engine-socket", path], wait_ready=False)


def answered(path: str) -> bool:
    """A round trip: once the engine answers, it is serving (its stop handlers are set)."""
    return decode_reply(unframe(raw(path, frame(encode_argv(["-v"])))) or b"")[0] == 2


def test_a_regular_file_at_the_socket_path_is_left_alone(tmp_path):
    path = tmp_path / "engine.sock"
    path.write_text("precious")
    p = start_engine(str(path))
    assert p.status == f"1\nengine: -engine-socket {path}: is a regular file, not a socket; " \
                       "refusing to replace it".encode()
    assert p.proc.wait(timeout=10) == 1
    assert path.read_text() == "precious"


def test_a_directory_at_the_socket_path_is_refused_without_a_traceback(tmp_path):
    p = start_engine(str(tmp_path))
    assert p.status.startswith(b"1\nengine: -engine-socket ") and b"is a directory" in p.status
    assert p.proc.wait(timeout=10) == 1
    assert b"Traceback" not in output(p.proc)[1]


def test_a_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "engine.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # bound, never listening: an engine that died
    p = start_engine(path)
    assert p.status == b"0\n" and answered(path)
    assert p.stop() and p.proc.returncode == 0


def test_a_socket_deleted_or_replaced_while_running_is_not_touched_at_stop(tmp_path):
    path = str(tmp_path / "engine.sock")
    p = start_engine(path)
    assert p.status == b"0\n" and answered(path)
    os.unlink(path)
    _, err = p.stop()
    assert p.proc.returncode == 0 and b"Traceback" not in err
    p = start_engine(path)
    assert p.status == b"0\n" and answered(path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's socket now: not ours to remove
    _, err = p.stop()
    assert p.proc.returncode == 0 and b"Traceback" not in err
    assert os.path.exists(path)
    other.close()


def test_an_empty_socket_path_is_a_usage_error(tmp_path):
    p = start_engine("")
    assert p.proc.wait(timeout=10) == 2
    assert p.status.startswith(b"1\nargument -engine-socket: empty")
    assert b"Traceback" not in output(p.proc)[1]


def test_a_socket_path_over_the_unix_limit_is_a_usage_error(tmp_path):
    path = str(tmp_path / ("x" * 200))
    p = start_engine(path)
    assert p.proc.wait(timeout=10) == 2
    assert p.status.startswith(b"1\nargument -engine-socket: ")
    assert b"at most 107" in p.status and b"None" not in p.status


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    p = start_engine(str(shared / "engine.sock"))
    assert p.proc.wait(timeout=10) == 1
    assert b"refusing a directory others can write" in p.status
    assert not (shared / "engine.sock").exists()


def test_a_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    p = start_engine(str(theirs / "engine.sock"))
    assert p.proc.wait(timeout=10) == 1
    assert b"belongs to uid 65534" in p.status


@pytest.mark.parametrize("turns", range(6))
async def test_stopping_the_accept_loop_loses_no_spawn(tmp_path, turns):
    """The engine stops taking registrations (idle exit, reload) by cancelling its accept
    loop: a spawn that had connected is registered, or still queued on the socket (an idle
    exit takes the queue once more), at whichever loop turn the cancel lands. A cancel
    between the kernel's accept and the registration used to drop it: that spawn read EOF
    and failed (test_autostart's spawns racing the idle exit)."""
    path = str(tmp_path / "engine.sock")
    engine = Engine(make_config("-engine", "-engine-socket", path))
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as spawn:
        listener.bind(path)
        listener.listen()
        listener.setblocking(False)
        accepting = asyncio.get_running_loop().create_task(engine._accept(listener))
        await asyncio.sleep(0)  # waiting for a spawn
        spawn.connect(path)
        for _ in range(turns):
            await asyncio.sleep(0)
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        registered = list(engine._tasks)
        try:
            listener.accept()[0].close()
            queued = 1
        except BlockingIOError:
            queued = 0
        for task in registered:
            task.cancel()
        await asyncio.gather(*registered, return_exceptions=True)
        assert len(registered) + queued == 1
