"""`pyproxy -list`: what a running engine (or a standalone pyproxy's /metrics) serves, as a
table and as JSON, with live counts; refused to another user; and its pure parts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ground.config import parse_ip, parse_publish
from proxy.ground.listing import Row, format_table, rows_from_exposition, rows_from_stats
from proxy.ground.metrics import make_registry
from proxy.ground.stats import MappingStats
from proxy.ground.wire import (
    LIST_REQUEST,
    WireError,
    decode_list_reply,
    encode_list_reply,
    frame,
)
from tests.helpers import REPO, EchoBackend, Proxy, free_port, spawn_via

pytestmark = pytest.mark.timeout(60)


def pyproxy(*args: str, env: dict[str, str] | None = None,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "proxy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYPROXY_ENGINE_SOCKET": "", **(env or {})})


@pytest.fixture
def udp_backend() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _traffic(tcp_port: int, udp_port: int, udp_backend: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A TCP client left connected (10 bytes echoed) and a UDP flow (7 bytes out, 3 back)."""
    tcp = socket.create_connection(("127.0.0.1", tcp_port), timeout=5)
    tcp.sendall(b"0123456789")
    got = b""
    while len(got) < 10:
        got += tcp.recv(100)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.sendto(b"request", ("127.0.0.1", udp_port))
    data, addr = udp_backend.recvfrom(100)
    udp_backend.sendto(data[:3], addr)
    assert udp.recv(100) == b"req"
    return tcp, udp


def test_list_a_live_engine_as_table_and_json(engine, udp_backend):
    path, _ = engine
    backend = EchoBackend()
    tcp_port, iface_port = free_port(), free_port()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    waiter = spawn_via(path, ["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{tcp_port}:{backend.port}",
                              "-p", f"lo:{iface_port}:{backend.port}",
                              "-p", f"127.0.0.1:{udp_port}:{udp_backend.getsockname()[1]}/udp"])
    tcp, udp = _traffic(tcp_port, udp_port, udp_backend)
    try:
        env = {"PYPROXY_ENGINE_SOCKET": path}
        listed = pyproxy("-list", "-json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = {row["frontend"]: row for row in json.loads(listed.stdout)}
        assert rows[f"127.0.0.1:{tcp_port}"] == {
            "proto": "tcp", "frontend": f"127.0.0.1:{tcp_port}", "backend": f"127.0.0.1:{backend.port}",
            "docker_port": f"{backend.port}/tcp -> 127.0.0.1:{tcp_port}",
            "open": 1, "total": 1, "bytes_client_to_container": 10, "bytes_container_to_client": 10}
        udp_row = rows[f"127.0.0.1:{udp_port}"]
        assert (udp_row["proto"], udp_row["open"], udp_row["total"]) == ("udp", 1, 1)
        assert (udp_row["bytes_client_to_container"], udp_row["bytes_container_to_client"]) == (7, 3)
        assert rows[f"lo%0.0.0.0:{iface_port}"]["open"] == 0  # the interface is kept
        # the table, for people: a header, then a row per mapping, host port -> backend
        table = pyproxy("-list", "-engine-socket", path)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["MAPPING", "BACKEND", "OPEN", "TOTAL", "FROM", "CLIENT",
                                    "FROM", "CONTAINER"]
        assert len(lines) == 4
        tcp_line = next(line for line in lines if f"127.0.0.1:{tcp_port} " in line)
        assert tcp_line.split() == [f"{backend.port}/tcp", "->", f"127.0.0.1:{tcp_port}",
                                    f"127.0.0.1:{backend.port}", "1", "1", "10", "10"]
        assert any(f"{backend.port}/tcp -> lo%0.0.0.0:{iface_port}" in line for line in lines)
    finally:
        tcp.close()
        udp.close()
        waiter.stop(signal.SIGINT)
        backend.close()
    # once released, the engine lists nothing of it
    listed = pyproxy("-list", "-json", env={"PYPROXY_ENGINE_SOCKET": path})
    assert json.loads(listed.stdout) == []


@pytest.fixture
def root_only_engine(proxy_loop_env) -> Iterator[str]:
    """An engine whose socket another user could reach: its directory is 0755 (unlike tmp_path,
    0700), in /run, as /run/pyproxy is."""
    directory = tempfile.mkdtemp(prefix="pyproxy-list-", dir="/run")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "engine.sock")
    p = Proxy(["-engine", "-engine-socket", path], env=proxy_loop_env)
    yield path
    p.stop(signal.SIGKILL)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to act as another user")
def test_another_user_is_refused(root_only_engine):
    path = root_only_engine
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    # the socket is 0600: the kernel refuses the connection
    refused = pyproxy("-list", "-engine-socket", path, prefix=nobody)
    assert refused.returncode == 1
    assert refused.stderr == f"pyproxy -list: engine socket {path}: permission denied\n"
    # a socket opened to everyone by mistake: the engine's own check (SO_PEERCRED) refuses
    os.chmod(path, 0o666)
    refused = pyproxy("-list", "-engine-socket", path, prefix=nobody)
    assert refused.returncode == 1
    assert refused.stderr == "pyproxy -list: engine: permission denied\n"
    assert "Traceback" not in refused.stderr
    assert pyproxy("-list", "-engine-socket", path).returncode == 0  # root still may


def test_list_a_standalone_pyproxy_through_its_metrics(proxy_loop_env, udp_backend):
    backend = EchoBackend()
    tcp_port, metrics = free_port(), free_port()
    udp_port = free_port(kind=socket.SOCK_DGRAM)
    Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{tcp_port}:{backend.port}",
           "-p", f"127.0.0.1:{udp_port}:{udp_backend.getsockname()[1]}/udp",
           "-metrics-addr", f"127.0.0.1:{metrics}"], env=proxy_loop_env)
    tcp, udp = _traffic(tcp_port, udp_port, udp_backend)
    try:
        listed = pyproxy("-list", "-json", "-metrics-addr", f"127.0.0.1:{metrics}")
        assert listed.returncode == 0, listed.stderr
        rows = {row["proto"]: row for row in json.loads(listed.stdout)}
        assert rows["tcp"]["docker_port"] == f"{backend.port}/tcp -> 127.0.0.1:{tcp_port}"
        assert (rows["tcp"]["open"], rows["tcp"]["total"]) == (1, 1)
        assert rows["tcp"]["bytes_client_to_container"] == 10
        assert (rows["udp"]["open"], rows["udp"]["bytes_client_to_container"],
                rows["udp"]["bytes_container_to_client"]) == (1, 7, 3)
        table = pyproxy("-list", "-metrics-addr", f"127.0.0.1:{metrics}")
        assert table.returncode == 0 and len(table.stdout.splitlines()) == 3
    finally:
        tcp.close()
        udp.close()
        backend.close()


@pytest.mark.parametrize("args, code, says", [
    (["-list", "-engine-socket", "/nonexistent/engine.sock"], 1,
     "pyproxy -list: no engine serves /nonexistent/engine.sock (no such file or directory); "
     "for a standalone pyproxy give its -metrics-addr\n"),
    (["-list", "-metrics-addr", "127.0.0.1:1"], 1,
     "pyproxy -list: -metrics-addr 127.0.0.1:1: connection refused\n"),
    (["-list", "-metrics-addr", ":9100"], 2, "argument -metrics-addr"),
    (["-list", "-p", "80"], 2, "flag provided but not defined: -p"),
    (["-list", "-json=maybe"], 2, "argument -json"),
])
def test_list_errors_name_what_is_wrong(args, code, says):
    done = pyproxy(*args)
    assert done.returncode == code
    assert says in done.stderr and "Traceback" not in done.stderr


def test_list_help_exits_0():
    done = pyproxy("-list", "-h")
    assert done.returncode == 0 and "-metrics-addr" in done.stdout and "-json" in done.stdout
    assert "pyproxy -list" in pyproxy("-h").stdout  # the main help points at it


# -- pure parts --------------------------------------------------------------------------------

def _stats() -> dict:
    tcp, = parse_publish("127.0.0.1:8080:80", parse_ip("172.17.0.2"))
    udp, = parse_publish("[::1]:5353:53/udp", parse_ip("172.17.0.3"))
    return {tcp: MappingStats(accepted=5, active=2, bytes_from_client=100, bytes_from_container=2000),
            udp: MappingStats(flows_active=3, flows_created=9, bytes_from_client=40,
                              bytes_from_container=120)}


def test_rows_from_stats_and_from_the_same_stats_scraped_agree():
    stats = _stats()
    rows = rows_from_stats(stats)
    assert [r.docker_port for r in rows] == ["80/tcp -> 127.0.0.1:8080", "53/udp -> [::1]:5353"]
    assert rows[1] == Row("udp", "[::1]:5353", "172.17.0.3:53", "53/udp -> [::1]:5353", 3, 9, 40, 120)
    from prometheus_client import generate_latest

    assert rows_from_exposition(generate_latest(make_registry(stats)).decode()) == rows
    assert [Row.from_json(r.to_json()) for r in rows] == rows


def test_table_aligns_columns():
    table = format_table(rows_from_stats(_stats())).splitlines()
    assert table[1].split() == ["80/tcp", "->", "127.0.0.1:8080", "172.17.0.2:80", "2", "5", "100",
                                "2000"]
    assert len({line.index("BACKEND") if "BACKEND" in line else line.index("172.17")
                for line in table}) == 1


def test_a_long_list_spans_frames_and_decodes_whole():
    lines = [json.dumps({"n": i, "pad": "x" * 200}) for i in range(2000)]  # ~440 KB > 64 KiB
    answer = encode_list_reply(lines)
    assert decode_list_reply(answer) == (0, lines)
    assert decode_list_reply(answer[:-1]) is None  # the end frame not yet there
    assert decode_list_reply(encode_list_reply([])) == (0, [])
    # not an argv any registration could send: its first argument would be empty
    assert frame(LIST_REQUEST).endswith(b"\0list\0")


@given(st.binary(max_size=300))
def test_any_bytes_from_an_engine_are_an_answer_none_or_a_wire_error(junk):
    """`-list` reads what a (possibly broken or hostile) engine sends: never another exception."""
    try:
        decode_list_reply(junk)
    except WireError:
        pass


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n",
                                               blacklist_categories=("Cs",)),
                        min_size=1, max_size=50), max_size=30))
def test_list_replies_round_trip(lines):
    assert decode_list_reply(encode_list_reply(lines)) == (0, lines)
