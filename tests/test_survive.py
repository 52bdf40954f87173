"""The engine dies, the ports do not: waiters hold the listening sockets, re-attach them to the
next engine on the same path, and keep their PIDs; a re-attach is trusted no more than a
registration. Real subprocesses with dockerd's fd layouts (20.10: fd 4 free; >= 28: fd 4 the
listening socket and -use-listen-fd)."""

from __future__ import annotations

import array
import os
import signal
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.ground.wire import decode_reply, encode_request, frame, unframe
from tests.helpers import (
    ConnectLoop,
    EchoBackend,
    Proxy,
    UdpEcho,
    docker_args,
    free_port,
    output,
    read_status,
    reattaching,
    refused,
    serves_tcp,
    serves_udp,
    spawn,
    spawn_via,
    until,
    waiting,
)

pytestmark = pytest.mark.timeout(120)


def start_engine(path: str, env: dict[str, str], metrics: int | None = None) -> Proxy:
    """An engine on `path`, as a service manager starts it."""
    args = ["-engine", "-engine-socket", path]
    if metrics:
        args += ["-metrics-addr", f"127.0.0.1:{metrics}"]
    return Proxy(args, env=env)


def kill9(engine: Proxy) -> None:
    engine.proc.kill()
    engine.proc.wait(timeout=5)


@pytest.mark.parametrize("use_listen_fd", [False, True], ids=["fd4-free", "fd4-socket"])
def test_engine_killed_and_restarted_every_port_serves_again(tmp_path, proxy_loop_env,
                                                             use_listen_fd, waiter_env):
    path = str(tmp_path / "engine.sock")
    engine = start_engine(path, proxy_loop_env)
    backend, udp_backend = EchoBackend(), UdpEcho()
    tcp_ports = [free_port() for _ in range(4)]
    udp_ports = [free_port(kind=socket.SOCK_DGRAM) for _ in range(2)]
    waiters: dict[tuple[str, int], Proxy] = {}
    try:
        for proto, port, backend_port in ([("tcp", p, backend.port) for p in tcp_ports]
                                          + [("udp", p, udp_backend.port) for p in udp_ports]):
            args = docker_args(port, backend_port, proto=proto)
            if use_listen_fd:  # Docker >= 28: dockerd binds, passes fd 4, keeps no copy
                kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
                lsock = socket.socket(socket.AF_INET, kind)
                lsock.bind(("127.0.0.1", port))
                if proto == "tcp":
                    lsock.listen()
                waiters[proto, port] = spawn_via(path, [*args, "-use-listen-fd"], env=waiter_env,
                                                 pass_fds={4: lsock.fileno()})
                lsock.close()
            else:
                waiters[proto, port] = spawn_via(path, args, env=waiter_env)
        assert all(serves_tcp(p) for p in tcp_ports) and all(serves_udp(p) for p in udp_ports)
        pids = {key: w.proc.pid for key, w in waiters.items()}
        programs = {pid: os.readlink(f"/proc/{pid}/exe") for pid in pids.values()}
        for pid in pids.values():  # the connection, stderr and the one held socket: no more
            fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            [held] = set(fds) - {0, 1, 2}
            assert held != 3 and fds[held].startswith("socket:") and fds[held] != fds[0]

        loop = ConnectLoop(tcp_ports[0])
        time.sleep(0.2)
        kill9(engine)
        until(lambda: all(reattaching(pid) for pid in pids.values()), within=10)
        time.sleep(0.3)  # the gap: the loop's connections wait in the kernel's accept queue
        engine = start_engine(path, proxy_loop_env)
        back = until(lambda: all(serves_tcp(p) for p in tcp_ports)
                     and all(serves_udp(p) for p in udp_ports), within=5)
        time.sleep(0.2)
        loop.stop()
        assert loop.refused == 0
        assert loop.lost <= 1  # only a connection open on the killed engine may be lost
        assert loop.served > 0
        print(f"every port serving again {back:.3f}s after the new engine was ready")

        # no process dockerd spawned exited: same PIDs, waiters again (not Python)
        for key, w in waiters.items():
            assert w.proc.poll() is None and w.proc.pid == pids[key]
        until(lambda: all(waiting(pid) for pid in pids.values()), within=5)
        # in the same waiter program as before (the choice of it came through the exec's env)
        assert {pid: os.readlink(f"/proc/{pid}/exe") for pid in pids.values()} == programs

        # SIGINT to each frees exactly its port, promptly, exit 0
        for (proto, port), w in list(waiters.items()):
            w.proc.send_signal(signal.SIGINT)
            assert w.proc.wait(timeout=5) == 0
            if proto == "tcp":
                assert refused(port)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", port))  # free again
            del waiters[proto, port]
            assert all(serves_tcp(p) for pr, p in waiters if pr == "tcp")
    finally:
        for w in waiters.values():
            w.stop(signal.SIGINT)
        engine.stop(signal.SIGKILL)
        backend.close()
        udp_backend.close()


def test_sigint_while_no_engine_is_up_exits_0_and_frees_the_port(tmp_path, proxy_loop_env,
                                                                 waiter_env):
    path = str(tmp_path / "engine.sock")
    engine = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    port = free_port()
    try:
        waiter = spawn_via(path, docker_args(port, backend.port), env=waiter_env)
        assert serves_tcp(port)
        kill9(engine)
        until(lambda: reattaching(waiter.proc.pid), within=10)
        assert not refused(port)  # held: a client would wait in the accept queue
        waiter.proc.send_signal(signal.SIGINT)
        assert waiter.proc.wait(timeout=5) == 0
        assert refused(port)
    finally:
        backend.close()


def test_a_waiter_whose_engine_is_gone_waits_without_spinning(tmp_path, proxy_loop_env):
    """While no engine is up, the re-attaching waiter sleeps between tries."""
    path = str(tmp_path / "engine.sock")
    engine = start_engine(path, proxy_loop_env)
    port = free_port()
    waiter = spawn_via(path, docker_args(port, 9))
    kill9(engine)
    until(lambda: reattaching(waiter.proc.pid), within=10)

    def cpu() -> float:
        with open(f"/proc/{waiter.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(2)
    assert cpu() - before < 0.5  # a few wake-ups a second, not a busy loop
    waiter.stop(signal.SIGINT)
    assert waiter.proc.returncode == 0


# -- a re-attach is trusted no more than a registration ---------------------------------------

def reattach_raw(path: str, argv: list[str], fds: list[int],
                 held: list[socket.socket] | None = None) -> tuple[int, str]:
    """A re-attach as a waiter sends it; the connection goes into `held` if given (the
    mapping lasts as long as it), else is closed."""
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(15)
    c.connect(path)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    c.sendmsg([frame(encode_request(argv, reattach=True))], ancillary if fds else [])
    data = b""
    while (payload := unframe(data)) is None:
        chunk = c.recv(65536)
        assert chunk, "the engine closed without a reply"
        data += chunk
    if held is None:
        c.close()
    else:
        held.append(c)
    return decode_reply(payload)


def engine_fds(pid: int) -> dict[str, str]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return fds


def test_hostile_reattach_is_refused_and_nothing_leaks(engine):
    path, proc = engine
    pid = proc.proc.pid
    # udp_port is checked free for TCP too (free_port's default): "TCP for a UDP mapping"
    # binds a TCP socket there, and a port free for UDP alone may hold a TCP listener or
    # TIME_WAIT (on a machine shared with other runs: EADDRINUSE, the test's own failure).
    port, udp_port = free_port(), free_port()

    def tcp(host: str = "127.0.0.1", at: int = port, listen: bool = True) -> socket.socket:
        s = socket.socket()
        s.bind((host, at))
        if listen:
            s.listen()
        return s

    def udp(at: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", at))
        return s

    tcp_args, udp_args = docker_args(port, 9), docker_args(udp_port, 9, proto="udp")
    reattach_raw(path, ["-v"], [])  # a first round trip: the engine's lazy fds are open
    baseline = engine_fds(pid)
    cases = [
        ("another port", tcp_args, lambda: [tcp(at=free_port())]),
        ("bound elsewhere", tcp_args, lambda: [tcp("127.0.0.2")]),
        ("not listening", tcp_args, lambda: [tcp(listen=False)]),
        ("TCP for a UDP mapping", udp_args, lambda: [tcp(at=udp_port)]),
        ("UDP for a TCP mapping", tcp_args, lambda: [udp(port)]),
        ("extra fds", tcp_args, lambda: [tcp(), udp(free_port(kind=socket.SOCK_DGRAM))]),
        ("no socket", tcp_args, lambda: []),
        ("not a socket", tcp_args, lambda: [open("/dev/null")]),
    ]
    for what, args, make in cases:
        objects = make()
        status, body = reattach_raw(path, args, [o.fileno() for o in objects])
        assert status == 1, (what, body)
        assert "re-attach" in body, (what, body)
        for o in objects:
            o.close()
        try:
            # every fd it was sent closed (the -v connection may close meanwhile)
            until(lambda: engine_fds(pid).items() <= baseline.items(), within=5)
        except AssertionError:
            raise AssertionError(f"{what}: {baseline} -> {engine_fds(pid)}") from None
        assert refused(port), what  # and it serves nothing

    # the real thing is served: the socket held for the mapping, adopted as it is
    backend = EchoBackend()
    try:
        held = tcp()
        queued = socket.create_connection(("127.0.0.1", port), timeout=5)  # in the queue
        conns: list[socket.socket] = []
        status, body = reattach_raw(path, docker_args(port, backend.port), [held.fileno()],
                                    conns)
        assert (status, body) == (0, f"{backend.port}/tcp -> 127.0.0.1:{port}")
        queued.sendall(b"queued")
        queued.shutdown(socket.SHUT_WR)
        assert queued.recv(100) == b"queued"
        queued.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics") as r:
            text = r.read().decode()
        assert "pyproxy_engine_reattached_mappings_total 1.0" in text
        held.close()
        conns[0].close()  # as a waiter that dies: the engine releases the mapping
        until(lambda: refused(port), within=5)
    finally:
        backend.close()


# -- upgrade: SIGUSR2 starts the installed pyproxy and hands every mapping over ----------------

def test_reload_under_a_connection_loop_refuses_and_resets_nothing(tmp_path, proxy_loop_env):
    path, metrics = str(tmp_path / "engine.sock"), free_port()
    engine = Proxy(["-engine", "-engine-socket", path, "-metrics-addr", f"127.0.0.1:{metrics}",
                    "-drain-timeout", "5s"], env=proxy_loop_env)
    backend, udp_backend = EchoBackend(), UdpEcho()
    tcp_ports = [free_port() for _ in range(4)]
    udp_ports = [free_port(kind=socket.SOCK_DGRAM) for _ in range(2)]
    waiters = ([spawn_via(path, docker_args(p, backend.port)) for p in tcp_ports]
               + [spawn_via(path, docker_args(p, udp_backend.port, proto="udp"))
                  for p in udp_ports])
    new_pid = 0
    try:
        loops = [ConnectLoop(port) for port in tcp_ports[:2]]
        time.sleep(0.3)
        engine.proc.send_signal(signal.SIGUSR2)
        assert engine.proc.wait(timeout=30) == 0  # once its own connections finished
        lines = output(engine.proc)[0].decode().splitlines()
        assert len(lines) == 2 and all(line.startswith(f"pyproxy engine serving {path}")
                                       for line in lines)
        new_pid = int(lines[1].rpartition("pid ")[2].rstrip(")"))
        assert new_pid != engine.proc.pid
        until(lambda: all(serves_tcp(p) for p in tcp_ports)
              and all(serves_udp(p) for p in udp_ports), within=5)
        time.sleep(0.3)  # the loops run on the new engine alone
        for loop in loops:
            loop.stop()
            assert (loop.refused, loop.lost) == (0, 0)
            assert loop.served > 0
        assert all(w.proc.poll() is None for w in waiters)  # dockerd's children stay
        # the new process serves: the old one is gone, and the new one counts the mappings
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f"pyproxy_engine_reattached_mappings_total {len(waiters)}.0" in text
        for w, port in zip(waiters, tcp_ports + udp_ports, strict=True):
            w.proc.send_signal(signal.SIGINT)
            assert w.proc.wait(timeout=5) == 0
            if port in tcp_ports:
                assert refused(port)
    finally:
        if new_pid:
            os.kill(new_pid, signal.SIGKILL)  # not our child: the old engine started it
        backend.close()
        udp_backend.close()


def test_a_reload_whose_new_engine_fails_keeps_the_old_one_serving(tmp_path, proxy_loop_env):
    """The new engine cannot open the -log-file (its directory was renamed away): the old one
    logs why, listens again, and serves on, old mappings and new registrations alike."""
    path, logs = str(tmp_path / "engine.sock"), tmp_path / "logs"
    logs.mkdir()
    engine = Proxy(["-engine", "-engine-socket", path, "-log-file", str(logs / "engine.log")],
                   env=proxy_loop_env)
    backend = EchoBackend()
    port, later = free_port(), free_port()
    watch = PathWatch(path)
    try:
        waiter = spawn_via(path, docker_args(port, backend.port))
        logs.rename(tmp_path / "moved")
        engine.proc.send_signal(signal.SIGUSR2)

        def logged() -> str:
            return (tmp_path / "moved" / "engine.log").read_text()

        until(lambda: "did not start" in logged() and logged().count("engine serving") == 1
              and os.path.exists(path), within=20)
        assert engine.proc.poll() is None
        watch.stop()
        assert watch.missing == 0  # it never stopped listening on the path
        assert serves_tcp(port)
        spawn_via(path, docker_args(later, backend.port))  # registrations come again
        assert serves_tcp(later)
        waiter.stop(signal.SIGINT)
        assert waiter.proc.returncode == 0 and refused(port)
    finally:
        watch.stop()
        engine.stop(signal.SIGTERM)
        backend.close()
    assert engine.proc.returncode == 0


# -- a reload hands the engine's listening socket over: the path never disappears -------------

class PathWatch:
    """Polls that `path` exists, from now until stop(); counts the polls that found it gone."""

    def __init__(self, path: str) -> None:
        self.path, self.done = path, threading.Event()
        self.polls = self.missing = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.polls += 1
            if not os.path.lexists(self.path):
                self.missing += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=10)


def engines_on(path: str) -> list[int]:
    """Every live `pyproxy -engine` process serving `path` (not its workers, not waiters)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline") as f:
                args = f.read().split("\0")
        except OSError:
            continue
        if "-engine" in args and path in args:
            found.append(int(name))
    return found


def test_spawns_across_a_reload_all_start_and_the_path_never_disappears(tmp_path,
                                                                        proxy_loop_env):
    """30 spawns, 4 in flight at any moment, each a pyproxy with fd 3 as dockerd starts it,
    while the engine reloads: every one says "0" and serves, one engine is left, and the
    socket path was there throughout (none could find no engine and start a rival)."""
    path = str(tmp_path / "engine.sock")
    engine = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    ports = [free_port() for _ in range(30)]
    env = {**proxy_loop_env, "PYPROXY_ENGINE_SOCKET": path}
    started = threading.Semaphore(0)

    def one(port: int) -> Proxy:
        try:
            return Proxy(docker_args(port, backend.port), env=env, wait_ready=False)
        finally:
            started.release()

    watch = PathWatch(path)
    new_pid = 0
    try:
        with ThreadPoolExecutor(4) as pool:
            spawned = [pool.submit(one, port) for port in ports]
            for _ in range(6):
                started.acquire(timeout=30)
            engine.proc.send_signal(signal.SIGUSR2)  # 24 spawns still to come, 4 in flight
            proxies = [future.result(timeout=60) for future in spawned]
        assert engine.proc.wait(timeout=30) == 0
        watch.stop()
        assert [p.status for p in proxies] == [b"0\n"] * len(ports), \
            [(p.status, output(p.proc)[1][-300:]) for p in proxies if p.status != b"0\n"]
        assert watch.polls > 100 and watch.missing == 0
        lines = output(engine.proc)[0].decode().splitlines()
        new_pid = int(lines[-1].rpartition("pid ")[2].rstrip(")"))
        assert engines_on(path) == [new_pid]  # no spawn started an engine of its own
        until(lambda: all(serves_tcp(port) for port in ports), within=20)
        assert all(p.proc.poll() is None for p in proxies)  # dockerd's children stay
        # The new engine adopted the socket file, so it is the one that removes it at its stop.
        os.kill(new_pid, signal.SIGTERM)
        until(lambda: not engines_on(path), within=10)
        assert not os.path.lexists(path)
        new_pid = 0
    finally:
        watch.stop()
        if new_pid:
            os.kill(new_pid, signal.SIGKILL)  # not our child: the old engine started it
        backend.close()


def test_a_new_engine_that_fails_after_adopting_leaves_the_socket_in_place(tmp_path,
                                                                          proxy_loop_env):
    """Its /metrics port is taken: it says "1" and exits, and the socket file, which the old
    engine still serves on, stays (only an engine that said "0" owns an adopted socket)."""
    path, metrics = str(tmp_path / "engine.sock"), free_port()
    listener = _unix_listener(path)
    taker = socket.create_server(("127.0.0.1", metrics))
    status_r, status_w = os.pipe()
    proc = spawn(["-engine", "-engine-socket", path, "-metrics-addr", f"127.0.0.1:{metrics}"],
                 {3: status_w, 4: listener.fileno()},
                 env={**proxy_loop_env, "PYPROXY_ENGINE_LISTEN_FD": "4"})
    os.close(status_w)
    try:
        status = read_status(status_r)
        assert proc.wait(timeout=20) == 1
        assert status.startswith(b"1\n") and b"metrics" in status, status
        assert os.path.lexists(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as spawn_like:
            spawn_like.connect(path)  # still listening: queued for whoever serves next
    finally:
        os.close(status_r)
        taker.close()
        listener.close()


def _unix_listener(path: str, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    if listen:
        sock.listen()
    return sock


@pytest.mark.parametrize("kind", ["tcp", "other-path", "not-listening", "datagram", "pipe",
                                  "closed", "garbage"])
def test_the_new_engine_refuses_a_listener_that_is_not_its_socket(tmp_path, kind):
    path = str(tmp_path / "engine.sock")
    handed: socket.socket | None = None
    fd_text, fds = "4", {}
    if kind == "tcp":
        handed = socket.create_server(("127.0.0.1", 0))
    elif kind == "other-path":
        handed = _unix_listener(str(tmp_path / "other.sock"))
    elif kind == "not-listening":
        handed = _unix_listener(path, listen=False)
    elif kind == "datagram":
        handed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        handed.bind(path)
    elif kind == "garbage":
        fd_text = "four"
    read_end, write_end = os.pipe()
    if handed is not None:
        fds = {4: handed.fileno()}
    elif kind == "pipe":
        fds = {4: read_end}
    status_r, status_w = os.pipe()
    proc = spawn(["-engine", "-engine-socket", path], {3: status_w, **fds},
                 env={"PYPROXY_ENGINE_LISTEN_FD": fd_text})
    os.close(status_w)
    try:
        status = read_status(status_r)
        assert proc.wait(timeout=20) == 1
    finally:
        os.close(status_r)
        os.close(read_end)
        os.close(write_end)
        if handed is not None:
            handed.close()
    assert status.startswith(b"1\nengine: PYPROXY_ENGINE_LISTEN_FD=" + fd_text.encode()), status
    assert b"Traceback" not in output(proc)[1]
    assert not engines_on(path)
    if kind in ("not-listening", "datagram"):
        assert os.path.lexists(path)  # never removed: not a socket it made
    else:
        assert not os.path.lexists(path)  # nor made one of its own


def test_the_new_engine_adopts_its_socket_and_removes_it_at_its_stop(tmp_path,
                                                                    proxy_loop_env):
    """As a reload's new engine: a spawn queued on the socket before it started is served."""
    path = str(tmp_path / "engine.sock")
    listener = _unix_listener(path)
    backend, port = EchoBackend(), free_port()
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)  # in the backlog, as a spawn during the switch
    try:
        engine = Proxy(["-engine", "-engine-socket", path], pass_fds={4: listener.fileno()},
                       env={**proxy_loop_env, "PYPROXY_ENGINE_LISTEN_FD": "4"})
        listener.close()
        queued.sendall(frame(encode_request(docker_args(port, backend.port), False)))
        reply = b""
        while (payload := unframe(reply)) is None:
            chunk = queued.recv(65536)
            assert chunk, reply
            reply += chunk
        assert decode_reply(payload)[0] == 0
        assert serves_tcp(port)
        queued.close()
        engine.stop(signal.SIGTERM)
        assert engine.proc.returncode == 0
        assert not os.path.lexists(path)
    finally:
        queued.close()
        backend.close()


@pytest.mark.parametrize("flag", ["-engine-reattach=99", "-engine-reattach=x", "-engine-reattach=0"])
def test_reattach_flag_with_no_held_sockets_is_a_usage_error(flag, tmp_path):
    proc = spawn([flag, *docker_args(free_port(), 9)], {},
                 env={"PYPROXY_ENGINE_SOCKET": str(tmp_path / "engine.sock")})
    assert proc.wait(timeout=20) == 2
    err = output(proc)[1]
    assert f"pyproxy: {flag}: not a list of held socket fds".encode() in err
    assert b"Traceback" not in err
