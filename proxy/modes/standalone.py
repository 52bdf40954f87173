"""Standalone: serve one command line in this process. Open every mapping (all or nothing),
tell the runtime on fd 3, serve until SIGINT/SIGTERM, then close listeners and connections
(on SIGTERM after up to -drain-timeout) and exit 0 promptly.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from proxy.ground.config import Config
from proxy.ground.heap import freeze_startup
from proxy.ground.logs import mapping_fields
from proxy.ground.privileges import drop_to
from proxy.ground.sockets import StartupError
from proxy.ground.statuspipe import LISTEN_FD, StatusPipe
from proxy.modes.publication import Publication
from proxy.modes.signals import stop_requested

log = logging.getLogger("pyproxy")


class Standalone:
    """One command line's publication, its /metrics, its user, and its lifecycle."""

    def __init__(self, config: Config, status: StatusPipe) -> None:
        self.config = config
        self.status = status
        self.publication = Publication(config, LISTEN_FD)
        self._metrics: Any = None

    async def start(self) -> None:
        """Open every mapping, then /metrics, then drop to -user; all or nothing."""
        try:
            await self.publication.open()
            if self.config.metrics_addr:
                from proxy.ground.metrics import start_metrics  # only paid for when asked

                self._metrics = start_metrics(self.config.metrics_addr, self.publication.stats)
            if self.config.user:
                drop_to(self.config.user)  # every port is bound: root is no longer needed
        except BaseException:
            self._stop_metrics()
            self.publication.stop_accepting()
            raise

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            from proxy.ground.metrics import stop_metrics

            metrics, self._metrics = self._metrics, None
            stop_metrics(metrics)

    async def serve(self) -> int:
        stop = stop_requested()  # before start(): a stop during start-up is not lost
        try:
            await self.start()
        except StartupError as exc:
            log.error("cannot start: %s", exc, extra={"reason": str(exc)})
            self.status.fail(str(exc))
            return 1
        if stop.done():  # stopped while starting: exit 0, nothing on fd 3 (dockerd sees EOF)
            self._stop_metrics()
            self.publication.stop_accepting()
            return 0
        for line in self.publication.lines():
            print(line, flush=True)  # before "ready": whoever waits on fd 3 can read them
        for mapping in self.publication.published():
            log.info("serving %s", mapping, extra=mapping_fields(mapping))
        self.status.ready()
        freeze_startup()  # after "ready": its few ms delay no one
        signum = await stop
        self._stop_metrics()
        drain = signum == signal.SIGTERM
        await self.publication.close(self.config.drain_timeout if drain else 0.0)
        return 0
