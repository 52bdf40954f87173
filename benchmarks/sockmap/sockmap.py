"""Sockmap from pure Python: ctypes over bpf(2), no libbpf, no headers, no clang.

A SOCKHASH keyed by u64 socket cookie, and an sk_skb stream-verdict program that
redirects every skb arriving on socket S to the socket stored under key cookie(S),
egress (it is sent out of that socket). If no entry exists the program returns SK_PASS
with no redirect set: the data is queued to S itself and user space reads it as usual
(that is the per-connection fallback).

    map[cookie(client)]  = backend socket   -> client's data goes out to the backend
    map[cookie(backend)] = client socket    -> backend's data goes out to the client

Constants checked against include/uapi/linux/bpf.h (helper ids in __BPF_FUNC_MAPPER).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

NR_BPF = 321  # x86_64
# commands
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
# types
BPF_MAP_TYPE_SOCKMAP, BPF_MAP_TYPE_SOCKHASH = 15, 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_PARSER, BPF_SK_SKB_STREAM_VERDICT = 4, 5
# helpers
FN_get_socket_cookie, FN_sk_redirect_map, FN_sk_redirect_hash = 46, 52, 72
SK_DROP, SK_PASS = 0, 1
BPF_F_INGRESS = 1
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_PSEUDO_MAP_FD = 1

SO_COOKIE = 57
SO_MEMINFO = 55
TCP_INFO = 11
SIOCOUTQ = 0x5411


def _bpf(cmd: int, attr: ctypes.Array) -> int:  # type: ignore[type-arg]
    ret = libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(ret)


def _attr(data: bytes, size: int = 128) -> ctypes.Array:  # type: ignore[type-arg]
    buf = ctypes.create_string_buffer(size)
    ctypes.memmove(buf, data, len(data))
    return buf


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def verdict_program(map_fd: int) -> bytes:
    return b"".join([
        insn(0xBF, dst=6, src=1),                    # r6 = r1 (ctx)
        # if (skb->len == 0) return SK_DROP: a bare FIN skb, redirected, makes the backlog's
        # skb_send_sock() return 0, which the kernel treats as a hard error: EPIPE on the peer.
        insn(0x61, dst=2, src=1, off=0),             # r2 = *(u32 *)(skb + 0)  (__sk_buff.len)
        insn(0x15, dst=2, off=11, imm=0),            # if r2 == 0 goto drop
        insn(0x85, imm=FN_get_socket_cookie),        # r0 = bpf_get_socket_cookie(skb)
        insn(0x7B, dst=10, src=0, off=-8),           # *(u64 *)(r10 - 8) = r0
        insn(0xBF, dst=1, src=6),                    # r1 = ctx
        insn(0x18, dst=2, src=BPF_PSEUDO_MAP_FD, imm=map_fd),  # r2 = map (ld_imm64, 2 slots)
        insn(0x00),
        insn(0xBF, dst=3, src=10),                   # r3 = r10
        insn(0x07, dst=3, imm=-8),                   # r3 += -8  (&key)
        insn(0xB7, dst=4, imm=0),                    # r4 = 0 (egress)
        insn(0x85, imm=FN_sk_redirect_hash),         # bpf_sk_redirect_hash(skb, map, &key, 0)
        insn(0xB7, dst=0, imm=SK_PASS),              # return SK_PASS: redirect if set, else to self
        insn(0x95),
        insn(0xB7, dst=0, imm=SK_DROP),              # drop: return SK_DROP (no data in it)
        insn(0x95),
    ])


def map_create(map_type: int = BPF_MAP_TYPE_SOCKHASH, key_size: int = 8, value_size: int = 8,
               max_entries: int = 65536) -> int:
    return _bpf(BPF_MAP_CREATE, _attr(struct.pack("<5I", map_type, key_size, value_size, max_entries, 0)))


def prog_load(code: bytes, prog_type: int = BPF_PROG_TYPE_SK_SKB) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = _attr(struct.pack("<IIQQIIQII16sII", prog_type, len(code) // 8, ctypes.addressof(insns),
                             ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0,
                             b"pyproxy_redir", 0, 0))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}\nverifier log:\n{log.value.decode()}") from None


def prog_attach(prog_fd: int, map_fd: int, attach_type: int = BPF_SK_SKB_STREAM_VERDICT) -> None:
    _bpf(BPF_PROG_ATTACH, _attr(struct.pack("<5I", map_fd, prog_fd, attach_type, 0, 0)))


def map_update(map_fd: int, key: int, sock_fd: int, flags: int = BPF_ANY) -> None:
    k = ctypes.c_uint64(key)
    v = ctypes.c_uint64(sock_fd)
    _bpf(BPF_MAP_UPDATE_ELEM, _attr(struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k),
                                                ctypes.addressof(v), flags)))


def map_delete(map_fd: int, key: int) -> bool:
    k = ctypes.c_uint64(key)
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _attr(struct.pack("<IIQ", map_fd, 0, ctypes.addressof(k))))
        return True
    except FileNotFoundError:
        return False


def cookie(sock: socket.socket | int) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    s = socket.socket(fileno=os.dup(fd))
    try:
        return struct.unpack("<Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    finally:
        s.close()


def tcp_bytes(sock: socket.socket) -> tuple[int, int, int]:
    """(bytes_received, bytes_acked, bytes still in the send queue) from TCP_INFO + SIOCOUTQ."""
    import fcntl
    info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 232)
    acked, received = struct.unpack_from("<QQ", info, 120)
    outq = struct.unpack("<i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    return received, acked, outq


def written(sock: socket.socket) -> int:
    """Bytes ever written into sock (acked + still queued), whoever wrote them."""
    _, acked, outq = tcp_bytes(sock)
    return acked + outq


class SockHash:
    """One map + one verdict program for the whole process."""

    def __init__(self, max_entries: int = 65536) -> None:
        self.map_fd = map_create(max_entries=max_entries)
        # A second SOCKHASH with no programs: holding a socket there keeps its psock (and the
        # queue of bytes the kernel is still sending out of it) alive after the redirect entry is
        # deleted from map_fd. The same socket can't be linked twice to maps with a verdict
        # program (EBUSY), so this one must stay program-less.
        self.keep_fd = map_create(max_entries=max_entries)
        self.prog_fd = prog_load(verdict_program(self.map_fd))
        prog_attach(self.prog_fd, self.map_fd)

    def pair(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        ca, cb = cookie(a), cookie(b)
        map_update(self.map_fd, ca, b.fileno())
        map_update(self.map_fd, cb, a.fileno())
        return ca, cb

    @staticmethod
    def kick(*socks: socket.socket) -> None:
        """Run data already sitting in the receive queue through the verdict program:
        SO_RCVLOWAT -> tcp_set_rcvlowat -> tcp_data_ready -> sk_data_ready (the psock's)."""
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


if __name__ == "__main__":
    import time
    sh = SockHash()
    print("map fd", sh.map_fd, "prog fd", sh.prog_fd)
    lst = socket.create_server(("127.0.0.1", 0))
    bst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname())
    front, _ = lst.accept()
    back = socket.create_connection(bst.getsockname())
    cont, _ = bst.accept()
    sh.pair(front, back)
    cli.sendall(b"hello backend")
    cont.settimeout(2)
    print("backend got", cont.recv(100))
    cont.sendall(b"hello client")
    cli.settimeout(2)
    print("client got", cli.recv(100))
    print("front tcp", tcp_bytes(front), "back tcp", tcp_bytes(back))
