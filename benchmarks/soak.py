"""A bounded soak: one pyproxy (TCP and UDP mappings, metrics on) under a mixed load for a
set time, sampling its RSS, open fds, CPU and error counts every second.

    .venv/bin/python benchmarks/soak.py --minutes 10
    .venv/bin/python benchmarks/soak.py --minutes 3 --engine-workers 2

With --engine-workers N the mappings are served by `pyproxy -engine -workers N` instead,
registered by one pyproxy as dockerd's spawns register (it becomes a waiter); what is sampled
is then the engine and its workers together (RSS and fds summed, CPU of the tree), and the
metrics are the engine's, summed over its workers.

The mix, all on loopback: HTTP keep-alive (wrk, 20 connections), new connections (wrk with
`Connection: close`, 5 at a time), UDP request/response from 50 clients, and a bulk TCP
transfer (iperf3) for 5 s of every 30. Writes benchmarks/results/soak-*.json and .png.
A healthy run is flat: RSS and fds level off after warm-up, errors stay at zero.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import children, cpu_seconds
from peers import (
    LOAD_CPU,
    PROXY_CPU,
    PYPROXY,
    REPO,
    free_port,
    http_backend,
    iperf_backend,
    stop,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith(name)).split()[1])


def rss_and_fds(pid: int, tree: bool) -> tuple[float, int]:
    """RSS (MiB) and open fds of pid, or of pid and every descendant (an engine's workers)."""
    rss, fds = 0, 0
    for p in [pid, *(children(pid) if tree else [])]:
        try:
            rss += status_field(p, "VmRSS:")
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            pass  # a worker being restarted
    return rss / 1024, fds


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pyproxy_"):
            name = line.split("{")[0].split(" ")[0]
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


class Load:
    """The mixed load; every worker loops until stop is set and counts its errors."""

    def __init__(self, tcp_port: int, udp_port: int, iperf_port: int) -> None:
        self.tcp_port, self.udp_port, self.iperf_port = tcp_port, udp_port, iperf_port
        self.stop = threading.Event()
        self.errors = {"http": 0, "udp": 0, "bulk": 0}
        self.requests = 0
        self.threads = [threading.Thread(target=t, daemon=True) for t in
                        (self._keepalive, self._new_connections, self._udp, self._bulk)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _wrk(self, extra: list[str], conns: int) -> None:
        out = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", "-d5s", *extra,
                              f"http://127.0.0.1:{self.tcp_port}/"], check=False, capture_output=True, text=True,
                             timeout=60).stdout
        done = re.search(r"(\d+) requests in", out)
        self.requests += int(done[1]) if done else 0
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        self.errors["http"] += (sum(map(int, errors.groups())) if errors else 0) + (int(bad[1]) if bad else 0)

    def _keepalive(self) -> None:
        while not self.stop.is_set():
            self._wrk([], 20)

    def _new_connections(self) -> None:
        while not self.stop.is_set():
            self._wrk(["-H", "Connection: close"], 5)

    def _udp(self) -> None:
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
        for c in clients:
            c.settimeout(1)
        i = 0
        while not self.stop.is_set():
            c = clients[i % len(clients)]
            payload = b"soak %d" % i
            try:
                c.sendto(payload, ("127.0.0.1", self.udp_port))
                while c.recv(100) != payload:
                    pass
            except OSError:
                self.errors["udp"] += 1
            i += 1
            time.sleep(0.002)

    def _bulk(self) -> None:
        while not self.stop.wait(25):
            out = subprocess.run(["taskset", "-c", LOAD_CPU, "iperf3", "-c", "127.0.0.1", "-p",
                                  str(self.iperf_port), "-t", "5", "-J"], check=False, capture_output=True,
                                 text=True, timeout=60).stdout
            if '"error"' in out or not out:
                self.errors["bulk"] += 1


def udp_echo(port: int) -> subprocess.Popen:
    code = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('127.0.0.1', {port}))\nwhile True:\n d, a = s.recvfrom(2048); s.sendto(d, a)")
    return subprocess.Popen(["taskset", "-c", LOAD_CPU, sys.executable, "-c", code])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--engine-workers", type=int, default=0, metavar="N",
                        help="serve through `pyproxy -engine -workers N` (default 0: one "
                        "standalone pyproxy)")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    http_port, iperf_port, udp_backend_port = free_port(), free_port(), free_port()
    backends = [http_backend(http_port), iperf_backend(iperf_port), udp_echo(udp_backend_port)]
    tcp_port, bulk_port, udp_port, metrics = free_port(), free_port(), free_port(), free_port()
    publish = ["-container-ip", "127.0.0.1", "-p", f"127.0.0.1:{tcp_port}:{http_port}",
               "-p", f"127.0.0.1:{bulk_port}:{iperf_port}",
               "-p", f"127.0.0.1:{udp_port}:{udp_backend_port}/udp"]
    waiter = None
    # The checkout's code, not whatever copy is installed beside the console script.
    env = {**os.environ, "PYTHONPATH": REPO}
    if args.engine_workers:
        directory = tempfile.mkdtemp(prefix="pyproxy-soak-")  # 0700: the engine's checks
        path = os.path.join(directory, "engine.sock")
        proxy = subprocess.Popen(
            ["taskset", "-c", PROXY_CPU, PYPROXY, "-engine", "-engine-socket", path,
             "-workers", str(args.engine_workers), "-metrics-addr", f"127.0.0.1:{metrics}"],
            stdout=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        waiter = subprocess.Popen([PYPROXY, *publish], stdout=subprocess.DEVNULL,
                                  env={**env, "PYPROXY_ENGINE_SOCKET": path})
    else:
        proxy = subprocess.Popen(["taskset", "-c", PROXY_CPU, PYPROXY, *publish,
                                  "-metrics-addr", f"127.0.0.1:{metrics}"],
                                 stdout=subprocess.DEVNULL, env={**env, "PYPROXY_ENGINE_SOCKET": ""})
    time.sleep(1.5)
    load = Load(tcp_port, udp_port, bulk_port)
    load.start()
    samples = []
    started = time.monotonic()
    cpu_before = cpu_seconds(proxy.pid)
    try:
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(1.0)
            m = scrape(metrics)
            rss, fds = rss_and_fds(proxy.pid, tree=bool(args.engine_workers))
            samples.append({
                "t": round(time.monotonic() - started, 1),
                "rss_mib": rss,
                "fds": fds,
                "processes": 1 + len(children(proxy.pid)),
                "worker_restarts": m.get("pyproxy_worker_restarts_total", 0),
                "cpu_s": cpu_seconds(proxy.pid) - cpu_before,
                "connections": m.get("pyproxy_connections_accepted_total", 0),
                "dial_failures": m.get("pyproxy_backend_dial_failures_total", 0),
                "udp_dropped": m.get("pyproxy_udp_datagrams_dropped_total", 0),
                "load_errors": sum(load.errors.values()),
            })
            if len(samples) % 30 == 0:
                s = samples[-1]
                print(f"[{s['t']:5.0f}s] rss {s['rss_mib']:.1f} MiB  fds {s['fds']}  cpu {s['cpu_s']:.0f}s  "
                      f"connections {s['connections']:.0f}  errors {s['load_errors']}", flush=True)
    finally:
        load.stop.set()
        time.sleep(6)  # let the workers' last runs end
        if waiter is not None:
            stop(waiter)
        stop(proxy)
        for b in backends:
            stop(b)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = summarize(samples, load)
    summary["engine_workers"] = args.engine_workers
    with open(os.path.join(RESULTS, f"soak-{stamp}.json"), "w") as f:
        json.dump({"summary": summary, "samples": samples}, f, indent=1)
    draw(samples, os.path.join(RESULTS, f"soak-{stamp}.png"))
    print(json.dumps(summary, indent=2))
    print(f"results: benchmarks/results/soak-{stamp}.json and .png")
    return 0


def summarize(samples: list[dict], load: Load) -> dict:  # type: ignore[type-arg]
    warm = [s for s in samples if s["t"] >= 60] or samples
    return {
        "minutes": samples[-1]["t"] / 60 if samples else 0,
        "connections": samples[-1]["connections"] if samples else 0,
        "rss_mib_after_warmup": [round(warm[0]["rss_mib"], 1), round(max(s["rss_mib"] for s in warm), 1),
                                 round(warm[-1]["rss_mib"], 1)],
        "fds_first_last_max": [warm[0]["fds"], warm[-1]["fds"], max(s["fds"] for s in warm)],
        "errors": dict(load.errors),
        "dial_failures": samples[-1]["dial_failures"] if samples else 0,
        "udp_dropped": samples[-1]["udp_dropped"] if samples else 0,
        "processes_min_max": [min(s["processes"] for s in warm), max(s["processes"] for s in warm)],
        "worker_restarts": samples[-1]["worker_restarts"] if samples else 0,
    }


def draw(samples: list[dict], path: str) -> None:  # type: ignore[type-arg]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    cpu = [0.0] + [100 * (b["cpu_s"] - a["cpu_s"]) / (b["t"] - a["t"]) for a, b in itertools.pairwise(samples)]
    rate = [0.0] + [(b["connections"] - a["connections"]) / (b["t"] - a["t"]) for a, b in itertools.pairwise(samples)]
    for ax, values, title in (
        (axes[0][0], [s["rss_mib"] for s in samples], "RSS (MiB)"),
        (axes[0][1], [s["fds"] for s in samples], "open fds"),
        (axes[1][0], cpu, "proxy CPU (% of one core)"),
        (axes[1][1], [s["load_errors"] + s["dial_failures"] for s in samples], "errors (cumulative)"),
    ):
        ax.plot(t, values, lw=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax2 = axes[1][0].twinx()
    ax2.plot(t, rate, lw=0.6, color="#999999")
    ax2.set_ylabel("new connections/s", color="#777777")
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    fig.suptitle("pyproxy soak: HTTP keep-alive + new connections + UDP + periodic bulk")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
