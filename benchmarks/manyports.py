"""The cost of publishing many ports through dockerd's contract (a process per port that
answers on fd 3): total PSS for N ports, per process kind, and the time from spawn to "0\n".

    .venv/bin/python benchmarks/manyports.py --ports 100 --workers 1,2
    .venv/bin/python benchmarks/manyports.py --ports 1000 --workers 1,2 --kinds docker-proxy,"pyproxy engine"
    .venv/bin/python benchmarks/manyports.py --ports 100 --checkout .   # this checkout's code

Compares docker-proxy, pyproxy standalone (one interpreter per port) and pyproxy through the
engine (one engine, its workers, and a tiny waiter per port), the engine started as a spawn
starts one (its flags, a -log-file) plus `-workers N` for each N of --workers. PSS is summed
over every process involved while all of them are alive, so shared pages are counted once;
each kind of process (engine supervisor, worker, waiter) is also reported on its own, split
into anonymous (the process's own: heap, stack, relocated data) and file-backed (mostly
shared text). PSS is memory, not timing: a loaded machine does not bias it. Spawn times are
reported too, but they are wall times on whatever else the machine is doing.

Ports are spawned --batch at a time (each spawn with its own status pipe, read as they
answer), so 1,000 ports take tens of seconds, not minutes; the open-files limit is raised
to its hard limit first, as the proxies themselves do.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import children
from peers import DOCKER_PROXY, PYPROXY, Scratch, free_port, stop

SPAWN_TIMEOUT = 60.0  # for one batch's "0\n"s: an interpreter per port on a loaded machine
STOP_TIMEOUT = 30.0
SETTLE = 1.0  # after the last "0\n": lazy start-up work (the workers' first reports) is done
KINDS = ("docker-proxy", "pyproxy", "pyproxy engine")  # "pyproxy": standalone
# Spawn times also through pyproxy-door (installed beside pyproxy on x86-64): the native front
# door, registering with the same engine as "pyproxy engine" (its memory is that run's).
DOOR = "pyproxy door"
ENGINE_KINDS = ("pyproxy engine", DOOR)  # the kinds whose spawns register with an engine
# smaps_rollup fields reported per process kind (KiB)
FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Private_Dirty")


def checkout_launcher(checkout: str) -> str:
    """A `pyproxy` script running `checkout`'s proxy/ with this interpreter, as bin/pyproxy
    does once installed (site, then proxy.launch), without installing anything."""
    path = os.path.join(Scratch.dir, "pyproxy")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {os.path.abspath(checkout)!r})\n"
                "from proxy.launch import main\nraise SystemExit(main())\n")
    os.chmod(path, 0o755)
    return path


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def spawn_batch(cmds: Sequence[list[str]], env: dict[str, str]
                ) -> list[tuple[subprocess.Popen, float, bytes]]:
    """Start each command with a status pipe on fd 3, as dockerd does; for each, the process,
    the seconds until it answered, and what it wrote there (b"" if it closed it silently or
    had not answered within SPAWN_TIMEOUT)."""
    started, pending = [], {}
    for cmd in cmds:
        read_end, write_end = os.pipe()
        began = time.monotonic()
        # the benchmark has no threads, and dup2 in the child is how the pipe lands on fd 3
        proc = subprocess.Popen(cmd, pass_fds=(3,), preexec_fn=lambda w=write_end: os.dup2(w, 3),  # noqa: PLW1509
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_end)
        started.append([proc, 0.0, b""])
        pending[read_end] = (len(started) - 1, began)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd in select.select(list(pending), [], [], left)[0]:
            index, began = pending[fd]
            chunk = os.read(fd, 4096)
            started[index][2] += chunk
            if not chunk or started[index][2] == b"0\n":  # else "1\n<why>" until EOF
                started[index][1] = time.monotonic() - began
                os.close(fd)
                del pending[fd]
    for fd in pending:
        os.close(fd)
    return [(proc, elapsed, status) for proc, elapsed, status in started]  # type: ignore[misc]


def rollup(pid: int) -> dict[str, int]:
    fields = dict.fromkeys(FIELDS, 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    fields[name] = int(rest.split()[0])
    except OSError:
        pass
    return fields


def summed(pids: Sequence[int]) -> dict[str, int]:
    total = dict.fromkeys(FIELDS, 0)
    for pid in pids:
        for name, value in rollup(pid).items():
            total[name] += value
    return total


class Run:
    """One kind of proxy publishing `count` ports: spawn, measure, stop."""

    def __init__(self, kind: str, pyproxy: str, workers: int = 0) -> None:
        self.kind, self.pyproxy, self.workers = kind, pyproxy, workers
        self.socket = os.path.join(Scratch.dir, "engine.sock")
        self.engine: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.spawn_ms: list[float] = []

    @property
    def name(self) -> str:
        return f"{self.kind} -workers {self.workers}" if self.workers else self.kind

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYPROXY_ENGINE_SOCKET": self.socket if self.kind in ENGINE_KINDS else ""}

    def command(self, port: int) -> list[str]:
        binary = {"docker-proxy": DOCKER_PROXY, DOOR: door_beside(self.pyproxy)}.get(self.kind, self.pyproxy)
        return [binary, "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(port),
                "-container-ip", "127.0.0.1", "-container-port", "9"]

    def start_engine(self) -> None:
        """As a spawn starts one (proxy.handover.start_engine's flags), plus -workers."""
        log_file = os.path.join(Scratch.dir, f"engine-{self.workers}.log")
        cmd = [self.pyproxy, "-engine", "-engine-socket", self.socket, "-engine-idle-exit", "30s",
               "-log-file", log_file, *(["-workers", str(self.workers)] if self.workers else [])]
        [(proc, _, status)] = spawn_batch([cmd], dict(os.environ))
        if status != b"0\n":
            stop(proc)
            raise RuntimeError(f"the engine did not start: {status!r}")
        self.engine = proc

    def spawn(self, count: int, batch: int) -> None:
        if self.kind in ENGINE_KINDS:  # the door's run too: an engine of its own
            self.start_engine()
        used: set[int] = set()
        while len(self.procs) < count:
            ports = []
            while len(ports) < min(batch, count - len(self.procs)):
                port = free_port()
                if port not in used:
                    used.add(port)
                    ports.append(port)
            for proc, elapsed, status in spawn_batch([self.command(p) for p in ports], self.env()):
                if b"address already in use" in status:  # taken since free_port saw it free
                    proc.wait(timeout=STOP_TIMEOUT)
                    continue
                self.procs.append(proc)
                if status != b"0\n":
                    raise RuntimeError(f"{self.name}: a spawn answered {status!r}")
                self.spawn_ms.append(elapsed * 1000)

    def kinds(self) -> dict[str, list[int]]:
        """Process kind -> pids: the supervisor, its workers, the waiters (or the proxies)."""
        spawned = [p.pid for p in self.procs]
        if self.engine is None:
            return {self.kind: spawned}
        workers = children(self.engine.pid)
        return {"supervisor": [self.engine.pid], **({"workers": workers} if workers else {}),
                "waiters": spawned}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self.engine is not None:
            stop(self.engine)
            self.engine = None


def measure(count: int, runs: Sequence[Run], batch: int,
            log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each run's total PSS (MiB), per-kind breakdown and spawn times, and its ratio to
    docker-proxy's total when that was among the runs."""
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        try:
            run.spawn(count, batch)
            time.sleep(SETTLE)
            kinds = {kind: (len(pids), summed(pids)) for kind, pids in run.kinds().items()}
        finally:
            run.stop()
        total = sum(fields["Pss"] for _, fields in kinds.values()) / 1024
        results[run.name] = {"ports": count, "pss_mib": total, "kinds": kinds,
                             "spawn_ms_median": statistics.median(run.spawn_ms),
                             "spawn_ms_max": max(run.spawn_ms)}
        log(f"  {run.name:26} {total:8.1f} MiB PSS for {count} ports "
            f"({total * 1024 / count:.0f} KiB per port); spawn to 0 median "
            f"{statistics.median(run.spawn_ms):.1f} ms, max {max(run.spawn_ms):.0f} ms")
        for kind, (n, fields) in kinds.items():
            each = ", ".join(f"{name} {value / n:.0f}" for name, value in fields.items())
            log(f"  {'':26}   {kind:10} x{n:<5} {fields['Pss'] / 1024:8.1f} MiB; KiB each: {each}")
    base = results.get("docker-proxy")
    if base is not None:
        for name, result in results.items():
            result["vs_docker_proxy"] = result["pss_mib"] / base["pss_mib"]
            if name != "docker-proxy":
                log(f"  {name:26} {result['vs_docker_proxy']:.2f}x docker-proxy's PSS")
    return results


def many_ports(count: int, log: Callable[[str], None]) -> dict[str, float]:
    """bench.py's many-ports figures: total PSS (MiB) per kind, the engine with its default workers."""
    results = measure(count, [Run(kind, PYPROXY) for kind in KINDS], 20, log)
    return {name: result["pss_mib"] for name, result in results.items()}


def door_beside(pyproxy: str) -> str:
    return os.path.join(os.path.dirname(pyproxy), "pyproxy-door")


def spawn_latency(runs: int, log: Callable[[str], None], pyproxy: str = PYPROXY) -> dict[str, float]:
    """Median spawn-to-"0\\n" of one port at a time (the engine with its default workers), and
    through pyproxy-door where it is installed. The kinds take turns spawn by spawn (the
    engine started first), so a minute in which the shared host is slow slows them all: one
    kind after the other, wall times moved up to 2× between minutes here."""
    results: dict[str, float] = {}
    door = os.access(door_beside(pyproxy), os.X_OK)
    kinds = [Run(kind, pyproxy) for kind in (*KINDS, *([DOOR] if door else []))]
    times: dict[str, list[float]] = {run.kind: [] for run in kinds}
    try:
        for run in kinds:
            if run.kind == "pyproxy engine":
                run.start_engine()
        for _ in range(runs):
            for run in kinds:
                [(proc, elapsed, status)] = spawn_batch([run.command(free_port())], run.env())
                assert status == b"0\n", (run.kind, status)
                times[run.kind].append(elapsed * 1000)
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=5)
    finally:
        for run in kinds:
            run.stop()
    for run in kinds:
        results[run.kind] = statistics.median(times[run.kind])
        log(f"  {'spawn to ready':16} {run.kind:15} {results[run.kind]:8.1f} ms (median of {runs}, "
            f"fastest {min(times[run.kind]):.1f})")
    if results.get("docker-proxy"):
        results["engine_vs_docker_proxy"] = results["pyproxy engine"] / results["docker-proxy"]
        if door:
            results["door_vs_docker_proxy"] = results[DOOR] / results["docker-proxy"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--workers", default="0",
                        help="comma-separated -workers values, a run of the engine each; 0: its default")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, any of: {','.join((*KINDS, DOOR))} (pyproxy: standalone; "
                             f"{DOOR}: spawned through pyproxy-door, beside --pyproxy)")
    parser.add_argument("--batch", type=int, default=20, help="spawns in flight at once")
    parser.add_argument("--runs", type=int, default=20, help="spawns timed one by one; 0: none")
    parser.add_argument("--pyproxy", default=PYPROXY, help="the pyproxy command measured")
    parser.add_argument("--checkout", help="measure this checkout's proxy/ instead of --pyproxy")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= {*KINDS, DOOR}:
        parser.error(f"--kinds: not among {','.join((*KINDS, DOOR))}: {args.kinds}")
    raise_nofile_limit()
    pyproxy = checkout_launcher(args.checkout) if args.checkout else args.pyproxy
    runs = [Run(kind, pyproxy) for kind in kinds if kind not in ENGINE_KINDS]
    for kind in ENGINE_KINDS:
        if kind in kinds:
            runs += [Run(kind, pyproxy, int(w)) for w in args.workers.split(",")]
    measure(args.ports, runs, args.batch, print)
    if args.runs:
        spawn_latency(args.runs, print, pyproxy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
