"""The status pipe on fd 3: how a container runtime learns whether the proxy started.

dockerd reads two bytes in one read(), so "0\n" must go out in one write(); on failure it
reads "1\n" followed by the error text, which it shows as "Error starting userland proxy: ...".
"""

from __future__ import annotations

import os
import stat
import sys

STATUS_FD = 3  # the descriptors dockerd passes: the status pipe,
LISTEN_FD = 4  # and, with -use-listen-fd, the socket it bound for us


class StatusPipe:
    """fd 3 when it is a pipe or socket (as dockerd passes it); a no-op when run by hand."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def from_environment(cls) -> StatusPipe:
        try:
            mode = os.fstat(STATUS_FD).st_mode
        except OSError:
            return cls(None)
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return cls(None)  # some unrelated inherited file: never write into it
        os.set_inheritable(STATUS_FD, False)
        return cls(STATUS_FD)

    @property
    def attached(self) -> bool:
        """True when a runtime passed the pipe: a runtime, not a person, started us."""
        return self._fd is not None

    def inherit_on_exec(self) -> bool:
        """Let a program we exec answer on fd 3 (the engine's waiter writes "0\\n" once its
        signal trap is set). We keep our copy, to report "1\\n" if the exec fails."""
        if self._fd is None:
            return False
        os.set_inheritable(self._fd, True)
        return True

    def ready(self) -> None:
        self._report(b"0\n")

    def fail(self, text: str) -> None:
        """Tell whoever started us: the runtime on fd 3, and a person on stderr."""
        sys.stderr.write(f"pyproxy: {text}\n")
        self._report(b"1\n" + text.encode(errors="replace"))

    def _report(self, payload: bytes) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, payload)
        except OSError:
            pass  # the runtime went away; nothing left to tell
        finally:
            os.close(fd)
