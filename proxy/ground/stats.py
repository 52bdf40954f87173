"""Per-mapping counters that the relays bump on their hot paths.

Plain ints on a slotted object: an increment is one attribute store, no locks, no labels.
The Prometheus collector (proxy.ground.metrics) reads them only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left

from attrs import Factory, define

# Dial latency buckets (seconds): loopback/bridge dials take tens of microseconds (timed with
# perf_counter, which resolves them); a container that is still starting under -dial-retry can
# take seconds, and -dial-timeout defaults to 30.
DIAL_BUCKETS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@define(eq=False)
class MappingStats:
    # TCP and SCTP
    accepted: int = 0
    active: int = 0
    rejected_denied: int = 0  # client not in -allow
    rejected_limit: int = 0  # over -max-conns
    dial_failures: int = 0
    closed_idle: int = 0  # closed by -idle-timeout
    bytes_from_client: int = 0
    bytes_from_container: int = 0
    spliced: int = 0  # directions that switched to zero-copy splice
    # SCTP
    messages_from_client: int = 0
    messages_from_container: int = 0
    # UDP
    flows_active: int = 0
    flows_created: int = 0
    flows_expired: int = 0
    flows_evicted: int = 0
    datagrams_from_client: int = 0
    datagrams_from_container: int = 0
    datagrams_dropped: int = 0
    datagrams_denied: int = 0
    datagrams_no_flow: int = 0  # no flow could be opened for a new client (no fd, no port)
    # dial latency histogram: counts per bucket (last one is +Inf) and the running sum
    dial_bucket_counts: list[int] = Factory(lambda: [0] * (len(DIAL_BUCKETS) + 1))
    dial_seconds_sum: float = 0.0

    def observe_dial(self, seconds: float) -> None:
        """Once per connection, off the data path."""
        self.dial_seconds_sum += seconds
        # the first bucket whose bound is >= seconds; len(DIAL_BUCKETS) is +Inf
        self.dial_bucket_counts[bisect_left(DIAL_BUCKETS, seconds)] += 1


@define(eq=False)
class EngineStats:
    """The engine's own counters, apart from any one mapping's."""

    # mappings a waiter registered again after the engine before this one went away
    reattached_mappings: int = 0
    # With worker processes (proxy.modes.workers): workers that died and were started again,
    # the connections and UDP flows they had open (lost with them), and the TCP connections
    # (SCTP associations) each worker slot accepted, dead ones' included.
    worker_restarts: int = 0
    worker_connections_lost: int = 0
    worker_accepted: dict[int, int] = Factory(dict)
    # The workers' UDP flow budgets summed, [limit, used] (the supervisor holds no flow).
    worker_flow_budget: list[int] | None = None
