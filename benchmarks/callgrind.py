"""Instructions per new connection (keep-alive request, UDP round trip), counted by valgrind's
callgrind: an A/B that the machine's noise does not move (no hardware counters on these VMs,
so `perf stat` can't count them).

    .venv/bin/python benchmarks/callgrind.py --connections 2000 [--python /work/venv-before/bin/python]
    .venv/bin/python benchmarks/callgrind.py --mode keepalive   # or --mode udp, --mode udpburst

Runs `python -m proxy` (from --cwd, this checkout by default, or the installed package of
--python's venv with --installed) under callgrind, lets it start and warm up, zeroes the
counters, drives --connections exchanges one at a time, dumps, and prints the proxy's
instructions per exchange. The exchange is, by --mode:

  close      a `Connection: close` request on a new connection (connect, send a request, the
             backend answers and closes, read to EOF): connection set-up and teardown;
  keepalive  one HTTP/1.1 request and its response over a connection opened during the
             warm-up and kept: the relay's data path, two reads and two writes;
  udp        one 64-byte datagram to the proxy and its echo back, on one flow made during the
             warm-up: the UDP relay's per-datagram path, both ways;
  udpburst   a burst of 32 such datagrams, then their 32 echoes (a flood's shape: the proxy
             reads several per wake-up); the count is per datagram round trip.

The HTTP backend is nginx (as bench.py's http_backend), the UDP one an echo thread in this
process; both outside valgrind. Counts are of the whole process: interpreter, uvloop, libc;
not the kernel.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import free_port, http_backend, stop, wait_listening

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
DATAGRAM = b"x" * 64
BURST = 32  # datagrams per exchange in --mode udpburst: few enough that no queue drops one


def close_exchange(port: int) -> Callable[[], None]:
    def exchange() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(REQUEST)
            while s.recv(65536):
                pass
    return exchange


def keepalive_exchange(port: int) -> Callable[[], None]:
    s = socket.create_connection(("127.0.0.1", port))  # closed with the process

    def exchange() -> None:
        s.sendall(KEEPALIVE_REQUEST)
        response = b""
        while not response.endswith(b"\r\n\r\nok"):  # http_backend's whole answer
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("the backend closed a keep-alive connection")
            response += chunk
    return exchange


def udp_exchange(port: int) -> Callable[[], None]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)

    def exchange() -> None:
        s.send(DATAGRAM)
        s.recv(65536)
    return exchange


def udp_burst_exchange(port: int) -> Callable[[], None]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)

    def exchange() -> None:
        for _ in range(BURST):
            s.send(DATAGRAM)
        for _ in range(BURST):
            s.recv(65536)
    return exchange


def udp_echo_backend(port: int) -> None:
    """Echoes every datagram on 127.0.0.1:`port`, from a daemon thread (not under valgrind)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))

    def serve() -> None:
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(data, peer)
    threading.Thread(target=serve, daemon=True).start()


MODES = {"close": close_exchange, "keepalive": keepalive_exchange, "udp": udp_exchange,
         "udpburst": udp_burst_exchange}
UNITS = {"close": "connection", "keepalive": "keep-alive request", "udp": "UDP round trip",
         "udpburst": "UDP round trip in bursts of 32"}
PER_EXCHANGE = {"udpburst": BURST}  # round trips per exchange, where not one


def totals(out_dir: str) -> int:
    """The instruction count of the dump asked for after the zeroing (callgrind names the
    dumps it is asked for `<out file>.1`, `.2`, ...; the one at exit has no suffix)."""
    total = 0
    for path in glob.glob(os.path.join(out_dir, "callgrind.out.*.*")):
        with open(path) as f:
            match = re.search(r"^(?:totals|summary):\s+(\d+)", f.read(), re.M)
        if match:
            total += int(match[1])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="close", choices=tuple(MODES))
    parser.add_argument("--connections", type=int, default=2000, help="exchanges to count")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--cwd", default=REPO, help="the checkout whose proxy/ runs")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--installed", action="store_true",
                        help="run the --python venv's installed package, not --cwd's proxy/")
    parser.add_argument("extra", nargs="*", help="more pyproxy flags (after --)")
    args = parser.parse_args()
    backend_port, port = free_port(udp_too=True), free_port(udp_too=True)
    proto = "udp" if args.mode.startswith("udp") else "tcp"
    backend = None
    if proto == "udp":
        udp_echo_backend(backend_port)
    else:
        backend = http_backend(backend_port)
    out_dir = tempfile.mkdtemp(prefix="callgrind-")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
           args.python, "-m", "proxy", "-proto", proto, "-host-ip", "127.0.0.1",
           "-host-port", str(port), "-container-ip", "127.0.0.1",
           "-container-port", str(backend_port), *args.extra]
    env = {**os.environ, "PYPROXY_ENGINE_SOCKET": "", "PYPROXY_LOOP": args.loop}
    cwd = tempfile.gettempdir() if args.installed else args.cwd
    proxy = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proto, timeout=600)  # valgrind starts slowly on a busy machine
        exchange = MODES[args.mode](port)
        for _ in range(args.warmup):
            exchange()
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
        for _ in range(args.connections):
            exchange()
        time.sleep(0.5)  # the last connection's close callbacks
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 120  # the dump is written in the background; slow when busy
        while not (instructions := totals(out_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop(proxy)
        if backend is not None:
            stop(backend)
    per = instructions / args.connections / PER_EXCHANGE.get(args.mode, 1)
    print(f"{per:,.0f} instructions per {UNITS[args.mode]} "
          f"({args.connections} of them, {args.loop}, {' '.join(args.extra) or 'no flags'})")
    # Kept for per-function counts: `callgrind_annotate --inclusive=yes DIR/callgrind.out.*.1`
    # (its find_name_in_mro line: CPython's method-cache misses, which move with the build's
    # memory layout; benchmarks/README.md, "Access log", third round).
    print(f"dump: {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
