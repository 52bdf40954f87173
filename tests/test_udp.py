"""The UDP relay on real loopback sockets: flows, source addresses, timeouts, the flow cap."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import pytest

from proxy.ground.sockets import set_buffer_size
from proxy.relays import udp
from proxy.relays.udp import FlowTable
from tests.helpers import Proxy, free_port, needs_ipv6, udp_backend, udp_client, udp_proxy
from tests.netns import Lab, needs_netns

pytestmark = pytest.mark.timeout(60)


def ask(sock: socket.socket, dest: tuple, payload: bytes, timeout: float = 3) -> tuple[bytes, tuple]:
    sock.settimeout(timeout)
    sock.sendto(payload, dest)
    return sock.recvfrom(65536)


@pytest.mark.parametrize("host_ip, container_ip", [
    ("127.0.0.1", "127.0.0.1"),
    pytest.param("::1", "::1", marks=needs_ipv6),
    pytest.param("::1", "127.0.0.1", marks=needs_ipv6),
])
async def test_udp_echo(host_ip: str, container_ip: str) -> None:
    async with udp_backend(container_ip) as (bport, _), udp_proxy(
        bport, host_ip=host_ip, container_ip=container_ip
    ) as server:
        port = server.relays[0].port
        with udp_client(host_ip) as c:
            data, src = await asyncio.to_thread(ask, c, (host_ip, port), b"hello")
        assert data == b"re:hello"
        assert src[1] == port


async def test_200_clients_each_get_their_answers_from_distinct_source_ports() -> None:
    async with udp_backend() as (bport, backend), udp_proxy(bport) as server:
        port = server.relays[0].port
        clients = [udp_client() for _ in range(200)]

        def exchange_all() -> bool:
            for round_ in range(3):
                for i, c in enumerate(clients):
                    c.sendto(b"%d/%d" % (i, round_), ("127.0.0.1", port))
                for i, c in enumerate(clients):
                    c.settimeout(3)
                    if c.recv(100) != b"re:%d/%d" % (i, round_):
                        return False
            return True

        assert await asyncio.to_thread(exchange_all)
        for c in clients:
            c.close()
        # each client was one flow: the backend saw 200 distinct source ports, each 3 times
        ports = [src[1] for src in backend.sources]
        assert len(set(ports)) == 200 and len(ports) == 600
        stats = server.relays[0].stats
        assert stats.flows_created == 200 and stats.flows_active == 200


async def test_reply_comes_from_the_address_the_client_sent_to() -> None:
    """Bound to 0.0.0.0; a client asking 127.0.0.2 must get the answer from 127.0.0.2."""
    async with udp_backend() as (bport, _), udp_proxy(bport, host_ip="0.0.0.0") as server:
        port = server.relays[0].port
        with udp_client() as c:
            for dest in ("127.0.0.2", "127.0.0.3", "127.0.0.1"):
                data, src = await asyncio.to_thread(ask, c, (dest, port), b"q")
                assert (data, src) == (b"re:q", (dest, port))


@needs_ipv6
async def test_ipv6_wildcard_replies_from_the_address_asked() -> None:
    async with udp_backend() as (bport, _), udp_proxy(bport, host_ip="::") as server:
        port = server.relays[0].port
        with udp_client("::1") as c:
            data, src = await asyncio.to_thread(ask, c, ("::1", port), b"q")
        assert data == b"re:q" and src[:2] == ("::1", port)


async def test_backend_absent_then_appearing_keeps_the_flow() -> None:
    bport = free_port(kind=socket.SOCK_DGRAM)
    async with udp_proxy(bport) as server:
        port = server.relays[0].port
        with udp_client() as c:
            c.sendto(b"early", ("127.0.0.1", port))  # ICMP port unreachable comes back
            await asyncio.sleep(0.2)
            c.sendto(b"early2", ("127.0.0.1", port))
            await asyncio.sleep(0.2)
            async with udp_backend(port=bport) as (_, backend):
                data, _ = await asyncio.to_thread(ask, c, ("127.0.0.1", port), b"now")
            assert data == b"re:now"
        stats = server.relays[0].stats
        assert stats.flows_created == 1  # the refusal never killed the flow


async def test_one_sided_flow_keeps_its_source_port_then_expires() -> None:
    """Only the client talks: the flow lives while it does (timeout counts either direction),
    and gets a new source port after idling out."""

    sources: list[tuple] = []

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
            sources.append(addr)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    bport = transport.get_extra_info("sockname")[1]
    try:
        async with udp_proxy(bport, "-udp-timeout", "300ms") as server:
            port = server.relays[0].port
            with udp_client() as c:
                for _ in range(8):  # 1.2 s of one-way traffic, four times the timeout
                    c.sendto(b"tick", ("127.0.0.1", port))
                    await asyncio.sleep(0.15)
                await asyncio.sleep(0.8)  # now idle for more than the timeout
                c.sendto(b"again", ("127.0.0.1", port))
                await asyncio.sleep(0.2)
            assert len(sources) == 9
            assert len({s[1] for s in sources[:8]}) == 1
            assert sources[8][1] != sources[0][1]
            stats = server.relays[0].stats
            assert stats.flows_expired >= 1 and stats.flows_created == 2
    finally:
        transport.close()


async def test_largest_datagram_passes_whole_both_ways() -> None:
    async with udp_backend() as (bport, _), udp_proxy(bport) as server:
        port = server.relays[0].port
        payload = bytes(range(256)) * 255 + b"x" * 227  # 65507 bytes: IPv4's largest
        assert len(payload) == 65507
        with udp_client() as c:
            data, _ = await asyncio.to_thread(ask, c, ("127.0.0.1", port), payload)
        assert data == payload


async def test_flow_cap_evicts_the_idlest_flow() -> None:
    async with udp_backend() as (bport, backend), udp_proxy(bport, "-udp-max-flows", "3") as server:
        port = server.relays[0].port
        clients = [udp_client() for _ in range(4)]
        try:
            for c in clients[:3]:
                await asyncio.to_thread(ask, c, ("127.0.0.1", port), b"hi")
            await asyncio.to_thread(ask, clients[1], ("127.0.0.1", port), b"again")
            await asyncio.to_thread(ask, clients[2], ("127.0.0.1", port), b"again")
            await asyncio.to_thread(ask, clients[3], ("127.0.0.1", port), b"new")  # evicts #0
            relay = server.relays[0]
            assert relay.stats.flows_evicted == 1 and len(relay.flows) == 3
            assert clients[0].getsockname() not in relay.flows
            assert clients[1].getsockname() in relay.flows
            # the evicted client still gets service: a new flow (evicting the next idlest)
            data, _ = await asyncio.to_thread(ask, clients[0], ("127.0.0.1", port), b"back")
            assert data == b"re:back" and relay.stats.flows_evicted == 2
        finally:
            for c in clients:
                c.close()


class Sink(asyncio.DatagramProtocol):
    """Records every datagram with its source address, in arrival order."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple]] = []

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        self.got.append((data, addr))


def burst(clients: list[socket.socket], host: str, port: int) -> dict[int, list[bytes]]:
    """Datagrams sent without waiting, so the proxy (same loop) reads them in one go: runs of
    one size broken by a shorter one, by a large one, and by the other client's."""
    sent: dict[int, list[bytes]] = {i: [] for i in range(len(clients))}

    def send(i: int, payload: bytes) -> None:
        clients[i].sendto(payload, (host, port))
        sent[i].append(payload)

    n = 0
    # ... and more than one run's worth of bytes (64,000), so runs wrap around the buffer
    for size in (64, 64, 30, 500, 64, 2000, 64, 100, 100, *[1000] * 10):
        for _ in range(8):
            n += 1
            send(0, (b"%06d" % n).ljust(size, b"a"))
        send(1, (b"%06d" % n).ljust(size, b"b"))
    for _ in range(3):  # empty datagrams are datagrams too
        send(0, b"")
    return sent


@pytest.mark.parametrize("host_ip, container_ip", [
    ("127.0.0.1", "127.0.0.1"),  # without PKTINFO
    ("0.0.0.0", "127.0.0.1"),  # with
    pytest.param("::1", "::1", marks=needs_ipv6),  # runs over IPv6
    pytest.param("::", "::1", marks=needs_ipv6),
])
async def test_a_burst_reaches_the_container_datagram_by_datagram_in_order(
        host_ip: str, container_ip: str) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in container_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((container_ip, 0))
    set_buffer_size(sock, socket.SO_RCVBUF, 4 << 20)  # the whole burst waits for the sink
    transport, sink = await loop.create_datagram_endpoint(Sink, sock=sock)
    client_ip = "::1" if ":" in host_ip else "127.0.0.1"
    try:
        async with udp_proxy(transport.get_extra_info("sockname")[1], host_ip=host_ip,
                             container_ip=container_ip) as server:
            relay = server.relays[0]
            clients = [udp_client(client_ip), udp_client(client_ip)]
            try:
                sent = burst(clients, client_ip, relay.port)
                total = sum(len(v) for v in sent.values())
                for _ in range(300):
                    if len(sink.got) >= total:
                        break
                    await asyncio.sleep(0.01)
            finally:
                for c in clients:
                    c.close()
            by_source: dict[tuple, list[bytes]] = {}
            for data, src in sink.got:
                by_source.setdefault(src, []).append(data)
            # each client one flow, one source port, its datagrams whole, apart and in order
            assert sorted(by_source.values()) == sorted(sent.values())
            assert relay.stats.datagrams_from_client == total
            assert relay.stats.datagrams_dropped == 0
            assert relay._max_segment == udp.MAX_SEGMENT  # the runs went out as runs
    finally:
        transport.close()


async def test_a_kernel_refusing_udp_segment_gets_the_datagrams_one_by_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown SOL_UDP control message fails as UDP_SEGMENT does where the kernel lacks it
    (EINVAL): the run goes out one by one, and the relay stops trying."""
    monkeypatch.setattr(udp, "UDP_SEGMENT", 0x7FFF)
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
    try:
        async with udp_proxy(transport.get_extra_info("sockname")[1]) as server:
            relay = server.relays[0]
            with udp_client() as c:
                payloads = [b"%02d" % i * 32 for i in range(20)]
                for payload in payloads:
                    c.sendto(payload, ("127.0.0.1", relay.port))
                for _ in range(300):
                    if len(sink.got) >= len(payloads):
                        break
                    await asyncio.sleep(0.01)
            assert [data for data, _ in sink.got] == payloads
            assert relay._max_segment == 0 and relay.stats.datagrams_dropped == 0
    finally:
        transport.close()


def test_flow_table_bookkeeping() -> None:
    """The table's order is the idleness order; no traffic needed to check it (real Flows, as
    the compiled build checks their type, over one socket that never sends)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        table = FlowTable(max_flows=2)
        flows = table.by_client
        flows["a"], flows["b"] = udp.Flow("a", sock, 1.0), udp.Flow("b", sock, 2.0)
        flows.move_to_end("a")
        flows["a"].last = 3.0
        evicted = table.make_room()
        assert evicted is not None and evicted.last == 2.0 and list(flows) == ["a"]
        assert "a" in table and "b" not in table and len(table) == 1
        flows["c"] = udp.Flow("c", sock, 4.0)
        assert table.make_room().last == 3.0  # type: ignore[union-attr]
        assert [f.last for f in table.expire(now=10.0, timeout=5.0)] == [4.0]
        assert not table and table.pop_idlest() is None


# The container's side of test_runs_cross_a_veth_to_another_namespace: counts what arrives,
# datagram by datagram, and prints it once `expected` came or 5 s passed without one.
_SINK = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("198.18.5.2", 7))
print("ready", flush=True)
got = []
s.settimeout(5)
try:
    while len(got) < int(sys.argv[1]):
        got.append(s.recv(65536).hex())
except socket.timeout:
    pass
print(json.dumps(got), flush=True)
"""


@needs_netns
@pytest.mark.parametrize("mtu", [1500, 576])  # 576: under a run's 1000-byte segments
def test_runs_cross_a_veth_to_another_namespace(mtu: int) -> None:
    """UDP_SEGMENT runs leave loopback: the container in its own namespace, behind a veth pair
    as docker0 puts it, receives every datagram whole, apart and in order; with a link MTU
    under the segment size, the kernel refuses the run and the relay sends one by one."""
    with Lab() as lab:
        host, box = lab.host("host"), lab.host("box")
        lab.link(host, "veth-box", "198.18.5.1/24", box, "eth0", "198.18.5.2/24")
        host.ip("link", "set", "veth-box", "mtu", str(mtu))
        box.ip("link", "set", "eth0", "mtu", str(mtu))
        payloads = [(b"%04d" % i).ljust(size, b"x")
                    for i, size in enumerate([100] * 40 + [500] * 20 + [1000] * 20)]
        sink = lab.spawn(box, sys.executable, "-c", _SINK, str(len(payloads)),
                         stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        port = free_port(kind=socket.SOCK_DGRAM)
        p = Proxy(["-proto", "udp", "-host-ip", "127.0.0.1", "-host-port", str(port),
                   "-container-ip", "198.18.5.2", "-container-port", "7"], prefix=host.prefix())
        try:
            # Stopped, the proxy finds the whole burst queued when it wakes: runs for certain.
            p.proc.send_signal(signal.SIGSTOP)
            send = ("import socket, sys\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for payload in {payloads!r}:\n"
                    f"    s.sendto(payload, ('127.0.0.1', {port}))\n")
            host.run(sys.executable, "-c", send)
            p.proc.send_signal(signal.SIGCONT)
            out, _ = sink.communicate(timeout=20)
            assert [bytes.fromhex(h) for h in json.loads(out)] == payloads
        finally:
            p.proc.send_signal(signal.SIGCONT)
            p.stop()
