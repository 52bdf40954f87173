"""Floods a published port meets: many UDP source ports against a small fd limit, and UDP
mappings flooded next to a TCP mapping of the same process. Real subprocesses (the fd limit is
the child's, set as `ulimit -n` would), real sockets, sized to run in a few seconds."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from proxy.ground.budget import FlowBudget, ephemeral_port_range, flow_limit
from tests.helpers import EchoBackend, Proxy, exchange, fd_limit, free_port, scrape, value

pytestmark = pytest.mark.timeout(120)

LINUX_RANGE = (32768, 60999)  # 28,232 ephemeral ports


def test_flow_budget_arithmetic() -> None:
    # `ulimit -n 64`: a quarter kept back, half the rest for flows
    assert flow_limit(64, LINUX_RANGE) == 24
    # the engine's 20,000: 9,968 flows, the other ~10,000 fds for TCP and the engine
    assert flow_limit(20000, LINUX_RANGE) == 9968
    # a million fds: half the ephemeral range, the rest left to the host
    assert flow_limit(1 << 20, LINUX_RANGE) == 14116
    assert flow_limit(1 << 20, (60000, 60999)) == 500
    assert flow_limit(3, LINUX_RANGE) == 1  # never zero: one flow can always be tried
    # an engine's two workers split the ports' share (each has its own fds)
    assert flow_limit(1 << 20, LINUX_RANGE, sharers=2) == 7058
    assert flow_limit(20000, LINUX_RANGE, sharers=2) == 7058
    assert flow_limit(64, LINUX_RANGE, sharers=2) == 24


def test_ephemeral_port_range_read_or_defaulted(tmp_path) -> None:
    ranges = tmp_path / "range"
    ranges.write_text("1024\t65535\n")
    assert ephemeral_port_range(str(ranges)) == (1024, 65535)
    ranges.write_text("junk")
    assert ephemeral_port_range(str(ranges)) == LINUX_RANGE
    assert ephemeral_port_range(str(tmp_path / "absent")) == LINUX_RANGE


def test_spent_budget_takes_from_the_mapping_with_most_flows() -> None:
    class Owner:
        def __init__(self, flows: int) -> None:
            self.flows = flows

        def flow_count(self) -> int:
            return self.flows

        def evict_idlest(self) -> bool:
            self.flows -= 1
            return True

    quiet, flooded = Owner(3), Owner(10)
    budget = FlowBudget(limit=13, used=13)
    budget.join(quiet)
    budget.join(flooded)
    assert budget.exhausted()
    assert budget.evict_one() and (quiet.flows, flooded.flows) == (3, 9)
    budget.leave(flooded)
    assert budget.evict_one() and quiet.flows == 2
    budget.leave(quiet)
    assert not budget.evict_one()


# -- floods against a real process ------------------------------------------------------------


UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(b"re:" + data, addr)
"""


class UdpEcho:
    """A UDP backend answering b"re:" + payload, in its own process: a thread of the test would
    wait for the flooding thread's GIL and answer milliseconds late, which no container does."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", UDP_ECHO], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def udp_flood(ports: list[int], sources: int) -> Iterator[None]:
    """`sources` client ports on 127.0.0.1 per target port, each sending a datagram a round."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sources * len(ports))]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            for i, s in enumerate(socks):
                try:
                    s.sendto(b"flood", ("127.0.0.1", ports[i % len(ports)]))
                except OSError:
                    pass
            time.sleep(0.02)  # sized to churn the flow table, not to saturate a shared CPU

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the flood is on before anyone else asks
        yield
    finally:
        stop.set()
        thread.join()
        for s in socks:
            s.close()


def answers(port: int, questions: int = 20, tries: int = 20) -> int:
    """How many of `questions` a regular client gets answered, retrying each as DNS would;
    it gives up at the first question that gets no answer at all."""
    got = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind(("127.0.0.1", 0))
        c.settimeout(0.2)
        for q in range(questions):
            question = b"q%d" % q
            for _ in range(tries):
                c.sendto(question, ("127.0.0.1", port))
                try:
                    while c.recv(100) != b"re:" + question:
                        pass  # a late answer to an earlier try
                except TimeoutError:
                    continue
                got += 1
                break
            else:
                return got
    return got


def test_udp_flood_under_ulimit_64_evicts_and_keeps_answering(tmp_path, proxy_loop_env):
    """socket() would fail with EMFILE after ~50 flows: the budget (24 here) keeps the process
    below that, the idlest flows make room for new clients, and the log says so rarely."""
    echo = UdpEcho()
    port, metrics = free_port(kind=socket.SOCK_DGRAM), free_port()
    log_file = tmp_path / "pyproxy.log"
    p = Proxy(["-proto", "udp", "-host-ip", "127.0.0.1", "-host-port", str(port),
               "-container-ip", "127.0.0.1", "-container-port", str(echo.port),
               "-metrics-addr", f"127.0.0.1:{metrics}", "-log-file", str(log_file)],
              env=proxy_loop_env, preexec=fd_limit(64))
    try:
        with udp_flood([port], sources=100):
            assert answers(port) == 20
            m = scrape(metrics)
    finally:
        echo.close()
    p.stop()
    assert value(m, "pyproxy_udp_flow_budget", state="limit") == 24
    assert value(m, "pyproxy_udp_flow_budget", state="used") <= 24
    assert value(m, "pyproxy_udp_flows_total", event="evicted") > 24
    lines = log_file.read_text().splitlines()
    assert len(lines) < 10, lines  # serving, a rate-limited warning or two, stopped
    assert any("evicting" in line for line in lines)


def test_flooded_udp_mappings_leave_a_tcp_mapping_of_the_process_its_fds(proxy_loop_env):
    """Two UDP mappings flooded in one process (the engine's case) with a TCP mapping beside
    them: the flows stay within the process's budget, so every TCP client is still served."""
    echo, tcp_echo = UdpEcho(), EchoBackend()
    u1, u2 = free_port(kind=socket.SOCK_DGRAM), free_port(kind=socket.SOCK_DGRAM)
    t = free_port()
    Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{u1}:{echo.port}/udp",
           "-p", f"127.0.0.1:{u2}:{echo.port}/udp", "-p", f"127.0.0.1:{t}:{tcp_echo.port}"],
          env=proxy_loop_env, preexec=fd_limit(128))
    served = failed = 0
    try:
        with udp_flood([u1, u2], sources=80):
            for i in range(50):
                try:
                    if exchange("127.0.0.1", t, b"hello %d" % i) == b"hello %d" % i:
                        served += 1
                        continue
                except OSError:  # refused, reset, or timed out unaccepted
                    pass
                failed += 1
                if failed > 3:
                    break
            flooded_answers = answers(u2, questions=3)
    finally:
        echo.close()
        tcp_echo.close()
    assert served == 50
    assert flooded_answers == 3  # and the flooded mappings themselves still answer
