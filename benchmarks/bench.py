"""pyproxy against docker-proxy, nginx stream, HAProxy, socat and no proxy, in one run.

    sudo benchmarks/setup.sh && .venv/bin/python benchmarks/bench.py

The proxy is pinned to CPU 0, the load generator and the backend to CPU 1. Throughput is
often capped by the load core, so the figure that tells proxies apart is the proxy's CPU
time per unit of work, read from /proc/PID/stat. Prints a table of absolute figures and
ratios to docker-proxy, writes JSON and a PNG chart to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import cpu_seconds, tree_pss_kib  # noqa: E402
from peers import (  # noqa: E402
    LOAD_CPU,
    PEERS,
    Peer,
    free_port,
    http_backend,
    iperf_backend,
    sockperf_backend,
    stop,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_load(cmd: list[str], timeout: float) -> str:
    done = subprocess.run(["taskset", "-c", LOAD_CPU, *cmd], capture_output=True, text=True,
                          timeout=timeout)
    return done.stdout + done.stderr


# -- workloads: each drives load at a port and returns {"rate": .., "units": ..} -------------

def http_keepalive(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["wrk", "-t1", "-c50", f"-d{int(seconds)}s", f"http://127.0.0.1:{port}/"], seconds + 30)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
            "units": float(re.search(r"(\d+) requests in", out)[1])}  # type: ignore[index]


def http_close(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["wrk", "-t1", "-c20", f"-d{int(seconds)}s", "-H", "Connection: close",
                    f"http://127.0.0.1:{port}/"], seconds + 30)
    return {"rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
            "units": float(re.search(r"(\d+) requests in", out)[1])}  # type: ignore[index]


def bulk(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)), "-J"], seconds + 30)
    summary = json.loads(out[out.index("{"):])["end"]["sum_received"]
    return {"rate": summary["bits_per_second"] / 1e9, "units": summary["bytes"] / 1e9}


def udp_pingpong(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)),
                    "-m", "64"], seconds + 30)
    # sockperf reports half the round trip; CPU is read over the whole run, warm-up included
    half_rtt = float(re.search(r"Latency is ([\d.]+) usec", out)[1])  # type: ignore[index]
    received = float(re.search(r"\[Total Run\].*?ReceivedMessages=(\d+)", out)[1])  # type: ignore[index]
    return {"rate": 2 * half_rtt, "units": 2 * received}  # µs round trip; datagrams relayed


WORKLOADS: dict[str, tuple[str, Callable[[int], Any], Callable[[int, float], dict[str, float]], str, str, float]] = {
    # name: (proto, backend, load, rate label, cpu label, cpu scale to µs or s)
    "http-keepalive": ("tcp", http_backend, http_keepalive, "req/s", "µs CPU/req", 1e6),
    "new-connections": ("tcp", http_backend, http_close, "conn/s", "µs CPU/conn", 1e6),
    "bulk-tcp": ("tcp", iperf_backend, bulk, "Gbit/s", "CPU s/GB", 1.0),
    "udp-pingpong": ("udp", sockperf_backend, udp_pingpong, "µs RTT", "µs CPU/dgram", 1e6),
}


def measure_workload(name: str, peers: list[Peer], seconds: float, log: Callable[[str], None]
                     ) -> dict[str, dict[str, float]]:
    proto, make_backend, load, *_ = WORKLOADS[name]
    backend_port = free_port()
    backend = make_backend(backend_port)
    results: dict[str, dict[str, float]] = {}
    try:
        for peer in peers:
            if proto not in peer.protos:
                continue
            port = free_port()
            proxy = peer.start(proto, port, backend_port)
            try:
                load(port if proxy else backend_port, 1)  # warm up: first connections, caches
                before = cpu_seconds(proxy.pid) if proxy else 0.0
                figures = load(port if proxy else backend_port, seconds)
                if proxy:
                    figures["cpu"] = cpu_seconds(proxy.pid) - before
                    figures["cpu_per_unit"] = figures["cpu"] / figures["units"]
                    figures["pss_kib"] = tree_pss_kib(proxy.pid)
                results[peer.name] = figures
                log(f"  {name:16} {peer.name:13} {figures['rate']:10.1f} {WORKLOADS[name][3]}"
                    + (f"   {figures['cpu_per_unit'] * WORKLOADS[name][5]:8.2f} {WORKLOADS[name][4]}"
                       if proxy else ""))
            finally:
                if proxy:
                    stop(proxy)
    finally:
        stop(backend)
    return results


def idle_connection_memory(peers: list[Peer], count: int, log: Callable[[str], None]) -> dict[str, float]:
    """PSS the proxy gains per open idle connection (both its sockets, buffers, objects)."""
    backend_port = free_port()
    backend = http_backend(backend_port)  # holds idle connections
    results = {}
    try:
        for peer in peers:
            if peer.command is None or peer.name == "socat":  # socat: a process per connection
                continue
            port = free_port()
            proxy = peer.start("tcp", port, backend_port)
            assert proxy is not None
            try:
                warm = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
                time.sleep(0.5)
                before = tree_pss_kib(proxy.pid)
                conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
                time.sleep(1.5)
                after = tree_pss_kib(proxy.pid)
                results[peer.name] = (after - before) / count
                log(f"  {'idle-memory':16} {peer.name:13} {results[peer.name]:10.2f} KiB/conn"
                    f"   (PSS {after / 1024:.1f} MiB with {count} open)")
                for c in conns + warm:
                    c.close()
            finally:
                stop(proxy)
    finally:
        stop(backend)
    return results


def metrics_cost(seconds: float, rounds: int, log: Callable[[str], None]) -> dict[str, float]:
    """pyproxy's request rate with -metrics-addr on and off, alternating to cancel drift."""
    from peers import _pyproxy

    backend_port = free_port()
    backend = http_backend(backend_port)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(rounds):
            for mode in ("off", "on"):
                extra = ("-metrics-addr", f"127.0.0.1:{free_port()}") if mode == "on" else ()
                peer = Peer(f"pyproxy metrics {mode}", _pyproxy(*extra), ("tcp",), status_pipe=True)
                port = free_port()
                proxy = peer.start("tcp", port, backend_port)
                try:
                    http_keepalive(port, 1)
                    rates[mode].append(http_keepalive(port, seconds)["rate"])
                finally:
                    stop(proxy)  # type: ignore[arg-type]
    finally:
        stop(backend)
    off, on = sum(rates["off"]) / rounds, sum(rates["on"]) / rounds
    log(f"  {'metrics':16} off {off:.0f} req/s, on {on:.0f} req/s: on/off = {on / off:.3f}")
    return {"off": off, "on": on, "ratio": on / off}


def print_table(results: dict[str, Any], log: Callable[[str], None]) -> None:
    names = [p.name for p in PEERS]
    log("\n" + f"{'workload':30}" + "".join(f"{n:>14}" for n in names))
    for name, (_, _, _, rate_label, cpu_label, scale) in WORKLOADS.items():
        rows = results.get(name, {})
        ref = rows.get("docker-proxy", {})
        for key, label, mult in (("rate", rate_label, 1.0), ("cpu_per_unit", cpu_label, scale)):
            line = f"{name + ' ' + label:30}"
            for n in names:
                v = rows.get(n, {}).get(key)
                line += f"{v * mult:14.2f}" if v is not None else f"{'-':>14}"
            log(line)
            line = f"{'  ratio to docker-proxy':30}"
            for n in names:
                v, r = rows.get(n, {}).get(key), ref.get(key)
                line += f"{v / r:14.2f}" if v is not None and r else f"{'-':>14}"
            log(line)
    if "idle-memory" in results:
        mem = results["idle-memory"]
        line = f"{'idle KiB per connection':30}"
        for n in names:
            line += f"{mem[n]:14.2f}" if n in mem else f"{'-':>14}"
        log(line)
        if mem.get("docker-proxy"):
            log(f"{'  ratio to docker-proxy':30}" + "".join(
                f"{mem[n] / mem['docker-proxy']:14.2f}" if n in mem else f"{'-':>14}" for n in names))
    for key in ("metrics", "spawn", "many-ports"):
        if key in results:
            log(f"{key}: {json.dumps(results[key])}")


def draw_chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, k, f"{WORKLOADS[w][3] if k == 'rate' else WORKLOADS[w][4]}")
              for w in WORKLOADS if w in results for k in ("rate", "cpu_per_unit")]
    if "idle-memory" in results:
        panels.append(("idle-memory", "", "KiB per idle connection"))
    if not panels:
        return
    fig, axes = plt.subplots((len(panels) + 1) // 2, 2, figsize=(12, 3 * ((len(panels) + 1) // 2)))
    for ax, (workload, key, label) in zip(axes.flat, panels):
        rows = results[workload]
        names = [p.name for p in PEERS if p.name in rows and (not key or key in rows[p.name])]
        values = [rows[n][key] * (WORKLOADS[workload][5] if key == "cpu_per_unit" else 1) if key else rows[n]
                  for n in names]
        colors = ["#d62728" if n == "pyproxy" else "#1f77b4" if n == "docker-proxy" else "#999999"
                  for n in names]
        ax.barh(names, values, color=colors)
        better = "higher is better" if key == "rate" and workload != "udp-pingpong" else "lower is better"
        ax.set_title(f"{workload}: {label} ({better})", fontsize=10)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("pyproxy vs docker-proxy and peers (proxy on CPU 0, load and backend on CPU 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5, help="per workload and proxy")
    parser.add_argument("--only", action="append", help="workloads to run (default: all)")
    parser.add_argument("--idle-conns", type=int, default=1000)
    parser.add_argument("--many-ports", type=int, default=100, help="N for the many-ports memory test")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    peers = [p for p in PEERS if p.available()]
    missing = [p.name for p in PEERS if not p.available()]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (run benchmarks/setup.sh)")
    selected = args.only or [*WORKLOADS, "idle-memory", "metrics", "spawn", "many-ports"]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                               "seconds": args.seconds}
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {line}" if line.startswith("  ") else line, flush=True)

    for name in selected:
        log(f"{name} ...")
        if name in WORKLOADS:
            results[name] = measure_workload(name, peers, args.seconds, log)
        elif name == "idle-memory":
            results[name] = idle_connection_memory(peers, args.idle_conns, log)
        elif name == "metrics":
            results[name] = metrics_cost(args.seconds, 3, log)
        elif name in ("spawn", "many-ports"):
            import manyports

            results[name] = (manyports.spawn_latency(20, log) if name == "spawn"
                             else manyports.many_ports(args.many_ports, log))
    print_table(results, print)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(RESULTS, f"bench-{stamp}.json"), "w") as f:
        json.dump(results, f, indent=2)
    try:
        draw_chart(results, os.path.join(RESULTS, f"bench-{stamp}.png"))
        print(f"results: benchmarks/results/bench-{stamp}.json and .png")
    except ImportError:
        print(f"results: benchmarks/results/bench-{stamp}.json (pip install matplotlib for the chart)")
    return 0


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Linux {os.uname().release}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
