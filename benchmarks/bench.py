"""pyproxy against docker-proxy, nginx stream, HAProxy, socat and no proxy, in one run.

    sudo benchmarks/setup.sh && .venv/bin/python benchmarks/bench.py
    .venv/bin/python benchmarks/bench.py --seconds 1 --only udp-flood --peers no-proxy,pyproxy

The proxy is pinned to CPU 0, the load generator and the backend to CPU 1. Throughput is
often capped by the load core, so the figure that tells proxies apart is the proxy's CPU
time per unit of work, read from /proc/PID/stat. Latency percentiles (p50, p99) come from the
load tools: wrk --latency for HTTP, sockperf for the UDP round trip. Prints a table of
absolute figures and ratios to docker-proxy, writes JSON and a PNG chart to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import cpu_seconds, tree_pss_kib
from peers import (
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
FLOOD_BITRATE = "100M"  # iperf3 -b: 64-byte payloads at 100 Mbit/s offer ~195,000 datagrams/s
FLOOD_SIZE = 64


def run_load(cmd: list[str], timeout: float) -> str:
    done = subprocess.run(["taskset", "-c", LOAD_CPU, *cmd], check=False, capture_output=True,
                          text=True, timeout=timeout)
    return done.stdout + done.stderr


def found(pattern: str, out: str, flags: int = 0) -> re.Match[str]:
    """pattern in a load tool's output, or an error that shows the output (a failed run)."""
    match = re.search(pattern, out, flags)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in the load's output: {out[-400:]!r}")
    return match


def iperf_json(out: str) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(out[out.index("{"):])
    except ValueError as e:
        raise RuntimeError(f"iperf3 gave no JSON ({e}): {out[-400:]!r}") from None
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return report


# -- workloads: each drives load at a port and returns {"rate": .., "units": ..} and, where the
# -- tool measures it, "p50_us" and "p99_us" -------------------------------------------------

WRK_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def wrk(port: int, seconds: float, *extra: str) -> dict[str, float]:
    out = run_load(["wrk", "-t1", *extra, "--latency", f"-d{int(seconds)}s", f"http://127.0.0.1:{port}/"],
                   seconds + 30)
    figures = {"rate": float(found(r"Requests/sec:\s+([\d.]+)", out)[1]),
               "units": float(found(r"(\d+) requests in", out)[1])}
    for pct in (50, 99):  # from the "Latency Distribution" block, e.g. "     99%    1.50ms"
        value = found(rf"^\s*{pct}%\s+([\d.]+)([a-z]+)\s*$", out, re.MULTILINE)
        figures[f"p{pct}_us"] = float(value[1]) * WRK_UNITS[value[2]]
    return figures


def http_keepalive(port: int, seconds: float) -> dict[str, float]:
    return wrk(port, seconds, "-c50")


def http_close(port: int, seconds: float) -> dict[str, float]:
    # wrk's latency runs from the request's first byte to the response's last; the connect is
    # not in it, but the connection setup shows in the rate and the CPU
    return wrk(port, seconds, "-c20", "-H", "Connection: close")


def bulk(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)), "-J"], seconds + 30)
    summary = iperf_json(out)["end"]["sum_received"]
    return {"rate": summary["bits_per_second"] / 1e9, "units": summary["bytes"] / 1e9}


def udp_pingpong(port: int, seconds: float) -> dict[str, float]:
    out = run_load(["sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(port), "-t", str(int(seconds)),
                    "-m", "64"], seconds + 30)
    # sockperf reports half the round trip (each sample is its round trip halved, percentiles
    # too); CPU is read over the whole run, warm-up included
    half_rtt = float(found(r"Latency is ([\d.]+) usec", out)[1])
    received = float(found(r"\[Total Run\].*?ReceivedMessages=(\d+)", out)[1])
    figures = {"rate": 2 * half_rtt, "units": 2 * received}  # µs round trip; datagrams relayed
    for pct in (50, 99):
        figures[f"p{pct}_us"] = 2 * float(found(rf"percentile {pct:.3f} =\s+([\d.]+)", out)[1])
    return figures


def udp_flood(port: int, seconds: float, bitrate: str = FLOOD_BITRATE) -> dict[str, float]:
    """iperf3 -u at a fixed offered rate: what the proxy delivers, and its CPU per delivered
    datagram. iperf3's control connection is TCP on the same port number as the UDP data."""
    out = run_load(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-l", str(FLOOD_SIZE), "-b", bitrate,
                    "-t", str(int(seconds)), "-J"], seconds + 30)
    end = iperf_json(out)["end"]
    # iperf3 >= 3.11 splits the client's count ("sum_sent") from the server's ("sum_received",
    # where packets - lost_packets arrived); older ones give one "sum" with the server's losses
    sent, received = end.get("sum_sent", end["sum"]), end.get("sum_received", end["sum"])
    delivered = received["packets"] - received["lost_packets"]
    if not sent["packets"] or not delivered:
        raise RuntimeError(f"nothing delivered: {sent['packets']} datagrams sent, {delivered} arrived")
    return {"rate": delivered / received["seconds"], "units": delivered,
            "offered_rate": sent["packets"] / sent["seconds"], "delivered_fraction": delivered / sent["packets"]}


def settle(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """Wait until the proxy has gone idle, so the measured run is charged only its own work.
    After a flood the proxy may still be relaying the last test's queued datagrams (pyproxy's
    frontend queue is 4 MiB deep: thousands of small ones); iperf3's next server would take a
    late one for its handshake, answer the old flow, and the new client would wait forever."""
    deadline, last = time.monotonic() + timeout, -1.0
    while time.monotonic() < deadline:
        used = sum(cpu_seconds(p.pid) for p in procs)
        if used == last:
            return
        last = used
        time.sleep(0.2)


class Workload(NamedTuple):
    proto: str  # as Peer.start_all takes it
    backend: Callable[[int], subprocess.Popen]
    load: Callable[[int, float], dict[str, float]]
    rate_label: str
    cpu_label: str
    cpu_scale: float  # CPU seconds per unit to the label's unit (µs or s)
    latency_label: str = ""  # what p50_us / p99_us measure, if the load reports them
    rate_higher_is_better: bool = True


WORKLOADS: dict[str, Workload] = {
    "http-keepalive": Workload("tcp", http_backend, http_keepalive, "req/s", "µs CPU/req", 1e6, "µs latency"),
    "new-connections": Workload("tcp", http_backend, http_close, "conn/s", "µs CPU/conn", 1e6, "µs latency"),
    "bulk-tcp": Workload("tcp", iperf_backend, bulk, "Gbit/s", "CPU s/GB", 1.0),
    "udp-pingpong": Workload("udp", sockperf_backend, udp_pingpong, "µs RTT", "µs CPU/dgram", 1e6, "µs RTT",
                             rate_higher_is_better=False),
    "udp-flood": Workload("tcp+udp", iperf_backend, udp_flood, "dgram/s delivered", "µs CPU/delivered dgram", 1e6),
}


def measure_workload(name: str, peers: list[Peer], seconds: float, log: Callable[[str], None]
                     ) -> dict[str, dict[str, Any]]:
    """Figures per peer; a peer that fails gets {"error": ...} and the run goes on."""
    work = WORKLOADS[name]
    udp_too = "udp" in work.proto and "tcp" in work.proto  # iperf3 -u: both on one port number
    backend_port = free_port(udp_too)
    backend = work.backend(backend_port)
    results: dict[str, dict[str, Any]] = {}
    try:
        for peer in peers:
            if not peer.serves(work.proto):
                continue
            port = free_port(udp_too)
            procs: list[subprocess.Popen] = []
            try:
                procs = peer.start_all(work.proto, port, backend_port)
                target = port if procs else backend_port
                work.load(target, 1)  # warm up: first connections, caches
                settle(procs)
                # the CPU of every process serving the workload (two for docker-proxy's and
                # pyproxy's iperf3 -u: one TCP, one UDP)
                before = sum(cpu_seconds(p.pid) for p in procs)
                figures: dict[str, Any] = work.load(target, seconds)
                if procs:
                    figures["cpu"] = sum(cpu_seconds(p.pid) for p in procs) - before
                    figures["cpu_per_unit"] = figures["cpu"] / figures["units"]
                    figures["pss_kib"] = sum(tree_pss_kib(p.pid) for p in procs)
                results[peer.name] = figures
                log(f"  {name:16} {peer.name:13} {figures['rate']:10.1f} {work.rate_label}"
                    + (f"   {figures['cpu_per_unit'] * work.cpu_scale:8.2f} {work.cpu_label}" if procs else "")
                    + (f"   p50 {figures['p50_us']:.1f} p99 {figures['p99_us']:.1f} {work.latency_label}"
                       if "p99_us" in figures else "")
                    + (f"   {figures['delivered_fraction']:.1%} of {figures['offered_rate']:.0f}/s delivered"
                       if "delivered_fraction" in figures else ""))
            except (OSError, RuntimeError, subprocess.SubprocessError, KeyError, ValueError) as e:
                results[peer.name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  {name:16} {peer.name:13} FAILED: {results[peer.name]['error']}")
            finally:
                for proc in procs:
                    stop(proc)
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


def side_by_side(name: str, peers: list[Peer], seconds: float, rounds: int,
                 reference: Callable[[str, dict[str, float]], float], log: Callable[[str], None]
                 ) -> dict[str, Any]:
    """CPU per unit of work of `peers` measured at the same time: all of them run at once,
    pinned to the proxy core, each in front of a backend of its own, and each round drives
    the workload at every one of them together (one load process each, on the load core),
    reading each one's CPU from /proc/PID/stat around the round and dividing by its own count
    of work.
    Whatever the host does to the core during a round, it does to all: run one after the
    other a few seconds apart, the same build's CPU per connection moved ±15 % between
    rounds on this shared machine, while side by side the rounds agree to ±2 %.

    Each peer's figure of a round is divided by `reference(peer, figures)`; returned per peer: the ratios
    of every round, their median and quartiles, and the median CPU per unit. Rates and
    latencies mean nothing here (the peers share the cores) and are not reported."""
    from concurrent.futures import ThreadPoolExecutor

    work = WORKLOADS[name]
    backends: list[subprocess.Popen] = []
    procs: dict[str, list[subprocess.Popen]] = {}
    ports: dict[str, int] = {}
    try:
        for each in peers:  # a backend each: iperf3's server runs one test at a time
            backend_port = free_port()
            backends.append(work.backend(backend_port))
            ports[each.name] = free_port()
            procs[each.name] = each.start_all(work.proto, ports[each.name], backend_port)
        everyone = [proc for group in procs.values() for proc in group]
        ratios: dict[str, list[float]] = {peer: [] for peer in procs}
        cpus: dict[str, list[float]] = {peer: [] for peer in procs}
        with ThreadPoolExecutor(len(procs)) as pool:
            for round_ in range(rounds):
                list(pool.map(work.load, ports.values(), [1] * len(ports)))  # warm up
                settle(everyone)
                before = {peer: sum(cpu_seconds(p.pid) for p in group) for peer, group in procs.items()}
                done = dict(zip(procs, pool.map(work.load, ports.values(), [seconds] * len(ports)), strict=True))
                per_unit = {peer: (sum(cpu_seconds(p.pid) for p in group) - before[peer]) / done[peer]["units"]
                            for peer, group in procs.items()}
                for peer, cpu in per_unit.items():
                    cpus[peer].append(cpu)
                    ratios[peer].append(cpu / reference(peer, per_unit))
                log(f"  {name:16} round {round_ + 1}: {work.cpu_label} "
                    + ", ".join(f"{peer} {cpu * work.cpu_scale:.2f} ({ratios[peer][-1]:.3f})"
                                for peer, cpu in per_unit.items()))
    finally:
        for proc in [p for group in procs.values() for p in group] + backends:
            stop(proc)
    results: dict[str, Any] = {}
    for peer, series in ratios.items():
        quartiles = statistics.quantiles(series, n=4) if len(series) > 1 else series * 3
        results[peer] = {"ratios": series, "median": statistics.median(series), "q1": quartiles[0],
                         "q3": quartiles[2], "cpu_per_unit": statistics.median(cpus[peer])}
        log(f"  {name:16} {peer:24} {results[peer]['cpu_per_unit'] * work.cpu_scale:8.2f} {work.cpu_label}, "
            f"ratio median {statistics.median(series):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
            f"{rounds} rounds)")
    return results


SIDE_BY_SIDE = ("new-connections", "http-keepalive", "bulk-tcp")
OPT_IN = ("access-log", "side-by-side")


def peers_side_by_side(peers: list[Peer], seconds: float, rounds: int, log: Callable[[str], None]
                       ) -> dict[str, Any]:
    """Each TCP workload's CPU per unit of every peer, side by side (see side_by_side), over
    docker-proxy's in the same round."""
    serving = [p for p in peers if p.command is not None and p.serves("tcp") and p.name != "socat"]
    if not any(p.name == "docker-proxy" for p in serving):
        raise SystemExit("--only side-by-side: needs docker-proxy among the peers (the reference)")
    return {name: side_by_side(name, serving, seconds, rounds, lambda _, cpu: cpu["docker-proxy"], log)
            for name in SIDE_BY_SIDE}


def _over_off(peer: str, cpu: dict[str, float]) -> float:
    """access_log_cost's reference: the control over the other copy with the log off, the
    logged ones over both."""
    return cpu["off"] if peer == "off again" else (cpu["off"] + cpu["off again"]) / 2


def access_log_cost(seconds: float, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """pyproxy's CPU per unit of work with -access-log on (text and JSON lines) against off
    (issue 16: within 10 %), side by side (see side_by_side): four of the installed pyproxy,
    off, off again (the control: it must come out 1.00, or the places the proxies run in
    are not alike), text and JSON; the control over the first, the logged ones over the mean
    of the two that are off."""
    from peers import _pyproxy

    log_dir = tempfile.mkdtemp(prefix="pyproxy-access-log-")
    files = {"text": os.path.join(log_dir, "text.log"), "json": os.path.join(log_dir, "json.log")}
    variants = {"off": (), "off again": (), "text": ("-access-log", files["text"]),
                "json": ("-access-log", files["json"], "-log-format", "json")}
    peers = [Peer(mode, _pyproxy(*extra), ("tcp",), status_pipe=True) for mode, extra in variants.items()]
    results: dict[str, Any] = {}
    try:
        for name in ("new-connections", "http-keepalive"):
            results[name] = side_by_side(name, peers, seconds, rounds, _over_off, log)
        for mode, path in files.items():  # that the logged ones did log: a line per connection
            with open(path, "rb") as f:
                results[f"{mode}_lines"] = f.read().count(b"\n")
        log(f"  {'access-log':16} lines written: text {results['text_lines']}, json {results['json_lines']}")
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    return results


class Row(NamedTuple):
    """One line of the table (and one panel of the chart): a figure per peer."""

    label: str
    values: dict[str, float]
    ref: float | None  # what the ratios divide by: docker-proxy's figure
    higher_is_better: bool
    chart: bool = True
    chart_values: dict[str, float] | None = None  # bars other than the table's, when not values


def table_rows(results: dict[str, Any]) -> list[Row]:
    rows = []
    for name, work in WORKLOADS.items():
        peers = {n: f for n, f in results.get(name, {}).items() if "error" not in f}
        for key, label, scale, higher in (
            ("rate", work.rate_label, 1.0, work.rate_higher_is_better),
            ("cpu_per_unit", work.cpu_label, work.cpu_scale, False),
            ("p50_us", f"p50 {work.latency_label}", 1.0, False),
            ("p99_us", f"p99 {work.latency_label}", 1.0, False),
            ("delivered_fraction", "% delivered", 100.0, True),
        ):
            values = {n: f[key] * scale for n, f in peers.items() if key in f}
            if values:
                rows.append(Row(f"{name} {label}", values, values.get("docker-proxy"), higher, key != "p50_us"))
    if results.get("idle-memory"):
        mem = results["idle-memory"]
        rows.append(Row("idle KiB per connection", mem, mem.get("docker-proxy"), False))
    # The spawn contract: pyproxy standalone, through the engine (and its native door), against docker-proxy's.
    for key, label in (("spawn", "spawn to 0\\n ms"), ("many-ports", "many ports, total PSS MiB")):
        kinds = results.get(key) or {}
        values = {n: kinds[n] for n in ("docker-proxy", "pyproxy") if n in kinds}
        bars = {bar: kinds[n] for n, bar in (("docker-proxy", "docker-proxy"), ("pyproxy", "pyproxy standalone"),
                                              ("pyproxy engine", "pyproxy engine"),
                                              ("pyproxy door", "pyproxy-door")) if n in kinds}
        if values:  # its chart panel shows the engine's bar too
            rows.append(Row(f"{label}, standalone", values, kinds.get("docker-proxy"), False, chart_values=bars))
        if "pyproxy engine" in kinds:
            rows.append(Row(f"{label}, via engine", {"pyproxy": kinds["pyproxy engine"]}, kinds.get("docker-proxy"),
                            False, chart=not values))
        if "pyproxy door" in kinds:  # spawn only: the same engine, entered by the native door
            rows.append(Row(f"{label}, via pyproxy-door", {"pyproxy": kinds["pyproxy door"]},
                            kinds.get("docker-proxy"), False, chart=False))
    return rows


def print_table(results: dict[str, Any], log: Callable[[str], None]) -> None:
    names = [p.name for p in PEERS]
    log("\n" + f"{'workload':36}" + "".join(f"{n:>14}" for n in names))
    for row in table_rows(results):
        log(f"{row.label:36}" + "".join(f"{row.values[n]:14.2f}" if n in row.values else f"{'-':>14}"
                                         for n in names))
        if row.ref:
            log(f"{'  ratio to docker-proxy':36}" + "".join(
                f"{row.values[n] / row.ref:14.2f}" if n in row.values else f"{'-':>14}" for n in names))
    if "metrics" in results:
        log(f"metrics on/off, keep-alive request rate: {results['metrics']['ratio']:.3f}")
    failed = [f"{w} {n}: {f['error']}" for w in WORKLOADS for n, f in results.get(w, {}).items() if "error" in f]
    for line in failed:
        log(f"FAILED {line}")


def draw_chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [row for row in table_rows(results) if row.chart]  # p50s are in the table only
    if not panels:
        return
    cols = 3
    lines = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(16, 2.6 * lines), squeeze=False)
    for ax, row in zip(axes.flat, panels, strict=False):
        if row.chart_values is not None:
            names = list(row.chart_values)
            values = list(row.chart_values.values())
        else:
            names = [p.name for p in PEERS if p.name in row.values]
            values = [row.values[n] for n in names]
        colors = ["#d62728" if n.startswith("pyproxy") else "#1f77b4" if n == "docker-proxy" else "#999999"
                  for n in names]
        ax.barh(names, values, color=colors)
        title = row.label.removesuffix(", standalone") if row.chart_values is not None else row.label
        ax.set_title(f"{title} ({'higher' if row.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}" if v >= 1000 else f" {v:.3g}", va="center", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("pyproxy vs docker-proxy and peers (proxy on CPU 0, load and backend on CPU 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = [*WORKLOADS, "idle-memory", "metrics", "access-log", "side-by-side", "spawn", "many-ports"]
    parser.add_argument("--seconds", type=int, default=5, help="per workload and proxy")
    parser.add_argument("--only", action="append", default=[],
                        help=f"workloads to run, comma-separated or repeated (default: all but {', '.join(OPT_IN)}): "
                             f"{', '.join(parts)}")
    parser.add_argument("--peers", default="",
                        help=f"peers to run, comma-separated (default: all): {', '.join(p.key() for p in PEERS)}")
    parser.add_argument("--idle-conns", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds of the side-by-side measures (access-log, side-by-side)")
    parser.add_argument("--many-ports", type=int, default=100, help="N for the many-ports memory test")
    parser.add_argument("--flood-bitrate", default=FLOOD_BITRATE,
                        help=f"iperf3 -b for the UDP flood of {FLOOD_SIZE}-byte datagrams (default {FLOOD_BITRATE})")
    args = parser.parse_args()
    # The side-by-side measures only when asked for (--only): their rounds double the run.
    selected = [w for arg in args.only for w in arg.split(",") if w] or [p for p in parts if p not in OPT_IN]
    unknown = [w for w in selected if w not in parts]
    if unknown:
        parser.error(f"--only: no workload {', '.join(unknown)} (one of {', '.join(parts)})")
    wanted = [p for p in args.peers.split(",") if p]
    unknown = [p for p in wanted if p not in {peer.key() for peer in PEERS}]
    if unknown:
        parser.error(f"--peers: no peer {', '.join(unknown)} (one of {', '.join(p.key() for p in PEERS)})")
    if args.seconds < 1:
        parser.error(f"--seconds {args.seconds}: at least 1 (the load tools count whole seconds)")
    if not re.fullmatch(r"\d+(\.\d+)?[KMG]?", args.flood_bitrate):
        parser.error(f"--flood-bitrate {args.flood_bitrate!r}: a rate as iperf3 -b takes it, e.g. 100M")
    WORKLOADS["udp-flood"] = WORKLOADS["udp-flood"]._replace(
        load=functools.partial(udp_flood, bitrate=args.flood_bitrate))
    os.makedirs(RESULTS, exist_ok=True)
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    peers = [p for p in PEERS if p.available() and (not wanted or p.key() in wanted)]
    missing = [p.name for p in PEERS if not p.available()]
    if missing:
        print(f"not installed, skipped: {', '.join(missing)} (run benchmarks/setup.sh)")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                               "seconds": args.seconds, "flood_bitrate": args.flood_bitrate}
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
        elif name == "access-log":
            results[name] = access_log_cost(args.seconds, args.rounds, log)
        elif name == "side-by-side":
            results[name] = peers_side_by_side(peers, args.seconds, args.rounds, log)
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
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Linux {os.uname().release}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
