"""What a benchmark reads from /proc: CPU time and PSS of a process and its descendants."""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Every descendant of pid (nginx's worker, socat's forks, the engine's waiters aside)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found += kids
        frontier += kids
    return found


def cpu_seconds(pid: int) -> float:
    """User + system time of pid and its live descendants, plus what reaped children used."""
    total = 0.0
    for i, p in enumerate([pid, *children(pid)]):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + (cutime + cstime if i == 0 else 0)
    return total / CLOCK_TICKS


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def tree_pss_kib(pid: int) -> int:
    return pss_kib([pid, *children(pid)])
