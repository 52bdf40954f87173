"""-idle-timeout: close a TCP connection (SCTP association) that has moved no bytes either way
for the timeout, so silent clients can't hold -max-conns slots and backend connections forever.

No cost per read: one sweeper per listener wakes every half timeout and asks each connection how
long it has been quiet (TCP: the kernel's own clock of the last data received on either socket;
SCTP: its message count compared with the last sweep's). A connection quiet for the timeout at a
sweep is closed, so one is closed between D and 1.5·D after its last byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Protocol

from proxy.ground.stats import MappingStats


class Quiet(Protocol):
    def quiet_for(self, now: float) -> float:
        """Seconds since this connection last moved a byte (0 while its dial is under way:
        -dial-timeout and -dial-retry govern that part)."""
        ...

    def close_idle(self) -> None: ...


class IdleSweeper:
    """Closes a listener's connections that have been quiet for `timeout` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 connections: Collection[Quiet], stats: MappingStats) -> None:
        self.loop = loop
        self.timeout = timeout
        self.interval = max(timeout / 2, 0.005)
        self.connections = connections
        self.stats = stats
        self._timer: asyncio.TimerHandle | None = loop.call_later(self.interval, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        now = self.loop.time()
        idle = [conn for conn in self.connections if conn.quiet_for(now) >= self.timeout]
        for conn in idle:
            conn.close_idle()
            self.stats.closed_idle += 1
        self._timer = self.loop.call_later(self.interval, self._sweep)
