"""Command line -> Config, with Go `flag` syntax so dockerd can run pyproxy as docker-proxy.
Below the modes: the standalone entry and the engine (for each registration) both parse here.

`-flag value`, `-flag=value` and `--flag value` all work; booleans are `-b` or `-b=true`.
`-h` prints usage and exits 0; a bad flag or value exits 2 naming it. No networking here.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs

from proxy import __version__, compiled
from proxy.ground.config import (
    CAPABILITIES,
    PROTOCOLS,
    Config,
    Mapping,
    PortRange,
    available_cpus,
    expand_ranges,
    is_decimal,
    parse_cidr,
    parse_duration,
    parse_ip,
    parse_publish,
    parse_workers,
)
from proxy.ground.wire import DEFAULT_ENGINE_SOCKET, ENGINE_SOCKET_ENV, engine_socket_path

USAGE_EXIT = 2
DOCKER_CONTAINER_IP = "0.0.0.0"  # docker-proxy's -container-ip default


class UsageError(Exception):
    """A command line that cannot be served; the text names the flag."""


def _flag_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """argparse reports a type's ValueError generically; ArgumentTypeError keeps our message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None

    convert.__name__ = name
    return convert


def _parse_bool(text: str) -> bool:
    # Go's strconv.ParseBool
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError("not a boolean (true or false)")


def _parse_count(text: str) -> int:
    if not is_decimal(text):
        raise ValueError("not a non-negative whole number")
    return int(text)


def _parse_proxy_protocol(text: str) -> int:
    versions = {"v1": 1, "1": 1, "v2": 2, "2": 2}
    if text not in versions:
        raise ValueError("must be v1 or v2")
    return versions[text]


def _parse_metrics_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not is_decimal(port) or not 0 < int(port) <= 65535:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:9100")
    if not host:
        # Metrics reveal traffic: a bare ":PORT" would serve them on every address.
        raise ValueError(
            "no host given, which would serve metrics on every address; "
            "write 127.0.0.1:PORT, or 0.0.0.0:PORT if you mean it"
        )
    return str(parse_ip(host)), int(port)


def _default(name: str) -> Any:
    """A flag's default as the user would write it, from its Config field (said once there)."""
    field = attrs.fields_dict(Config)[name]
    return field.metadata.get("flag_default", field.default)


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text

    return parse


class _GoParser(argparse.ArgumentParser):
    """argparse with Go's `flag` syntax: `-name`, `--name`, `-name=value`, `-name value`.

    argparse alone would also chain single-dash flags (`-hv` as `-h -v`) and take `-1s` for
    a flag; Go does neither, so go_syntax() rewrites argv into unambiguous `--name=value`
    first, rejecting what Go's flag package rejects."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.go_flags: dict[str, argparse.Action] = {}  # "host-port" -> its action

    def add_argument(self, *args: Any, **kw: Any) -> argparse.Action:
        action = super().add_argument(*args, **kw)
        for option in action.option_strings:
            self.go_flags[option.lstrip("-")] = action
        return action

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def go_syntax(self, argv: Sequence[str]) -> list[str]:
        """argv with every flag spelled `--name[=value]`; stops at the first non-flag, as Go."""
        out: list[str] = []
        rest = list(argv)
        while rest:
            arg = rest[0]
            if len(arg) < 2 or arg[0] != "-":
                break  # not a flag: the rest goes to argparse as is (and is refused there)
            del rest[0]
            if arg == "--":
                out.append(arg)
                break
            name, has_value, value = arg[2 if arg[1] == "-" else 1:].partition("=")
            if not name or name[0] in "-=":
                raise UsageError(f"bad flag syntax: {arg}")
            action = self.go_flags.get(name)
            if action is None:
                raise UsageError(f"flag provided but not defined: -{name}")
            option = action.option_strings[-1]
            if action.nargs == 0:  # -h, -v: argparse refuses a value given to them
                out.append(f"{option}={value}" if has_value else option)
            elif action.nargs == "?":  # a Go boolean: never takes the next argument
                out.append(f"{option}={value if has_value else 'true'}")
            elif has_value or rest:  # Go takes the next argument whatever it looks like
                out.append(f"{option}={value if has_value else rest.pop(0)}")
            else:
                out.append(option)  # argparse says "expected one argument"
        return out + rest


class _DefaultsFormatter(argparse.HelpFormatter):
    """-h shows every flag's default. Defaults are written as a user writes them ("90s", not
    90.0; argparse parses a string default with the flag's type), booleans as Go's "false";
    a flag whose default is nothing says in its help text what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        shown = str(action.default).lower() if isinstance(action.default, bool) else "%(default)s"
        return f"{text} (default: {shown})"


@functools.cache  # the engine parses every registration's argv with it: build it once
def build_parser() -> argparse.ArgumentParser:
    parser = _GoParser(
        prog="pyproxy",
        description="Publish a port: relay TCP connections or UDP flows from a host address "
        "to a container address. Runs as docker-proxy under dockerd, or on its own.",
        add_help=False,
        allow_abbrev=False,
        formatter_class=_DefaultsFormatter,
        epilog="pyproxy -list [-json] [-engine-socket PATH | -metrics-addr HOST:PORT] lists "
        "what a running pyproxy serves (pyproxy -list -h tells more).",
    )

    def flag(name: str, parse: Callable[[str], Any] | None, default: Any, help: str, **kw: Any) -> None:
        if parse is not None:
            kw["type"] = _flag_type(parse, name)
        parser.add_argument(
            f"-{name}", f"--{name}", dest=name.replace("-", "_"), default=default, help=help, **kw
        )

    def boolean(name: str, help: str) -> None:
        flag(name, _parse_bool, False, help, nargs="?", const=True, metavar="true|false")

    # docker-proxy's own flags (the runtime contract)
    flag("proto", _parse_choice(*PROTOCOLS), "tcp", "tcp, udp or sctp")
    flag("host-ip", parse_ip, "0.0.0.0", "frontend address (picks IPv4 or IPv6)")
    flag("host-port", None, "-1", "frontend port, a range A-B, or 0 for a kernel-chosen port")
    # No default here so that -p can tell it was not given; -host-port keeps docker-proxy's.
    flag("container-ip", parse_ip, None,
         f"backend address (default: {DOCKER_CONTAINER_IP} with -host-port; -p needs it)")
    flag("container-port", None, "-1", "backend port, or a range C-D")
    boolean("use-listen-fd", "adopt the listening socket passed on fd 4")
    parser.add_argument("-v", "-version", "--version", action="store_true", dest="version",
                        default=None, help="print the version and exit")
    parser.add_argument("-h", "-help", "--help", action="store_true", dest="help",
                        default=None, help="show this help and exit")
    # pyproxy's own
    flag("p", None, None, "publish [IP:|IFACE:]HOSTPORT[-END]:CONTAINERPORT[-END][/tcp|/udp|/sctp] "
         "(repeatable; backend address from -container-ip; default: none)", action="append",
         metavar="SPEC")
    flag("udp-timeout", parse_duration, _default("udp_timeout"), "UDP flow idle timeout", metavar="D")
    flag("udp-max-flows", _parse_count, _default("udp_max_flows"), "cap on UDP flows per mapping; the idlest is "
         "evicted when full (0: no per-mapping cap; the process-wide budget still applies)",
         metavar="N")
    flag("dial-timeout", parse_duration, _default("dial_timeout"), "backend connect timeout (0: none)", metavar="D")
    flag("dial-retry", parse_duration, _default("dial_retry"), "retry a refused backend for up to D", metavar="D")
    flag("max-conns", _parse_count, _default("max_conns"),
         "cap on concurrent TCP connections (SCTP associations) per listener; 0: none", metavar="N")
    flag("idle-timeout", parse_duration, _default("idle_timeout"),
         "close a TCP connection (SCTP association) with no bytes either way for D; 0: never",
         metavar="D")
    flag("allow", parse_cidr, None, "only clients in this CIDR may connect (repeatable; "
         "default: every client)", action="append", metavar="CIDR")
    flag("proxy-protocol", _parse_proxy_protocol, _default("proxy_protocol"),
         "send a PROXY protocol header, v1 or v2 (default: off)", metavar="v1|v2")
    boolean("transparent", "connect to the container from the client's own address "
            "(IP_TRANSPARENT; needs CAP_NET_ADMIN and policy routing)")
    flag("metrics-addr", _parse_metrics_addr, None,
         "serve Prometheus metrics on HOST:PORT (default: off)", metavar="HOST:PORT")
    flag("log-level", _parse_choice("debug", "info", "warning", "error"), _default("log_level"),
         "debug, info, warning or error")
    flag("log-format", _parse_choice("text", "json"), _default("log_format"), "text or json")
    flag("log-file", None, None, "log to PATH, a file or device (reopened on SIGHUP), or "
         "'syslog' (default: stderr)", metavar="PATH")
    flag("access-log", None, None, "write a line per finished connection or UDP flow to "
         "PATH (reopened on SIGHUP), 'syslog' or '-' (stdout), in -log-format "
         "(default: off)", metavar="PATH")
    flag("user", None, None, "once every port is bound, run as this user, name or uid "
         "(default: stay as started)", metavar="NAME")
    boolean("engine", "run the shared engine that serves the mappings of spawned pyproxies")
    flag("engine-socket", None, engine_socket_path(),
         f"the engine's Unix socket (default: ${ENGINE_SOCKET_ENV} or {DEFAULT_ENGINE_SOCKET})",
         metavar="PATH")
    flag("engine-idle-exit", parse_duration, _default("engine_idle_exit"),
         "with -engine: exit once no mapping has been held for D (0: never)", metavar="D")
    # No argparse default, so that a -workers given without -engine is refused even as "auto".
    flag("workers", parse_workers, None,
         "with -engine: worker processes that serve the mappings; auto: one per CPU the "
         f"engine may run on ({available_cpus()} here); 1: the engine's own process "
         f"(default: {_default('workers')})", metavar="N|auto")
    flag("drain-timeout", parse_duration, _default("drain_timeout"),
         "on SIGTERM, let open connections finish for up to D (default: 0, exit at once)",
         metavar="D")
    return parser


@functools.cache
def build_list_parser() -> argparse.ArgumentParser:
    """`pyproxy -list`: its own few flags, answered here, never handed to an engine."""
    parser = _GoParser(
        prog="pyproxy -list",
        description="List what a running engine serves (or, with -metrics-addr, a standalone "
        "pyproxy's /metrics): each mapping in `docker port` form, its backend, what is open "
        "now, how many were accepted (UDP: flows made) and the bytes each way.",
        add_help=False, allow_abbrev=False, formatter_class=_DefaultsFormatter)
    parser.add_argument("-list", "--list", type=_flag_type(_parse_bool, "list"), nargs="?",
                        const=True, default=False, metavar="true|false", help="list mappings")
    parser.add_argument("-json", "--json", type=_flag_type(_parse_bool, "json"), nargs="?",
                        const=True, default=False, metavar="true|false",
                        help="print a JSON array for scripts instead of a table")
    parser.add_argument("-engine-socket", "--engine-socket", dest="engine_socket",
                        default=engine_socket_path(), metavar="PATH",
                        help=f"the engine's Unix socket (default: ${ENGINE_SOCKET_ENV} or "
                        f"{DEFAULT_ENGINE_SOCKET})")
    parser.add_argument("-metrics-addr", "--metrics-addr", dest="metrics_addr",
                        type=_flag_type(_parse_metrics_addr, "metrics-addr"), default=None,
                        metavar="HOST:PORT", help="read a standalone pyproxy's /metrics here "
                        "instead of asking the engine (default: ask the engine)")
    parser.add_argument("-h", "-help", "--help", action="store_true", dest="help",
                        default=None, help="show this help and exit")
    return parser


def parse_list_args(argv: Sequence[str]) -> argparse.Namespace:
    """`pyproxy -list ...`'s flags; raises UsageError naming the flag."""
    parser = build_list_parser()
    assert isinstance(parser, _GoParser)
    args = parser.parse_args(parser.go_syntax(argv))
    if args.metrics_addr and "-engine-socket" in {a.lstrip("-").partition("=")[0] for a in argv}:
        raise UsageError("argument -metrics-addr: lists a standalone pyproxy; drop -engine-socket")
    return args


def _port_range(text: str, flag_name: str) -> PortRange:
    try:
        return PortRange.parse(text)
    except ValueError as exc:
        raise UsageError(f"argument -{flag_name}: invalid value {text!r}: {exc}") from None


def _check_not_published(mapping: Mapping, seen: set[tuple[object, ...]], spec: str) -> None:
    """Two mappings on one fixed frontend would fail at bind with "address already in use",
    which blames some other process; name the real mistake instead. (A host range takes its
    first free port, so repeating one publishes twice, as docker does.)"""
    if len(mapping.host_ports) != 1 or mapping.host_port == 0:
        return
    key = (mapping.proto, mapping.host_ip, mapping.interface, mapping.host_port)
    if key in seen:
        raise UsageError(f"argument -p: duplicate mapping {spec!r}: {mapping.frontend()}/"
                         f"{mapping.proto} is already published")
    seen.add(key)


MAX_UNIX_PATH = 107  # sun_path is 108 bytes, NUL included


def _check_engine_socket(path: str) -> None:
    if not path:
        raise UsageError(f"argument -engine-socket: empty (is ${ENGINE_SOCKET_ENV} set to ''?); "
                         "the engine needs a path for its socket")
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise UsageError(f"argument -engine-socket: {path!r} is {size} bytes; a Unix socket path "
                         f"is at most {MAX_UNIX_PATH}")


def config_from_args(args: argparse.Namespace) -> Config:
    mappings: list[Mapping] = []
    if args.p and args.container_ip is None:
        # Without it every -p would relay to 0.0.0.0, which Linux dials as this host: never
        # the container the user meant.
        raise UsageError("argument -p: needs -container-ip, the backend's address")
    container_ip = parse_ip(DOCKER_CONTAINER_IP) if args.container_ip is None else args.container_ip
    if args.host_port != "-1":
        if args.container_port == "-1":
            raise UsageError("argument -container-port: required with -host-port")
        host_ports = _port_range(args.host_port, "host-port")
        container_ports = _port_range(args.container_port, "container-port")
        if container_ports.start == 0:
            raise UsageError("argument -container-port: port 0 cannot be dialled")
        try:
            mappings += expand_ranges(args.proto, args.host_ip, host_ports, container_ip,
                                      container_ports)
        except ValueError as exc:
            raise UsageError(f"argument -host-port/-container-port: {exc}") from None
    seen: set[tuple[object, ...]] = set()
    for mapping in mappings:
        _check_not_published(mapping, seen, f"-host-port {args.host_port}")
    for spec in args.p or ():
        try:
            published = parse_publish(spec, container_ip)
        except ValueError as exc:
            raise UsageError(f"argument -p: invalid value {spec!r}: {exc}") from None
        for mapping in published:
            _check_not_published(mapping, seen, spec)
        mappings += published
    if args.engine and mappings:
        raise UsageError("argument -engine: the engine serves what spawned pyproxies hand it; "
                         "give it no -host-port or -p")
    if args.engine:
        _check_engine_socket(args.engine_socket)
    if args.engine_idle_exit and not args.engine:
        raise UsageError("argument -engine-idle-exit: only with -engine")
    if args.workers is not None and not args.engine:
        raise UsageError("argument -workers: only with -engine")
    if not mappings and not args.engine:
        raise UsageError("nothing to publish: give -host-port and -container-port, or -p")
    if args.use_listen_fd and len(mappings) != 1:
        raise UsageError("argument -use-listen-fd: fd 4 serves exactly one mapping")
    if args.user and args.transparent:
        raise UsageError("argument -user: -transparent needs CAP_NET_ADMIN or CAP_NET_RAW for "
                         "every connection, which -user would drop")
    if args.user and args.engine:
        raise UsageError("argument -user: the engine binds ports as they are published; "
                         "run it as the user it should be")
    if args.transparent and args.proxy_protocol:
        raise UsageError("argument -transparent: the container already sees the client; "
                         "drop -proxy-protocol")
    protos = {m.proto for m in mappings}
    for proto, can in CAPABILITIES.items():
        if proto not in protos:
            continue
        if args.proxy_protocol and args.proxy_protocol not in can.proxy_protocol:
            raise UsageError(f"argument -proxy-protocol: {can.unsupported}")
        if args.transparent and not can.transparent:
            raise UsageError(f"argument -transparent: {can.unsupported}")
    # Every pyproxy flag's dest is a Config field of the same name (tests/test_config.py
    # keeps them in step), so the rest of the Config is read straight off the flags.
    own = {f.name: getattr(args, f.name) for f in attrs.fields(Config) if f.name != "mappings"}
    if own["workers"] is None:
        own["workers"] = parse_workers(_default("workers"))
    return Config(mappings=mappings, **own)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """argv read with Go's flag syntax; raises UsageError, never exits (the engine calls it)."""
    parser = build_parser()
    assert isinstance(parser, _GoParser)
    return parser.parse_args(parser.go_syntax(argv))


def parse_config(argv: Sequence[str]) -> Config | None:
    """The Config for argv, or None when the command was -h or -v (already answered)."""
    args = parse_args(argv)
    if args.help:
        build_parser().print_help()
        return None
    if args.version:
        print(f"pyproxy version {__version__}{' (compiled relays)' if compiled() else ''}")
        return None
    return config_from_args(args)
