"""The cost of publishing many ports through dockerd's contract (a process per port that
answers on fd 3): total PSS for N ports, and the time from spawn to "0\n".

    .venv/bin/python benchmarks/manyports.py --ports 100

Compares docker-proxy, pyproxy standalone (one interpreter per port) and pyproxy through the
engine (one engine plus a tiny waiter per port). PSS is summed over every process involved,
engine included, while all of them are alive, so shared pages are counted once.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import pss_kib
from peers import DOCKER_PROXY, PYPROXY, Scratch, free_port, stop


def spawn(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, float, bytes]:
    """Start cmd with a status pipe on fd 3, as dockerd does; seconds until it answered."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    # the benchmark has no threads, and dup2 in the child is how the pipe lands on fd 3
    proc = subprocess.Popen(cmd, pass_fds=(3,), preexec_fn=lambda: os.dup2(write_end, 3), env=env,  # noqa: PLW1509
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    select.select([read_end], [], [], 20)
    status = os.read(read_end, 4096)
    elapsed = time.monotonic() - started
    os.close(read_end)
    return proc, elapsed, status


def command(kind: str, port: int, backend: int) -> list[str]:
    binary = DOCKER_PROXY if kind == "docker-proxy" else PYPROXY
    return [binary, "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(port),
            "-container-ip", "127.0.0.1", "-container-port", str(backend)]


class Variants:
    """docker-proxy, pyproxy standalone, and pyproxy with an engine running."""

    def __init__(self) -> None:
        self.engine: subprocess.Popen | None = None
        self.socket = os.path.join(Scratch.dir, "engine.sock")

    def env(self, kind: str) -> dict[str, str]:
        return {**os.environ, "PYPROXY_ENGINE_SOCKET": self.socket if kind == "pyproxy engine" else ""}

    def start_engine(self) -> subprocess.Popen:
        proc, _, status = spawn([PYPROXY, "-engine", "-engine-socket", self.socket], dict(os.environ))
        assert status == b"0\n", status
        self.engine = proc
        return proc

    def stop_engine(self) -> None:
        if self.engine is not None:
            stop(self.engine)
            self.engine = None


KINDS = ["docker-proxy", "pyproxy", "pyproxy engine"]


def spawn_latency(runs: int, log: Callable[[str], None]) -> dict[str, float]:
    variants, results = Variants(), {}
    for kind in KINDS:
        if kind == "pyproxy engine":
            variants.start_engine()
        times = []
        for _ in range(runs):
            proc, elapsed, status = spawn(command(kind, free_port(), 9), variants.env(kind))
            assert status == b"0\n", (kind, status)
            times.append(elapsed * 1000)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=5)
        results[kind] = statistics.median(times)
        log(f"  {'spawn to ready':16} {kind:15} {results[kind]:8.1f} ms (median of {runs})")
    variants.stop_engine()
    if results.get("docker-proxy"):
        results["engine_vs_docker_proxy"] = results["pyproxy engine"] / results["docker-proxy"]
    return results


def many_ports(count: int, log: Callable[[str], None]) -> dict[str, float]:
    variants, results = Variants(), {}
    for kind in KINDS:
        pids: list[int] = []
        if kind == "pyproxy engine":
            pids.append(variants.start_engine().pid)
        procs = []
        for _ in range(count):
            proc, _, status = spawn(command(kind, free_port(), 9), variants.env(kind))
            assert status == b"0\n", (kind, status)
            procs.append(proc)
        time.sleep(1.0)
        total = pss_kib(pids + [p.pid for p in procs]) / 1024
        results[kind] = total
        log(f"  {'many-ports':16} {kind:15} {total:8.1f} MiB PSS for {count} ports "
            f"({total * 1024 / count:.0f} KiB per port)")
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(timeout=10)
        variants.stop_engine()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    many_ports(args.ports, print)
    spawn_latency(args.runs, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
