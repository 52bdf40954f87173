"""Logging that survives dockerd pointing stderr at /dev/null: -log-file, JSON, levels;
and the event loop's own error reports, folded into one line each, never a flood.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from proxy.config import Config

log = logging.getLogger("pyproxy")

# Resource exhaustion (EMFILE in accept) is reported by the loop once per failed accept: with a
# backlog of thousands that is a flood. Say it once per this many seconds instead.
EXHAUSTION_LOG_INTERVAL = 10.0


def setup_logging(config: Config) -> None:
    handler: logging.Handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(config.log_level.upper())
    log.propagate = False


class LoopErrorReporter:
    """An event loop exception handler: one log line per error, exhaustion rate-limited."""

    def __init__(self) -> None:
        self._last_exhaustion = -EXHAUSTION_LOG_INTERVAL

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = context.get("message", "event loop error")
        exc = context.get("exception")
        if "out of system resource" in message:
            now = time.monotonic()
            if now - self._last_exhaustion >= EXHAUSTION_LOG_INTERVAL:
                self._last_exhaustion = now
                log.warning("accept: %s; backing off and retrying", getattr(exc, "strerror", exc))
            return
        log.error("%s: %r", message, exc)
