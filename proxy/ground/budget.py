"""The process's budget of UDP flows, shared by every UDP mapping it serves.

Each flow holds a connected socket: a file descriptor and an ephemeral port. Capped per mapping
only, a flood on one mapping could take every fd of the process (an engine's TCP mappings then
accept nothing) or every ephemeral port of the host (nobody can open a UDP socket). So flows
across all mappings draw on one budget, sized at start from RLIMIT_NOFILE and the ephemeral port
range with a reserve kept back; the arithmetic is pure (flow_limit) so it is tested without I/O.
"""

from __future__ import annotations

import functools
import resource
from typing import Protocol

from attrs import Factory, define

PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_PORT_RANGE = (32768, 60999)  # Linux's default, for when /proc can't tell
# Descriptors never given to flows: stdio, fds 3 and 4, listeners, the event loop's epoll and
# its self-pipe, the engine's socket and registrations, the log file, metrics. A quarter of a
# tiny limit, so that `ulimit -n 64` still leaves flows something.
FD_RESERVE = 64
# Of the descriptors left, flows get at most this share; the rest is TCP's (2 per connection).
FLOW_FD_SHARE = 0.5
# Of the ephemeral port range, flows get at most this share; the rest is the host's (its
# resolver, its other programs' UDP and TCP). Each pyproxy process draws on its own share, so
# the engine, which serves every mapping, is where this bound holds for a host: its N worker
# processes each take 1/N of it (share_ports).
FLOW_PORT_SHARE = 0.5
_port_sharers = 1


def flow_limit(nofile: int, port_range: tuple[int, int], sharers: int = 1) -> int:
    """How many UDP flows a process with `nofile` descriptors may hold, given the host's
    ephemeral `port_range` (inclusive), when `sharers` processes split the ports' share: the
    smaller of the two shares, and at least 1."""
    reserve = min(FD_RESERVE, nofile // 4)
    by_fds = int((nofile - reserve) * FLOW_FD_SHARE)
    by_ports = int((port_range[1] - port_range[0] + 1) * FLOW_PORT_SHARE) // sharers
    return max(1, min(by_fds, by_ports))


def share_ports(sharers: int) -> None:
    """This process is one of `sharers` (an engine's workers) that split the host's share of
    ephemeral ports; before its first flow. (Each has descriptors of its own.)"""
    global _port_sharers
    _port_sharers = sharers
    process_budget.cache_clear()


def ephemeral_port_range(path: str = PORT_RANGE_FILE) -> tuple[int, int]:
    try:
        with open(path) as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        return DEFAULT_PORT_RANGE
    return (low, high) if low <= high else DEFAULT_PORT_RANGE


class FlowOwner(Protocol):
    """A UDP relay, as the budget sees it: how many flows it holds; give one up."""

    def flow_count(self) -> int: ...

    def evict_idlest(self) -> bool: ...


@define(eq=False)
class FlowBudget:
    """Flows in use against the process's limit. Relays take one per flow they open and give
    it back when the flow closes; when none is left, the relay holding the most flows gives up
    its idlest one, so a flood on one mapping pays for itself and quiet mappings keep theirs."""

    limit: int
    used: int = 0
    owners: list[FlowOwner] = Factory(list)

    def join(self, owner: FlowOwner) -> None:
        self.owners.append(owner)

    def leave(self, owner: FlowOwner) -> None:
        if owner in self.owners:
            self.owners.remove(owner)

    def exhausted(self) -> bool:
        return self.used >= self.limit

    def evict_one(self) -> bool:
        """Make room: the idlest flow of the relay with the most flows goes. Once per new
        flow, and only when the budget or the system ran out: a scan of the relays is fine."""
        if not self.owners:
            return False
        return max(self.owners, key=lambda owner: owner.flow_count()).evict_idlest()


@functools.cache
def process_budget() -> FlowBudget:
    """The budget of this process, sized on first use: after start-up raised the soft
    RLIMIT_NOFILE to the hard one, before any flow exists."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1 << 20
    return FlowBudget(flow_limit(nofile, ephemeral_port_range(), _port_sharers))
