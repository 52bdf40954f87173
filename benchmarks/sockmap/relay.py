"""Minimal TCP relay on asyncio+uvloop: `relay.py MODE LISTEN_PORT BACKEND_PORT`.

MODE copy:    bytes through user space (Protocol -> transport.write), pause/resume backpressure.
MODE sockmap: after accept + dial both sockets go into a SOCKHASH; the kernel redirects data,
              the loop only sees EOF / errors (and any data the kernel passes to us).
Same code otherwise: half-close (EOF -> SHUT_WR after the redirected bytes are written), RST passed
on (SO_LINGER 0), byte counts (TCP_INFO in sockmap mode). SIGUSR1 in sockmap mode moves every open
connection back to user space (FALLBACK=safe: keep the psock, wait for in-flight bytes, then copy;
FALLBACK=naive: just delete the map entries). VERBOSE=1 prints per-connection byte counts on close.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
import sys

import uvloop

import sockmap as sm

MODE = sys.argv[1]
LPORT, BPORT = int(sys.argv[2]), int(sys.argv[3])
VERBOSE = os.environ.get("VERBOSE") == "1"
FALLBACK = os.environ.get("FALLBACK", "safe")
TAG = 1 << 63
LINGER0 = struct.pack("ii", 1, 0)
HIGH = 256 * 1024
SH: sm.SockHash | None = None
# Since "bpf, sockmap: wake up polling after data copy" the psock calls the socket's original
# data_ready after every redirect, so a reader registered for EPOLLIN is woken (to find nothing)
# for every segment the kernel relays. While a pair is on the kernel path its transports are
# paused and its fds sit in this epoll set for EPOLLRDHUP/ERR/HUP only: state changes, no data.
WATCH = select.epoll()
WATCHED: dict[int, "Side"] = {}
WATCH_MASK = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
NO_EPOLLIN = os.environ.get("EPOLLIN_WAKEUPS") != "1"
PAIR_FAILED = 0
CONNS: set[Client] = set()


def wrap(transport: asyncio.BaseTransport) -> socket.socket:
    fd = transport.get_extra_info("socket").fileno()
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.sock: socket.socket | None = None
        self.eof = self.closed = False
        self.copied = 0  # bytes copied by user space from this side
        self.held: list[bytes] = []  # fallback: data read while kernel redirects still in flight
        self.hold = False
        self.r0 = self.w0 = 0  # TCP_INFO baselines at the switch

    # -- data on the user-space path --
    def data_received(self, data: bytes) -> None:
        self.copied += len(data)
        if self.hold:
            self.held.append(data)
            return
        peer = self.peer
        assert peer is not None and peer.transport is not None
        peer.transport.write(data)
        if peer.transport.get_write_buffer_size() > HIGH:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()

    # -- kernel path bookkeeping --
    def drained(self) -> bool:
        """Has every byte received on this side been written into the peer's socket?"""
        peer = self.peer
        if self.sock is None or peer is None or peer.sock is None:
            return True  # (a closed peer: nothing more can be written to it)
        received = sm.tcp_bytes(self.sock)[0] - self.r0 - self.eof  # the FIN counts as one
        pending = peer.transport.get_write_buffer_size() + sum(map(len, self.held))  # type: ignore[union-attr]
        return received == sm.written(peer.sock) - peer.w0 + pending

    def when_drained(self, then, tries: int = 0) -> None:  # type: ignore[no-untyped-def]
        if self.closed:
            return
        if self.drained() or tries > 2000:  # ~2 s at most, then give up waiting
            then()
        else:
            asyncio.get_running_loop().call_later(0.001, self.when_drained, then, tries + 1)

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for data in held:
            self.peer.transport.write(data)  # type: ignore[union-attr]
        if self.eof:
            self._forward_eof()

    def eof_received(self) -> bool:
        self.eof = True
        if self.hold:
            return True  # release() forwards it
        if self.sock is not None:
            self.when_drained(self._forward_eof)
        else:
            self._forward_eof()
        return True

    def _forward_eof(self) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        if peer.eof:
            self.finish()
        else:
            peer.transport.write_eof()

    def finish(self) -> None:
        for side in (self, self.peer):
            if side and side.transport and not side.transport.is_closing():
                if VERBOSE and side.sock is not None:
                    rec = sm.tcp_bytes(side.sock)[0] - side.r0
                    print(f"{type(side).__name__} received {rec} (tcp_info) copied {side.copied}",
                          flush=True)
                elif VERBOSE:
                    print(f"{type(side).__name__} copied {side.copied}", flush=True)
                side.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        unwatch(self)
        if self.sock is not None:
            self.sock.detach()  # never let the wrapper close the transport's (maybe reused) fd
            self.sock = None
        if isinstance(self, Client):
            CONNS.discard(self)
        peer = self.peer
        if peer and peer.transport and not peer.transport.is_closing():
            if exc is not None:  # reset or error: pass a reset on
                try:
                    s = wrap(peer.transport)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                    s.detach()
                except OSError:
                    pass
                peer.transport.abort()
            elif not peer.eof or not self.eof:
                peer.transport.close()


class Backend(Side):
    def __init__(self, client: Client) -> None:
        super().__init__()
        self.peer = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        client = self.peer
        assert isinstance(client, Client)
        if client.closed:
            transport.abort()  # type: ignore[attr-defined]
            return
        client.peer = self
        if MODE == "sockmap":
            assert SH is not None
            self.sock, client.sock = wrap(transport), wrap(client.transport)  # type: ignore[arg-type]
            try:
                SH.pair(client.sock, self.sock)
            except OSError:  # e.g. EOPNOTSUPP: a socket already past ESTABLISHED (FIN received)
                global PAIR_FAILED
                PAIR_FAILED += 1
                for side in (client, self):
                    sm.map_delete(SH.map_fd, sm.cookie(side.sock))  # type: ignore[arg-type]
                    side.sock.detach()  # type: ignore[union-attr]  # the fd belongs to the transport
                    side.sock = None
            for side in (client, self) if self.sock is not None else ():
                side.r0 = sm.tcp_bytes(side.sock)[0]  # type: ignore[arg-type]
                side.w0 = sm.written(side.sock)  # type: ignore[arg-type]
            # client bytes already read by user space count as pending until written below
            client.r0 -= client.copied
            if self.sock is not None and os.environ.get("NOKICK") != "1":
                SH.kick(client.sock, self.sock)  # data that arrived before the insert
        for data in client.early:
            transport.write(data)  # type: ignore[attr-defined]
        client.early = []
        if self.sock is not None and NO_EPOLLIN:
            self.transport.pause_reading()  # type: ignore[union-attr]
            for side in (client, self):
                fd = side.sock.fileno()  # type: ignore[union-attr]
                WATCH.register(fd, WATCH_MASK)
                WATCHED[fd] = side
        else:
            client.transport.resume_reading()  # type: ignore[union-attr]
        if client.eof:
            client.eof_received()


class Client(Side):
    def __init__(self) -> None:
        super().__init__()
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        CONNS.add(self)
        transport.pause_reading()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        loop.create_task(self.dial(loop))

    async def dial(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.create_connection(lambda: Backend(self), "127.0.0.1", BPORT)
        except OSError:
            if self.transport:
                self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
            self.copied += len(data)
            return
        super().data_received(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.eof = True
            return True
        return super().eof_received()


def unwatch(side: Side) -> None:
    if side.sock is not None and WATCHED.get(side.sock.fileno()) is side:
        del WATCHED[side.sock.fileno()]
        try:
            WATCH.unregister(side.sock.fileno())
        except OSError:
            pass


def on_watch() -> None:
    """FIN, RST or error on a kernel-path socket: let its transport read it (EOF / error)."""
    for fd, _ in WATCH.poll(0):
        side = WATCHED.get(fd)
        if side is None:
            continue
        unwatch(side)
        if side.transport is not None and not side.transport.is_closing():
            side.transport.resume_reading()


def fallback_all() -> None:
    """Move every connection back to the user-space path (SIGUSR1)."""
    assert SH is not None
    for client in list(CONNS):
        backend = client.peer
        if backend is None or client.sock is None or backend.sock is None:
            continue
        cc, cb = sm.cookie(client.sock), sm.cookie(backend.sock)
        if FALLBACK == "naive":
            sm.map_delete(SH.map_fd, cc)
            sm.map_delete(SH.map_fd, cb)
            continue
        # keep each psock alive under a second key, then stop the redirects: new data is passed
        # to its own socket (we read it); hold it until the kernel's in-flight bytes are written.
        sm.map_update(SH.keep_fd, cc, client.sock.fileno())
        sm.map_update(SH.keep_fd, cb, backend.sock.fileno())
        for side in (client, backend):
            side.hold = True
            unwatch(side)
            side.transport.resume_reading()  # type: ignore[union-attr]
        sm.map_delete(SH.map_fd, cc)
        sm.map_delete(SH.map_fd, cb)
        for side in (client, backend):
            side.when_drained(side.release)
    print(f"fallback ({FALLBACK}) for {len(CONNS)} connections", flush=True)


async def main() -> None:
    global SH
    loop = asyncio.get_running_loop()
    if MODE == "sockmap":
        SH = sm.SockHash()
        loop.add_signal_handler(signal.SIGUSR1, fallback_all)
        loop.add_reader(WATCH.fileno(), on_watch)
    server = await loop.create_server(Client, "127.0.0.1", LPORT, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    if PAIR_FAILED:
        print(f"pairing failed for {PAIR_FAILED} connections (user-space path)", flush=True)
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
