"""The log (not the access log): JSON lines carry named fields, addresses read ip:port and
[v6]:port, mappings read host -> container with the interface kept, and -log-level debug says
each connection, flow, registration and release, never a packet."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from pathlib import Path

import pytest

from proxy.ground.config import parse_ip, parse_publish
from proxy.ground.logs import JSONFormatter
from tests.helpers import EchoBackend, Proxy, docker_args, free_port, has_ipv6, spawn_via

pytestmark = pytest.mark.timeout(60)


def entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(path: Path, check, timeout: float = 5.0) -> list[dict]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in entries(path) if check(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def refused_by_proxy(host: str, port: int) -> str:
    """Connect (the proxy accepts, then its dial fails and it resets us); our ip:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as c:
        c.settimeout(5)
        c.bind((host, 0))  # our port known before connect: the reset may beat connect's return
        me = c.getsockname()
        try:
            c.connect((host, port))
            c.recv(10)
        except ConnectionResetError:
            pass
    return f"[{me[0]}]:{me[1]}" if family == socket.AF_INET6 else f"{me[0]}:{me[1]}"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_failed_dial_is_a_json_line_with_fields(tmp_path, host, proxy_loop_env):
    if host == "::1" and not has_ipv6():
        pytest.skip("no IPv6 loopback")
    log = tmp_path / "pyproxy.log"
    dead, port = free_port(), free_port(host)
    Proxy([*docker_args(port, dead, host_ip=host), "-log-file", str(log), "-log-format", "json"],
          env=proxy_loop_env)
    client = refused_by_proxy(host, port)
    frontend = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    failure, = wait_for(log, lambda e: e.get("reason"))
    assert failure["level"] == "warning"
    assert {k: failure[k] for k in ("proto", "client", "frontend", "backend", "reason")} == {
        "proto": "tcp", "client": client, "frontend": frontend, "backend": f"127.0.0.1:{dead}",
        "reason": "connection refused"}
    # and the sentence says the same, with no Python tuple in it
    assert failure["msg"] == (f"tcp {frontend}: client {client}: dial 127.0.0.1:{dead}: "
                              "connection refused")
    serving, = [e for e in entries(log) if e["msg"].startswith("serving")]
    assert serving["msg"] == f"serving tcp {frontend} -> 127.0.0.1:{dead}"  # host -> container
    assert (serving["proto"], serving["frontend"], serving["backend"]) == (
        "tcp", frontend, f"127.0.0.1:{dead}")


def test_text_lines_stay_one_readable_line(tmp_path):
    log = tmp_path / "pyproxy.log"
    dead, port = free_port(), free_port()
    p = Proxy([*docker_args(port, dead), "-log-file", str(log)])
    client = refused_by_proxy("127.0.0.1", port)
    deadline = time.monotonic() + 5
    while "dial" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    p.stop()
    text = log.read_text()
    assert f"WARNING tcp 127.0.0.1:{port}: client {client}: dial 127.0.0.1:{dead}: connection " \
           "refused\n" in text
    assert f"INFO serving tcp 127.0.0.1:{port} -> 127.0.0.1:{dead}\n" in text
    assert "('" not in text  # no tuple anywhere


def test_binding_by_interface_keeps_it_in_what_is_printed_and_logged(tmp_path):
    log = tmp_path / "pyproxy.log"
    backend = EchoBackend()
    port = free_port()
    p = Proxy(["-container-ip", "127.0.0.1", "-p", f"lo:{port}:{backend.port}",
               "-log-file", str(log), "-log-format", "json"])
    serving, = wait_for(log, lambda e: e["msg"].startswith("serving"))
    assert serving["msg"] == f"serving tcp lo%0.0.0.0:{port} -> 127.0.0.1:{backend.port}"
    assert serving["frontend"] == f"lo%0.0.0.0:{port}"
    p.stop()
    backend.close()


def test_engine_registration_and_release_are_json_lines_with_fields(tmp_path, proxy_loop_env):
    path, log = str(tmp_path / "engine.sock"), tmp_path / "engine.log"
    engine = Proxy(["-engine", "-engine-socket", path, "-log-file", str(log), "-log-format", "json",
                    "-log-level", "debug"], env=proxy_loop_env)
    backend = EchoBackend()
    port, udp_port = free_port(), free_port(kind=socket.SOCK_DGRAM)
    waiter = spawn_via(path, ["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{port}:{backend.port}",
                              "-p", f"127.0.0.1:{udp_port}:{backend.port}/udp"])
    try:
        serving = wait_for(log, lambda e: e["msg"].startswith("serving"))
        assert len(serving) == 2
        tcp_line = next(e for e in serving if e["proto"] == "tcp")
        assert tcp_line["msg"] == f"serving tcp 127.0.0.1:{port} -> 127.0.0.1:{backend.port}"
        assert tcp_line["frontend"] == f"127.0.0.1:{port}"
        assert tcp_line["backend"] == f"127.0.0.1:{backend.port}"
        assert tcp_line["peer_pid"] == waiter.proc.pid and tcp_line["peer_uid"] == 0
        registered, = [e for e in entries(log) if "registers" in e["msg"]]
        assert registered["level"] == "debug" and registered["peer_pid"] == waiter.proc.pid
        # debug: a connection accepted and closed, a UDP flow created and ended; nothing per packet
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            for _ in range(20):
                c.sendall(b"x")
                c.recv(1)
            me = c.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for _ in range(20):
                u.sendto(b"y", ("127.0.0.1", udp_port))
            udp_me = u.getsockname()
        assert wait_for(log, lambda e: e["msg"].endswith(f"client {me[0]}:{me[1]} closed"))
        assert wait_for(log, lambda e: e.get("event") == "created")
    finally:
        waiter.stop(signal.SIGTERM)
    released = wait_for(log, lambda e: e["msg"].startswith("released"))
    assert {e["msg"] for e in released} == {
        f"released tcp 127.0.0.1:{port} -> 127.0.0.1:{backend.port}",
        f"released udp 127.0.0.1:{udp_port} -> 127.0.0.1:{backend.port}"}
    engine.stop()
    backend.close()
    lines = entries(log)
    client = f"127.0.0.1:{me[1]}"
    about_client = [e["msg"] for e in lines if e.get("client") == client]
    assert about_client == [f"tcp 127.0.0.1:{port}: client {client} accepted",
                            f"tcp 127.0.0.1:{port}: client {client} closed"]
    udp_client = f"127.0.0.1:{udp_me[1]}"
    flow = [(e["msg"], e["event"]) for e in lines if e.get("client") == udp_client]
    assert flow == [(f"udp 127.0.0.1:{udp_port}: client {udp_client}: flow created", "created"),
                    (f"udp 127.0.0.1:{udp_port}: client {udp_client}: flow shutdown", "shutdown")]


def test_info_level_says_nothing_per_connection(tmp_path):
    log = tmp_path / "pyproxy.log"
    backend = EchoBackend()
    port = free_port()
    p = Proxy([*docker_args(port, backend.port), "-log-file", str(log), "-log-format", "json"])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"hi")
            c.recv(2)
    p.stop()
    backend.close()
    assert [e["msg"].split()[0] for e in entries(log)] == ["serving", "stopped;"]


def test_json_formatter_emits_the_extra_fields_and_only_them():
    from proxy.ground.logs import mapping_fields

    mapping, = parse_publish("[::1]:8080:80", parse_ip("172.17.0.2"))
    record = logging.LogRecord("pyproxy", logging.WARNING, __file__, 1, "dial %s", ("x",), None)
    for name, value in {**mapping_fields(mapping), "client": "[::1]:40000"}.items():
        setattr(record, name, value)
    entry = json.loads(JSONFormatter().format(record))
    assert set(entry) == {"time", "level", "msg", "pid", "proto", "frontend", "backend", "client"}
    assert (entry["frontend"], entry["backend"], entry["msg"]) == ("[::1]:8080", "172.17.0.2:80",
                                                                  "dial x")
