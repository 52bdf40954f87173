"""Instructions per new connection, counted by valgrind's callgrind: an A/B that the machine's
noise does not move (no hardware counters on these VMs, so `perf stat` can't count them).

    .venv/bin/python benchmarks/callgrind.py --connections 2000 [--python /work/venv-before/bin/python]

Runs `python -m proxy` (from --cwd, this checkout by default, or the installed package of
--python's venv with --installed) under callgrind, lets it start and warm up, zeroes the
counters, drives --connections `Connection: close`-style exchanges (connect, send a request,
the backend answers and closes, read to EOF) one at a time, dumps, and prints the proxy's
instructions per connection. The backend is nginx (as bench.py's http_backend), outside
valgrind. Counts are of the whole process: interpreter, uvloop, libc; not the kernel.

With --keepalive the exchanges are keep-alive requests instead, all on one connection opened
before the warm-up: instructions per request, the relay's read-and-write path alone.
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
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import free_port, http_backend, stop, wait_listening

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
BODY = b"\r\n\r\nok"  # how the backend's every answer ends (peers.http_backend)


def exchange(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(REQUEST)
        while s.recv(65536):
            pass


def keepalive_exchange(s: socket.socket) -> None:
    s.sendall(KEEPALIVE_REQUEST)
    answer = b""
    while not answer.endswith(BODY):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("the connection closed during a keep-alive request")
        answer += chunk


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
    parser.add_argument("--connections", type=int, default=2000,
                        help="exchanges to count (requests, with --keepalive)")
    parser.add_argument("--keepalive", action="store_true",
                        help="keep-alive requests on one connection, not a connection each")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--cwd", default=REPO, help="the checkout whose proxy/ runs")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--installed", action="store_true",
                        help="run the --python venv's installed package, not --cwd's proxy/")
    parser.add_argument("extra", nargs="*", help="more pyproxy flags (after --)")
    args = parser.parse_args()
    backend_port, port = free_port(), free_port()
    backend = http_backend(backend_port)
    out_dir = tempfile.mkdtemp(prefix="callgrind-")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
           args.python, "-m", "proxy", "-proto", "tcp", "-host-ip", "127.0.0.1",
           "-host-port", str(port), "-container-ip", "127.0.0.1",
           "-container-port", str(backend_port), *args.extra]
    env = {**os.environ, "PYPROXY_ENGINE_SOCKET": "", "PYPROXY_LOOP": args.loop}
    cwd = tempfile.gettempdir() if args.installed else args.cwd
    proxy = subprocess.Popen(cmd, cwd=cwd, env=env, stderr=subprocess.DEVNULL)
    held: socket.socket | None = None
    try:
        wait_listening(port, timeout=120)
        if args.keepalive:
            held = socket.create_connection(("127.0.0.1", port))
        conn = held
        run = (lambda: keepalive_exchange(conn)) if conn else (lambda: exchange(port))
        for _ in range(args.warmup):
            run()
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True, capture_output=True)
        for _ in range(args.connections):
            run()
        time.sleep(0.5)  # the last connection's close callbacks
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], check=True, capture_output=True)
        time.sleep(0.5)
        instructions = totals(out_dir)
    finally:
        if held:
            held.close()
        stop(proxy)
        stop(backend)
    unit = "request" if args.keepalive else "connection"
    print(f"{instructions / args.connections:,.0f} instructions per {unit} "
          f"({args.connections} {unit}s, {args.loop}, {' '.join(args.extra) or 'no flags'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
