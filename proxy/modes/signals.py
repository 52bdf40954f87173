"""The stop signals of a serving process: the first SIGINT or SIGTERM ends it (both modes),
SIGHUP reopens the log file."""

from __future__ import annotations

import asyncio
import signal

from proxy.ground.logs import reopen_log_file

_stop: tuple[asyncio.AbstractEventLoop, asyncio.Future[int]] | None = None


def stop_requested() -> asyncio.Future[int]:
    """The running loop's stop: resolved with the first SIGINT or SIGTERM. The first call
    installs the handlers (SIGHUP meanwhile reopens the log file); later calls share them."""
    global _stop
    loop = asyncio.get_running_loop()
    if _stop is not None and _stop[0] is loop:
        return _stop[1]
    stop: asyncio.Future[int] = loop.create_future()

    def on_stop(signum: int) -> None:
        if not stop.done():
            stop.set_result(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, reopen_log_file)  # after logrotate moved it
    _stop = (loop, stop)
    return stop


async def wait_for_stop_signal() -> int:
    """Serve until SIGINT or SIGTERM (returned)."""
    return await stop_requested()
