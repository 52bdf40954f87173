"""`pyproxy -list`: ask a running engine (or a standalone pyproxy's /metrics) what it serves,
and print one row per mapping, as a table or, with -json, for scripts.

The engine answers only root or its own user (SO_PEERCRED, as for registrations), and this
side trusts only an engine run by root or by us (proxy.handover.check_engine): the list names
every published port and its traffic.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

from proxy.ground.config import format_hostport
from proxy.ground.listing import Row, format_json, format_table, rows_from_exposition
from proxy.ground.sockets import go_strerror
from proxy.ground.wire import LIST_REQUEST, WireError, decode_list_reply, frame
from proxy.handover import EngineRefused, check_engine

TIMEOUT = 10.0  # the engine answers at once; a hung one must not hang the operator's shell
MAX_ANSWER = 64 * 1024 * 1024  # a million mappings' rows would still fit


class ListError(Exception):
    """The list could not be had; the text says from where and why."""


def list_command(argv: Sequence[str]) -> int:
    from proxy.ground.flags import USAGE_EXIT, UsageError, build_list_parser, parse_list_args

    try:
        args = parse_list_args(argv)
    except UsageError as exc:
        build_list_parser().print_usage(sys.stderr)
        sys.stderr.write(f"pyproxy -list: {exc}\n")
        return USAGE_EXIT
    if args.help:
        build_list_parser().print_help()
        return 0
    try:
        rows = from_metrics(*args.metrics_addr) if args.metrics_addr else from_engine(
            args.engine_socket)
    except ListError as exc:
        sys.stderr.write(f"pyproxy -list: {exc}\n")
        return 1
    print(format_json(rows) if args.json else format_table(rows), flush=True)
    return 0


def from_engine(path: str) -> list[Row]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ListError(f"no engine serves {path} ({go_strerror(exc)}); for a standalone "
                            "pyproxy give its -metrics-addr") from None
        except OSError as exc:
            raise ListError(f"engine socket {path}: {go_strerror(exc)}") from None
        try:
            check_engine(sock, path)
        except EngineRefused as exc:
            raise ListError(str(exc)) from None
        return _ask(sock, path)
    finally:
        sock.close()


def _ask(sock: socket.socket, path: str) -> list[Row]:
    buffer = b""
    try:
        try:
            sock.sendall(frame(LIST_REQUEST))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the engine answered before reading (refusing us): its answer is still there
        while (answer := decode_list_reply(buffer)) is None:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ListError(f"engine {path} closed the connection before answering")
            buffer += chunk
            if len(buffer) > MAX_ANSWER:
                raise ListError(f"engine {path}: an answer over {MAX_ANSWER} bytes")
    except TimeoutError:
        raise ListError(f"engine {path} did not answer within {TIMEOUT:g}s") from None
    except OSError as exc:
        raise ListError(f"engine {path}: {go_strerror(exc)}") from None
    except WireError as exc:
        raise ListError(f"engine {path}: not an answer: {exc}") from None
    status, lines = answer
    if status != 0:
        raise ListError(lines[0])
    try:
        return [Row.from_json(line) for line in lines]
    except ValueError as exc:
        raise ListError(f"engine {path}: {exc}") from None


def from_metrics(host: str, port: int) -> list[Row]:
    import urllib.error
    import urllib.request

    url = f"http://{format_hostport(host, port)}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            text = response.read(MAX_ANSWER).decode(errors="replace")
    except urllib.error.URLError as exc:
        reason = exc.reason
        why = go_strerror(reason) if isinstance(reason, OSError) else str(reason)
        raise ListError(f"-metrics-addr {format_hostport(host, port)}: {why}") from None
    except (OSError, ValueError) as exc:
        why = go_strerror(exc) if isinstance(exc, OSError) else str(exc)
        raise ListError(f"-metrics-addr {format_hostport(host, port)}: {why}") from None
    try:
        return rows_from_exposition(text)
    except ValueError as exc:
        raise ListError(f"-metrics-addr {format_hostport(host, port)}: not pyproxy's metrics: "
                        f"{exc}") from None
