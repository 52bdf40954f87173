"""The `pyproxy` command's entry: hand the mapping to a running engine, or serve it here.

dockerd spawns one pyproxy per published port. When a pyproxy engine is running
(`pyproxy -engine`), this process sends it the command line (and the fd 4 socket), reports
the engine's answer on fd 3 exactly as docker-proxy would, then replaces itself with a tiny
dash waiter holding the engine connection: ~120 KiB instead of a Python interpreter. On
SIGINT/SIGTERM the waiter asks the engine to release the port and exits 0 once it has, so
the port is free when the process is gone, as with docker-proxy; if the engine dies, the
connection ends and the waiter exits too.

Time to "0\\n" is what dockerd waits for, so this path imports only C modules (`_socket`,
`_signal`, and os/sys, which the interpreter has loaded anyway): `socket`, `signal` and
`json` would add ~10 ms of imports (enum, re) to a ~10 ms interpreter start.
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys
from collections.abc import Sequence

from proxy.wire import WireError, decode_reply, encode_argv, frame, unframe

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
_S_IFMT, _S_IFSOCK = 0o170000, 0o140000

# -- the spawned side ------------------------------------------------------------------------------

def engine_socket_path() -> str:
    """Where the engine listens; an empty PYPROXY_ENGINE_SOCKET means never use one."""
    return os.environ.get(ENGINE_SOCKET_ENV, DEFAULT_ENGINE_SOCKET)


def connect_engine(path: str) -> _socket.socket | None:
    if not path:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no engine (or a stale socket file): serve the mapping here
        sock.close()
        return None
    return sock


def _listen_fd() -> list[int]:
    """fd 4, if it is an open socket: the engine adopts it only when -use-listen-fd says so."""
    try:
        return [4] if os.fstat(4).st_mode & _S_IFMT == _S_IFSOCK else []
    except OSError:
        return []


def _read_reply(sock: _socket.socket) -> tuple[int, str]:
    buffer = b""
    while (payload := unframe(buffer)) is None:
        chunk = sock.recv(65536)
        if not chunk:
            return 1, "pyproxy engine closed the connection"
        buffer += chunk
    return decode_reply(payload)


def _stop_now(signum: int, frame: object) -> None:
    os._exit(0)  # before we are the waiter: just go; the engine sees the connection close


def hand_over(engine: _socket.socket, argv: Sequence[str]) -> int:
    """Register the mapping with the engine; on success, become the waiter (never returns)."""
    from proxy.statuspipe import StatusPipe  # os and stat only

    status = StatusPipe.from_environment()
    _signal.signal(_signal.SIGINT, _stop_now)
    _signal.signal(_signal.SIGTERM, _stop_now)
    fds = _listen_fd()
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                  b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else []
    try:
        engine.sendmsg([frame(encode_argv(argv))], ancillary)
        code, body = _read_reply(engine)
    except (OSError, WireError) as exc:
        code, body = 1, f"pyproxy engine: {exc}"
    if code != 0:
        status.fail(body)
        return code
    if body:
        sys.stdout.write(body + "\n")
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
