"""The `pyproxy` command: argv -> answer locally (-h, -v, -list), hand over to a running engine
(proxy.handover), or serve here, standalone or as the engine. It owns the process's bootstrap:
the open-files limit, logging, and the event loop (uvloop unless PYPROXY_LOOP=asyncio).

Until it is known that this process serves here, only import-light modules are loaded (see
proxy.handover: time to "0\\n" is what dockerd waits for); flag parsing, asyncio and the
modes are imported inside the functions that serve here.
"""

from __future__ import annotations

import os
import sys

from proxy.ground.statuspipe import LISTEN_FD, StatusPipe
from proxy.ground.wire import engine_socket_path
from proxy.handover import (
    REATTACH_FLAG,
    EngineRefused,
    catch_stop_signals,
    engine_connection,
    hand_over,
    inherited_socket,
    reattach,
)

TYPE_CHECKING = False  # not typing's: see proxy.ground.wire (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence
    from typing import Any

    from proxy.ground.config import Config

# Flags answered locally, without an engine.
_LOCAL_FLAGS = {"-h", "-help", "--help", "-v", "-version", "--version", "-engine", "--engine"}
_LIST_FLAGS = {"-list", "--list"}  # `pyproxy -list`: a command of its own (proxy.listing)


def main(argv: Sequence[str] | None = None, *, standalone: bool = False) -> int:
    """`standalone`: never use an engine (bin/pyproxy-standalone, for daemon.json)."""
    catch_stop_signals()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].partition("=")[0] == REATTACH_FLAG:
        # A waiter whose engine went away (proxy.handover): fd 3 is gone and its fds are
        # the sockets it holds, none of them to be taken for the status pipe.
        return reattach(args)
    # fd 3 and fd 4 as our parent left them, before anything here opens a descriptor.
    status = StatusPipe.from_environment()
    listen_fd = inherited_socket(LISTEN_FD)
    if _LIST_FLAGS.intersection(arg.partition("=")[0] for arg in args):
        from proxy.listing import list_command

        return list_command(args)
    if not _LOCAL_FLAGS.intersection(arg.partition("=")[0] for arg in args):
        try:
            # Only a runtime's spawn starts an engine: one typed at a shell serves (and stops
            # with Ctrl-C) in its own process unless an engine is already running.
            path = engine_socket_flag(args)
            engine = None if standalone else engine_connection(
                engine_socket_path() if path is None else path, may_start=status.attached)
        except EngineRefused as exc:
            status.fail(str(exc))
            return 1
        if engine is not None:
            return hand_over(engine, args, status, listen_fd)
    return serve_here(args, status)


def engine_socket_flag(args: Sequence[str]) -> str | None:
    """The value of an -engine-socket flag in argv, read without the flag parser (too heavy
    before a handover); the parser checks it, and the engine ignores it, later."""
    for i, arg in enumerate(args):
        name, equals, value = arg.lstrip("-").partition("=")
        if name == "engine-socket" and arg.startswith("-") and len(arg) - len(arg.lstrip("-")) <= 2:
            if equals:
                return value
            return args[i + 1] if i + 1 < len(args) else None
    return None


def serve_here(argv: Sequence[str], status: StatusPipe) -> int:
    """Parse argv; answer -h/-v, or serve it in this process. `status`: fd 3 as main() found
    it before opening anything."""
    from proxy.ground.flags import USAGE_EXIT, UsageError, build_parser, parse_config

    try:
        config = parse_config(argv)
    except UsageError as exc:
        build_parser().print_usage(sys.stderr)
        status.fail(str(exc))  # under a runtime, the error reaches the user through fd 3
        return USAGE_EXIT
    if config is None:
        return 0
    return run(config, status)


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go does at start and dockerd relies on."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop, unless PYPROXY_LOOP=asyncio asks for the standard loop (the tests run both)."""
    if os.environ.get("PYPROXY_LOOP") == "asyncio":
        import asyncio

        return asyncio.run
    import uvloop

    return uvloop.run


def run(config: Config, status: StatusPipe) -> int:
    """Serve `config` in this process until a stop signal; the exit status."""
    from proxy.ground.accesslog import flush_access_log, setup_access_log
    from proxy.ground.logs import setup_logging
    from proxy.ground.sockets import go_strerror

    raise_nofile_limit()
    try:
        setup_logging(config)
    except OSError as exc:
        status.fail(f"-log-file {config.log_file}: {go_strerror(exc)}")
        return 1
    try:
        setup_access_log(config)  # before any relay exists: each reads it when it is built
    except OSError as exc:
        status.fail(f"-access-log {config.access_log}: {go_strerror(exc)}")
        return 1
    try:
        return event_loop_runner()(_serve(config, status))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    finally:
        flush_access_log()  # the last connections' lines, still waiting for their batch


async def _serve(config: Config, status: StatusPipe) -> int:
    import asyncio

    from proxy.ground.logs import LoopErrorReporter
    from proxy.modes.signals import stop_requested

    asyncio.get_running_loop().set_exception_handler(LoopErrorReporter())
    stop_requested()  # first: from here a stop signal resolves it, whatever is starting
    if config.engine:
        from proxy.modes.engine import Engine

        return await Engine(config).serve(status)
    from proxy.modes.standalone import Standalone

    return await Standalone(config, status).serve()
