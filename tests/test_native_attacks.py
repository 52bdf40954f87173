"""Attacks on the C relay (proxy/relays/_native.c): clients and backends that reset, half-close
or stall at every moment of a transfer, floods of short connections, and every state a
connection can park in, each checked for intact bytes, resets passed on, nothing left open
(open_count, the process's fds) and no busy loop (run() is called only when there is work).

The cases the Python relay shares run on both relays (the tcp_relay fixture): they are its
rules, the C relay must keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.ground.sockets import StartupError
from proxy.relays import native
from proxy.relays.native import NativeTcpListener
from tests.helpers import (
    Proxy,
    backend,
    fd_limit,
    fds_back_to,
    free_port,
    free_port_block,
    open_fds,
    proxy,
    sha,
    silent_listener,
    tcp_proxy,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not native.available(), reason="this build has no C relay (PYPROXY_COMPILE=1)"),
]


def linger0(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (unless it is closed already)."""
    if not writer.is_closing():
        linger0(writer.get_extra_info("socket"))
    writer.close()


async def until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def settled(relay: object, before: set[str]) -> None:
    """Nothing open on the relay, and every fd opened since `before` closed again."""
    assert await until(lambda: relay.open_count == 0), relay.open_count  # type: ignore[attr-defined]
    assert relay.stats.active == 0  # type: ignore[attr-defined]
    assert await fds_back_to(before) == set()


class Parked:
    """A backend whose connections the test drives: each accepted one is queued as
    (reader, writer) and stays open until the test closes it."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.accepted.put((reader, writer))

    async def next(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.accepted.get(), 5)

    def close(self) -> None:
        for w in self.writers:
            reset(w)


@contextlib.asynccontextmanager
async def parked_backend() -> AsyncIterator[tuple[int, Parked]]:
    parked = Parked()
    server = await asyncio.start_server(parked.handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], parked
    finally:
        server.close()
        parked.close()
        await asyncio.sleep(0)


@contextlib.contextmanager
def counted_runs(relay: NativeTcpListener) -> contextlib.AbstractContextManager[list[int]]:  # type: ignore[misc]
    """How many times the loop calls the C relay's run(): once per wake-up of its epoll set,
    so a side registered for an event nobody consumes (level-triggered) shows as thousands."""
    core = relay._core  # noqa: SLF001 -- what the loop watches
    assert core is not None
    loop = relay.loop
    calls = [0]

    def run() -> None:
        calls[0] += 1
        core.run()

    loop.remove_reader(core.fileno())
    loop.add_reader(core.fileno(), run)
    yield calls


# -- no busy loop, whatever state a connection parks in ----------------------------------------

async def test_no_state_a_connection_parks_in_wakes_the_relay_in_a_loop() -> None:
    """Connections parked in each state that waits on the other side: the client half-closed
    (backend idle), the backend half-closed (client idle), a client flooding a backend that
    never reads, a spliced backend flooding a client that never reads, a client that
    half-closed then reset, a backend reset while its direction was blocked. Over half a
    second nothing happens, so run() is hardly called (a spin calls it thousands of times);
    then everything ends and nothing is left open."""
    async with parked_backend() as (bport, parked), tcp_proxy(bport) as server:
        relay = server.relays[0]
        assert isinstance(relay, NativeTcpListener)
        before = open_fds()
        clients: list[asyncio.StreamWriter] = []

        async def client() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader,
                                    asyncio.StreamWriter]:
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            clients.append(w)
            br, bw = await parked.next()
            w.write(b"x")
            assert await asyncio.wait_for(br.readexactly(1), 5) == b"x"
            return r, w, br, bw

        # the client half-closed, the backend idle
        r, w, br, bw = await client()
        w.write_eof()
        assert await asyncio.wait_for(br.read(), 5) == b""
        # the backend half-closed, the client idle
        r, w, br, bw = await client()
        bw.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""
        # the client floods a backend that never reads
        r, w, br, bw = await client()
        w.write(os.urandom(16 << 20))
        # a bulk backend floods a client that never reads (spliced)
        r, w, br, bw = await client()
        bw.write(os.urandom(32 << 20))
        # the client half-closed, then reset
        r, w, br, bw = await client()
        w.write_eof()
        assert await asyncio.wait_for(br.read(), 5) == b""
        reset(w)
        # the backend reset while its direction was blocked on the client
        r, w, br, bw = await client()
        bw.write(os.urandom(8 << 20))
        await asyncio.sleep(0.2)
        reset(bw)
        await asyncio.sleep(0.3)  # let the floods fill what they can
        with counted_runs(relay) as calls:
            await asyncio.sleep(0.5)
        assert calls[0] < 50, f"run() called {calls[0]} times in 0.5 s with nothing to do"
        assert relay.open_count >= 5 and relay.stats.spliced >= 1
        for w in clients:
            reset(w)
        parked.close()
        await settled(relay, before)


async def test_no_dial_under_way_wakes_the_relay_in_a_loop() -> None:
    """Dials that hang (the backend's accept queue is full): one client waits quietly, one
    sends its request, one sends it and half-closes. Nothing is due, so run() is hardly
    called. The clients then reset: the first two end at once; the half-closed one is not
    watched any more (as with the Python relay, whose transport stops reading at the FIN)
    and ends with its dial, here the shutdown's abort_all(). Nothing is left."""
    async with backend():
        pass  # uvloop's lazily opened fds (libuv's reserve for EMFILE: /dev/null) made now
    with silent_listener() as silent_port:
        before = open_fds()
        async with tcp_proxy(silent_port) as server:
            relay = server.relays[0]
            assert isinstance(relay, NativeTcpListener)
            writers = []
            for how in ("quiet", "talks", "half-closes"):
                _, w = await asyncio.open_connection("127.0.0.1", relay.port)
                writers.append(w)
                if how != "quiet":
                    w.write(b"request")
                if how == "half-closes":
                    w.write_eof()
            await asyncio.sleep(0.2)
            with counted_runs(relay) as calls:
                await asyncio.sleep(0.5)
            assert calls[0] < 50, f"run() called {calls[0]} times in 0.5 s with nothing to do"
            assert relay.open_count == 3
            for w in writers:
                reset(w)
            assert await until(lambda: relay.open_count == 1)
        assert relay.open_count == 0
        assert await fds_back_to(before) == set()


# -- resets at random moments --------------------------------------------------------------------

async def test_clients_resetting_at_random_moments_of_large_transfers(tcp_relay: str) -> None:
    """80 clients echo 64 KiB to 4 MiB each way at once (bulk: spliced); half of them reset
    at a random point. Every other client gets exactly its bytes back; afterwards nothing is
    open and the fds are back."""
    rng = random.Random(23)

    async def one(port: int, leaves: bool) -> bool:
        payload = os.urandom(rng.choice([64 << 10, 300 << 10, 1 << 20, 4 << 20]))
        stop_at = rng.randrange(len(payload))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        got = bytearray()
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 20):
                got += chunk
                if leaves and len(got) >= stop_at:
                    reset(writer)
                    return got == payload[:len(got)]
        except ConnectionError:
            return False
        writer.close()
        return not leaves and sha(bytes(got)) == sha(payload)

    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        before = open_fds()
        leaving = [rng.random() < 0.5 for _ in range(80)]
        results = await asyncio.gather(*(one(relay.port, leaves) for leaves in leaving))
        assert all(results), [i for i, ok in enumerate(results) if not ok]
        await settled(relay, before)


async def test_a_client_that_half_closes_then_resets_resets_a_backend_still_sending(
        tcp_relay: str) -> None:
    """The client half-closes, reads a little of an endless answer, and resets: the reset
    reaches the backend (its write fails) rather than the backend streaming into a
    connection nobody reads. 20 clients, reading different amounts (small: copied; large:
    spliced)."""
    ended: list[BaseException | None] = []

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the client's FIN
        block = os.urandom(1 << 16)
        try:
            while True:
                writer.write(block)
                await writer.drain()
        except ConnectionError as exc:
            ended.append(exc)
        finally:
            writer.close()

    async with backend(endless) as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        before = open_fds()

        async def one(amount: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"request")
            writer.write_eof()
            await asyncio.wait_for(reader.readexactly(amount), 10)
            reset(writer)

        await asyncio.gather(*(one(1 + i * 300_000) for i in range(20)))
        assert await until(lambda: len(ended) == 20, 10), f"{len(ended)} of 20 backends saw the reset"
        await settled(relay, before)


async def test_a_backend_resetting_mid_stream_is_a_reset_at_the_client_never_an_eof(
        tcp_relay: str) -> None:
    """60 backends send a random amount (up to 6 MiB: spliced beyond a few reads) and reset;
    half the clients read slowly, so the reset comes while that direction is blocked. Each
    client reads a prefix of what its backend sent, then a reset: a truncated answer never
    looks complete."""
    rng = random.Random(5)
    streams: dict[int, bytes] = {}

    async def send_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = int.from_bytes(await reader.readexactly(4), "big")
        writer.write(streams[key])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        reset(writer)

    async def one(port: int, key: int, slow: bool) -> str:
        streams[key] = os.urandom(rng.randrange(1, 6 << 20))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(key.to_bytes(4, "big"))
        got = bytearray()
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 16), 20):
                got += chunk
                if slow:
                    await asyncio.sleep(0.002)
        except ConnectionResetError:
            writer.close()
            return "reset" if got == streams[key][:len(got)] else "corrupt"
        writer.close()
        return "eof"

    async with backend(send_then_reset) as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        before = open_fds()
        results = await asyncio.gather(*(one(relay.port, k, k % 2 == 0) for k in range(60)))
        assert results == ["reset"] * 60
        await settled(relay, before)


# -- stalls --------------------------------------------------------------------------------------

async def test_a_backend_that_never_reads_holds_one_connection_not_the_relay(tcp_relay: str) -> None:
    """A client floods a backend that accepts and never reads: that connection stalls (the
    client's writes block), others are served meanwhile; when the backend goes, both ends
    are closed and nothing is left."""
    async with parked_backend() as (bport, parked), tcp_proxy(bport) as server:
        relay = server.relays[0]
        before = open_fds()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        _, stalled = await parked.next()
        writer.transport.set_write_buffer_limits(high=1 << 20)
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < (512 << 20):
                writer.write(os.urandom(1 << 20))
                sent += 1 << 20
                await asyncio.wait_for(writer.drain(), 1)
        assert sent < (512 << 20)  # the relay did not take it all in
        r2, w2 = await asyncio.open_connection("127.0.0.1", relay.port)  # served meanwhile
        br2, bw2 = await parked.next()
        w2.write(b"ping")
        assert await asyncio.wait_for(br2.readexactly(4), 5) == b"ping"
        bw2.write(b"pong")
        assert await asyncio.wait_for(r2.readexactly(4), 5) == b"pong"
        w2.close()
        bw2.close()
        reset(stalled)  # the backend goes (with unread bytes: a reset)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await settled(relay, before)


# -- half-close ----------------------------------------------------------------------------------

async def test_a_fin_during_the_dial_follows_the_early_bytes(tcp_relay: str) -> None:
    """The client sends its request and half-closes while the dial is still under way (the
    backend's accept queue is full, so its SYN waits for a retransmit): once the backend
    answers, it gets every byte, then the FIN, and its reply reaches the client."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    silent.setblocking(False)
    fillers = []
    try:
        for _ in range(2):
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
        await asyncio.sleep(0.1)  # the queue full: the next SYN is dropped
        filler_names = {f.getsockname() for f in fillers}
        async with tcp_proxy(silent.getsockname()[1]) as server:
            relay = server.relays[0]
            request = os.urandom(100_000)
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(request)
            writer.write_eof()
            await asyncio.sleep(0.3)  # the C relay has seen the FIN; the dial still waits
            assert relay.open_count == 1
            loop = asyncio.get_running_loop()
            while True:  # make room: the fillers' and the relay's SYNs come again
                conn, peer = await asyncio.wait_for(loop.sock_accept(silent), 10)
                if peer in filler_names:
                    conn.close()
                    continue
                break
            with conn:
                conn.setblocking(False)
                got = bytearray()
                while chunk := await asyncio.wait_for(loop.sock_recv(conn, 1 << 16), 5):
                    got += chunk
                assert got == request
                await loop.sock_sendall(conn, b"done")
            assert await asyncio.wait_for(reader.read(), 5) == b"done"
            writer.close()
            assert await until(lambda: relay.open_count == 0)
    finally:
        for s in [*fillers, silent]:
            s.close()


# -- floods --------------------------------------------------------------------------------------

async def test_2000_short_connections_as_fast_as_they_come(tcp_relay: str) -> None:
    """2,000 connections, 200 at a time: most echo a few bytes, one in four connects and
    resets at once. Every echo is exact, every connection is counted, nothing is left."""
    rng = random.Random(2000)
    async with backend() as bport, tcp_proxy(bport) as server:
        relay = server.relays[0]
        before = open_fds()
        gate = asyncio.Semaphore(200)
        sent: list[int] = []
        loop = asyncio.get_running_loop()

        async def one(i: int) -> bool:
            async with gate:
                if rng.random() < 0.25:
                    s = socket.socket()
                    s.setblocking(False)
                    await loop.sock_connect(s, ("127.0.0.1", relay.port))
                    linger0(s)
                    s.close()
                    return True
                payload = b"%d:" % i + os.urandom(rng.randrange(1, 2000))
                sent.append(len(payload))
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                writer.write(payload)
                writer.write_eof()
                got = await asyncio.wait_for(reader.read(), 20)
                writer.close()
                return got == payload

        results = await asyncio.gather(*(one(i) for i in range(2000)))
        assert all(results), results.count(False)
        await settled(relay, before)
        stats = relay.stats
        assert stats.accepted == 2000
        assert stats.bytes_from_client == stats.bytes_from_container == sum(sent)
        # every echo's dial observed; a client that resets at once may leave during its own
        assert len(sent) <= sum(stats.dial_bucket_counts) <= 2000 and stats.dial_failures == 0


# -- stopping ------------------------------------------------------------------------------------

async def test_a_publication_that_fails_to_open_leaves_no_fd_behind(tcp_relay: str) -> None:
    """Two mappings, the second port taken: the first relay is stopped again (Publication's
    all-or-nothing open), and all it had open is closed, not only its listening socket (in a
    long-lived engine, each failed registration would otherwise keep fds for good)."""
    base = free_port_block(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        async with backend() as bport:
            before = open_fds()
            with pytest.raises(StartupError):
                async with proxy("-container-ip", "127.0.0.1",
                                 "-p", f"127.0.0.1:{base}-{base + 1}:{bport}-{bport + 1}"):
                    pass
            assert await fds_back_to(before) == set()


# -- limits and shutdown under churn ---------------------------------------------------------------

async def test_dial_timeouts_under_churn(tcp_relay: str) -> None:
    """60 dials that hang (-dial-timeout 300ms): a third of the clients reset at once, a
    third send a request and half-close, a third wait. Every client that stayed is reset by
    the timeout and counted as a dial failure; the ones that left are not; nothing is left."""
    async with backend():
        pass  # uvloop's lazily opened fds made before counting
    with silent_listener() as silent_port:
        before = open_fds()
        async with tcp_proxy(silent_port, "-dial-timeout", "300ms") as server:
            relay = server.relays[0]

            async def one(how: str) -> str:
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
                if how == "leaves":
                    reset(writer)
                    return "left"
                if how == "half-closes":
                    writer.write(b"request")
                    writer.write_eof()
                try:
                    got = await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:
                    got = None
                writer.close()
                return "reset" if got is None else f"read {got!r}"

            kinds = ["leaves", "half-closes", "waits"] * 20
            results = await asyncio.gather(*(one(k) for k in kinds))
            assert set(results[1::3] + results[2::3]) == {"reset"}, results
            assert await until(lambda: relay.open_count == 0)
            assert relay.stats.dial_failures == 40 and relay.stats.active == 0
        assert await fds_back_to(before) == set()


async def test_max_conns_under_churn(tcp_relay: str) -> None:
    """-max-conns 10 with 100 clients at once, each holding its connection a moment: never
    more than 10 open, every client either served or reset, the refusals counted."""
    async with backend() as bport, tcp_proxy(bport, "-max-conns", "10") as server:
        relay = server.relays[0]
        before = open_fds()
        peak = 0

        async def one(i: int) -> bool:
            nonlocal peak
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            except ConnectionError:
                return False
            try:
                writer.write(b"%d" % i)
                got = await asyncio.wait_for(reader.read(8), 5)
                peak = max(peak, relay.open_count)
                await asyncio.sleep(0.05)
                writer.write_eof()
                rest = await asyncio.wait_for(reader.read(), 5)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                return False
            writer.close()
            if not got:
                return False  # refused: closed before its first byte came back
            assert got + rest == b"%d" % i
            return True

        served = await asyncio.gather(*(one(i) for i in range(100)))
        assert served.count(True) >= 10 and peak <= 10
        await settled(relay, before)
        assert relay.stats.rejected_limit == served.count(False)


async def test_a_shutdown_in_the_middle_of_everything_closes_it_all(tcp_relay: str) -> None:
    """The proxy stops (abort_all) while 90 connections are in every state: dialling,
    relaying bulk both ways (spliced), blocked on a slow reader, half-closed. Every client
    sees its connection end, and every fd the proxy had is closed."""
    async with backend():
        pass
    with silent_listener() as silent_port:
        async with backend() as bport:
            before = open_fds()
            clients: list[asyncio.Task[str]] = []
            payload = os.urandom(8 << 20)
            stopped = False  # then the slow readers read what is left at once

            async def one(port: int, how: str) -> str:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if how != "dialling":
                    writer.write(payload)
                if how == "half-closed":
                    writer.write_eof()
                try:
                    while await asyncio.wait_for(reader.read(1 << 16 if how != "slow" else 1024), 10):
                        if how == "slow" and not stopped:
                            await asyncio.sleep(0.01)
                except ConnectionResetError:
                    pass
                writer.close()
                return "ended"

            async with tcp_proxy(bport) as server, tcp_proxy(silent_port) as hanging:
                port, hport = server.relays[0].port, hanging.relays[0].port
                for i in range(30):
                    how = ["bulk", "slow", "half-closed"][i % 3]
                    clients.append(asyncio.create_task(one(port, how)))
                    clients.append(asyncio.create_task(one(hport, "dialling")))
                    clients.append(asyncio.create_task(one(port, "bulk")))
                assert await until(lambda: hanging.relays[0].open_count == 30)
                assert server.relays[0].open_count >= 10  # the slow readers' at least
            stopped = True
            results = await asyncio.wait_for(asyncio.gather(*clients), 15)
            assert results == ["ended"] * 90
            assert await fds_back_to(before) == set()


async def test_a_failed_dial_names_its_client_even_once_the_client_has_gone(
        tcp_relay: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client half-closes during a dial that hangs, then resets (unseen: a half-closed
    client is not watched while the dial is under way). When -dial-timeout ends the dial,
    the warning names the client by the address it came from, as for any other client, not
    "-" (the socket, reset by then, has no peer to ask for)."""
    with silent_listener() as silent_port:
        async with tcp_proxy(silent_port, "-dial-timeout", "300ms") as server:
            relay = server.relays[0]
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            client_port = writer.get_extra_info("sockname")[1]
            writer.write_eof()
            await asyncio.sleep(0.05)
            reset(writer)
            assert await until(lambda: relay.stats.dial_failures == 1)
    [line] = [r.getMessage() for r in caplog.records if "dial" in r.getMessage()]
    assert f"client 127.0.0.1:{client_port}: dial" in line, line


def test_out_of_fds_with_dials_hanging_every_client_still_ends(tmp_path, proxy_loop_env) -> None:  # type: ignore[no-untyped-def]
    """Under `ulimit -n 40`, 60 clients whose dials hang (-dial-timeout 300ms): the accept
    runs out of fds and pauses, while the dials under way time out on the same timer and
    free theirs; the accept then resumes. Every client is reset in the end (none is left
    waiting in the queue), and the process carries on."""
    with silent_listener() as silent_port:
        port = free_port()
        p = Proxy(["-host-ip", "127.0.0.1", "-host-port", str(port), "-container-ip", "127.0.0.1",
                   "-container-port", str(silent_port), "-dial-timeout", "300ms",
                   "-log-file", str(tmp_path / "pyproxy.log")],
                  env={**proxy_loop_env, "PYPROXY_NATIVE": "1"}, preexec=fd_limit(40))
        clients = []
        try:
            for _ in range(60):
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                c.settimeout(15)
                clients.append(c)
            for c in clients:
                with contextlib.suppress(ConnectionResetError):
                    assert c.recv(1) == b""
            assert p.proc.poll() is None
        finally:
            for c in clients:
                c.close()
        out, err = p.stop()
    assert p.proc.returncode == 0 and b"Traceback" not in err
    log = (tmp_path / "pyproxy.log").read_text()
    assert "Too many open files" in log  # the accept did pause
    assert log.count(": dial 127.0.0.1:") == 60  # and every client was dialled, and failed
