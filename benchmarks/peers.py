"""The proxies compared, and the backends they front, each started pinned to its core.

A Peer starts its proxy process(es) for (proto, listen port, backend port). Config files for
nginx and HAProxy go into a scratch directory; every process is stopped by its pid.

Protocols a command understands: "tcp", "udp" (datagrams answered one by one, as DNS or
sockperf's ping-pong), "sctp", and two for iperf3 -u, whose UDP test needs its TCP control
connection on the same port number: "tcp+udp" (one process serving both, as nginx's stream
module can) and "udp-flow" (one long UDP flow, for a peer whose plain "udp" mode would not
keep one: socat forks a child per datagram there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from measure import children

PROXY_CPU = "0"  # the proxy under test
LOAD_CPU = "1"  # load generator and backend
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROXY = os.path.join(os.path.dirname(sys.executable), "pyproxy")
DOCKER_PROXY = "/usr/sbin/docker-proxy"


def pinned(cpu: str, cmd: list[str], **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=kw.pop("stdout", subprocess.DEVNULL),
                            stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)


def wait_listening(port: int, proto: str = "tcp", timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/net/{proto}") as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and (proto == "udp" or fields[3] == "0A"):
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {proto} port {port}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM proc, then its descendants: socat's children for UDP flows never end by themselves."""
    if proc.poll() is not None:
        return
    kids = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class Scratch:
    dir = tempfile.mkdtemp(prefix="pyproxy-bench-")

    @classmethod
    def file(cls, name: str, text: str) -> str:
        path = os.path.join(cls.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path


def _nginx_stream(proto: str, port: int, backend: int) -> list[str]:
    listen = {"tcp": f"listen 127.0.0.1:{port};", "udp": f"listen 127.0.0.1:{port} udp;",
              # proxy_pass follows each session's protocol. No proxy_responses here: with it,
              # nginx ends the UDP session after the backend's first answer (iperf3's handshake)
              # and the flood's next datagrams would come from a new source port, which
              # iperf3's connected server socket drops.
              "tcp+udp": f"listen 127.0.0.1:{port}; listen 127.0.0.1:{port} udp;"}[proto]
    extra = "proxy_responses 1; proxy_timeout 5s;" if proto == "udp" else ""
    conf = Scratch.file(f"nginx-stream-{port}.conf", f"""
worker_processes 1; daemon off; pid {Scratch.dir}/nginx-{port}.pid; error_log /dev/null crit;
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
events {{ worker_connections 20000; }}
worker_rlimit_nofile 40000;
stream {{ server {{ {listen} proxy_pass 127.0.0.1:{backend}; {extra} }} }}
""")
    return ["nginx", "-c", conf, "-p", Scratch.dir]


def _haproxy(proto: str, port: int, backend: int) -> list[str]:
    conf = Scratch.file(f"haproxy-{port}.cfg", f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen p
  bind 127.0.0.1:{port}
  server b 127.0.0.1:{backend}
""")
    return ["haproxy", "-db", "-f", conf]


def _socat(proto: str, port: int, backend: int) -> list[str]:
    if proto == "udp":
        return ["socat", f"UDP4-RECVFROM:{port},bind=127.0.0.1,fork,reuseaddr", f"UDP4-SENDTO:127.0.0.1:{backend}"]
    if proto == "udp-flow":  # a child per client address, connected to it, for the flow's life
        return ["socat", f"UDP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr", f"UDP4:127.0.0.1:{backend}"]
    return ["socat", f"TCP4-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
            f"TCP4:127.0.0.1:{backend}"]


def _docker_proxy(proto: str, port: int, backend: int) -> list[str]:
    return [DOCKER_PROXY, "-proto", proto, "-host-ip", "127.0.0.1", "-host-port", str(port),
            "-container-ip", "127.0.0.1", "-container-port", str(backend)]


def _pyproxy(*extra: str, binary: str = PYPROXY) -> Callable[[str, int, int], list[str]]:
    def command(proto: str, port: int, backend: int) -> list[str]:
        return [binary, "-proto", proto, "-host-ip", "127.0.0.1", "-host-port", str(port),
                "-container-ip", "127.0.0.1", "-container-port", str(backend), *extra]

    return command


class Peer:
    def __init__(self, name: str, command: Callable[[str, int, int], list[str]] | None,
                 protos: tuple[str, ...], needs: str | None = None, status_pipe: bool = False) -> None:
        self.name, self.command, self.protos, self.needs = name, command, protos, needs
        # Started as dockerd starts it, with a status pipe on fd 3. docker-proxy needs one:
        # without it, its os.NewFile(3).Close() closes its own listening socket.
        self.status_pipe = status_pipe

    def available(self) -> bool:
        return self.needs is None or bool(shutil.which(self.needs) or os.path.exists(self.needs))

    def start(self, proto: str, port: int, backend: int) -> subprocess.Popen | None:
        """The proxy process (None for "no proxy": the load goes straight to the backend)."""
        return None if self.command is None else self._spawn(proto, port, backend)

    def _spawn(self, proto: str, port: int, backend: int) -> subprocess.Popen:
        assert self.command is not None
        env = {**os.environ, "PYPROXY_ENGINE_SOCKET": ""}
        if not self.status_pipe:
            proc = pinned(PROXY_CPU, self.command(proto, port, backend), env=env)
            for kind in proto.removesuffix("-flow").split("+"):
                wait_listening(port, kind)
            return proc
        read_end, write_end = os.pipe()
        proc = pinned(PROXY_CPU, self.command(proto, port, backend), env=env, pass_fds=(3,),
                      preexec_fn=lambda: os.dup2(write_end, 3))
        os.close(write_end)
        status = os.read(read_end, 4096)
        os.close(read_end)
        if status != b"0\n":
            raise RuntimeError(f"{self.name} did not start: {status!r}")
        return proc

    def serves(self, proto: str) -> bool:
        return proto in self.protos or (proto == "tcp+udp" and {"tcp", "udp"} <= set(self.protos))

    def start_all(self, proto: str, port: int, backend: int) -> list[subprocess.Popen]:
        """Every process serving proto on port: two for "tcp+udp" when one can't serve both
        (docker-proxy and pyproxy standalone are one protocol per process, as dockerd runs them)."""
        if self.command is None:
            return []
        if proto != "tcp+udp" or proto in self.protos:
            return [self._spawn(proto, port, backend)]
        procs = [self._spawn("tcp", port, backend)]
        try:
            procs.append(self._spawn("udp-flow" if "udp-flow" in self.protos else "udp", port, backend))
        except BaseException:
            stop(procs[0])
            raise
        return procs

    def key(self) -> str:
        """The name as --peers takes it: "no proxy" is no-proxy."""
        return self.name.replace(" ", "-")


PEERS = [
    Peer("no proxy", None, ("tcp", "udp")),
    Peer("docker-proxy", _docker_proxy, ("tcp", "udp"), DOCKER_PROXY, status_pipe=True),
    Peer("pyproxy", _pyproxy(), ("tcp", "udp"), PYPROXY, status_pipe=True),
    # A/B of a change in one run: PYPROXY_BASELINE=/path/to/other/venv/bin/pyproxy adds it
    # as a peer of its own ("pyproxy-baseline"), e.g. the commit before the change.
    *([Peer("pyproxy-baseline", _pyproxy(binary=os.environ["PYPROXY_BASELINE"]), ("tcp", "udp"),
            os.environ["PYPROXY_BASELINE"], status_pipe=True)]
      if os.environ.get("PYPROXY_BASELINE") else []),
    Peer("nginx", _nginx_stream, ("tcp", "udp", "tcp+udp"), "nginx"),
    Peer("haproxy", _haproxy, ("tcp",), "haproxy"),
    Peer("socat", _socat, ("tcp", "udp", "udp-flow"), "socat"),
]


# -- backends -----------------------------------------------------------------------------------

def http_backend(port: int) -> subprocess.Popen:
    conf = Scratch.file(f"nginx-http-{port}.conf", f"""
worker_processes 1; daemon off; pid {Scratch.dir}/nginx-http-{port}.pid; error_log /dev/null crit;
events {{ worker_connections 20000; }}
worker_rlimit_nofile 40000;
http {{
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 "ok"; }} }}
}}
""")
    proc = pinned(LOAD_CPU, ["nginx", "-c", conf, "-p", Scratch.dir])
    wait_listening(port)
    return proc


def iperf_backend(port: int) -> subprocess.Popen:
    proc = pinned(LOAD_CPU, ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)])
    wait_listening(port)
    return proc


def sockperf_backend(port: int) -> subprocess.Popen:
    proc = pinned(LOAD_CPU, ["sockperf", "server", "-i", "127.0.0.1", "-p", str(port)])
    wait_listening(port, "udp")
    return proc


def free_port(udp_too: bool = False) -> int:
    """A free TCP port on 127.0.0.1; with udp_too, one whose UDP twin is free as well (iperf3 -u)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
