"""The `pyproxy` command's entry: hand the mapping to a running engine, or serve it here.

dockerd spawns one pyproxy per published port. When a pyproxy engine is running
(`pyproxy -engine`), this process sends it the command line (and the fd 4 socket), reports
the engine's answer on fd 3 exactly as docker-proxy would, then replaces itself with a tiny
dash waiter holding the engine connection: ~120 KiB instead of a Python interpreter. On
SIGINT/SIGTERM the waiter asks the engine to release the port and exits 0 once it has, so
the port is free when the process is gone, as with docker-proxy; if the engine dies, the
connection ends and the waiter exits too.

Only os, socket, json and sys are imported before that decision: a spawn that goes through
the engine never pays for asyncio, uvloop or attrs.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence

ENGINE_SOCKET_ENV = "PYPROXY_ENGINE_SOCKET"
DEFAULT_ENGINE_SOCKET = "/run/pyproxy/engine.sock"
WAITER = "/bin/dash"  # Debian's essential POSIX shell: small, and always there
# The waiter's whole program. fd 0 is the engine connection. A stop signal sends "stop" and
# waits for the engine's "ok" (the port is released by then); EOF means the engine is gone.
WAITER_SCRIPT = (
    "trap 'echo stop; read -r ack; exit 0' INT TERM; "
    "while read -r line; do :; done; exit 1"
)
# Flags answered locally, without an engine.
_LOCAL_FLAGS = {"-h", "-help", "--help", "-v", "-version", "--version", "-engine", "--engine"}


def engine_socket_path() -> str:
    """Where the engine listens; an empty PYPROXY_ENGINE_SOCKET means never use one."""
    return os.environ.get(ENGINE_SOCKET_ENV, DEFAULT_ENGINE_SOCKET)


def connect_engine(path: str) -> socket.socket | None:
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no engine (or a stale socket file): serve the mapping here
        sock.close()
        return None
    return sock


def _listen_fd() -> list[int]:
    """fd 4, if it is an open socket: the engine adopts it only when -use-listen-fd says so."""
    try:
        return [4] if stat.S_ISSOCK(os.fstat(4).st_mode) else []
    except OSError:
        return []


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def hand_over(engine: socket.socket, argv: Sequence[str]) -> int:
    """Register the mapping with the engine; on success, become the waiter (never returns)."""
    from proxy.statuspipe import StatusPipe  # os and stat only

    status = StatusPipe.from_environment()
    # A stop signal before we are the waiter: just go; the engine sees the connection close.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: os._exit(0))
    request = json.dumps({"argv": list(argv)}).encode() + b"\n"
    fds = _listen_fd()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    try:
        engine.sendmsg([request], ancillary)
        reply = json.loads(_read_line(engine) or b'{"status": 1, "error": "engine closed"}')
    except (OSError, ValueError) as exc:
        status.fail(f"pyproxy engine: {exc}")
        print(f"pyproxy: engine: {exc}", file=sys.stderr)
        return 1
    code = reply.get("status", 1)
    if code != 0:
        error = reply.get("error", "engine refused the mapping")
        print(f"pyproxy: {error}", file=sys.stderr)
        status.fail(error)
        return int(code)
    for line in reply.get("mappings", []):
        print(line)
    sys.stdout.flush()
    status.ready()
    os.dup2(engine.fileno(), 0)
    os.dup2(engine.fileno(), 1)
    os.execv(WAITER, ["pyproxy-wait", "-c", WAITER_SCRIPT])
    return 1  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _LOCAL_FLAGS.intersection(arg.partition("=")[0] for arg in args):
        engine = connect_engine(engine_socket_path())
        if engine is not None:
            return hand_over(engine, args)
    from proxy.cli import main as serve_here

    return serve_here(args)
