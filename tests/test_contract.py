"""docker-proxy's runtime contract, checked against a real pyproxy subprocess."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import (
    Proxy,
    docker_args,
    exchange,
    free_port,
    needs_ipv6,
    output,
    read_text,
    spawn,
    udp_exchange,
)
from tests.sctpvm import kernel_has_sctp

pytestmark = pytest.mark.timeout(60)


def test_status_pipe_reports_ready_in_one_write_and_relays(echo_backend, proxy_loop_env):
    port = free_port()
    p = Proxy(docker_args(port, echo_backend.port), env=proxy_loop_env)
    assert p.status == b"0\n"
    assert exchange("127.0.0.1", port) == b"ping"


def test_port_in_use_reports_failure_on_status_pipe(busy_port, echo_backend):
    port = busy_port
    p = Proxy(docker_args(port, echo_backend.port), wait_ready=False)
    assert p.status == f"1\nlisten tcp4 127.0.0.1:{port}: bind: address already in use".encode()
    assert p.proc.wait(timeout=10) == 1


@pytest.mark.parametrize("bad, message", [
    (["-proto", "icmp"], b"-proto"),
    (["-host-ip", "not-an-ip"], b"-host-ip"),
    (["-container-port", "http"], b"-container-port"),
    (["-no-such-flag"], b"-no-such-flag"),
])
def test_bad_flags_exit_2_naming_the_flag(bad, message):
    args = ["-host-port", "8080", "-container-port", "80", *bad]
    p = Proxy(args, wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    _, err = output(p.proc)
    assert message in err and b"usage:" in err
    assert p.status.startswith(b"1\n") and message in p.status  # dockerd would show it


def test_help_and_version_exit_0():
    help_run = subprocess.run([sys.executable, "-m", "proxy", "-h"], capture_output=True, timeout=20)
    assert help_run.returncode == 0 and b"-container-port" in help_run.stdout
    for flag in ("-v", "-version", "--version"):
        run = subprocess.run([sys.executable, "-m", "proxy", flag], capture_output=True, timeout=20)
        assert run.returncode == 0 and run.stdout.startswith(b"pyproxy version ")


def test_go_flag_syntax_variants(echo_backend):
    port = free_port()
    args = [f"-host-port={port}", "--container-port", str(echo_backend.port),
            "--host-ip=127.0.0.1", "-container-ip", "127.0.0.1", "-use-listen-fd=false"]
    Proxy(args)
    assert exchange("127.0.0.1", port) == b"ping"


def test_adopts_listen_fd_without_binding_again(echo_backend, proxy_loop_env):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    Proxy([*docker_args(port, echo_backend.port), "-use-listen-fd"],
          pass_fds={4: lsock.fileno()}, env=proxy_loop_env)
    lsock.close()  # only pyproxy holds it now
    assert exchange("127.0.0.1", port) == b"ping"


@needs_ipv6
def test_adopts_dual_stack_listen_fd(echo_backend):
    lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lsock.bind(("::", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    Proxy([*docker_args(port, echo_backend.port, host_ip="::"), "-use-listen-fd"],
          pass_fds={4: lsock.fileno()})
    lsock.close()
    assert exchange("127.0.0.1", port, b"v4") == b"v4"
    assert exchange("::1", port, b"v6") == b"v6"


@pytest.mark.parametrize("what", ["closed", "udp", "pipe", "not-listening"])
def test_bad_listen_fd_fails_cleanly(what, echo_backend):
    fds: dict[int, int] = {}
    keep: list = []
    if what == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep.append(s)
        fds[4] = s.fileno()
    elif what == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fds[4] = r
    elif what == "not-listening":
        s = socket.socket()
        keep.append(s)
        fds[4] = s.fileno()
    p = Proxy([*docker_args(free_port(), echo_backend.port), "-use-listen-fd"], pass_fds=fds,
              wait_ready=False)
    for kept in keep:  # after the child has its copies; ours must not leak
        kept.close() if isinstance(kept, socket.socket) else os.close(kept)
    assert p.status.startswith(b"1\nlisten fd 4"), p.status
    assert p.proc.wait(timeout=10) == 1
    _, err = output(p.proc)
    assert b"Traceback" not in err


def test_fds_3_and_4_untouched_when_not_given(echo_backend):
    """Run by hand with unrelated files on fd 3 and fd 4: pyproxy must leave both alone."""
    with tempfile.TemporaryFile() as f3:
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = free_port()
        proc = spawn(docker_args(port, echo_backend.port), {3: f3.fileno(), 4: other.fileno()})
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    assert exchange("127.0.0.1", port) == b"ping"
                    break
                except ConnectionRefusedError:
                    time.sleep(0.05)
            f3.seek(0)
            assert f3.read() == b""
            assert other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        finally:
            proc.kill()
            proc.wait()
            other.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_exits_0_within_a_second_with_connections_open(
    signum, echo_backend, proxy_loop_env
):
    port = free_port()
    p = Proxy(docker_args(port, echo_backend.port), env=proxy_loop_env)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in held:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    started = time.monotonic()
    p.proc.send_signal(signum)
    assert p.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 1.0
    _, err = output(p.proc)
    assert b"Traceback" not in err
    for s in held:  # the relayed connections were closed, not left hanging
        s.settimeout(2)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        s.close()


def test_raises_soft_nofile_limit_to_hard(echo_backend):
    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    port = free_port()
    p = Proxy(docker_args(port, echo_backend.port), preexec=low_soft_limit)
    limits = read_text(f"/proc/{p.proc.pid}/limits")
    line = next(l for l in limits.splitlines() if l.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"]


def test_accept_loop_survives_fd_exhaustion(echo_backend, proxy_loop_env):
    """docker-proxy dies here (moby#6402); pyproxy must serve again once the flood is gone."""

    def tiny_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    port = free_port()
    p = Proxy(docker_args(port, echo_backend.port), preexec=tiny_limit, env=proxy_loop_env)
    try:
        flood = []
        for _ in range(120):  # each relayed connection costs the proxy two fds
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            flood.append(s)
        time.sleep(1.0)
        assert p.proc.poll() is None
        for s in flood:
            s.close()
        time.sleep(0.5)
        deadline = time.monotonic() + 15
        while True:  # serving resumes on its own (asyncio retries accept after 1 s)
            try:
                if exchange("127.0.0.1", port, b"after") == b"after":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "proxy did not recover from fd exhaustion"
            time.sleep(0.2)
        assert p.proc.poll() is None
    finally:
        _, err = p.stop()
    assert b"Traceback" not in err
    assert err.count(b"backing off") <= 3  # said once, not once per failed accept


def test_udp_adopts_listen_fd_without_pktinfo(udp_echo_backend, proxy_loop_env):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsock.bind(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    Proxy([*docker_args(port, udp_echo_backend, proto="udp"), "-use-listen-fd"],
          pass_fds={4: lsock.fileno()}, env=proxy_loop_env)
    lsock.close()
    assert udp_exchange(("127.0.0.1", port), b"dgram") == (b"dgram", ("127.0.0.1", port))


def test_udp_status_pipe_and_stop(udp_echo_backend, proxy_loop_env):
    port = free_port(kind=socket.SOCK_DGRAM)
    p = Proxy(docker_args(port, udp_echo_backend, host_ip="0.0.0.0", proto="udp"), env=proxy_loop_env)
    assert udp_exchange(("127.0.0.2", port), b"x") == (b"x", ("127.0.0.2", port))
    started = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    assert p.proc.wait(timeout=5) == 0 and time.monotonic() - started < 1.0


@pytest.mark.skipif(kernel_has_sctp(), reason="this kernel has SCTP: the failure path can't be shown")
def test_sctp_without_kernel_support_fails_cleanly():
    p = Proxy(docker_args(free_port(), 80, proto="sctp"), wait_ready=False)
    assert p.status.startswith(b"1\nlisten sctp4 127.0.0.1:")
    assert b"no SCTP" in p.status
    assert p.proc.wait(timeout=10) == 1
