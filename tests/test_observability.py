"""Metrics equal the traffic the test sent (read with prometheus-client's own parser); logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import pytest

from proxy.ground.metrics import make_registry
from tests.helpers import (
    EchoBackend,
    Proxy,
    backend,
    docker_args,
    exchange,
    free_port,
    output,
    read_text,
    scrape,
    tcp_proxy,
    value,
)

pytestmark = pytest.mark.timeout(60)


async def test_collector_reads_counters_at_scrape_time() -> None:
    async with backend() as bport, tcp_proxy(bport) as server:
        registry = make_registry(server.stats)
        port = server.relays[0].port
        for payload in (b"a" * 1000, b"b" * 234):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            assert await reader.read() == payload
            writer.close()
        await asyncio.sleep(0.05)
        labels = {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": str(port)}
        get = registry.get_sample_value
        assert get("pyproxy_connections_accepted_total", labels | _backend(bport)) == 2
        assert get("pyproxy_connections_active", labels | _backend(bport)) == 0
        assert get("pyproxy_bytes_total", labels | _backend(bport) | {"direction": "client_to_container"}) == 1234
        assert get("pyproxy_bytes_total", labels | _backend(bport) | {"direction": "container_to_client"}) == 1234
        assert get("pyproxy_backend_dial_duration_seconds_count", labels | _backend(bport)) == 2


def _backend(port: int) -> dict[str, str]:
    return {"container_ip": "127.0.0.1", "container_port": str(port)}


def test_metrics_endpoint_counts_tcp_and_udp_traffic():
    tcp_backend = EchoBackend()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    udp_backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_backend.bind(("127.0.0.1", udp_port))
    metrics_port, tcp_port, udp_front = free_port(), free_port(), free_port(kind=socket.SOCK_DGRAM)
    Proxy([*docker_args(tcp_port, tcp_backend.port), "-p", f"127.0.0.1:{udp_front}:{udp_port}/udp",
           "-container-ip", "127.0.0.1", "-metrics-addr", f"127.0.0.1:{metrics_port}"])
    for _ in range(3):
        assert exchange("127.0.0.1", tcp_port, b"x" * 500) == b"x" * 500
    dead_front = []
    for _ in range(4):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.sendto(b"y" * 100, ("127.0.0.1", udp_front))
        data, addr = udp_backend.recvfrom(1000)
        udp_backend.sendto(data[:10], addr)
        c.settimeout(5)
        assert c.recv(100) == b"y" * 10
        dead_front.append(c)
    time.sleep(0.1)
    m = scrape(metrics_port)
    assert value(m, "pyproxy_connections_accepted_total", proto="tcp") == 3
    assert value(m, "pyproxy_bytes_total", proto="tcp", direction="client_to_container") == 1500
    assert value(m, "pyproxy_bytes_total", proto="tcp", direction="container_to_client") == 1500
    # UDP bytes too, per direction: 4 datagrams of 100 bytes out, 4 of 10 back
    assert value(m, "pyproxy_bytes_total", proto="udp", direction="client_to_container") == 400
    assert value(m, "pyproxy_bytes_total", proto="udp", direction="container_to_client") == 40
    assert value(m, "pyproxy_udp_flows_total", event="created") == 4
    assert value(m, "pyproxy_udp_flows_active") == 4
    assert value(m, "pyproxy_udp_datagrams_total", direction="client_to_container") == 4
    assert value(m, "pyproxy_udp_datagrams_total", direction="container_to_client") == 4
    assert value(m, "process_open_fds") > 0  # process metrics come along
    # never a client label
    assert not any("client" in dict(ls) for _, ls in m)
    for c in dead_front:
        c.close()
    udp_backend.close()
    tcp_backend.close()


def listening_ports(pid: int) -> list[int]:
    """TCP ports process `pid` listens on, from its socket inodes and /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read_text(table).splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_off_by_default():
    b = EchoBackend()
    port = free_port()
    p = Proxy(docker_args(port, b.port))
    assert listening_ports(p.proc.pid) == [port]  # the published port and nothing else
    b.close()


@pytest.mark.parametrize("addr, complaint", [
    (":9100", b"every address"), ("localhost:9100", b"not an IP"), ("127.0.0.1", b"HOST:PORT"),
    ("127.0.0.1:99999", b"HOST:PORT"),
])
def test_bad_metrics_addr_exits_2(addr, complaint):
    p = Proxy(["-host-port", "8080", "-container-port", "80", "-metrics-addr", addr], wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    _, err = output(p.proc)
    assert b"-metrics-addr" in err and complaint in err


def test_metrics_port_in_use_fails_start(busy_port):
    b = EchoBackend()
    p = Proxy([*docker_args(free_port(), b.port), "-metrics-addr", f"127.0.0.1:{busy_port}"],
              wait_ready=False)
    assert p.status.startswith(b"1\nmetrics: listen tcp 127.0.0.1:") and b"in use" in p.status
    assert p.proc.wait(timeout=10) == 1
    b.close()


def test_json_log_file_and_sighup_reopen(tmp_path):
    log = tmp_path / "pyproxy.log"
    dead_backend = free_port()
    port = free_port()
    p = Proxy([*docker_args(port, dead_backend), "-log-file", str(log), "-log-format", "json"])
    try:
        exchange("127.0.0.1", port)
    except ConnectionResetError:
        pass
    time.sleep(0.2)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("serving" in e["msg"] for e in entries)
    failure = [e for e in entries if "dial" in e["msg"]]
    assert len(failure) == 1 and failure[0]["level"] == "warning"
    assert str(dead_backend) in failure[0]["msg"]
    # logrotate moves the file, then sends SIGHUP: the next lines go to a new file at PATH
    rotated = tmp_path / "pyproxy.log.1"
    log.rename(rotated)
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    try:
        exchange("127.0.0.1", port)
    except ConnectionResetError:
        pass
    time.sleep(0.2)
    assert p.proc.poll() is None
    fresh = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(fresh) == 1 and "dial" in fresh[0]["msg"]
    assert len(rotated.read_text().splitlines()) == len(entries)


def test_unwritable_log_file_fails_start(tmp_path):
    p = Proxy([*docker_args(free_port(), 80), "-log-file", str(tmp_path / "no" / "such" / "dir.log")],
              wait_ready=False)
    assert p.status.startswith(b"1\n-log-file ") and b"no such file" in p.status
    assert p.proc.wait(timeout=10) == 1


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="a syslog daemon is listening here")
def test_syslog_without_a_syslog_daemon_warns_and_serves():
    b = EchoBackend()
    port = free_port()
    p = Proxy([*docker_args(port, b.port), "-log-file", "syslog", "-log-level", "debug"])
    assert exchange("127.0.0.1", port) == b"ping"
    _, err = p.stop()
    assert b"-log-file syslog: /dev/log does not exist" in err
    # said once at start, not as logging's traceback for every line that follows
    assert b"Logging error" not in err and b"Traceback" not in err, err
    assert err.count(b"/dev/log") == 1, err
    b.close()
