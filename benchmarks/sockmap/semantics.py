"""Correctness checks for relay.py in copy vs sockmap mode (loopback only, every step bounded)."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

PY = "/work/venv/bin/python"
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Relay:
    def __init__(self, mode: str, env: dict[str, str] | None = None) -> None:
        self.lport, self.bport = free_port(), free_port()
        self.backend = socket.create_server(("127.0.0.1", self.bport))
        cmd = ([PY, os.path.join(HERE, "rawrelay.py")] if mode == "raw" else [PY, os.path.join(HERE, "relay.py"), mode])
        self.proc = subprocess.Popen([*cmd, str(self.lport), str(self.bport)],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        assert self.proc.stdout.readline().strip() == "ready"
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.out.append(line.strip())

    def pair(self) -> tuple[socket.socket, socket.socket]:
        c = socket.create_connection(("127.0.0.1", self.lport))
        self.backend.settimeout(5)
        b, _ = self.backend.accept()
        for s in (c, b):
            s.settimeout(10)
        return c, b

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.backend.close()


def read_all(s: socket.socket, limit: float = 10) -> tuple[bytes, str]:
    chunks, end = [], "eof"
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            d = s.recv(1 << 20)
            if not d:
                break
            chunks.append(d)
        else:
            end = "timeout"
    except socket.timeout:
        end = "timeout"
    except ConnectionResetError:
        end = "reset"
    return b"".join(chunks), end


def t_bidir(r: Relay) -> str:
    c, b = r.pair()
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    res = {}
    def sender(s, data):
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    def reader(s, key):
        res[key] = read_all(s)
    ts = [threading.Thread(target=f, args=a) for f, a in
          ((sender, (c, up)), (sender, (b, down)), (reader, (b, "b")), (reader, (c, "c")))]
    [t.start() for t in ts]; [t.join(20) for t in ts]
    c.close(); b.close()
    ok_up = res["b"][0] == up and res["b"][1] == "eof"
    ok_down = res["c"][0] == down and res["c"][1] == "eof"
    return f"8 MiB each way concurrently: up {'ok' if ok_up else 'BAD'} down {'ok' if ok_down else 'BAD'} ({len(res['b'][0])}/{res['b'][1]}, {len(res['c'][0])}/{res['c'][1]})"


def t_halfclose(r: Relay, client_first: bool) -> str:
    c, b = r.pair()
    first, second = (c, b) if client_first else (b, c)
    first.sendall(b"request" * 1000)
    first.shutdown(socket.SHUT_WR)
    got, end = read_all(second, 3)
    late = os.urandom(1 << 20)
    second.sendall(late)  # the other direction keeps flowing after the FIN
    second.shutdown(socket.SHUT_WR)
    got2, end2 = read_all(first, 5)
    c.close(); b.close()
    who = "client" if client_first else "backend"
    return (f"{who} sends+FIN: peer got {len(got)} B then {end}; reverse 1 MiB after it: "
            f"{'ok' if got2 == late else 'BAD'} ({len(got2)} B, {end2})")


def t_rst(r: Relay, client_first: bool) -> str:
    c, b = r.pair()
    c.sendall(b"x"); b.recv(1); b.sendall(b"y"); c.recv(1)
    first, second = (c, b) if client_first else (b, c)
    first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    first.close()
    _, end = read_all(second, 3)
    second.close()
    return f"{'client' if client_first else 'backend'} RST -> peer sees {end}"


def meminfo() -> dict[str, int]:
    out = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":"); out[k] = int(v.split()[0])
    return out


def tcp_mem_pages() -> int:
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            return int(line.split("mem")[1].split()[0])
    return -1


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return -1


def t_backpressure(r: Relay, cap_mb: int = 512, seconds: float = 4) -> str:
    c, b = r.pair()  # b never reads
    c.setblocking(False)
    m0, t0, rss0 = meminfo(), tcp_mem_pages(), rss_kib(r.proc.pid)
    chunk = b"z" * (1 << 20)
    sent, deadline = 0, time.monotonic() + seconds
    last_progress = time.monotonic()
    while sent < cap_mb << 20 and time.monotonic() < deadline:
        try:
            sent += c.send(chunk); last_progress = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - last_progress > 1.0:
                break  # blocked for a second: backpressure reached the client
            time.sleep(0.005)
    time.sleep(0.3)
    m1, t1, rss1 = meminfo(), tcp_mem_pages(), rss_kib(r.proc.pid)
    slab = (m1["Slab"] - m0["Slab"]) // 1024
    used = ((m0["MemAvailable"] - m1["MemAvailable"])) // 1024
    tcpmem = (t1 - t0) * 4 // 1024
    c.close(); b.close()
    time.sleep(0.3)
    m2 = meminfo()
    back = (m0["MemAvailable"] - m2["MemAvailable"]) // 1024
    return (f"backend never reads: client got {sent >> 20} MiB accepted before blocking (cap {cap_mb}); "
            f"kernel MemAvailable -{used} MiB, Slab +{slab} MiB, sockstat TCP mem +{tcpmem} MiB; relay RSS "
            f"{rss0 // 1024}->{rss1 // 1024} MiB; after close MemAvailable -{back} MiB")


def t_bytes(r: Relay) -> str:
    n0 = len(r.out)
    c, b = r.pair()
    up, down = os.urandom(3_000_001), os.urandom(1_234_567)
    c.sendall(up); c.shutdown(socket.SHUT_WR)
    got, _ = read_all(b)
    b.sendall(down); b.shutdown(socket.SHUT_WR)
    got2, _ = read_all(c)
    c.close(); b.close()
    time.sleep(0.3)
    return f"sent up {len(up)} down {len(down)}; relay reports: " + "; ".join(r.out[n0:])


def pattern(n: int, off: int) -> bytes:
    # 8-byte big-endian counters: any loss, duplicate or reorder shows
    start = off // 8
    return b"".join(struct.pack(">Q", i) for i in range(start, start + n // 8))


def t_fallback(r: Relay, total_mb: int = 64) -> str:
    c, b = r.pair()
    total = total_mb << 20
    res = {}
    def reader():
        res["got"] = read_all(b, 20)
    t = threading.Thread(target=reader); t.start()
    chunk = 1 << 16
    sent = 0
    sig_at = total // 4
    signalled = False
    while sent < total:
        c.sendall(pattern(chunk, sent)); sent += chunk
        if not signalled and sent >= sig_at:
            r.proc.send_signal(signal.SIGUSR1); signalled = True
    c.shutdown(socket.SHUT_WR)
    t.join(25)
    got, end = res.get("got", (b"", "none"))
    c.close(); b.close()
    ok = got == pattern(total, 0)
    bad = ""
    if not ok:
        n = min(len(got), total) // 8 * 8
        exp = pattern(n, 0)
        first = next((i for i in range(0, n, 8) if got[i:i+8] != exp[i:i+8]), n)
        bad = f", first difference at byte {first}"
    return f"stream {total_mb} MiB, SIGUSR1 at {sig_at >> 20} MiB: backend got {len(got)} B ({end}) {'intact' if ok else 'CORRUPT/LOST'}{bad}; relay: {r.out[-1:]}"


def t_early(r: Relay) -> str:
    c = socket.create_connection(("127.0.0.1", r.lport))
    c.sendall(b"GET / HTTP/1.1\r\n\r\n")  # before the relay has dialled: sits in the receive queue
    r.backend.settimeout(5)
    b, _ = r.backend.accept()
    b.settimeout(2)
    try:
        got = b.recv(100)
    except socket.timeout:
        got = b"<nothing within 2 s>"
    c.close(); b.close()
    return f"request sent before the relay dialled: backend got {got!r}"


def main() -> None:
    modes = sys.argv[1:] or ["copy", "sockmap"]
    for mode in modes:
        print(f"== {mode}", flush=True)
        r = Relay(mode, {"VERBOSE": "1"})
        try:
            for name, fn in [("bidir", lambda: t_bidir(r)), ("halfclose-client", lambda: t_halfclose(r, True)),
                             ("halfclose-backend", lambda: t_halfclose(r, False)),
                             ("rst-client", lambda: t_rst(r, True)), ("rst-backend", lambda: t_rst(r, False)),
                             *([] if mode == "raw" else [("bytes", lambda: t_bytes(r))]), ("early", lambda: t_early(r)),
                             ("backpressure", lambda: t_backpressure(r))]:
                try:
                    print(f"  {name}: {fn()}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"  {name}: EXCEPTION {exc!r}", flush=True)
        finally:
            r.stop()
        if mode == "sockmap":
            for env in ({"NOKICK": "1"},):
                r = Relay(mode, env)
                try:
                    print(f"  early {env}: {t_early(r)}", flush=True)
                finally:
                    r.stop()
            for fb in ("safe", "naive"):
                for i in range(3):
                    r = Relay(mode, {"FALLBACK": fb})
                    try:
                        print(f"  fallback {fb} #{i}: {t_fallback(r)}", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        print(f"  fallback {fb}: EXCEPTION {exc!r}", flush=True)
                    finally:
                        r.stop()


if __name__ == "__main__":
    main()
