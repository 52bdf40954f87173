"""The spawned side of the engine handshake: hand this command line to a running engine and
become its waiter. proxy.launch decides whether to; this module does it.

dockerd spawns one pyproxy per published port. When a pyproxy engine is running
(`pyproxy -engine`), this process checks that the engine is ours (root or our uid, in a
directory only they can write), sends it the command line (and the fd 4 socket dockerd
passed, with -use-listen-fd), then replaces itself with a tiny shell waiter holding the
engine connection: ~120 KiB instead of a Python interpreter. The waiter sets its signal trap
and only then writes "0\\n" on fd 3, so what dockerd reads is true of the process it will
signal. On SIGINT/SIGTERM the waiter asks the engine to release the port and exits 0 once it
has; if the waiter dies any other way, or the engine does, the connection ends and the port
is released.

What fd 3 and fd 4 are is read at the very first line, before this process opens anything:
the engine connection must never be taken for the status pipe or for dockerd's socket.

Time to "0\\n" is what dockerd waits for, so this path imports only C modules (`_socket`,
`_signal`, and os/sys/stat, which the interpreter has loaded anyway) and the two import-light
ground modules (statuspipe, wire): `socket`, `signal` and `json` would add ~10 ms of imports
(enum, re) to a ~10 ms interpreter start. pyproject.toml's import-linter contract keeps it so.
"""

from __future__ import annotations

import _signal
import _socket
import os
import stat
import sys
from collections.abc import Sequence

from proxy.ground.statuspipe import StatusPipe  # os and stat only
from proxy.ground.wire import WireError, decode_reply, encode_argv, frame, unframe

# The waiter's shell, found at run time: the smallest POSIX shell there is (dash on Debian
# and Ubuntu, busybox on Alpine, bash as /bin/sh on Fedora, RHEL and Arch).
# PYPROXY_WAIT_SHELL names one explicitly (and only that one is tried).
WAIT_SHELL_ENV = "PYPROXY_WAIT_SHELL"
WAIT_SHELLS = ("/bin/dash", "/usr/bin/dash", "/bin/busybox", "/usr/bin/busybox", "/bin/sh")
# The waiter's whole program. fd 0 and 1 are the engine connection. The trap comes first,
# then "0\n" on fd 3 (one write: the printf builtin of dash, busybox and bash flushes once);
# a stop signal sends "stop" and waits for the engine's "ok" (the port is released by then);
# EOF means the engine is gone.
WAITER_TRAP = "trap 'echo stop; read -r ack; exit 0' INT TERM; "
WAITER_READY = "printf '0\\n' >&3; exec 3>&-; "
WAITER_LOOP = "while read -r line; do :; done; exit 1"
_LISTEN_FD_FLAGS = {"-use-listen-fd", "--use-listen-fd"}
_UCRED_SIZE = 12  # struct ucred: pid, uid, gid

class EngineRefused(Exception):
    """The socket at the engine path is not an engine we may trust; the text says why."""


def connect_engine(path: str) -> _socket.socket | None:
    """A connection to the engine at `path`, None if none answers there (serve here then).
    Raises EngineRefused if what answers is not trusted: nothing has been sent to it."""
    if not path:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no engine (or a stale socket file): serve the mapping here
        sock.close()
        return None
    try:
        check_engine(sock, path)
    except EngineRefused:
        sock.close()
        raise
    return sock


def check_engine(sock: _socket.socket, path: str) -> None:
    """Whoever could bind `path` gets our argv, our fd 4 and the clients' traffic: only root
    or our own uid may, so the directory must be writable by no one else and the listening
    process (SO_PEERCRED, what it was when it bound) must be root or us."""
    ours = (0, os.geteuid())
    directory = os.path.dirname(os.path.abspath(path))
    try:
        info = os.stat(directory)
    except OSError as exc:  # gone since we connected
        raise EngineRefused(f"engine socket {path}: refused: {directory}: {exc.strerror}") from None
    if info.st_uid not in ours or info.st_mode & 0o022:
        raise EngineRefused(
            f"engine socket {path}: refused: directory {directory} can be written by other "
            f"users (mode {info.st_mode & 0o7777:04o}, owner uid {info.st_uid}), so anyone "
            "could have bound the engine socket; put it in a directory only root (or this "
            "user) can write, such as /run/pyproxy")
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED_SIZE)
    uid = int.from_bytes(cred[4:8], sys.byteorder)
    if uid not in ours:
        raise EngineRefused(
            f"engine socket {path}: refused: it is served by uid {uid}, not by root or this "
            f"user (uid {os.geteuid()}); nothing was sent to it")


def inherited_socket(fd: int) -> int | None:
    """`fd` if it is a socket now, else None. Called before this process opens anything, so a
    socket there is one our parent (dockerd) put there."""
    try:
        return fd if stat.S_ISSOCK(os.fstat(fd).st_mode) else None
    except OSError:
        return None


def wait_shell() -> str | None:
    """The waiter's shell: an executable POSIX shell on this host, None if there is none."""
    named = os.environ.get(WAIT_SHELL_ENV) or None
    for path in (named,) if named is not None else WAIT_SHELLS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def waiter_argv(shell: str, lines: str, answers_fd3: bool) -> list[str]:
    """argv[0] shows the mapping in `ps`; busybox picks its applet by argv[0], so it gets "sh"."""
    name = "pyproxy-wait " + ", ".join(lines.splitlines()) if lines else "pyproxy-wait"
    if os.path.basename(os.path.realpath(shell)) == "busybox":
        name = "sh"
    return [name, "-c", WAITER_TRAP + (WAITER_READY if answers_fd3 else "") + WAITER_LOOP]


def _read_reply(sock: _socket.socket) -> tuple[int, str]:
    buffer = b""
    while (payload := unframe(buffer)) is None:
        chunk = sock.recv(65536)
        if not chunk:
            return 1, "pyproxy engine closed the connection"
        buffer += chunk
    return decode_reply(payload)


def _stop_now(signum: int, frame: object) -> None:
    # Until the server's own handlers or the waiter's trap take over: nothing is on fd 3 yet,
    # so just go; an engine sees the connection close and releases what it opened.
    os._exit(0)


def _not_now(signum: int, frame: object) -> None:
    pass  # SIGHUP reopens the log file once serving; during start-up there is none to reopen


def catch_stop_signals() -> None:
    """Stop signals end start-up with exit 0 (no traceback, no death by signal)."""
    _signal.signal(_signal.SIGINT, _stop_now)
    _signal.signal(_signal.SIGTERM, _stop_now)
    _signal.signal(_signal.SIGHUP, _not_now)


def hand_over(engine: _socket.socket, argv: Sequence[str], status: StatusPipe,
              listen_fd: int | None) -> int:
    """Register the mapping with the engine; on success, become the waiter (never returns).
    `listen_fd` is dockerd's socket on fd 4, sent only when -use-listen-fd asks for it."""
    shell = wait_shell()
    if shell is None:
        where = os.environ.get(WAIT_SHELL_ENV) or ", ".join(WAIT_SHELLS)
        status.fail(f"pyproxy engine: no POSIX shell to wait in (tried {where})")
        return 1
    # Any spelling of the flag (even =false: the engine then closes its copy unused).
    wanted = _LISTEN_FD_FLAGS.intersection(arg.partition("=")[0] for arg in argv)
    fds = [listen_fd] if (listen_fd is not None and wanted) else []
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
    if listen_fd is not None:
        os.set_inheritable(listen_fd, False)  # the engine has it now; the waiter needs none
    os.dup2(engine.fileno(), 0)
    os.dup2(engine.fileno(), 1)
    waiter = waiter_argv(shell, body, status.inherit_on_exec())
    try:
        os.execv(shell, waiter)
    except OSError as exc:  # the engine sees the connection close when we exit
        status.fail(f"pyproxy engine: cannot run the waiter {shell}: {exc.strerror}")
    return 1
