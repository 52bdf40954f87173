"""SCTP side by side: no proxy, docker-proxy and pyproxy relaying message ping-pong.

On a kernel without SCTP (as on the project's machines) the script runs itself again inside
the test suite's SCTP virtual machine (tests/sctpvm.py: Debian's kernel under qemu's software
emulation, this machine's root filesystem read-only). Emulation makes every absolute figure
slow; the ratios between peers measured in one run are what to read. In the guest the proxy
is pinned to CPU 0, the load and the echo backend to CPU 1.

    .venv/bin/python benchmarks/sctp.py [--seconds 10] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]  # measure and peers; tests.sctpvm

from measure import cpu_seconds  # noqa: E402 (found through sys.path, set just above)
from peers import LOAD_CPU, PEERS, free_port  # noqa: E402

from tests import sctpvm  # noqa: E402

SOL_SCTP, SCTP_RECVRCVINFO, SCTP_SNDINFO = 132, 32, 2
HOST = "127.0.0.1"


def sctp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    s.setsockopt(SOL_SCTP, SCTP_RECVRCVINFO, 1)
    s.setsockopt(SOL_SCTP, 3, 1)  # SCTP_NODELAY: a ping-pong must not wait for bundling
    return s


def echo_backend(port: int) -> None:
    """Echo every message with its stream and PPID, one association at a time (runs forked)."""
    srv = sctp_socket()
    srv.bind((HOST, port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        with conn:
            while True:
                data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64))
                if not data:
                    break
                sid, ppid = struct.unpack_from("H", anc[0][2], 0)[0], struct.unpack_from("I", anc[0][2], 8)[0]
                conn.sendmsg([data], [(SOL_SCTP, SCTP_SNDINFO, struct.pack("HHIIi", sid, 0, ppid, 0, 0))])


def ping_pong(port: int, seconds: float, size: int) -> int:
    """Messages sent and answered in `seconds`, one at a time, rotating over 10 streams."""
    c = sctp_socket()
    c.connect((HOST, port))
    payload, done = b"x" * size, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = struct.pack("HHIIi", done % 10, 0, done, 0, 0)
        c.sendmsg([payload], [(SOL_SCTP, SCTP_SNDINFO, info)])
        data, _, flags, _ = c.recvmsg(65536, socket.CMSG_SPACE(64))
        assert data == payload and flags & socket.MSG_EOR
        done += 1
    c.close()
    return done


def run(seconds: float, size: int) -> None:
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # the load and the backend (forked below)
    backend_port = free_port()
    backend = os.fork()
    if backend == 0:
        echo_backend(backend_port)
        os._exit(0)
    time.sleep(0.3)
    rows = []
    try:
        for peer in PEERS:
            if peer.name not in ("no proxy", "docker-proxy", "pyproxy"):
                continue
            if not peer.available():
                print(f"{peer.name}: not installed (benchmarks/setup.sh)")
                continue
            port = free_port()
            proc = peer.start("sctp", port, backend_port)  # pinned to the proxy's CPU
            before = cpu_seconds(proc.pid) if proc else 0.0
            done = ping_pong(port if proc else backend_port, seconds, size)
            used = cpu_seconds(proc.pid) - before if proc else 0.0
            if proc:
                proc.terminate()
                proc.wait()
            # a relayed ping-pong moves two messages through the proxy per round trip
            cpu = used / (2 * done) * 1e6 if proc else None
            rows.append((peer.name, done / seconds, cpu))
            print(f"{peer.name:13s} {done / seconds:9.0f} round trips/s"
                  + (f"  {cpu:8.1f} µs proxy CPU per message" if cpu else ""), flush=True)
    finally:
        os.kill(backend, 9)
    ref = {name: (rate, cpu) for name, rate, cpu in rows}.get("docker-proxy")
    if ref:
        for name, rate, cpu in rows:
            ratio = f"rate {rate / ref[0]:.2f}×" + (f", CPU per message {cpu / ref[1]:.2f}×" if cpu and ref[1] else "")
            print(f"  {name:13s} vs docker-proxy: {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    args = parser.parse_args()
    if sctpvm.kernel_has_sctp():
        run(args.seconds, args.size)
        return

    why = sctpvm.available()
    if why:
        sys.exit(f"this kernel has no SCTP, and the VM can't run here: {why}")
    print("this kernel has no SCTP: running in the SCTP VM (software emulation) ...", flush=True)
    kernel = sctpvm.Kernel.fetch(os.environ.get("PYPROXY_VM_CACHE", "/var/cache/pyproxy-sctp-vm"))
    result = sctpvm.run(kernel, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                        cwd=REPO, env={}, timeout=600)
    lines = result.console.splitlines()
    print("\n".join(line for line in lines if not line.startswith(("[", sctpvm.EXIT_MARK))))
    if result.exit_code != 0:
        sys.exit(f"the run in the VM failed (exit {result.exit_code})")


if __name__ == "__main__":
    main()
