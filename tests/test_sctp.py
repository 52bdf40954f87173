"""SCTP: messages relayed one by one with their stream id, PPID and unordered flag intact.

These need a kernel with SCTP. Where there is none they skip, and the heavy suite runs them in
a virtual machine that has it (tests/e2e/test_sctp_vm.py sets PYPROXY_REQUIRE_SCTP, so there a
missing SCTP is a failure, not a skip).

The peers here are written from <linux/sctp.h> on their own, with byte offsets rather than the
proxy's struct formats, so a mistake in the proxy's layout can't be mirrored by the tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from proxy.relays import sctp
from tests.helpers import Proxy, free_port, output, proxy, read_text
from tests.sctpvm import kernel_has_sctp

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not (kernel_has_sctp() or os.environ.get("PYPROXY_REQUIRE_SCTP")),
                       reason="this kernel has no SCTP (the heavy suite runs these in a VM)"),
]

SOL_SCTP = 132
SCTP_INITMSG, SCTP_RECVRCVINFO = 2, 32  # socket options
SCTP_SNDINFO, SCTP_RCVINFO = 2, 3  # ancillary data types
SCTP_UNORDERED = 1
MSG_NOTIFICATION = 0x8000
SO_SNDBUFFORCE = 32
TIMEOUT = 30.0


class Message(NamedTuple):
    data: bytes
    sid: int = 0
    ppid: int = 0
    unordered: bool = False


def sctp_socket(family: int = socket.AF_INET, streams: int = 10, big: bool = False) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.setsockopt(SOL_SCTP, SCTP_RECVRCVINFO, 1)
    # struct sctp_initmsg: num_ostreams, max_instreams, max_attempts, max_init_timeo (u16 each)
    s.setsockopt(SOL_SCTP, SCTP_INITMSG, struct.pack("HHHH", streams, streams, 0, 0))
    if big:  # Linux sends no message larger than the send buffer (208 KiB unless raised)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        except PermissionError:
            s.close()
            pytest.skip("a send buffer past net.core.wmem_max needs root (SO_SNDBUFFORCE)")
    s.settimeout(TIMEOUT)
    return s


def send(s: socket.socket, m: Message) -> None:
    # struct sctp_sndinfo: u16 snd_sid, u16 snd_flags, u32 snd_ppid, u32 snd_context, s32 assoc
    info = struct.pack("HHIIi", m.sid, SCTP_UNORDERED if m.unordered else 0, m.ppid, 0, 0)
    s.sendmsg([m.data], [(SOL_SCTP, SCTP_SNDINFO, info)])


def recv(s: socket.socket) -> Message | None:
    """The next whole message (put together from partial deliveries), or None at EOF."""
    parts: list[bytes] = []
    meta = (0, 0, False)
    while True:
        data, ancillary, flags, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        if not data:
            return None
        if flags & MSG_NOTIFICATION:
            continue
        for level, kind, info in ancillary:
            if level == SOL_SCTP and kind == SCTP_RCVINFO and not parts:
                # struct sctp_rcvinfo: u16 sid @0, u16 ssn @2, u16 flags @4, u32 ppid @8, ...
                sid, rflags = struct.unpack_from("H", info, 0)[0], struct.unpack_from("H", info, 4)[0]
                meta = (sid, struct.unpack_from("I", info, 8)[0], bool(rflags & SCTP_UNORDERED))
        parts.append(data)
        if flags & socket.MSG_EOR:
            return Message(b"".join(parts), *meta)


def connect(port: int, host: str = "127.0.0.1", streams: int = 10, big: bool = False) -> socket.socket:
    s = sctp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, streams, big)
    s.connect((host, port))
    return s


CLOSE, ABORT = "close", "abort"  # what a reply can be instead of messages: end the association


class Backend:
    """An SCTP server on loopback (a thread per association) that records what it receives,
    with the client address it came from, and answers with `reply(message)`: messages to send,
    or CLOSE (a SHUTDOWN) or ABORT."""

    def __init__(self, reply: Callable[[Message], list[Message] | str] = lambda m: [m],
                 host: str = "127.0.0.1", streams: int = 10, reading: threading.Event | None = None,
                 big: bool = False) -> None:
        self.reply = reply
        self.received: list[Message] = []
        self.peers: list[tuple] = []
        self.ended = threading.Event()  # set when an association ended (EOF or abort)
        self.end_reason: list[str] = []
        self.reading = reading  # if given, associations wait for it before reading
        self.sock = sctp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, streams, big)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            conn.settimeout(None)
            self.conns.append(conn)
            self.peers.append(peer)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.reading is not None:
            self.reading.wait(TIMEOUT)
        try:
            while (m := recv(conn)) is not None:
                self.received.append(m)
                answer = self.reply(m)
                if answer == ABORT:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if isinstance(answer, str):
                    conn.close()
                    return
                for message in answer:
                    send(conn, message)
            self.end_reason.append("eof")
        except OSError as exc:
            self.end_reason.append(type(exc).__name__)
        self.ended.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Backend]]:
    """Backend(...) that is closed when the test ends, whatever the test did."""
    made: list[Backend] = []

    def make(*args: object, **kwargs: object) -> Backend:
        made.append(Backend(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend: Callable[..., Backend]) -> Backend:
    return make_backend()


def start(backend_port: int, *extra: str, env: dict[str, str] | None = None,
          host_ip: str = "127.0.0.1") -> tuple[Proxy, int]:
    port = free_port()
    p = Proxy(["-proto", "sctp", "-host-ip", host_ip, "-host-port", str(port),
               "-container-ip", "127.0.0.1", "-container-port", str(backend_port), *extra], env=env)
    return p, port


def test_messages_keep_boundaries_stream_and_ppid(proxy_loop_env, make_backend):
    b = make_backend(reply=lambda m: [Message(m.data.upper(), m.sid + 1, m.ppid + 1)])
    p, port = start(b.port, env=proxy_loop_env)
    sent = [Message(b"a", 0, 0), Message(b"bb" * 100, 3, 0x01020304), Message(b"c" * 3000, 7, 46)]
    with connect(port) as c:
        for m in sent:  # back to back: a byte stream would merge them
            send(c, m)
        answers = [recv(c) for _ in sent]
    assert b.received == sent
    assert answers == [Message(m.data.upper(), m.sid + 1, m.ppid + 1) for m in sent]


def test_unordered_flag_passes_both_ways(backend):
    p, port = start(backend.port)
    with connect(port) as c:
        send(c, Message(b"urgent", 2, 9, unordered=True))
        assert recv(c) == Message(b"urgent", 2, 9, unordered=True)
        send(c, Message(b"in order", 2, 9))
        assert recv(c) == Message(b"in order", 2, 9)
    assert [m.unordered for m in backend.received] == [True, False]


@pytest.mark.parametrize("size", [65536, 212992, 1 << 20])
def test_large_message_arrives_whole_both_ways(size, make_backend):
    """Larger than one read: the kernel hands it over in parts, the proxy sends it whole. The
    largest takes peers that raised their send buffers; the proxy raises its own to match."""
    backend = make_backend(big=True)
    p, port = start(backend.port)
    payload = os.urandom(size)
    with connect(port, big=True) as c:
        send(c, Message(payload, 1, 77))
        send(c, Message(b"next", 1, 78))
        assert recv(c) == Message(payload, 1, 77)
        assert recv(c) == Message(b"next", 1, 78)
    assert [len(m.data) for m in backend.received] == [size, 4]


async def test_a_message_over_the_cap_aborts_the_association(monkeypatch, make_backend, caplog):
    """Messages are held whole, so their size is capped (16 MiB; 100 kB here): past it the
    association is aborted and logged, rather than buffered without bound or split."""
    monkeypatch.setattr(sctp, "MAX_MESSAGE", 100_000)
    b = make_backend(big=True)

    def client(port: int) -> None:
        with connect(port, big=True) as c:
            send(c, Message(b"fine", 1, 1))
            assert recv(c) == Message(b"fine", 1, 1)
            send(c, Message(os.urandom(150_000), 1, 2))
            with pytest.raises(ConnectionResetError):
                recv(c)

    caplog.set_level(logging.WARNING, logger="pyproxy")
    async with proxy("-proto", "sctp", "-host-ip", "127.0.0.1", "-host-port", "0",
                     "-container-ip", "127.0.0.1", "-container-port", str(b.port)) as server:
        await asyncio.to_thread(client, server.relays[0].port)
        assert server.stats[server.relays[0].mapping].active == 0
    assert "receive from client: message too long" in caplog.text
    assert [m.data for m in b.received] == [b"fine"]


def test_streams_beyond_the_kernel_default_of_ten(make_backend):
    """A client with 100 streams, a container answering on the stream it was asked on."""
    b = make_backend(streams=100)
    p, port = start(b.port)
    with connect(port, streams=100) as c:
        for sid in (0, 10, 57, 99):
            send(c, Message(f"on {sid}".encode(), sid, sid))
            assert recv(c) == Message(f"on {sid}".encode(), sid, sid)


def test_ipv6_frontend_to_ipv4_container(backend):
    p, port = start(backend.port, host_ip="::1")
    with connect(port, host="::1") as c:
        send(c, Message(b"v6 in, v4 out", 1, 5))
        assert recv(c) == Message(b"v6 in, v4 out", 1, 5)
    assert backend.peers[0][0] == "127.0.0.1"


def test_many_associations_each_get_their_own_answers(backend):
    p, port = start(backend.port)
    clients = [connect(port) for _ in range(40)]
    for i, c in enumerate(clients):
        send(c, Message(f"client {i}".encode(), i % 10, i))
    for i, c in enumerate(clients):
        assert recv(c) == Message(f"client {i}".encode(), i % 10, i)
        c.close()
    assert len({peer[1] for peer in backend.peers}) == 40


def test_client_close_ends_the_container_association(backend):
    p, port = start(backend.port)
    c = connect(port)
    send(c, Message(b"last words", 4, 4))
    assert recv(c) == Message(b"last words", 4, 4)
    c.close()  # SHUTDOWN
    assert backend.ended.wait(TIMEOUT)
    assert backend.end_reason == ["eof"]


def test_container_close_ends_the_client_association_after_its_last_message(make_backend):
    b = make_backend(reply=lambda m: CLOSE if m.data == b"bye" else [Message(b"ok", 1, 1)])
    p, port = start(b.port)
    with connect(port) as c:
        send(c, Message(b"hello", 0, 0))
        assert recv(c) == Message(b"ok", 1, 1)
        send(c, Message(b"bye", 0, 0))
        assert recv(c) is None  # EOF: a SHUTDOWN, not an ABORT


def test_container_abort_reaches_the_client_as_an_abort(make_backend):
    b = make_backend(reply=lambda m: ABORT if m.data == b"die" else [m])
    p, port = start(b.port)
    with connect(port) as c:
        send(c, Message(b"x"))
        assert recv(c) == Message(b"x")
        send(c, Message(b"die"))
        with pytest.raises(ConnectionResetError):
            recv(c)


def test_container_absent_aborts_the_client_and_says_why():
    absent = free_port()
    p, port = start(absent)
    with connect(port) as c, pytest.raises(ConnectionResetError):
        send(c, Message(b"anyone?"))
        recv(c)
    _, err = p.stop()
    # the client as ip:port, never a Python tuple
    assert re.search(rb"sctp 127\.0\.0\.1:%d: client 127\.0\.0\.1:\d+: dial 127\.0\.0\.1:%d: "
                     rb"connection refused" % (port, absent), err), err


def test_dial_retry_reaches_a_container_that_comes_up_late():
    backend_port = free_port()
    p, port = start(backend_port, "-dial-retry", "10s")
    with connect(port) as c:
        send(c, Message(b"early", 3, 3))  # waits in the client's association meanwhile
        time.sleep(0.5)  # the proxy is being refused and retrying
        with sctp_socket() as late:
            late.bind(("127.0.0.1", backend_port))
            late.listen(1)
            conn, _ = late.accept()
            with conn:
                assert recv(conn) == Message(b"early", 3, 3)
                send(conn, Message(b"late reply", 1, 1))
                assert recv(c) == Message(b"late reply", 1, 1)


def test_backpressure_holds_one_message_not_the_whole_flood(proxy_loop_env, make_backend):
    """The container doesn't read for a while: the client is held back by the windows, the
    proxy's memory doesn't grow with what was sent, and every message then arrives, in order
    on its stream."""
    reading = threading.Event()
    b = make_backend(reply=lambda m: [], reading=reading)
    p, port = start(b.port, env=proxy_loop_env)
    def rss() -> int:
        with open(f"/proc/{p.proc.pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1])
    count, size = 1000, 16384
    sent = []

    def flood() -> None:
        with connect(port) as c:
            for i in range(count):
                send(c, Message(struct.pack("I", i) * (size // 4), i % 10, i))
                sent.append(i)
            time.sleep(TIMEOUT)  # stay open until the test is done

    before = rss()
    threading.Thread(target=flood, daemon=True).start()
    time.sleep(2)
    held = len(sent)
    during = rss()
    assert held < count, "the client was never held back"
    assert during - before < 16 * 1024, f"proxy RSS grew by {during - before} KiB while the container wasn't reading"
    reading.set()
    deadline = time.monotonic() + TIMEOUT
    while len(b.received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    # order holds within a stream (SCTP promises no order across streams)
    assert sorted(m.ppid for m in b.received) == list(range(count))
    for sid in range(10):
        assert [m.ppid for m in b.received if m.sid == sid] == list(range(sid, count, 10))
    assert all(m.data == struct.pack("I", m.ppid) * (size // 4) and m.sid == m.ppid % 10
               for m in b.received)


def test_allow_and_max_conns_abort_whoever_is_refused(backend):
    p, port = start(backend.port, "-allow", "10.0.0.0/8")
    with connect(port) as c, pytest.raises((ConnectionResetError, BrokenPipeError)):
        send(c, Message(b"let me in"))
        recv(c)
    p2, port2 = start(backend.port, "-max-conns", "1")
    with connect(port2) as first:
        send(first, Message(b"one"))
        assert recv(first) == Message(b"one")
        with connect(port2) as second, pytest.raises((ConnectionResetError, BrokenPipeError)):
            send(second, Message(b"two"))
            recv(second)
        send(first, Message(b"still here"))
        assert recv(first) == Message(b"still here")


def test_accept_survives_fd_exhaustion(backend):
    """Out of descriptors, accept fails: say so once, back off, serve again once fds free up."""
    port = free_port()
    p = Proxy(["-proto", "sctp", "-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip",
               "127.0.0.1", "-container-port", str(backend.port)],
              preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)))
    flood = [connect(port) for _ in range(40)]  # each relayed association costs two fds
    time.sleep(2)  # accept fails meanwhile (and is retried every second)
    assert p.proc.poll() is None
    for c in flood:
        c.close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            with connect(port) as c:
                send(c, Message(b"after", 1, 1))
                if recv(c) == Message(b"after", 1, 1):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the proxy did not serve again after fd exhaustion"
        time.sleep(0.2)
    _, err = p.stop()
    assert b"Traceback" not in err and 1 <= err.count(b"backing off") <= 3


def test_use_listen_fd_adopts_an_sctp_socket_and_refuses_a_tcp_one(backend):
    listener = sctp_socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    args = ["-proto", "sctp", "-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip",
            "127.0.0.1", "-container-port", str(backend.port), "-use-listen-fd"]
    Proxy(args, pass_fds={4: listener.fileno()})
    listener.close()
    with connect(port) as c:
        send(c, Message(b"via fd 4", 2, 2))
        assert recv(c) == Message(b"via fd 4", 2, 2)
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        wrong = Proxy(args, pass_fds={4: tcp.fileno()}, wait_ready=False)
    assert wrong.status == b"1\nlisten fd 4 for sctp: fd 4 is a TCP socket, not SCTP"


def test_publish_spec_metrics_and_sigterm_with_an_open_association(backend):
    port, metrics = free_port(), free_port()
    p = Proxy(["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{port}:{backend.port}/sctp",
               "-metrics-addr", f"127.0.0.1:{metrics}"])
    c = connect(port)
    for i in range(3):
        send(c, Message(b"m" * 10, 0, i))
        assert recv(c) == Message(b"m" * 10, 0, i)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in ('pyproxy_sctp_messages_total{', 'pyproxy_connections_active{'):
        assert line in text
    want = [l for l in text.splitlines() if l.startswith("pyproxy_sctp_messages_total{")
            and 'proto="sctp"' in l]
    assert sorted(float(l.split()[-1]) for l in want) == [3.0, 3.0]
    assert any(l.startswith("pyproxy_connections_active{") and l.endswith(" 1.0")
               for l in text.splitlines())
    started = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=5) == 0 and time.monotonic() - started < 2.0
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        send(c, Message(b"after exit"))
        recv(c)
    c.close()
    _, err = output(p.proc)
    assert b"Traceback" not in err


def test_through_the_engine_with_fd_4(tmp_path, backend):
    """dockerd's way with an engine running: the spawned pyproxy hands its SCTP socket over."""
    path = str(tmp_path / "engine.sock")
    Proxy(["-engine", "-engine-socket", path])
    listener = sctp_socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    spawned = Proxy(["-proto", "sctp", "-host-ip", "127.0.0.1", "-host-port", str(port),
                     "-container-ip", "127.0.0.1", "-container-port", str(backend.port),
                     "-use-listen-fd"], pass_fds={4: listener.fileno()},
                    env={"PYPROXY_ENGINE_SOCKET": path})
    listener.close()
    # served by the engine: the spawned process becomes the tiny waiter, not an interpreter
    deadline = time.monotonic() + TIMEOUT
    while not read_text(f"/proc/{spawned.proc.pid}/cmdline").startswith("pyproxy-wait"):
        assert time.monotonic() < deadline, "the spawned pyproxy never handed over to the engine"
        time.sleep(0.05)
    with connect(port) as c:
        send(c, Message(b"via the engine", 6, 0xCAFE))
        assert recv(c) == Message(b"via the engine", 6, 0xCAFE)



def test_idle_timeout_closes_a_silent_association_and_keeps_a_busy_one(backend):
    p, port = start(backend.port, "-idle-timeout", "400ms")
    with connect(port) as busy, connect(port) as silent:
        send(silent, Message(b"hello"))
        assert recv(silent) == Message(b"hello")
        for i in range(12):  # three timeouts of traffic, a message every 100 ms
            send(busy, Message(b"%d" % i))
            assert recv(busy) == Message(b"%d" % i)
            time.sleep(0.1)
        assert recv(silent) is None  # SHUTDOWN from the proxy, long since
        send(busy, Message(b"still here"))
        assert recv(busy) == Message(b"still here")
