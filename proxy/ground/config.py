"""What pyproxy serves: the frozen Mapping and Config, and the parsing of every value
a user can write (addresses, ports, port ranges, durations, CIDRs, `-p` specs).

Config is one command line: its mappings, the RelayOptions every relay of it is built from,
and the ProcessOptions of the process serving it. Each flag's default is written once, on its
field here (proxy.ground.flags shows and parses it from there). What each protocol can do
(PROXY protocol versions, -transparent) is the CAPABILITIES table, not checks spread about.

Pure logic, no I/O: each parser raises ValueError with a message that reads well after
"invalid value ... for flag -x:", so the CLI can name the flag and the bad value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

import attrs
from attrs import field, frozen

from proxy.ground.wire import DEFAULT_ENGINE_SOCKET

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Proto = Literal["tcp", "udp", "sctp"]

PROTOCOLS: tuple[Proto, ...] = ("tcp", "udp", "sctp")


@frozen
class Capabilities:
    """What a protocol's relay can do: for the flags that depend on it, and the metrics it has."""

    proxy_protocol: frozenset[int]  # PROXY protocol versions it can send
    transparent: bool  # -transparent (IP_TRANSPARENT dials)
    unsupported: str  # ends "argument -FLAG: " when a flag asks for what it cannot do
    datagrams: bool  # flows of datagrams (else connections or associations)
    messages: bool  # relays whole messages (SCTP), counted as such
    splice: bool  # may switch a bulk direction to splice(2)


# In the order flag errors are reported when a command line mixes protocols.
CAPABILITIES: dict[Proto, Capabilities] = {
    "sctp": Capabilities(frozenset(), False, "TCP and UDP only, not SCTP",
                         datagrams=False, messages=True, splice=False),
    "udp": Capabilities(frozenset({2}), True, "UDP needs v2 (v1 is text for TCP streams)",
                        datagrams=True, messages=False, splice=False),
    "tcp": Capabilities(frozenset({1, 2}), True, "", datagrams=False, messages=False, splice=True),
}
MAX_PORT = 65535

# Linux interface names: at most IFNAMSIZ-1 = 15 bytes, no '/', ':' or whitespace.
_IFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}\Z")


def is_decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() and int() also take '²', '５' and '٣', which no
    port, count or uid is ever written with."""
    return text.isascii() and text.isdigit()


def parse_ip(text: str) -> IPAddress:
    """An IPv4 or IPv6 address; brackets around IPv6 are accepted ("[::1]"), and so is an
    IPv6 zone ("fe80::1%eth0"), which must name an interface (whether it exists is only
    known when a socket uses it: see proxy.ground.sockets)."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    zone = getattr(ip, "scope_id", None)
    if zone is not None and not (is_decimal(zone) or _IFACE.match(zone)):
        raise ValueError(f"{text!r}: zone {zone!r} is not an interface name or index")
    return ip


def parse_port(text: str, *, allow_zero: bool = True) -> int:
    if not is_decimal(text):
        raise ValueError(f"{text!r} is not a port number")
    port = int(text)
    if port > MAX_PORT or (port == 0 and not allow_zero):
        raise ValueError(f"port {port} is out of range ({0 if allow_zero else 1}-{MAX_PORT})")
    return port


@frozen
class PortRange:
    """An inclusive range of ports; a single port is a range of length 1."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str, *, allow_zero: bool = True) -> PortRange:
        first, sep, last = text.partition("-")
        start = parse_port(first, allow_zero=allow_zero)
        end = parse_port(last, allow_zero=False) if sep else start
        if end < start:
            raise ValueError(f"port range {text!r} ends before it starts")
        if sep and start == 0:
            raise ValueError(f"port range {text!r} cannot start at 0")
        return cls(start, end)

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.end + 1))

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


# A Go duration: a sequence of decimal numbers with units, "300ms", "1m30s", "1.5h".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A non-negative Go duration (`time.ParseDuration` syntax) in seconds."""
    if text == "0":
        return 0.0
    if text.startswith("-") and _DURATION_PART.match(text, 1):
        raise ValueError("a duration must not be negative")
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r} is not a duration (examples: 90s, 1m30s, 500ms)")
        total += float(match[1]) * _UNIT_SECONDS[match[2]]
        pos = match.end()
    if pos == 0:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 1m30s, 500ms)")
    return total


def parse_cidr(text: str) -> IPNetwork:
    """A client network: "10.0.0.0/8", "2001:db8::/32", or a bare address (one host)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR network (example: 192.168.0.0/16)") from None


def parse_interface(text: str) -> str:
    if not _IFACE.match(text):
        raise ValueError(f"{text!r} is neither an IP address nor an interface name")
    return text


def family_of(ip: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def format_hostport(ip: IPAddress | str, port: int) -> str:
    """Go's net.JoinHostPort: IPv6 in brackets."""
    text = str(ip)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@frozen
class Mapping:
    """One published port: frontend (host) address and port to backend (container) address and port.

    `host_ports` is usually a single port. A longer range means "the first free port of the range"
    (docker's `-p 8000-8010:80`); port 0 means "the kernel picks". `interface` replaces `host_ip`
    when the user named an interface: the listener takes only traffic arriving on it.
    """

    proto: Proto
    host_ip: IPAddress
    host_ports: PortRange
    container_ip: IPAddress
    container_port: int
    interface: str | None = None

    @property
    def host_port(self) -> int:
        return self.host_ports.start

    @property
    def family(self) -> socket.AddressFamily:
        return family_of(self.host_ip)

    def frontend(self, port: int | None = None) -> str:
        host = f"{self.interface}%" if self.interface else ""
        return host + format_hostport(self.host_ip, self.host_port if port is None else port)

    def backend(self) -> str:
        return format_hostport(self.container_ip, self.container_port)

    @property
    def backend_address(self) -> tuple[str, int]:
        """The backend as connect() takes it."""
        return str(self.container_ip), self.container_port

    @property
    def backend_family(self) -> socket.AddressFamily:
        return family_of(self.container_ip)

    def docker_port_line(self, bound_port: int) -> str:
        """`docker port`'s format: "80/tcp -> 0.0.0.0:49153"."""
        return f"{self.container_port}/{self.proto} -> {format_hostport(self.host_ip, bound_port)}"

    def with_port(self, port: int) -> Mapping:
        return attrs.evolve(self, host_ports=PortRange(port, port))

    def __str__(self) -> str:
        return f"{self.proto} {self.frontend()} -> {self.backend()}"


def expand_ranges(
    proto: Proto,
    host_ip: IPAddress,
    host_ports: PortRange,
    container_ip: IPAddress,
    container_ports: PortRange,
    interface: str | None = None,
) -> list[Mapping]:
    """Docker's range rules: equal lengths map one to one; a host range with a single container
    port is one mapping on the first free port of the range."""
    if len(container_ports) == 1:
        return [Mapping(proto, host_ip, host_ports, container_ip, container_ports.start, interface)]
    if len(host_ports) == 1 and host_ports.start == 0:
        return [
            Mapping(proto, host_ip, PortRange(0, 0), container_ip, port, interface)
            for port in container_ports
        ]
    if len(host_ports) != len(container_ports):
        raise ValueError(
            f"host ports {host_ports} and container ports {container_ports} differ in length"
        )
    return [
        Mapping(proto, host_ip, PortRange(hp, hp), container_ip, cp, interface)
        for hp, cp in zip(host_ports, container_ports, strict=True)
    ]


def parse_publish(text: str, container_ip: IPAddress) -> list[Mapping]:
    """`docker run -p` syntax: [IP:|IFACE:]HOSTPORT[-END]:CONTAINERPORT[-END][/tcp|/udp|/sctp].

    Also `CONTAINERPORT` and `IP::CONTAINERPORT` (host port chosen by the kernel).
    """
    spec, _, proto_text = text.partition("/")
    proto = proto_text or "tcp"
    if proto not in PROTOCOLS:
        raise ValueError(f"protocol {proto!r} in {text!r} is not tcp, udp or sctp")
    host_text, host_ports_text, container_text = _split_publish(spec, text)
    interface = None
    host_ip: IPAddress = ipaddress.IPv4Address("0.0.0.0")
    if host_text:
        try:
            host_ip = parse_ip(host_text)
        except ValueError:
            interface = parse_interface(host_text)
    host_ports = PortRange.parse(host_ports_text) if host_ports_text else PortRange(0, 0)
    container_ports = PortRange.parse(container_text, allow_zero=False)
    return expand_ranges(proto, host_ip, host_ports, container_ip, container_ports, interface)  # type: ignore[arg-type]


def _split_publish(spec: str, text: str) -> tuple[str, str, str]:
    if spec.startswith("["):  # [IPv6]:host:container
        close = spec.find("]")
        if close < 0 or spec[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r}: an IPv6 address must be written [addr]:hostport:port")
        host = spec[: close + 1]
        rest = spec[close + 2 :].split(":")
        if len(rest) != 2:
            raise ValueError(f"{text!r} is not [IP:]HOSTPORT:CONTAINERPORT")
        return host, rest[0], rest[1]
    parts = spec.split(":")
    if len(parts) == 1:
        return "", "", parts[0]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise ValueError(f"{text!r} is not [IP:]HOSTPORT:CONTAINERPORT (write IPv6 as [addr])")


def _mappings(value: Iterable[Mapping]) -> tuple[Mapping, ...]:
    return tuple(value)


def _networks(value: Iterable[IPNetwork] | None) -> tuple[IPNetwork, ...]:
    return tuple(value or ())


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as a cgroup's cpuset or taskset
    narrows it), not the host's count: what "-workers auto" means."""
    return len(os.sched_getaffinity(0))


def parse_workers(text: str) -> int:
    """-workers: "auto" (0: one worker per available CPU) or a whole number of at least 1."""
    if text == "auto":
        return 0
    if not is_decimal(text) or int(text) < 1:
        raise ValueError("not auto or a whole number of at least 1")
    return int(text)


def _option(text: str, parse: Callable[[str], Any], **kw: Any) -> Any:
    """A field whose flag default is `text`, written as a user writes it ("90s"): the field
    holds its parsed value, and -h shows the text (proxy.ground.flags reads it from here)."""
    return field(default=parse(text), metadata={"flag_default": text}, **kw)


@frozen
class RelayOptions:
    """How every relay of a command line serves its mapping; all a relay is built from."""

    udp_timeout: float = _option("90s", parse_duration, validator=_positive)
    udp_max_flows: int = _option("16384", int, validator=_positive)
    dial_timeout: float = _option("30s", parse_duration, validator=_positive)
    dial_retry: float = _option("0", parse_duration, validator=_positive)
    max_conns: int = _option("0", int, validator=_positive)
    idle_timeout: float = _option("0", parse_duration, validator=_positive)  # 0: never
    allow: tuple[IPNetwork, ...] = field(default=(), converter=_networks)
    proxy_protocol: int = 0  # 0 (off), 1 or 2
    transparent: bool = False


# Not slotted: Config inherits from both option classes, and only one base may have slots.
@frozen(slots=False)
class ProcessOptions:
    """How the process serving a command line runs: its log, metrics, user, shutdown."""

    metrics_addr: tuple[str, int] | None = None
    log_level: str = "info"
    log_format: str = "text"
    log_file: str | None = None
    access_log: str | None = None  # PATH, "syslog" or "-" (stdout): see proxy.ground.accesslog
    drain_timeout: float = _option("0", parse_duration, validator=_positive)
    user: str | None = None  # drop to this user once listening
    engine: bool = False  # serve the mappings that spawned pyproxies hand over (modes.engine)
    engine_socket: str = DEFAULT_ENGINE_SOCKET
    # An engine exits once no mapping has been registered for this long; 0: never (an engine
    # a service manager runs). An engine that a spawned pyproxy started gets one (handover).
    engine_idle_exit: float = _option("0", parse_duration, validator=_positive)
    # The engine's worker processes (proxy.modes.workers); 0 ("auto"): one per CPU it may run on.
    workers: int = _option("auto", parse_workers)


@frozen
class Config(RelayOptions, ProcessOptions):
    """One command line, built once by proxy.ground.flags, never changed: what it publishes
    (mappings, and whether its socket came on fd 4), and both kinds of options (read
    `relay_options()` to build relays)."""

    mappings: tuple[Mapping, ...] = field(converter=_mappings, default=())
    use_listen_fd: bool = False

    def relay_options(self) -> RelayOptions:
        """Only the per-relay options: what a relay is built from, and all it can see."""
        return RelayOptions(**{f.name: getattr(self, f.name) for f in attrs.fields(RelayOptions)})

    def process_options(self) -> ProcessOptions:
        return ProcessOptions(**{f.name: getattr(self, f.name)
                                 for f in attrs.fields(ProcessOptions)})
