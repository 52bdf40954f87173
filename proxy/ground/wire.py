"""The engine protocol's wire format, shared by the spawned pyproxy (proxy.handover) and the
engine (proxy.modes.engine): where the engine listens, and pure functions over bytes, strict,
and cheap to import.

A frame is "<length>\\n<payload>": the length in ASCII decimal digits only (no sign, no
underscore, no spaces), at most MAX_PAYLOAD. A request's payload is the argv, each argument
followed by a NUL (no argument can hold one), then the request's kind: nothing for a
registration, REATTACH for a waiter registering again with the listening sockets it holds
(whatever follows the last NUL is the kind, so every registration ever sent still parses as
one, and any other tail is a WireError); a reply's is "<status>\\n<body>": status 0 with
the `docker port` lines, 1 or 2 (usage) with the error text. Anything else is a WireError,
the only exception these functions raise on any input: the engine answers it, never dies of it.

The spawned side imports this before "0\\n", so it may import only os, sys and C modules.
"""

from __future__ import annotations

import os
import sys

# typing.TYPE_CHECKING without importing typing: this module is on the handover path, where
# typing (re, enum) and collections.abc (collections, operator) cost ~5 ms of start-up;
# mypy reads the name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

ENGINE_SOCKET_ENV = "PYPROXY_ENGINE_SOCKET"
DEFAULT_ENGINE_SOCKET = "/run/pyproxy/engine.sock"
MAX_PAYLOAD = 64 * 1024  # an argv is a few hundred bytes; a reply a few lines
_MAX_DIGITS = len(str(MAX_PAYLOAD))
_DIGITS = frozenset(b"0123456789")
STATUSES = (0, 1, 2)
REATTACH = b"reattach"  # the kind of a waiter's request after its engine went away
MAX_HELD = 64  # listening sockets one request may carry (one per mapping of its argv)


# The directory this copy of pyproxy is imported from (proxy/ground/wire.py -> its root).
_PROGRAM_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pyproxy_command(args: Sequence[str]) -> list[str]:
    """The argv that runs this copy of pyproxy (this interpreter, whatever sys.path found it
    by) with `args`: how a waiter re-attaches and an engine reloads itself."""
    program = (f"import sys; sys.path[0] = {_PROGRAM_ROOT!r}; "
               "from proxy.launch import main; sys.exit(main())")
    return [sys.executable, "-c", program, *args]


def engine_socket_path() -> str:
    """Where the engine listens; an empty PYPROXY_ENGINE_SOCKET means never use one."""
    return os.environ.get(ENGINE_SOCKET_ENV, DEFAULT_ENGINE_SOCKET)


class WireError(ValueError):
    """Bytes that are not a frame of the engine protocol; the text says what is wrong."""


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return b"%d\n" % len(payload) + payload


def _length(head: bytes) -> int:
    if not head or not _DIGITS.issuperset(head):
        raise WireError(f"frame length {head[:_MAX_DIGITS + 1]!r} is not a decimal number")
    if len(head) > _MAX_DIGITS or int(head) > MAX_PAYLOAD:
        raise WireError(f"frame length {head[:_MAX_DIGITS + 1]!r} is over the "
                        f"{MAX_PAYLOAD}-byte limit")
    return int(head)


def unframe(buffer: bytes) -> bytes | None:
    """The payload if `buffer` starts with a whole frame, None if more bytes are needed.

    Bytes after the frame are ignored. A buffer that can no longer become a valid frame
    raises WireError at once, so a reader never waits on (or buffers) a hopeless request."""
    end = buffer.find(b"\n", 0, _MAX_DIGITS + 1)
    if end < 0:
        if len(buffer) > _MAX_DIGITS or not _DIGITS.issuperset(buffer):
            _length(buffer[:_MAX_DIGITS + 1])  # raises: too long or not digits
        return None
    length = _length(buffer[:end])
    payload = buffer[end + 1 : end + 1 + length]
    return payload if len(payload) == length else None


def encode_argv(argv: Sequence[str]) -> bytes:
    try:
        encoded = [os.fsencode(arg) for arg in argv]
    except UnicodeEncodeError as exc:  # a str no command line can hold (a lone surrogate)
        raise WireError(f"an argument cannot be encoded: {exc.reason}") from None
    if any(b"\0" in arg for arg in encoded):
        raise WireError("an argument holds a NUL byte")
    return b"".join(arg + b"\0" for arg in encoded)


def decode_argv(payload: bytes) -> list[str]:
    """The argv as the spawned process had it (non-UTF-8 bytes kept, as in sys.argv)."""
    if payload and not payload.endswith(b"\0"):
        raise WireError("the argument list does not end with a NUL")
    return [os.fsdecode(arg) for arg in payload.split(b"\0")[:-1]]


def encode_request(argv: Sequence[str], reattach: bool = False) -> bytes:
    """A registration (the argv), or with `reattach` a re-attach of the same argv."""
    return encode_argv(argv) + (REATTACH if reattach else b"")


def decode_request(payload: bytes) -> tuple[list[str], bool]:
    """(argv, whether it is a re-attach)."""
    cut = payload.rfind(b"\0") + 1
    kind = payload[cut:]
    if kind not in (b"", REATTACH):
        raise WireError(f"request kind {kind[:16]!r} is not a registration or a re-attach")
    return decode_argv(payload[:cut]), kind == REATTACH


def encode_reply(status: int, body: str) -> bytes:
    if status not in STATUSES:
        raise WireError(f"reply status {status} is not 0, 1 or 2")
    # backslashreplace: an error text quoting a non-UTF-8 argument must still be sendable
    return frame(b"%d\n" % status + body.encode(errors="backslashreplace"))


def decode_reply(payload: bytes) -> tuple[int, str]:
    head, sep, body = payload.partition(b"\n")
    if not sep or head not in (b"0", b"1", b"2"):
        raise WireError(f"reply status {head[:8]!r} is not 0, 1 or 2")
    return int(head), body.decode(errors="replace")


# -- listing: `pyproxy -list` asks the engine what it serves -------------------------------
# Not an argv: a registration's first argument is a flag, never empty. The answer is replies
# of status 0 whose bodies hold mappings, one JSON object per line, as many as fit a frame,
# closed by an empty status-0 reply (so a thousand mappings never outgrow MAX_PAYLOAD); or one
# reply of status 1 with the error (the wrong user, say).
LIST_REQUEST = b"\0list\0"
_LIST_ROOM = MAX_PAYLOAD - 16  # a frame's head and the status line


def encode_list_reply(lines: Sequence[str]) -> bytes:
    """Every line (each under the frame limit), packed into as few replies as fit, then the end."""
    replies: list[bytes] = []
    batch: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode(errors="backslashreplace")) + 1  # as encode_reply writes it
        if batch and size + length > _LIST_ROOM:
            replies.append(encode_reply(0, "\n".join(batch)))
            batch, size = [], 0
        batch.append(line)
        size += length
    if batch:
        replies.append(encode_reply(0, "\n".join(batch)))
    return b"".join(replies) + encode_reply(0, "")


def decode_list_reply(buffer: bytes) -> tuple[int, list[str]] | None:
    """(0, the lines) once `buffer` holds a whole answer, (status, [error]) for an error reply,
    None if more bytes are needed. WireError if it is not an answer."""
    lines: list[str] = []
    while (payload := unframe(buffer)) is not None:
        status, body = decode_reply(payload)
        if status != 0:
            return status, [body]
        if not body:
            return 0, lines
        lines += body.split("\n")
        buffer = buffer[buffer.index(b"\n") + 1 + len(payload):]
    return None
