"""The engine's worker processes (`-workers N`, proxy.modes.workers): every worker accepts
on every TCP mapping, a UDP mapping stays on one worker, a killed worker comes back with its
mappings and no client is refused meanwhile, /metrics sums every worker. Real subprocesses
with dockerd's fd layout."""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from proxy.ground.budget import ephemeral_port_range, flow_limit
from tests.helpers import (
    ConnectLoop,
    EchoBackend,
    Proxy,
    alive,
    cmdline,
    docker_args,
    exchange,
    free_port,
    output,
    read_status,
    reattaching,
    refused,
    scrape,
    serves_tcp,
    serves_udp,
    spawn,
    spawn_via,
    until,
    value,
    waiting,
    workers_of,
)

pytestmark = pytest.mark.timeout(120)


def start_engine(path: str, env: dict[str, str], *extra: str) -> tuple[Proxy, int]:
    metrics = free_port()
    engine = Proxy(["-engine", "-engine-socket", path, "-metrics-addr", f"127.0.0.1:{metrics}",
                    "-workers", "2", *extra], env=env)
    return engine, metrics


class RecordingUdpEcho:
    """A UDP echo that records every source address it saw."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sources: list[tuple[str, int]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            self.sources.append(addr)
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()


CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(("workers", "cpus", "expected"), [
    ([], CPUS, len(CPUS)),  # the default: one per CPU it may run on
    (["-workers", "auto"], CPUS, len(CPUS)),
    ([], CPUS[:1], 0),  # pinned to one CPU (taskset, a cpuset): its own process serves
    (["-workers", "1"], CPUS, 0),  # one: the engine's own process, no worker
])
def test_default_workers_are_the_cpus_the_engine_may_run_on(tmp_path, proxy_loop_env, workers,
                                                             cpus, expected):
    path = str(tmp_path / "engine.sock")
    engine = Proxy(["-engine", "-engine-socket", path, *workers], env=proxy_loop_env,
                   preexec=lambda: os.sched_setaffinity(0, cpus))
    backend = EchoBackend()
    port = free_port()
    try:
        expected = 0 if expected == 1 else expected  # auto on a one-CPU machine: no worker
        assert len(workers_of(engine.proc.pid)) == expected
        waiter = spawn_via(path, docker_args(port, backend.port))
        assert exchange("127.0.0.1", port) == b"ping"
        waiter.stop(signal.SIGINT)
        assert waiter.proc.returncode == 0 and refused(port)
    finally:
        engine.stop(signal.SIGINT)
        backend.close()
    assert engine.proc.returncode == 0


def test_help_shows_the_workers_default_and_what_it_is_here():
    proc = spawn(["-h"], {})
    assert proc.wait(timeout=20) == 0
    text = " ".join(output(proc)[0].decode().split())  # argparse wraps the help text
    assert "-workers N|auto" in text
    assert f"auto: one per CPU the engine may run on ({len(CPUS)} here)" in text
    assert "1: the engine's own process (default: auto)" in text


@pytest.mark.parametrize("value_", ["0", "-1", "x", "1.5", "", "AUTO"])
def test_workers_junk_is_a_usage_error(value_, tmp_path):
    proc = spawn(["-engine", "-engine-socket", str(tmp_path / "e.sock"), "-workers", value_], {})
    assert proc.wait(timeout=20) == 2
    err = output(proc)[1]
    assert b"-workers" in err and b"Traceback" not in err


@pytest.mark.parametrize("value_", ["2", "auto"])
def test_workers_without_engine_is_a_usage_error(value_):
    proc = spawn(["-workers", value_, *docker_args(free_port(), 9)], {})
    assert proc.wait(timeout=20) == 2
    err = output(proc)[1]
    assert b"argument -workers: only with -engine" in err and b"Traceback" not in err


def test_workers_of_a_registration_are_refused_with_a_reason(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine, _ = start_engine(path, proxy_loop_env)
    waiter = spawn_via(path, ["-workers", "2", *docker_args(free_port(), 9)], wait_ready=False)
    assert waiter.status.startswith(b"1\n") and b"-workers" in waiter.status
    engine.stop(signal.SIGINT)
    assert engine.proc.returncode == 0


def test_every_worker_accepts_every_connection_is_served_and_metrics_sum(tmp_path,
                                                                         proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine, metrics = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    ports = [free_port() for _ in range(3)]
    try:
        pids = workers_of(engine.proc.pid)
        assert len(pids) == 2
        waiters = [spawn_via(path, docker_args(p, backend.port)) for p in ports]
        count = 150
        payload = b"w" * 100

        def one(i: int) -> bool:
            return exchange("127.0.0.1", ports[i % len(ports)], payload) == payload

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(count)))
        assert all(results)
        time.sleep(0.2)  # the last connections' counters, as the workers close them
        samples = scrape(metrics)
        per_worker = [value(samples, "pyproxy_worker_connections_accepted_total", worker=str(i))
                      for i in range(2)]
        assert sum(per_worker) == count
        assert all(n > 0 for n in per_worker), per_worker  # both workers accept
        assert value(samples, "pyproxy_connections_accepted_total") == count
        assert value(samples, "pyproxy_bytes_total", direction="client_to_container") == \
            count * len(payload)
        assert value(samples, "pyproxy_bytes_total", direction="container_to_client") == \
            count * len(payload)
        assert value(samples, "pyproxy_worker_restarts_total") == 0
        for w, port in zip(waiters, ports, strict=True):
            w.stop(signal.SIGINT)
            assert w.proc.returncode == 0 and refused(port)
    finally:
        engine.stop(signal.SIGINT)
        backend.close()
    assert engine.proc.returncode == 0
    assert not any(os.path.exists(f"/proc/{pid}") and alive(pid) for pid in pids)


def test_a_killed_worker_comes_back_and_no_client_is_refused(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine, metrics = start_engine(path, proxy_loop_env)
    backend, udp_backend = EchoBackend(), RecordingUdpEcho()
    tcp_ports = [free_port() for _ in range(3)]
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    try:
        waiters = ([spawn_via(path, docker_args(p, backend.port)) for p in tcp_ports]
                   + [spawn_via(path, docker_args(udp_port, udp_backend.port, proto="udp"))])
        before = workers_of(engine.proc.pid)
        loops = [ConnectLoop(port) for port in tcp_ports]
        time.sleep(0.3)
        os.kill(before[0], signal.SIGKILL)
        began = time.monotonic()
        until(lambda: len(set(workers_of(engine.proc.pid)) - set(before)) == 1, within=10)
        until(lambda: value(scrape(metrics), "pyproxy_worker_restarts_total") == 1, within=10)
        back = time.monotonic() - began
        time.sleep(0.5)  # the loops run on the restarted pair
        for loop in loops:
            loop.stop()
            assert loop.refused == 0  # queued in the kernel meanwhile, never refused
            assert loop.served > 0
        assert all(serves_tcp(p) for p in tcp_ports)
        assert serves_udp(udp_port)
        assert all(w.proc.poll() is None for w in waiters)  # dockerd's children stay
        assert engine.proc.poll() is None
        assert back < 10
        for w, port in zip(waiters, [*tcp_ports, udp_port], strict=True):
            w.stop(signal.SIGINT)
            assert w.proc.returncode == 0
            if port != udp_port:
                assert refused(port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", udp_port))  # free again
    finally:
        engine.stop(signal.SIGINT)
        backend.close()
        udp_backend.close()
    assert engine.proc.returncode == 0
    assert b"died (signal 9)" in output(engine.proc)[1]


def test_a_udp_client_stays_on_one_worker(tmp_path, proxy_loop_env):
    """Two UDP mappings (one per worker, least loaded first), many datagrams from one client
    each: the backend sees one source port per mapping, so the flow never changed process."""
    path = str(tmp_path / "engine.sock")
    engine, metrics = start_engine(path, proxy_loop_env)
    backends = [RecordingUdpEcho(), RecordingUdpEcho()]
    ports = [free_port(kind=socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for port, b in zip(ports, backends, strict=True):
            spawn_via(path, docker_args(port, b.port, proto="udp"))
        for port in ports:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(5)
                for i in range(50):
                    c.sendto(b"%d" % i, ("127.0.0.1", port))
                    assert c.recvfrom(100)[0] == b"%d" % i
        for b in backends:
            assert len(b.sources) == 50 and len(set(b.sources)) == 1
        samples = scrape(metrics)
        assert value(samples, "pyproxy_udp_datagrams_total", direction="client_to_container") == 100
        assert value(samples, "pyproxy_udp_flows_total", event="created") == 2
    finally:
        engine.stop(signal.SIGINT)
        for b in backends:
            b.close()


def test_workers_split_the_engines_udp_flow_budget_and_metrics_sum_it(tmp_path, proxy_loop_env):
    """Each worker holds its own flows: together they keep to the engine's share of the host's
    ephemeral ports (half the range), and pyproxy_udp_flow_budget shows the sum."""
    path = str(tmp_path / "engine.sock")
    engine, metrics = start_engine(path, proxy_loop_env)
    backend = RecordingUdpEcho()
    port = free_port(kind=socket.SOCK_DGRAM)
    try:
        spawn_via(path, docker_args(port, backend.port, proto="udp"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:  # one flow
            c.settimeout(5)
            c.sendto(b"one", ("127.0.0.1", port))
            assert c.recvfrom(100)[0] == b"one"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the engine raised it to this
        per_worker = flow_limit(nofile, ephemeral_port_range(), sharers=2)
        samples = scrape(metrics)
        assert value(samples, "pyproxy_udp_flow_budget", state="limit") == 2 * per_worker
        assert value(samples, "pyproxy_udp_flow_budget", state="used") == 1
        low, high = ephemeral_port_range()
        assert 2 * per_worker <= (high - low + 1) // 2  # the engine's share of the ports, no more
    finally:
        engine.stop(signal.SIGINT)
        backend.close()


def test_a_stop_while_the_workers_are_told_frees_the_port_before_the_spawn_exits(
        tmp_path, proxy_loop_env):
    """dockerd stops a spawn whose registration the engine is still serving: the supervisor has
    bound the port and waits for its workers (one is held here with SIGSTOP). The spawn asks
    the engine to release the port first, so the port is free once the process is gone, not
    when the engine later notices the closed connection."""
    path = str(tmp_path / "engine.sock")
    engine, _ = start_engine(path, proxy_loop_env)
    port = free_port()
    worker = workers_of(engine.proc.pid)[0]
    read_end, write_end = os.pipe()
    os.kill(worker, signal.SIGSTOP)
    try:
        proc = spawn(docker_args(port, 9), {3: write_end}, env={"PYPROXY_ENGINE_SOCKET": path})
        os.close(write_end)
        until(lambda: not refused(port), within=10)  # bound by the supervisor, not yet served
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert proc.wait(timeout=10) == 0
    assert refused(port)  # released before the spawn exited
    assert read_status(read_end) == b""  # nothing on fd 3: dockerd counts the start as failed
    os.close(read_end)
    assert engine.proc.poll() is None
    engine.stop(signal.SIGINT)
    assert engine.proc.returncode == 0


def test_reload_with_workers_under_a_connection_loop(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine, metrics = start_engine(path, proxy_loop_env, "-drain-timeout", "5s")
    backend = EchoBackend()
    ports = [free_port() for _ in range(2)]
    new_pid = 0
    try:
        waiters = [spawn_via(path, docker_args(p, backend.port)) for p in ports]
        loops = [ConnectLoop(port) for port in ports]
        time.sleep(0.3)
        engine.proc.send_signal(signal.SIGUSR2)
        assert engine.proc.wait(timeout=30) == 0
        lines = output(engine.proc)[0].decode().splitlines()
        new_pid = int(lines[1].rpartition("pid ")[2].rstrip(")"))
        until(lambda: all(serves_tcp(p) for p in ports), within=5)
        assert len(workers_of(new_pid)) == 2
        time.sleep(0.3)
        for loop in loops:
            loop.stop()
            assert (loop.refused, loop.lost) == (0, 0)
            assert loop.served > 0
        assert all(w.proc.poll() is None for w in waiters)
        for w, port in zip(waiters, ports, strict=True):
            w.proc.send_signal(signal.SIGINT)
            assert w.proc.wait(timeout=5) == 0
            assert refused(port)
    finally:
        if new_pid:
            os.kill(new_pid, signal.SIGKILL)
        backend.close()


def test_engine_killed_then_restarted_with_workers_reattaches(tmp_path, proxy_loop_env):
    path = str(tmp_path / "engine.sock")
    engine, _ = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    port = free_port()
    try:
        waiter = spawn_via(path, docker_args(port, backend.port))
        old_workers = workers_of(engine.proc.pid)
        engine.proc.kill()
        engine.proc.wait(timeout=5)
        until(lambda: not any(alive(pid) for pid in old_workers), within=5)  # PDEATHSIG
        until(lambda: reattaching(waiter.proc.pid), within=10)
        assert not refused(port)  # the waiter holds it: clients queue
        engine, _ = start_engine(path, proxy_loop_env)
        until(lambda: serves_tcp(port), within=10)
        assert waiter.proc.poll() is None
        until(lambda: waiting(waiter.proc.pid), within=5)
        waiter.stop(signal.SIGINT)
        assert waiter.proc.returncode == 0 and refused(port)
    finally:
        engine.stop(signal.SIGINT)
        backend.close()


def test_sighup_to_the_engine_reopens_its_workers_logs_too(tmp_path, proxy_loop_env):
    """logrotate moves the file and signals the engine: the workers' lines go to the new one."""
    path, log = str(tmp_path / "engine.sock"), tmp_path / "engine.log"
    engine, _ = start_engine(path, proxy_loop_env, "-log-file", str(log), "-log-level", "debug")
    try:
        spawn_via(path, docker_args(free_port(), 9))
        until(lambda: "engine worker" in log.read_text(), within=5)
        log.rename(tmp_path / "engine.log.1")
        engine.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        spawn_via(path, docker_args(free_port(), 9))
        until(lambda: log.exists() and log.read_text().count("engine worker") == 2, within=5)
    finally:
        engine.stop(signal.SIGINT)


def _rollup(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


def _inet_inodes() -> set[str]:
    """Inodes of every TCP and UDP socket on the host (the mappings' sockets among them)."""
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as f:
            found |= {line.split()[9] for line in f.read().splitlines()[1:]}
    return found


def test_workers_are_forked_sharing_memory_and_hold_nothing_of_the_supervisors(tmp_path,
                                                                               proxy_loop_env):
    """Each worker is a fork of the supervisor (its interpreter and start-up heap shared
    copy-on-write, not a fresh ~16 MiB interpreter), titled for `ps`, and holding none of the
    supervisor's descriptors but the mapping sockets it was given: a waiter's connection held
    by a worker would hide the engine's end from the waiter (re-attach, reload)."""
    path = str(tmp_path / "engine.sock")
    engine, _ = start_engine(path, proxy_loop_env)
    backend = EchoBackend()
    port = free_port()
    try:
        waiter = spawn_via(path, docker_args(port, backend.port))
        assert exchange("127.0.0.1", port, b"x") == b"x"
        supervisor = engine.proc.pid
        pids = workers_of(supervisor)
        assert len(pids) == 2
        for slot, pid in enumerate(sorted(pids, key=lambda p: cmdline(p).split()[-1])):
            assert cmdline(pid).split() == ["pyproxy-engine-worker", str(supervisor), str(slot)]
            memory = _rollup(pid)
            # forked: most of what it has is the supervisor's pages (a new interpreter: none)
            assert memory["Shared_Dirty"] > memory["Private_Dirty"], memory
            shared = _socket_inodes(pid) & _socket_inodes(supervisor)
            assert shared and shared <= _inet_inodes(), shared  # the mapping's, no Unix socket
        waiter.stop(signal.SIGINT)
        assert waiter.proc.returncode == 0 and refused(port)
    finally:
        engine.stop(signal.SIGINT)
        backend.close()
    assert engine.proc.returncode == 0
