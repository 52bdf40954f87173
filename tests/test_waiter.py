"""pyproxy-wait, the engine's waiter as machine code (proxy/waiter/), run directly: the engine
connection a socketpair on fds 0 and 1, the status pipe on fd 3, as proxy.handover execs it.
That it is what its source builds to; and each thing the shell program does, it does.
Through a real engine, in both waiters: tests/test_handover.py and tests/test_survive.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import time

import pytest

from proxy.handover import WAITER_ANSWERS, WAITER_DIR, WAITER_SILENT, waiter_binary
from tests.helpers import REPO, STOPS, mask, output, read_status, read_text, signal_mask, spawn, until

pytestmark = pytest.mark.timeout(60)

BINARY = waiter_binary()
needs_binary = pytest.mark.skipif(BINARY is None, reason=f"no pyproxy-wait for {os.uname().machine}")
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def fds_of(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def block_stop_signals() -> None:
    """In the child before its exec, as proxy.handover execs the binary."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class Waiter:
    """pyproxy-wait with `engine` (our end of its fds 0 and 1) and its status pipe's read end.
    `resume`: the re-attach command's words; `blocked`: exec'd with the stop signals blocked,
    as pyproxy does (else as any program starts it)."""

    def __init__(self, *, ready: bool = True, resume: tuple[str, ...] = (), blocked: bool = True,
                 env: dict[str, str] | None = None, fds: dict[int, int] | None = None) -> None:
        assert BINARY is not None
        self.engine, theirs = socket.socketpair()
        self.status, write_end = os.pipe()
        # argv[0] is the binary's path here (spawn's `command`); it reads none of it.
        self.proc = spawn([WAITER_ANSWERS if ready else WAITER_SILENT, *resume],
                          {0: theirs.fileno(), 1: theirs.fileno(), 3: write_end, **(fds or {})},
                          env=env, command=[BINARY], preexec=block_stop_signals if blocked else None)
        theirs.close()
        os.close(write_end)
        self.engine.settimeout(10)

    def handled(self) -> bool:
        """Its stop handler is set and the signals are no longer blocked."""
        try:
            return (signal_mask(self.proc.pid, "SigCgt") & STOPS == STOPS
                    and signal_mask(self.proc.pid, "SigBlk") & STOPS == 0)
        except (OSError, StopIteration):
            return False

    def close(self) -> None:
        self.engine.close()
        os.close(self.status)


@pytest.fixture
def waiters():
    made: list[Waiter] = []

    def make(**kw) -> Waiter:  # type: ignore[no-untyped-def]
        made.append(Waiter(**kw))
        return made[-1]

    yield make
    for w in made:
        w.close()  # the processes are reaped by conftest's reap_proxies


# -- the binary is its source ----------------------------------------------------------------

BUILD_SH = os.path.join(REPO, "proxy", "waiter", "build.sh")


def toolchain_mismatch() -> str | None:
    """Why this machine cannot rebuild the committed binary byte for byte, None if it can:
    GNU as, ld and gcc, at the versions build.sh records (another may lay the file out
    differently)."""
    if os.uname().machine != "x86_64":
        return "built by x86-64 binutils and gcc"
    if not (shutil.which("as") and shutil.which("ld") and shutil.which("gcc")):
        return "needs GNU as, ld and gcc (Debian: binutils, gcc) to rebuild pyproxy-wait"
    with open(BUILD_SH) as f:
        recorded = dict(line.strip("# \n").split("=") for line in f
                        if line.startswith(("#   BINUTILS_VERSION=", "#   GCC_VERSION=")))
    here = {"BINUTILS_VERSION": subprocess.run(["as", "--version"], capture_output=True, text=True,
                                               check=False).stdout.split("\n")[0].split()[-1],
            "GCC_VERSION": subprocess.run(["gcc", "-dumpfullversion"], capture_output=True,
                                          text=True, check=False).stdout.strip()}
    if here != recorded:
        return f"build.sh records {recorded}, this machine has {here}"
    return None


@pytest.mark.skipif(toolchain_mismatch() is not None, reason=str(toolchain_mismatch()))
def test_the_committed_binary_is_what_its_source_builds_to(tmp_path):
    """proxy/waiter/build.sh from the checkout's source, byte for byte the binary committed
    (and, on an installed build, the one installed)."""
    subprocess.run(["sh", BUILD_SH, str(tmp_path)], check=True, timeout=60)
    built = (tmp_path / "x86_64" / "pyproxy-wait").read_bytes()
    committed = os.path.join(REPO, "proxy", "waiter", "x86_64", "pyproxy-wait")
    with open(committed, "rb") as f:
        assert f.read() == built, "rebuild with proxy/waiter/build.sh and commit the binary"
    assert os.access(committed, os.X_OK)
    shipped = os.path.join(WAITER_DIR, "x86_64", "pyproxy-wait")
    with open(shipped, "rb") as f:
        assert f.read() == built
    assert os.access(shipped, os.X_OK)


@needs_binary
def test_it_is_static_and_tiny():
    """No program interpreter, no libc, one read-only segment (no data to write): what a
    waiter costs is its stack page. The front door (pyproxy-door) is most of its bytes."""
    from proxy.handover import statically_linked

    assert BINARY is not None and statically_linked(BINARY)
    assert os.path.getsize(BINARY) < 8192
    with open(BINARY, "rb") as f:
        head = f.read(64)
        offset, size, count = (int.from_bytes(head[32:40], "little"),
                               int.from_bytes(head[54:56], "little"), int.from_bytes(head[56:58], "little"))
        f.seek(offset)
        table = f.read(size * count)
    loads = [table[i:i + size] for i in range(0, size * count, size)
             if int.from_bytes(table[i:i + 4], "little") == 1]  # PT_LOAD
    [load] = loads
    assert int.from_bytes(load[4:8], "little") == 5  # PF_R | PF_X: nothing writable


@needs_binary
@pytest.mark.parametrize("word", ["rea", "readyx", "-x", "--", "", "r"])
def test_only_ready_or_dash_as_argv1_is_the_waiter(word):
    """Any other argv[1] is the front door, which falls back to the pyproxy beside it: none
    beside the package's binary, so it says so and exits 1."""
    engine, theirs = socket.socketpair()
    proc = subprocess.run([BINARY, word], stdin=theirs, stdout=theirs, capture_output=False,
                          stderr=subprocess.PIPE, timeout=10, check=False)
    theirs.close()
    engine.close()
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"pyproxy: pyproxy-door: cannot run ")


# -- what it does, from its start to its end -------------------------------------------------

@needs_binary
def test_ready_is_written_once_the_stop_is_handled_then_fd3_is_closed(waiters):
    w = waiters()
    assert read_status(w.status) == b"0\n"  # in one write, then EOF: fd 3 closed
    until(w.handled, within=5)
    fds = fds_of(w.proc.pid)
    assert set(fds) == {0, 1, 2}  # the connection and stderr: nothing opened, fd 3 closed
    assert fds[0] == fds[1] and fds[0].startswith("socket:")
    assert w.proc.poll() is None


@needs_binary
def test_not_asked_to_answer_it_leaves_fd3_alone(waiters):
    """A re-attach: fd 3 is not dockerd's pipe then (it may be a held socket)."""
    w = waiters(ready=False)
    until(w.handled, within=5)
    assert 3 in fds_of(w.proc.pid)
    time.sleep(0.1)
    os.set_blocking(w.status, False)
    with pytest.raises(BlockingIOError):  # nothing written, and not closed
        os.read(w.status, 10)


@needs_binary
@pytest.mark.parametrize("signum, second", [(signal.SIGTERM, signal.SIGINT),
                                            (signal.SIGINT, signal.SIGINT)])
def test_a_stop_says_stop_waits_for_the_answer_and_exits_0(waiters, signum, second):
    """A second signal meanwhile changes nothing; the answer may come in pieces."""
    w = waiters()
    assert read_status(w.status) == b"0\n"
    until(w.handled, within=5)
    w.proc.send_signal(signum)
    assert w.engine.recv(100) == b"stop\n"
    w.proc.send_signal(second)
    w.engine.sendall(b"o")
    time.sleep(0.2)
    assert w.proc.poll() is None  # still waiting for the end of the line
    w.engine.sendall(b"k\nanything after")
    assert w.proc.wait(timeout=5) == 0
    assert output(w.proc) == (b"", b"")


@needs_binary
def test_a_stop_answered_by_eof_exits_0(waiters):
    w = waiters()
    until(w.handled, within=5)
    w.proc.send_signal(signal.SIGTERM)
    assert w.engine.recv(100) == b"stop\n"
    w.engine.shutdown(socket.SHUT_WR)
    assert w.proc.wait(timeout=5) == 0


@needs_binary
def test_a_stop_with_the_engine_gone_exits_0_not_by_sigpipe(waiters):
    """No SIGPIPE for "stop" on a closed connection, whatever the disposition inherited
    (spawned here, SIGPIPE has its default action)."""
    w = waiters(resume=("/bin/sleep", "30"))
    until(w.handled, within=5)
    assert signal_mask(w.proc.pid, "SigIgn") & mask(signal.SIGPIPE) == 0
    w.proc.send_signal(signal.SIGSTOP)  # so the close is not seen before the stop
    w.engine.close()
    w.proc.send_signal(signal.SIGTERM)
    w.proc.send_signal(signal.SIGCONT)
    assert w.proc.wait(timeout=5) == 0


@needs_binary
def test_junk_and_long_lines_from_the_engine_are_read_and_ignored(waiters):
    w = waiters()
    until(w.handled, within=5)
    w.engine.sendall(os.urandom(300_000) + b"stop\nok\n" + b"x" * 1_000_000 + b"\n" * 1000)
    time.sleep(0.2)
    assert w.proc.poll() is None
    w.proc.send_signal(signal.SIGINT)
    assert w.engine.recv(100) == b"stop\n"
    w.engine.sendall(b"ok\n")
    assert w.proc.wait(timeout=5) == 0


@needs_binary
def test_eof_execs_the_resume_command_in_the_same_process(waiters, tmp_path):
    """fds 0 and 1 become /dev/null, the held sockets and stderr stay, nothing else is open,
    the stop signals are no longer blocked nor caught (a mask survives an exec: pyproxy must
    get them), the environment is passed as it came."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    w = waiters(resume=("/bin/sleep", "30"), fds={7: held.fileno()},
                env={"PYPROXY_WAITER_TEST": "passed through"})
    held.close()
    assert read_status(w.status) == b"0\n"
    until(w.handled, within=5)
    held_inode = fds_of(w.proc.pid)[7]
    w.engine.close()
    until(lambda: os.path.realpath(f"/proc/{w.proc.pid}/exe") == os.path.realpath("/bin/sleep"),
          within=5)
    # The exe link changes before the new program's argv and environment are in place (the
    # kernel sets them up a moment later in the same execve): wait for its argv.
    until(lambda: read_text(f"/proc/{w.proc.pid}/cmdline").split("\0")[:2] == ["/bin/sleep", "30"],
          within=5)
    fds = fds_of(w.proc.pid)
    assert fds == {0: "/dev/null", 1: "/dev/null", 2: fds[2], 7: held_inode}
    assert signal_mask(w.proc.pid, "SigBlk") == 0
    assert signal_mask(w.proc.pid, "SigCgt") == 0
    environ = read_text(f"/proc/{w.proc.pid}/environ").split("\0")
    assert "PYPROXY_WAITER_TEST=passed through" in environ


@needs_binary
def test_eof_with_nothing_to_resume_or_a_resume_that_cannot_run_exits_1(waiters, tmp_path):
    for resume in [(), (str(tmp_path / "missing"),)]:
        w = waiters(resume=resume)
        assert read_status(w.status) == b"0\n"
        w.engine.close()
        assert w.proc.wait(timeout=5) == 1


@needs_binary
def test_a_read_error_ends_the_wait_as_eof_does():
    """A connection reset (ECONNRESET from read) is the engine gone too: a TCP connection on
    fds 0 and 1 here, since a Unix socket has no reset to give."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        engine = socket.create_connection(server.getsockname())
        theirs, _ = server.accept()
    proc = spawn([WAITER_SILENT], {0: theirs.fileno(), 1: theirs.fileno()}, command=[BINARY])
    theirs.close()
    try:
        until(lambda: signal_mask(proc.pid, "SigCgt") != 0, within=5)
        engine.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        engine.close()  # an RST, not a FIN
        assert proc.wait(timeout=5) == 1
    finally:
        engine.close()


@needs_binary
@pytest.mark.parametrize("blocked", [True, False], ids=["as-pyproxy-execs-it", "plain-exec"])
def test_a_stop_at_any_moment_of_its_start_never_kills_it(waiters, blocked):
    """Signals sent at random moments of its start: it answers "0\\n" and exits 0, never by
    the signal. pyproxy execs it with them blocked, so from the instant the process exists no
    moment is left in which one could end it. Exec'd plainly, whatever execs it keeps its own
    disposition until the exec is done (a fork child of this Python dies of a SIGTERM, and
    under load that lasts milliseconds), so there the signals start once its first system
    call has blocked them: what is tested then is a stop pending before its handler is set."""
    rng = random.Random()
    for i in range(20):
        w = waiters(blocked=blocked)
        if not blocked:
            # (the exe link first: this Python's fork child blocks every signal for a moment
            # before it execs, then unblocks them with their default action)
            until(lambda pid=w.proc.pid: os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(BINARY)
                  and (signal_mask(pid, "SigBlk") & STOPS
                       or signal_mask(pid, "SigCgt")), within=5)
        time.sleep(rng.uniform(0, 0.003))
        w.proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
        assert w.engine.recv(100) == b"stop\n"
        w.engine.sendall(b"ok\n")
        assert w.proc.wait(timeout=5) == 0
        assert read_status(w.status) in (b"0\n", b"")


@needs_binary
def test_argv0_is_the_title_ps_shows():
    """As proxy.handover.waiter_argv makes it: `pyproxy-wait <mapping>`, nothing appended."""
    engine, theirs = socket.socketpair()
    title = "pyproxy-wait 80/tcp -> 0.0.0.0:8080, 80/tcp -> [::]:8080"
    proc = subprocess.Popen([title, WAITER_SILENT], executable=BINARY, stdin=theirs, stdout=theirs,
                            close_fds=True)
    theirs.close()
    try:
        until(lambda: read_text(f"/proc/{proc.pid}/cmdline").split("\0")[0] == title, within=5)
        ps = subprocess.run(["ps", "-o", "args=", "-p", str(proc.pid)], capture_output=True,
                            text=True, timeout=10, check=False)
        if ps.returncode == 0:  # procps present
            assert ps.stdout.startswith(title)
    finally:
        proc.kill()
        proc.wait()
        engine.close()
