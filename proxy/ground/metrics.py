"""Prometheus metrics: a collector that reads the relays' plain-int counters at scrape time.

Labelled by mapping (proto, host address and port, container address and port), never by
client: a label per client would grow without bound. Imported only with -metrics-addr.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator
from collections.abc import Mapping as MappingType
from typing import Any

from prometheus_client import CollectorRegistry, Info, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__, compiled
from proxy.ground.budget import process_budget
from proxy.ground.config import CAPABILITIES, Mapping, format_hostport
from proxy.ground.sockets import StartupError, go_strerror
from proxy.ground.stats import DIAL_BUCKETS, EngineStats, MappingStats

LABELS = ["proto", "host_ip", "host_port", "container_ip", "container_port"]


def _label_values(mapping: Mapping) -> list[str]:
    return [mapping.proto, str(mapping.host_ip), str(mapping.host_port),
            str(mapping.container_ip), str(mapping.container_port)]


class StatsCollector(Collector):
    """Turns every mapping's MappingStats into metric families, when scraped."""

    def __init__(self, stats: MappingType[Mapping, MappingStats],
                 engine: EngineStats | None = None,
                 refresh: Callable[[], None] | None = None) -> None:
        self._stats = stats
        self._engine = engine  # the engine's own counters; None outside the engine
        self._refresh = refresh  # brings `stats` up to date first (an engine's workers' sums)

    def collect(self) -> Iterator[Metric]:
        if self._refresh is not None:
            self._refresh()
        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"pyproxy_{name}", doc, labels=LABELS + (extra or []))

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"pyproxy_{name}", doc, labels=LABELS)

        accepted = counter("connections_accepted_total", "TCP connections (SCTP associations) accepted")
        active = gauge("connections_active", "TCP connections (SCTP associations) open now")
        rejected = counter("connections_rejected_total",
                           "connections closed at once: client not allowed, or over -max-conns",
                           ["reason"])
        closed = counter("connections_closed_total",
                         "open connections the proxy closed itself: idle for -idle-timeout",
                         ["reason"])
        dial_failed = counter("backend_dial_failures_total", "backend connects that failed")
        dial = HistogramMetricFamily("pyproxy_backend_dial_duration_seconds",
                                     "time to connect to the backend", labels=LABELS)
        stream_bytes = counter("bytes_total", "payload bytes relayed (TCP, SCTP, and UDP datagrams)",
                               ["direction"])
        spliced = counter("spliced_directions_total",
                          "TCP directions that switched to zero-copy splice(2) as bulk flows")
        messages = counter("sctp_messages_total", "SCTP messages relayed", ["direction"])
        flows_active = gauge("udp_flows_active", "UDP flows in the table now")
        flows = counter("udp_flows_total", "UDP flows by how they began or ended", ["event"])
        datagrams = counter("udp_datagrams_total", "UDP datagrams relayed", ["direction"])
        dropped = counter("udp_datagrams_dropped_total",
                          "UDP datagrams not relayed: send failed, client not allowed, or no "
                          "flow could be opened for a new client", ["reason"])
        budget = process_budget()
        limit, used = budget.limit, budget.used
        if self._engine is not None and self._engine.worker_flow_budget is not None:
            limit, used = self._engine.worker_flow_budget  # the workers hold the flows
        flow_budget = GaugeMetricFamily("pyproxy_udp_flow_budget",
                                        "UDP flows of the whole process (an engine's: of its "
                                        "workers together): its limit and how many are in use",
                                        labels=["state"])
        flow_budget.add_metric(["limit"], limit)
        flow_budget.add_metric(["used"], used)
        for mapping, s in list(self._stats.items()):
            lv = _label_values(mapping)
            can = CAPABILITIES[mapping.proto]
            if can.datagrams:
                flows_active.add_metric(lv, s.flows_active)
                for event, value in (("created", s.flows_created), ("expired", s.flows_expired),
                                     ("evicted", s.flows_evicted)):
                    flows.add_metric([*lv, event], value)
                datagrams.add_metric([*lv, "client_to_container"], s.datagrams_from_client)
                datagrams.add_metric([*lv, "container_to_client"], s.datagrams_from_container)
                dropped.add_metric([*lv, "error"], s.datagrams_dropped)
                dropped.add_metric([*lv, "denied"], s.datagrams_denied)
                dropped.add_metric([*lv, "no_flow"], s.datagrams_no_flow)
                stream_bytes.add_metric([*lv, "client_to_container"], s.bytes_from_client)
                stream_bytes.add_metric([*lv, "container_to_client"], s.bytes_from_container)
                continue
            accepted.add_metric(lv, s.accepted)
            active.add_metric(lv, s.active)
            rejected.add_metric([*lv, "denied"], s.rejected_denied)
            rejected.add_metric([*lv, "limit"], s.rejected_limit)
            closed.add_metric([*lv, "idle"], s.closed_idle)
            dial_failed.add_metric(lv, s.dial_failures)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, DIAL_BUCKETS), "+Inf"], s.dial_bucket_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            dial.add_metric(lv, buckets, s.dial_seconds_sum)
            stream_bytes.add_metric([*lv, "client_to_container"], s.bytes_from_client)
            stream_bytes.add_metric([*lv, "container_to_client"], s.bytes_from_container)
            if can.messages:
                messages.add_metric([*lv, "client_to_container"], s.messages_from_client)
                messages.add_metric([*lv, "container_to_client"], s.messages_from_container)
            if can.splice:
                spliced.add_metric(lv, s.spliced)
        yield from (accepted, active, rejected, closed, dial_failed, dial, stream_bytes, spliced,
                    messages, flows_active, flows, datagrams, dropped, flow_budget)
        if self._engine is not None:
            yield CounterMetricFamily(
                "pyproxy_engine_reattached_mappings",
                "mappings registered again by their waiter, with the listening socket it held, "
                "after the engine serving them went away (their open connections are not "
                "counted: they were lost with that engine)",
                value=self._engine.reattached_mappings)
            yield CounterMetricFamily(
                "pyproxy_worker_restarts",
                "engine worker processes that died and were started again",
                value=self._engine.worker_restarts)
            yield CounterMetricFamily(
                "pyproxy_worker_connections_lost",
                "TCP connections, SCTP associations and UDP flows that were open on an engine "
                "worker when it died (as of its last report)",
                value=self._engine.worker_connections_lost)
            per_worker = CounterMetricFamily(
                "pyproxy_worker_connections_accepted",
                "TCP connections (SCTP associations) accepted, by engine worker slot (a "
                "restarted worker keeps its slot)", labels=["worker"])
            for slot, count in sorted(self._engine.worker_accepted.items()):
                per_worker.add_metric([str(slot)], count)
            yield per_worker


def make_registry(stats: MappingType[Mapping, MappingStats],
                  engine: EngineStats | None = None,
                  refresh: Callable[[], None] | None = None) -> CollectorRegistry:
    """A fresh registry with our collector, the process metrics (CPU, memory, fds), and
    pyproxy_build_info (so a dashboard can tell which version serves)."""
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats, engine, refresh))
    ProcessCollector(registry=registry)
    Info("pyproxy_build", "the pyproxy version serving, its Python, and whether its relays are "
         "compiled", registry=registry).info(
        {"version": __version__, "python": platform.python_version(),
         "compiled": "true" if compiled() else "false"})
    return registry


def start_metrics(addr: tuple[str, int], stats: MappingType[Mapping, MappingStats],
                  engine: EngineStats | None = None,
                  refresh: Callable[[], None] | None = None) -> Any:
    """The /metrics endpoint over `stats` (read at scrape time), served by prometheus-client's
    HTTP server in its own thread; returns that server. StartupError if it can't listen."""
    try:
        server, _ = start_http_server(addr[1], addr=addr[0], registry=make_registry(stats, engine,
                                                                                 refresh))
    except OSError as exc:
        where = f"metrics: listen tcp {format_hostport(addr[0], addr[1])}"
        raise StartupError(f"{where}: bind: {go_strerror(exc)}") from None
    return server


def stop_metrics(server: Any) -> None:
    """Close the endpoint without waiting: shutdown() takes up to the server's 0.5 s poll
    interval, and exit must never wait for it."""
    threading.Thread(target=lambda: (server.shutdown(), server.server_close()),
                     daemon=True).start()
