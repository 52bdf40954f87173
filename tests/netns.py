"""Test hosts in network namespaces joined by veth pairs, addressed from 198.18.0.0/15.

Every name carries the test process's pid, and everything is deleted on exit, so runs
never collide or leak. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"pp-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


needs_netns = pytest.mark.skipif(not can_make_namespaces(),
                                 reason="needs root and iproute2 to build network namespaces")


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


class Host:
    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = f"pp{os.getpid() % 100000}-{name}"
        sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def run(self, *cmd: str) -> str:
        return sh("ip", "netns", "exec", self.name, *cmd)

    def prefix(self) -> list[str]:
        """A command prefix that runs a program inside this host."""
        return ["ip", "netns", "exec", self.name]


class Lab:
    """Hosts and links; `with Lab() as lab:` removes them all afterwards."""

    def __init__(self) -> None:
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen] = []
        self.links = 0

    def host(self, name: str) -> Host:
        h = Host(self, name)
        self.hosts.append(h)
        return h

    def link(self, a: Host, a_if: str, a_addr: str, b: Host, b_if: str, b_addr: str) -> None:
        """A veth pair between a and b, with an address (CIDR) on each end."""
        self.links += 1  # temporary names, unique per lab, renamed inside the namespaces
        tmp_a, tmp_b = (f"pp{os.getpid() % 100000}l{self.links}{end}" for end in "ab")
        sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        sh("ip", "link", "set", tmp_a, "netns", a.name, "name", a_if)
        sh("ip", "link", "set", tmp_b, "netns", b.name, "name", b_if)
        for host, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            host.ip("addr", "add", addr, "dev", ifname)
            host.ip("link", "set", ifname, "up")

    def spawn(self, host: Host, *cmd: str, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        proc = subprocess.Popen([*host.prefix(), *cmd], **kw)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):  # a PIPE a test asked for
                if stream is not None:
                    stream.close()
        for h in self.hosts:
            subprocess.run(["ip", "netns", "del", h.name], capture_output=True)
