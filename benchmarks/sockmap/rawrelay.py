"""Sockmap relay without transports: `rawrelay.py LISTEN_PORT BACKEND_PORT` (asyncio on uvloop).

relay.py keeps uvloop transports and pauses them, but libuv never epoll_ctl(DEL)s a paused fd
(it waits for an event to come back, which never does: the data is redirected), and since the
psock calls sock_def_readable after every redirect, the loop thread is woken in the kernel for
every segment. Here the sockets never get a transport: accept and connect through
add_reader/add_writer (uv_poll: DEL on stop), then only EPOLLRDHUP|ERR|HUP in a private epoll set.
Half-close: EOF -> wait until the bytes received on that side are written into the peer
(TCP_INFO + SIOCOUTQ) -> shutdown(SHUT_WR). Reset/error -> SO_LINGER 0 + close on the peer.
Data the kernel passes to us (no redirect entry) is copied with send (prototype: blocking-ish).
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import socket
import struct
import sys

import uvloop

import sockmap as sm

LPORT, BPORT = int(sys.argv[1]), int(sys.argv[2])
LINGER0 = struct.pack("ii", 1, 0)
MASK = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
WATCH = select.epoll()
SIDES: dict[int, "Side"] = {}
SH = sm.SockHash()


class Side:
    __slots__ = ("sock", "peer", "eof", "r0", "w0", "fd")

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.peer, self.eof, self.fd = sock, None, False, sock.fileno()
        self.r0 = self.w0 = 0


def close_pair(a: Side, reset: bool = False) -> None:
    for s in (a, a.peer):
        if s is None or s.fd < 0:
            continue
        SIDES.pop(s.fd, None)
        try:
            WATCH.unregister(s.fd)
        except (OSError, ValueError):
            pass
        if reset:
            try:
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            except OSError:
                pass
        s.sock.close()
        s.fd = -1


def drained(x: Side) -> bool:
    y = x.peer
    # tcpi_bytes_received counts the FIN's sequence number too
    return sm.tcp_bytes(x.sock)[0] - x.r0 - x.eof == sm.written(y.sock) - y.w0


def forward_eof(x: Side, tries: int = 0) -> None:
    y = x.peer
    if x.fd < 0 or y.fd < 0:
        return
    if not drained(x):
        if tries < 2000:
            asyncio.get_running_loop().call_later(0.001, forward_eof, x, tries + 1)
            return
        print(f"gave up waiting: received {sm.tcp_bytes(x.sock)[0] - x.r0 - x.eof} written "
              f"{sm.written(y.sock) - y.w0}", file=sys.stderr, flush=True)
    y.sock.shutdown(socket.SHUT_WR)
    if y.eof:
        if os.environ.get("CLOSE_NOW") == "1":
            close_pair(x)
        elif os.environ.get("CLOSE_NOW") == "outq":  # close once both send queues are empty
            close_when_sent(x)
        else:  # both directions done; see REPORT.md on why close() right away truncated data
            asyncio.get_running_loop().call_later(1.0, close_pair, x)


def close_when_sent(x: Side, tries: int = 0) -> None:
    if x.fd < 0 or x.peer.fd < 0:
        return
    if (sm.tcp_bytes(x.sock)[2] or sm.tcp_bytes(x.peer.sock)[2]) and tries < 2000:
        asyncio.get_running_loop().call_later(0.001, close_when_sent, x, tries + 1)
        return
    close_pair(x)


def on_watch() -> None:
    """FIN or RST on a kernel-path socket. Never recv() here: a read on a psock socket can take
    bytes the verdict program has not consumed yet, racing (and reordering against) the kernel's
    own sends. FIN: wait until everything before it was written into the peer, then SHUT_WR."""
    for fd, ev in WATCH.poll(0):
        x = SIDES.get(fd)
        if x is None:
            continue
        err = x.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ev & (select.EPOLLERR | select.EPOLLHUP) else 0
        if err or (ev & select.EPOLLHUP and not ev & select.EPOLLRDHUP):
            close_pair(x, reset=True)  # ECONNRESET & co: pass a reset on
            continue
        x.eof = True
        WATCH.unregister(fd)
        forward_eof(x)


def on_connected(loop: asyncio.AbstractEventLoop, c: socket.socket, b: socket.socket) -> None:
    loop.remove_writer(b.fileno())
    if b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        c.close(); b.close(); return
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    x, y = Side(c), Side(b)
    x.peer, y.peer = y, x
    try:
        SH.pair(c, b)
    except OSError:  # EOPNOTSUPP: a side already got its FIN (not ESTABLISHED): user-space copy
        for s in (x, y):
            loop.add_reader(s.fd, copy_ready, loop, s)
        return
    for s in (x, y):
        s.r0, s.w0 = sm.tcp_bytes(s.sock)[0], sm.written(s.sock)
        SIDES[s.fd] = s
        WATCH.register(s.fd, MASK)
    SH.kick(c, b)


def copy_ready(loop: asyncio.AbstractEventLoop, x: Side) -> None:
    """The user-space fallback (prototype: no write backpressure)."""
    try:
        data = x.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        for s in (x, x.peer):
            loop.remove_reader(s.fd)
        close_pair(x, reset=True)
        return
    if data:
        x.peer.sock.setblocking(True); x.peer.sock.sendall(data); x.peer.sock.setblocking(False)
        return
    loop.remove_reader(x.fd)
    x.eof = True
    if x.peer.eof:
        close_pair(x)
    else:
        x.peer.sock.shutdown(socket.SHUT_WR)


def on_accept(loop: asyncio.AbstractEventLoop, lsock: socket.socket) -> None:
    for _ in range(64):
        try:
            c, _ = lsock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return
            raise
        c.setblocking(False)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        b.setblocking(False)
        err = b.connect_ex(("127.0.0.1", BPORT))
        if err not in (0, errno.EINPROGRESS):
            c.close(); b.close(); continue
        loop.add_writer(b.fileno(), on_connected, loop, c, b)


async def main() -> None:
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", LPORT), backlog=4096, reuse_port=False)
    lsock.setblocking(False)
    loop.add_reader(lsock.fileno(), on_accept, loop, lsock)
    loop.add_reader(WATCH.fileno(), on_watch)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()


if __name__ == "__main__":
    uvloop.run(main())
