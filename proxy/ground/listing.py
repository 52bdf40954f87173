"""What `pyproxy -list` shows: one row per mapping (docker port's form, its backend, what is
open now and the bytes each way), built from the relays' MappingStats or from a /metrics scrape,
and printed as a table for people or JSON for scripts.

Pure logic, no I/O: the engine builds rows from its stats, the `-list` command from the engine's
answer or a standalone pyproxy's exposition text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Mapping as MappingType

import attrs
from attrs import frozen

from proxy.ground.config import CAPABILITIES, Mapping, PortRange, parse_ip
from proxy.ground.stats import MappingStats


@frozen
class Row:
    """One published mapping as `-list` shows it."""

    proto: str
    frontend: str  # ip:port ([v6]:port), "IFACE%ip:port" when bound by interface
    backend: str  # the container's ip:port
    docker_port: str  # `docker port`'s line: "80/tcp -> 0.0.0.0:8080" (no interface)
    open: int  # TCP connections / SCTP associations open now, or UDP flows in the table
    total: int  # connections accepted, or UDP flows created, since the mapping started
    bytes_client_to_container: int
    bytes_container_to_client: int

    @classmethod
    def of(cls, mapping: Mapping, stats: MappingStats) -> Row:
        datagrams = CAPABILITIES[mapping.proto].datagrams
        frontend = mapping.frontend()
        return cls(
            proto=mapping.proto, frontend=frontend, backend=mapping.backend(),
            docker_port=mapping.docker_port_line(mapping.host_port),
            open=stats.flows_active if datagrams else stats.active,
            total=stats.flows_created if datagrams else stats.accepted,
            bytes_client_to_container=stats.bytes_from_client,
            bytes_container_to_client=stats.bytes_from_container)

    def label(self) -> str:
        """docker port's form with the frontend as bound: "80/tcp -> lo%0.0.0.0:8080"."""
        return f"{self.docker_port.partition(' -> ')[0]} -> {self.frontend}"

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Row:
        """ValueError if the line is not a row (fields a newer engine adds are ignored)."""
        try:
            data = json.loads(line)
            return cls(**{f.name: data[f.name] for f in attrs.fields(cls)})
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a mapping row: {line[:80]!r}: {exc}") from None


def rows_from_stats(stats: MappingType[Mapping, MappingStats]) -> list[Row]:
    return sorted((Row.of(mapping, s) for mapping, s in list(stats.items())),
                  key=lambda row: (row.proto, row.frontend))


# The metric families (sample names) a row is read from, and the MappingStats field each fills.
_FROM_SAMPLES = {
    ("pyproxy_connections_active", None): "active",
    ("pyproxy_connections_accepted_total", None): "accepted",
    ("pyproxy_udp_flows_active", None): "flows_active",
    ("pyproxy_udp_flows_total", "created"): "flows_created",
    ("pyproxy_bytes_total", "client_to_container"): "bytes_from_client",
    ("pyproxy_bytes_total", "container_to_client"): "bytes_from_container",
}
_QUALIFIER = {"pyproxy_udp_flows_total": "event", "pyproxy_bytes_total": "direction"}


def rows_from_exposition(text: str) -> list[Row]:
    """The rows of a pyproxy's /metrics page (Prometheus text format). ValueError if it is not
    one. The labels carry no interface: a mapping bound by interface shows its address."""
    from prometheus_client.parser import text_string_to_metric_families  # only -list pays

    stats: dict[Mapping, MappingStats] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            qualifier = _QUALIFIER.get(sample.name)
            field = _FROM_SAMPLES.get((sample.name, sample.labels.get(qualifier) if qualifier
                                       else None))
            if field is None:
                continue
            labels = sample.labels
            try:
                host_port = int(labels["host_port"])
                mapping = Mapping(labels["proto"], parse_ip(labels["host_ip"]),  # type: ignore[arg-type]
                                  PortRange(host_port, host_port),
                                  parse_ip(labels["container_ip"]), int(labels["container_port"]))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"a pyproxy sample without a mapping's labels: {exc}") from None
            setattr(stats.setdefault(mapping, MappingStats()), field, int(sample.value))
    return rows_from_stats(stats)


_COLUMNS = ("MAPPING", "BACKEND", "OPEN", "TOTAL", "FROM CLIENT", "FROM CONTAINER")


def format_table(rows: Iterable[Row]) -> str:
    """Aligned columns, numbers to the right; TOTAL is connections accepted (UDP: flows made),
    FROM CLIENT / FROM CONTAINER the bytes each way."""
    cells = [_COLUMNS] + [(r.label(), r.backend, str(r.open), str(r.total),
                           str(r.bytes_client_to_container), str(r.bytes_container_to_client))
                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = []
    for row in cells:
        text = [cell.ljust(width) if i < 2 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(text).rstrip())
    return "\n".join(lines)


def format_json(rows: Iterable[Row]) -> str:
    """One JSON array of row objects (the field names of Row)."""
    return json.dumps([attrs.asdict(row) for row in rows], indent=1)
