"""The spawned side of the engine handshake: hand this command line to a running engine and
become its waiter. proxy.launch decides whether to; this module does it.

dockerd spawns one pyproxy per published port. When a pyproxy engine is running
(`pyproxy -engine`), this process checks that the engine is ours (root or our uid, in a
directory only they can write), sends it the command line (and the fd 4 socket dockerd
passed, with -use-listen-fd), then replaces itself with a tiny waiter holding the engine
connection, not a Python interpreter: pyproxy-wait, a few KiB of static machine code
shipped in proxy/waiter/ (~8 KiB of PSS), or where there is none for this machine a shell
(~65 KiB of PSS with a static busybox, ~115 with dash). The waiter handles its stop signals
and only then writes "0\\n" on fd 3, so what dockerd reads is true of the process it will
signal. On SIGINT/SIGTERM the waiter asks the engine to release the port and exits 0 once it
has; if the waiter dies any other way the connection ends and the engine releases the port.

The engine's "0" carries the mapping's listening sockets, and the waiter holds them: they
outlive the engine. If the engine goes away (killed, crashed, restarted), the waiter's read
ends and it execs pyproxy again in the same process (dockerd's child keeps its PID), with
REATTACH_FLAG, the fds it holds and the original argv: reattach() waits for an engine on the
same path, registers again with the sockets attached (the new engine adopts them: clients
queued meanwhile are served) and becomes the waiter again.

When no engine answers, a process that a runtime spawned (it has the status pipe) starts
one (engine_connection): under a lock beside the socket, so a hundred simultaneous spawns
start one engine, detached from us and from dockerd; if it cannot start, we serve here.

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
import time  # built in, like the C modules

from proxy.ground.statuspipe import StatusPipe  # os and stat only
from proxy.ground.wire import (
    MAX_HELD,
    WireError,
    decode_reply,
    encode_request,
    engine_socket_path,
    frame,
    pyproxy_command,
    unframe,
)

TYPE_CHECKING = False  # not typing's: see proxy.ground.wire (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Sequence

# The waiter program. What a waiter costs is the pages it writes (PSS, one waiter per
# published port), so the first choice is pyproxy-wait, the shell program below in a few
# KiB of statically linked machine code with no libc (proxy/waiter/, one binary per
# machine, as `uname -m` names it; built from its source by proxy/waiter/build.sh and shipped
# as package data): its stack page and page tables, ~8 KiB. Its argv carries what the script
# says: [title, "ready" (write "0\n" on fd 3) or "-", the re-attach command's words...].
# Any other argv[1] makes the same binary pyproxy-door (bin/, door_x86_64.c): this module's
# hand-over done natively, which execs itself as the waiter with that argv.
WAITER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "waiter")
WAITER_BINARY = "pyproxy-wait"
# Where there is no binary for this machine (or it is not executable, or PYPROXY_WAIT_SHELL
# names a program), a shell found at run time: the smallest POSIX shell there is. A
# statically linked busybox (Debian's busybox-static) ~60 KiB, having no libc to relocate;
# dash ~113 KiB, of which ~45 are libc's and ld.so's relocated data. So a static busybox
# first, then dash (Debian, Ubuntu), then any busybox (Alpine), then /bin/sh (bash on Fedora,
# RHEL, Arch). PYPROXY_WAIT_SHELL names one explicitly (and only that one is tried; a
# program named pyproxy-wait is run as the binary).
WAIT_SHELL_ENV = "PYPROXY_WAIT_SHELL"
WAIT_SHELLS = ("/bin/dash", "/usr/bin/dash", "/bin/busybox", "/usr/bin/busybox", "/bin/sh")
_BUSYBOXES = ("/bin/busybox", "/usr/bin/busybox")
# busybox runs the applet named by argv[0]'s last path component: a title ending in this
# runs its `sh` and still starts with "pyproxy-wait" in `ps`.
BUSYBOX_SH_SUFFIX = " busybox/sh"
# The waiter's whole program. fd 0 and 1 are the engine connection. The trap comes first,
# then "0\n" on fd 3 (one write: the printf builtin of dash, busybox and bash flushes once);
# a stop signal sends "stop" and waits for the engine's "ok" (the port is released by then);
# EOF means the engine is gone.
WAITER_TRAP = "trap 'echo stop; read -r ack; exit 0' INT TERM; "
WAITER_READY = "printf '0\\n' >&3; exec 3>&-; "
WAITER_LOOP = "while read -r line; do :; done; "
# After EOF: with sockets held, exec pyproxy to re-attach (fds 0 and 1, the dead connection,
# become /dev/null); with none, there is nothing to keep, so exit.
WAITER_GIVE_UP = "exit 1"
# The binary's argv[1]: whether it answers on fd 3; exactly one of these (any other is pyproxy-door).
WAITER_ANSWERS, WAITER_SILENT = "ready", "-"
_STOP_SIGNALS = {_signal.SIGINT, _signal.SIGTERM}
# argv[1] of the re-attaching pyproxy: "-engine-reattach=FD,FD,..." then the original argv.
# Internal: only a waiter passes it, and an engine trusts a re-attach no more than a registration.
REATTACH_FLAG = "-engine-reattach"
# Waiting for an engine to re-attach to: a connect (or an answer) that takes longer is retried;
# between tries a sleep from RETRY_FIRST doubling up to RETRY_MAX, so a port is back within
# ~RETRY_MAX of an engine starting, and a waiter with no engine costs a few wake-ups a second.
CONNECT_TIMEOUT = 2.0
# A waiter whose engine died first waits this long for one to come back, then starts one
# itself, as a spawn does: an engine that a spawn auto-started has no one else to start it
# again. Long enough that a managed engine wins: systemd restarts its unit's after 250 ms,
# and its slow start under load must not find an engine of ours on its path.
REATTACH_START_AFTER = 5.0
ANSWER_TIMEOUT = 15.0  # the engine answers within its own 10 s
RETRY_FIRST = 0.01
RETRY_MAX = 0.2
_FD_SPACE = _socket.CMSG_SPACE(4 * MAX_HELD)
_LISTEN_FD_FLAGS = {"-use-listen-fd", "--use-listen-fd"}
_UCRED_SIZE = 12  # struct ucred: pid, uid, gid

# Starting the engine when none answers (engine_connection). The lock beside the socket makes
# it one engine however many pyproxies dockerd spawns at once; the auto-started engine exits
# once it has served nothing for PYPROXY_ENGINE_IDLE_EXIT and logs to PYPROXY_ENGINE_LOG_FILE
# (default: syslog when /dev/log exists, else ENGINE_LOG_FILE).
ENGINE_START_TIMEOUT = 8.0  # from fork to listening; dockerd waits 16 s for our "0\n" in all
ENGINE_LOCK_TIMEOUT = ENGINE_START_TIMEOUT + 2.0  # waiting behind the spawn that starts it
ENGINE_FAILURE_MEMORY = 10.0  # after a failed start, the spawns behind it serve alone at once
IDLE_EXIT_ENV = "PYPROXY_ENGINE_IDLE_EXIT"
IDLE_EXIT_DEFAULT = "30s"
LOG_FILE_ENV = "PYPROXY_ENGINE_LOG_FILE"
ENGINE_LOG_FILE = "/var/log/pyproxy/engine.log"
# What must not reach the engine from dockerd's environment: it would answer for docker.service.
_SERVICE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                "WATCHDOG_PID")


class EngineRefused(Exception):
    """The socket at the engine path is not an engine we may trust; the text says why."""


def connect_engine(path: str, timeout: float | None = None) -> _socket.socket | None:
    """A connection to the engine at `path`, None if none answers there (serve here then), or
    none within `timeout` seconds. Raises EngineRefused if what answers is not trusted:
    nothing has been sent to it."""
    if not path:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
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


def engine_connection(path: str, *, may_start: bool) -> _socket.socket | None:
    """A connection to the engine at `path`, None to serve here. With `may_start` (a runtime
    spawned us), start the engine when none answers: one, however many spawns race, since the
    start happens under a lock beside the socket and re-checks there. If it cannot start, say
    why on stderr and return None: the mapping is served here, as before there were engines.
    Raises EngineRefused if what answers is not trusted. An empty path: never an engine."""
    engine = connect_engine(path)
    if engine is not None or not may_start or not path:
        return engine
    unsafe = _unsafe_directory(os.path.dirname(os.path.abspath(path)))
    if unsafe:  # the engine would refuse it too; and no lock file of ours goes there
        _cannot_start(path, unsafe)
        return None
    lock_path = engine_lock_path(path)
    try:
        lock = _take_lock(lock_path)
    except OSError as exc:
        _cannot_start(path, f"lock {lock_path}: {exc.strerror or exc}")
        return None
    try:
        engine = connect_engine(path)  # started by the spawn we waited behind
        if engine is not None:
            return engine
        info = os.fstat(lock)
        if info.st_size and time.time() - info.st_mtime < ENGINE_FAILURE_MEMORY:
            _cannot_start(path, "it failed moments ago: " + _read_all(lock))
            return None
        error = start_engine(path)
        engine = connect_engine(path) if error is None else None
        if engine is None:
            error = error or "it said it listens, but does not answer"
        os.ftruncate(lock, 0)  # the failure the spawns behind us read, or none
        if error is not None:
            os.pwrite(lock, error.encode(errors="replace"), 0)
            _cannot_start(path, error)
        return engine
    finally:
        os.close(lock)  # releases the lock


def _unsafe_directory(directory: str) -> str | None:
    """Why the engine's directory is not fit for it (others can write it), None if it is or
    does not exist yet (it is then made 0755). The engine checks the directories above too."""
    try:
        info = os.stat(directory)
    except OSError:
        return None
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o022:
        return (f"refusing a directory others can write: {directory} (mode "
                f"{info.st_mode & 0o7777:04o}, owner uid {info.st_uid})")
    return None


def engine_lock_path(path: str) -> str:
    """The lock file beside the socket: /run/pyproxy/engine.sock -> /run/pyproxy/engine.lock."""
    lock = os.path.splitext(path)[0] + ".lock"
    return lock if lock != path else path + ".lock"


def _take_lock(lock_path: str) -> int:
    """The lock file's fd, exclusively locked; OSError (ETIMEDOUT) after ENGINE_LOCK_TIMEOUT."""
    directory = os.path.dirname(os.path.abspath(lock_path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755)  # /run/pyproxy, as the engine would create it
    import fcntl  # a C module; only paid for when no engine answers

    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    previous = _signal.signal(_signal.SIGALRM, _lock_timed_out)
    _signal.setitimer(_signal.ITIMER_REAL, ENGINE_LOCK_TIMEOUT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)
    return fd


def _lock_timed_out(signum: int, frame: object) -> None:
    raise TimeoutError(f"held by another process for over {ENGINE_LOCK_TIMEOUT:g}s")


def _read_all(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _cannot_start(path: str, why: str) -> None:
    """Say it on stderr, and in syslog when there is one: dockerd discards our stderr."""
    text = f"engine {path}: cannot start one ({why}); serving this mapping in this process"
    sys.stderr.write(f"pyproxy: {text}\n")
    if os.path.exists("/dev/log"):
        import syslog  # a C module

        syslog.openlog("pyproxy", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, text)


def start_engine(path: str) -> str | None:
    """Start `pyproxy -engine` on `path`, detached from us (double fork, new session, stdio on
    /dev/null, none of dockerd's fds or service variables) and wait until it listens; None
    once it does, else why not. It reports on a pipe of ours, as dockerd's fd 3."""
    log_file = os.environ.get(LOG_FILE_ENV) or (
        "syslog" if os.path.exists("/dev/log") else ENGINE_LOG_FILE)
    if log_file != "syslog":
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o755, exist_ok=True)
        except OSError:
            pass  # the engine says what is wrong with its -log-file
    idle = os.environ.get(IDLE_EXIT_ENV) or IDLE_EXIT_DEFAULT
    argv = [sys.executable, "-m", "proxy", "-engine", "-engine-socket", path,
            "-engine-idle-exit", idle, "-log-file", log_file]
    env = {name: value for name, value in os.environ.items() if name not in _SERVICE_ENV}
    env["PYPROXY_ENGINE_SOCKET"] = path
    # The engine runs from "/" (it must pin no directory), so `-m proxy` must find this package
    # wherever it is, installed or not.
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return f"fork: {exc.strerror}"
    if pid == 0:  # pragma: no cover -- the child: only os calls from here to the exec
        try:
            os.setsid()  # no controlling terminal, out of dockerd's process group
            if os.fork():
                os._exit(0)  # the engine is reparented away from us and from dockerd
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.dup2(write_end, 3)  # its status pipe: ours, not dockerd's
            os.closerange(4, 1 << 20)  # dockerd's fd 4 and anything else we hold
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    os.close(write_end)
    try:
        os.waitpid(pid, 0)  # the first child exits at once
        return _engine_started(read_end)
    finally:
        os.close(read_end)


def _engine_started(read_end: int) -> str | None:
    """What the starting engine wrote on its status pipe, as dockerd would read it."""
    import select  # a C module; only paid for when no engine answers

    data = b""
    deadline = time.monotonic() + ENGINE_START_TIMEOUT
    while data != b"0\n":  # then EOF, as it closes the pipe; or "1\n<why>" and EOF
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([read_end], [], [], left)[0]:
            return f"it did not start listening within {ENGINE_START_TIMEOUT:g}s"
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        data += chunk
    if data == b"0\n":
        return None
    text = data.partition(b"\n")[2].decode(errors="replace").strip()
    return text or "it exited as it started"


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


def waiter_program() -> str | None:
    """The program to wait in: the pyproxy-wait binary for this machine when there is one and
    PYPROXY_WAIT_SHELL names nothing, else the shell wait_shell() finds; None if none."""
    if not os.environ.get(WAIT_SHELL_ENV):
        binary = waiter_binary()
        if binary is not None:
            return binary
    return wait_shell()


def waiter_binary() -> str | None:
    """The pyproxy-wait shipped for this machine, None if none is (or it is not executable)."""
    path = os.path.join(WAITER_DIR, os.uname().machine, WAITER_BINARY)
    return path if _executable(path) else None


def _is_waiter_binary(program: str) -> bool:
    return os.path.basename(program) == WAITER_BINARY


def wait_shell() -> str | None:
    """The waiter's shell: an executable POSIX shell on this host, None if there is none."""
    named = os.environ.get(WAIT_SHELL_ENV) or None
    if named is None:
        for path in _BUSYBOXES:
            if _executable(path) and statically_linked(path):
                return path
    for path in (named,) if named is not None else WAIT_SHELLS:
        if _executable(path):
            return path
    return None


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


_PT_INTERP = 3


def statically_linked(path: str) -> bool:
    """Whether `path` is a 64-bit little-endian ELF executable (x86-64, arm64...) with no
    program interpreter (ld.so). Anything else: False, so it is not preferred."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.pread(fd, 64, 0)
        if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":  # ELFCLASS64, ELFDATA2LSB
            return False
        offset = int.from_bytes(head[32:40], "little")
        size, count = int.from_bytes(head[54:56], "little"), int.from_bytes(head[56:58], "little")
        table = os.pread(fd, size * count, offset)
    except OSError:
        return False
    finally:
        os.close(fd)
    if size < 4 or len(table) < size * count:
        return False
    return all(int.from_bytes(table[i:i + 4], "little") != _PT_INTERP
               for i in range(0, size * count, size))


def _quote(word: str) -> str:
    """`word` as one POSIX shell word (shlex.quote would import re before "0\\n")."""
    return "'" + word.replace("'", "'\\''") + "'"


def resume_argv(held: Sequence[int], argv: Sequence[str]) -> list[str]:
    """The command that re-attaches: this copy of pyproxy with the held fds and the original
    argv (its first word is the program's path)."""
    return pyproxy_command([f"{REATTACH_FLAG}={','.join(map(str, held))}", *argv])


def resume_command(words: Sequence[str]) -> str:
    """`words` as the shell waiter's last command, each word quoted."""
    return "exec " + " ".join(map(_quote, words)) + " </dev/null >/dev/null"


def waiter_argv(program: str, lines: str, answers_fd3: bool,
                resume: Sequence[str] = ()) -> list[str]:
    """argv[0] shows the mapping in `ps`; busybox picks its applet by argv[0]'s last path
    component, so there it ends in BUSYBOX_SH_SUFFIX. The binary takes its instructions as
    words, a shell as a script. `resume`: what to run once the engine connection ends
    (resume_argv), if anything."""
    name = "pyproxy-wait " + ", ".join(lines.splitlines()) if lines else "pyproxy-wait"
    if _is_waiter_binary(program):
        return [name, WAITER_ANSWERS if answers_fd3 else WAITER_SILENT, *resume]
    if os.path.basename(os.path.realpath(program)) == "busybox":
        name += BUSYBOX_SH_SUFFIX
    return [name, "-c", WAITER_TRAP + (WAITER_READY if answers_fd3 else "") + WAITER_LOOP
            + (resume_command(resume) if resume else WAITER_GIVE_UP)]


def _exchange(engine: _socket.socket, argv: Sequence[str], fds: Sequence[int],
              reattach: bool) -> tuple[int, str, list[int]]:
    """Send the request with `fds` attached; the reply and the fds that came with it.
    OSError (ConnectionError if the engine closed the connection first) or WireError."""
    global _registered
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                  b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else []
    request = frame(encode_request(argv, reattach))
    # From the send on the engine may hold the port for us (bound, its workers being told)
    # before it answers: a stop signal asks it to release the port first (see _stop_now). So
    # the send and `_registered` are one step for the stop handler: a stop that came during
    # the send (its Python handler runs at the next bytecode, before `_registered` was set)
    # would otherwise exit without a word, leaving the port bound until the engine noticed.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        engine.sendmsg([request], ancillary)
        _registered = engine
    finally:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _STOP_SIGNALS)
    buffer, received = b"", []
    while (payload := unframe(buffer)) is None:
        chunk, messages, _, _ = engine.recvmsg(65536, _FD_SPACE)
        for level, kind, data in messages:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                received += [int.from_bytes(data[i:i + 4], sys.byteorder)
                             for i in range(0, len(data) - len(data) % 4, 4)]
        if not chunk:
            for fd in received:
                os.close(fd)
            raise ConnectionError("pyproxy engine closed the connection")
        buffer += chunk
    try:
        code, body = decode_reply(payload)
    except WireError:
        for fd in received:
            os.close(fd)
        raise
    return code, body, received


# The engine connection once our request is sent, until the waiter's trap takes over (see
# _stop_now).
_registered: _socket.socket | None = None
STOP_TIMEOUT = 2.0  # for the engine's "ok" to a stop, as the waiter's `read -r ack` waits


def _stop_now(signum: int, frame: object) -> None:
    # Until the server's own handlers or the waiter's trap take over: nothing is on fd 3 yet,
    # so just go. Once the engine has our request, it may be holding the port (answered 0, or
    # still telling its workers), so first ask it to release the port, as the trap does: then
    # the port is free when this process is gone, not some time after the engine notices the
    # connection closed (a re-attaching waiter is stopped by dockerd with no status pipe to
    # tell it anything else). The engine reads "stop" once it has answered, releases, says
    # "ok" and closes; if it refused the request it just closes: either way, read to EOF.
    engine = _registered
    if engine is not None:
        try:
            engine.settimeout(STOP_TIMEOUT)
            engine.sendall(b"stop\n")
            while engine.recv(4096):  # an answer's fds, unasked for, are closed by the kernel
                pass
        except OSError:
            pass  # the engine is gone: its copies are closed with it
    os._exit(0)


def _not_now(signum: int, frame: object) -> None:
    pass  # SIGHUP reopens the log file once serving; during start-up there is none to reopen


def catch_stop_signals() -> None:
    """Stop signals end start-up with exit 0 (no traceback, no death by signal).

    Then they are unblocked: pyproxy-door (and any parent that blocks them around its exec)
    execs us with them blocked, so that no instant is left in which one ends the process by
    its default action; one pending since then runs _stop_now here, now."""
    _signal.signal(_signal.SIGINT, _stop_now)
    _signal.signal(_signal.SIGTERM, _stop_now)
    _signal.signal(_signal.SIGHUP, _not_now)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _STOP_SIGNALS)


def hand_over(engine: _socket.socket, argv: Sequence[str], status: StatusPipe,
              listen_fd: int | None) -> int:
    """Register the mapping with the engine; on success, become the waiter (never returns).
    `listen_fd` is dockerd's socket on fd 4, sent only when -use-listen-fd asks for it."""
    program = waiter_program()
    if program is None:
        where = os.environ.get(WAIT_SHELL_ENV) or ", ".join(WAIT_SHELLS)
        status.fail(f"pyproxy engine: no POSIX shell to wait in (tried {where})")
        return 1
    # Any spelling of the flag (even =false: the engine then closes its copy unused).
    wanted = _LISTEN_FD_FLAGS.intersection(arg.partition("=")[0] for arg in argv)
    fds = [listen_fd] if (listen_fd is not None and wanted) else []
    try:
        code, body, held = _exchange(engine, argv, fds, reattach=False)
    except (OSError, WireError) as exc:
        code, body, held = 1, (str(exc) if isinstance(exc, ConnectionError)
                               else f"pyproxy engine: {exc}"), []
    if code != 0:
        for fd in held:
            os.close(fd)
        status.fail(body)
        return code
    if body:
        sys.stdout.write(body + "\n")
        sys.stdout.flush()
    if listen_fd is not None:
        os.set_inheritable(listen_fd, False)  # the engine sent back its copy, in `held`
    error = _become_waiter(program, engine, body, status.inherit_on_exec(), held, argv)
    status.fail(error)  # the engine sees the connection close when we exit
    return 1


def _become_waiter(program: str, engine: _socket.socket, lines: str, answers_fd3: bool,
                   held: Sequence[int], argv: Sequence[str]) -> str:
    """Exec the waiter (`program`: waiter_program()): the engine connection on fds 0 and 1, the
    held sockets where they are. Returns only if the exec failed: why."""
    for fd in held:
        os.set_inheritable(fd, True)
    os.dup2(engine.fileno(), 0)
    os.dup2(engine.fileno(), 1)
    args = waiter_argv(program, lines, answers_fd3, resume_argv(held, argv) if held else ())
    # The binary is exec'd with the stop signals blocked, and unblocks them once its handler
    # is set: a stop pending meanwhile waits for it, and there is no instant at all in which
    # one ends the waiter by its default action. Not a shell: a mask survives the exec, and
    # a shell would keep them blocked.
    blocked = _is_waiter_binary(program)
    if blocked:
        _signal.pthread_sigmask(_signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        os.execv(program, args)
    except OSError as exc:
        if blocked:  # a stop that came meanwhile runs our handler now (_stop_now)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, _STOP_SIGNALS)
        return f"pyproxy engine: cannot run the waiter {program}: {exc.strerror}"
    return "unreachable"  # execv returns only by raising


def _engine_for_reattach(path: str, may_start: bool) -> _socket.socket | None:
    """A connection to whichever engine serves `path` now, None if none does yet: the one
    place a re-attaching waiter looks for an engine. With `may_start` (none came back within
    REATTACH_START_AFTER: no service manager restarts it), it starts one, as a spawn does."""
    if may_start:
        return engine_connection(path, may_start=True)
    return connect_engine(path, CONNECT_TIMEOUT)


def _held_fds(flag: str) -> list[int] | None:
    """The fds of "-engine-reattach=FD,...", if every one is a socket we hold; else None."""
    numbers = flag.partition("=")[2].split(",")
    if not all(n.isdigit() and n.isascii() and len(n) < 8 for n in numbers):
        return None
    held = [int(n) for n in numbers]
    if any(inherited_socket(fd) is None for fd in held) or len(set(held)) != len(held):
        return None
    return held


def reattach(args: Sequence[str]) -> int:
    """A waiter whose engine went away: wait for an engine on the same path, register again
    with the sockets held, become the waiter again (never returns on success). Nothing is
    written on fd 3: dockerd had its "0\\n" long ago. A stop signal exits 0 (catch_stop_signals),
    closing the held sockets, which frees the port."""
    held = _held_fds(args[0])
    if held is None:
        sys.stderr.write(f"pyproxy: {args[0]}: not a list of held socket fds\n")
        return 2
    argv, path, program = args[1:], engine_socket_path(), waiter_program()
    if program is None or not path:
        sys.stderr.write("pyproxy: re-attach: no engine socket or no program to wait in\n")
        return 1
    delay, said = RETRY_FIRST, ""
    lost_at = time.monotonic()
    while True:
        try:
            engine = _engine_for_reattach(path, time.monotonic() - lost_at >= REATTACH_START_AFTER)
        except EngineRefused as exc:
            engine, why = None, str(exc)
            if why != said:  # once, not at every try
                sys.stderr.write(f"pyproxy: re-attach: {why}\n")
                said = why
        if engine is not None:
            try:
                engine.settimeout(ANSWER_TIMEOUT)
                code, body, extra = _exchange(engine, argv, held, reattach=True)
            except (OSError, WireError):
                code, body, extra = -1, "", []  # that engine went away too: wait for the next
            for fd in extra:
                os.close(fd)  # a re-attach is answered with none; never keep what we didn't ask for
            if code == 0:
                engine.settimeout(None)
                error = _become_waiter(program, engine, body, False, held, argv)
                sys.stderr.write(f"pyproxy: {error}\n")
                return 1
            engine.close()
            if code > 0:  # refused: that engine will not serve this mapping
                sys.stderr.write(f"pyproxy: re-attach refused: {body}\n")
                return 1
        time.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)
