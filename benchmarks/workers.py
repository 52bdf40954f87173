"""The engine with -workers N under the new-connection load: CPU per connection (every engine
process: supervisor and workers) and each worker's share of the accepts, for N = 1, 2, ...

    .venv/bin/python benchmarks/workers.py --workers 1,2 --seconds 5 --runs 3

One mapping is registered the way dockerd does it (a pyproxy spawned with a status pipe on
fd 3, pointed at this engine by PYPROXY_ENGINE_SOCKET); wrk drives `Connection: close`
requests through it to nginx (bench.py's http_backend). Nothing is pinned: with N workers on
this 2-core machine the load, the backend and the workers share the cores, so the figure to
read is CPU per connection and the accept split, not the rate. Runs alternate the N values so
that the machine's drift falls on each alike.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import cpu_seconds
from peers import PYPROXY, free_port, http_backend, stop, wait_listening


def register(engine_socket: str, port: int, backend: int) -> subprocess.Popen:
    """A spawn as dockerd makes it; returns once it answered "0" (it stays, as a waiter)."""
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYPROXY_ENGINE_SOCKET=engine_socket)
    cmd = [PYPROXY, "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(port),
           "-container-ip", "127.0.0.1", "-container-port", str(backend)]
    # no threads here: dup2 in the child is how the pipe lands on fd 3, as dockerd's does
    proc = subprocess.Popen(cmd, pass_fds=(3,), preexec_fn=lambda: os.dup2(write_end, 3),  # noqa: PLW1509
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    select.select([read_end], [], [], 30)
    status = os.read(read_end, 4096)
    os.close(read_end)
    if status != b"0\n":
        raise RuntimeError(f"spawn answered {status!r}")
    return proc


def accepts(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^pyproxy_worker_connections_accepted_total\{worker="(\d+)"\} ([\d.e+]+)$', text, re.M)}


def run(workers: int, seconds: float, backend: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="pyproxy-workers-") as scratch:
        path = os.path.join(scratch, "engine.sock")
        metrics_port = free_port()
        engine = subprocess.Popen([PYPROXY, "-engine", "-engine-socket", path, "-workers", str(workers),
                                   "-metrics-addr", f"127.0.0.1:{metrics_port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                if time.monotonic() > deadline or engine.poll() is not None:
                    raise RuntimeError("the engine did not start")
                time.sleep(0.05)
            port = free_port()
            waiter = register(path, port, backend)
            wait_listening(port)
            time.sleep(1.5)  # the workers' first reports
            before_cpu, before = cpu_seconds(engine.pid), accepts(metrics_port)
            out = subprocess.run(["wrk", "-t1", "-c20", "-H", "Connection: close", f"-d{int(seconds)}s",
                                  f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                                 timeout=seconds + 30).stdout
            cpu = cpu_seconds(engine.pid) - before_cpu
            time.sleep(1.5)  # the workers' last reports
            after = accepts(metrics_port)
            done = float(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
            stop(waiter)
        finally:
            stop(engine)
    counts = {w: after.get(w, 0.0) - before.get(w, 0.0) for w in after}
    total = sum(counts.values()) or 1.0
    figures = {"connections": done, "cpu_us_per_conn": cpu / done * 1e6}
    figures.update({f"share_worker_{w}": counts[w] / total for w in sorted(counts)})
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    backend_port = free_port()
    backend = http_backend(backend_port)
    wait_listening(backend_port)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    try:
        for i in range(args.runs):
            for n in (counts if i % 2 == 0 else counts[::-1]):
                figures = run(n, args.seconds, backend_port)
                results[n].append(figures)
                print(f"-workers {n}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)
    finally:
        stop(backend)
    for n in counts:
        cpu = [r["cpu_us_per_conn"] for r in results[n]]
        print(f"-workers {n}: CPU per connection median {statistics.median(cpu):.1f} µs "
              f"(runs {', '.join(f'{c:.1f}' for c in cpu)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
