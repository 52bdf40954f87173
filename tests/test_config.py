"""Parsing of flags, addresses, ports, ranges, durations, CIDRs and -p specs (no sockets)."""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ground.config import (
    Config,
    PortRange,
    parse_cidr,
    parse_duration,
    parse_publish,
)
from proxy.ground.flags import UsageError, build_parser, parse_config

IP = ipaddress.ip_address


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("1m30s", 90), ("500ms", 0.5), ("1.5h", 5400), ("0", 0), ("250us", 0.00025),
    ("2h45m", 9900), (".5s", 0.5),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "90", "s", "1x", "1 s", "1s2", "ms", "-", "--1s", "1٣s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-1s", "-0.5ms", "-1m30s"])
def test_negative_durations_say_so(text: str) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(text)


def test_publish_specs() -> None:
    backend = IP("172.17.0.2")
    [m] = parse_publish("8080:80", backend)
    assert (m.proto, str(m.host_ip), m.host_port, m.container_port) == ("tcp", "0.0.0.0", 8080, 80)
    [m] = parse_publish("127.0.0.1:53:53/udp", backend)
    assert (m.proto, str(m.host_ip)) == ("udp", "127.0.0.1")
    [m] = parse_publish("[::1]:8080:80", backend)
    assert str(m.host_ip) == "::1"
    [m] = parse_publish("80", backend)  # host port chosen by the kernel
    assert m.host_port == 0
    [m] = parse_publish("127.0.0.1::80", backend)
    assert m.host_port == 0 and str(m.host_ip) == "127.0.0.1"
    ms = parse_publish("9000-9003:9000-9003", backend)
    assert [(m.host_port, m.container_port) for m in ms] == [(p, p) for p in range(9000, 9004)]
    [m] = parse_publish("8000-8010:80", backend)  # first free port of the range
    assert m.host_ports == PortRange(8000, 8010)
    [m] = parse_publish("eth0:8080:80", backend)
    assert m.interface == "eth0"


@pytest.mark.parametrize("spec", [
    "8080:80/icmp", "1-3:1-2", "70000:80", "8080:0", "a:b:c:d", "[::1:80:80", "5-3:80", "",
    "not/an:iface:80:80",
])
def test_bad_publish_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_publish(spec, IP("10.0.0.1"))


def test_cidrs() -> None:
    assert parse_cidr("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_cidr("::1") == ipaddress.ip_network("::1/128")
    with pytest.raises(ValueError, match="CIDR"):
        parse_cidr("10.0.0.0/33")


def test_docker_command_line() -> None:
    config = parse_config(["-proto", "udp", "-host-ip", "::", "-host-port", "53",
                           "-container-ip", "172.17.0.2", "-container-port", "5353"])
    assert config is not None
    [m] = config.mappings
    assert (m.proto, str(m.host_ip), m.host_port, str(m.container_ip), m.container_port) == (
        "udp", "::", 53, "172.17.0.2", 5353)
    assert m.docker_port_line(53) == "5353/udp -> [::]:53"


def test_every_flag_reaches_config() -> None:
    """The CLI and Config stay in step: each pyproxy flag names a Config field, and back."""
    dests = {a.dest for a in build_parser()._actions} - {"help", "version"}
    docker_only = {"proto", "host_ip", "host_port", "container_ip", "container_port", "p"}
    fields = {f.name for f in attrs.fields(Config)} - {"mappings"}
    assert dests - docker_only == fields


FLAGS = ["-proto", "-host-ip", "-host-port", "-container-ip", "-container-port",
         "-use-listen-fd", "-p", "-udp-timeout", "-udp-max-flows", "-dial-timeout", "-dial-retry",
         "-max-conns", "-allow", "-proxy-protocol", "-metrics-addr", "-log-level", "-log-format",
         "-log-file", "-drain-timeout", "--host-port", "-x"]
VALUES = st.one_of(
    st.sampled_from(["tcp", "udp", "sctp", "0", "80", "-1", "8000-8010", "::", "127.0.0.1",
                     "1m", "90s", "v1", "v2", "json", "10.0.0.0/8", "8080:80/udp", "true", "="]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FLAGS), VALUES), max_size=10))
def test_any_argv_is_a_config_or_a_usage_error(argv: list[str]) -> None:
    try:
        parse_config(argv)
    except UsageError as exc:
        assert str(exc)  # a message, never a traceback
    except SystemExit as exc:  # only -h prints help and exits, with 0
        assert exc.code == 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789:-/[]abcdefptu.", max_size=24))
def test_any_publish_spec_parses_or_says_why(spec: str) -> None:
    try:
        mappings = parse_publish(spec, IP("10.0.0.2"))
    except ValueError as exc:
        assert str(exc)
    else:
        assert all(0 <= m.host_port <= 65535 and 0 < m.container_port <= 65535 for m in mappings)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.smhun", max_size=12))
def test_any_duration_parses_or_says_why(text: str) -> None:
    try:
        assert parse_duration(text) >= 0
    except ValueError as exc:
        assert "not a duration" in str(exc)


@pytest.mark.parametrize("argv, error", [
    (["-hv"], "flag provided but not defined: -hv"),  # Go does not chain single-dash flags
    (["-vh"], "flag provided but not defined: -vh"),
    (["-hh"], "flag provided but not defined: -hh"),
    (["-p", "80", "-nosuch"], "flag provided but not defined: -nosuch"),
    (["---p", "80"], "bad flag syntax: ---p"),
    (["-=p"], "bad flag syntax: -=p"),
    (["-engine", "-engine-socket", ""], "argument -engine-socket: empty"),
    (["-engine", "-engine-socket", "/" + "x" * 200], "is 201 bytes; a Unix socket path is at most 107"),
])
def test_go_flag_syntax_is_enforced(argv: list[str], error: str) -> None:
    with pytest.raises(UsageError, match=error.replace("-", r"\-")):
        parse_config(argv)


def test_a_value_flag_takes_the_next_argument_whatever_it_looks_like() -> None:
    """Go's flag package: `-dial-timeout -1s` gives -1s to -dial-timeout (then refuses it)."""
    with pytest.raises(UsageError, match=r"argument -dial-timeout/--dial-timeout: invalid value '-1s'"):
        parse_config(["-container-ip", "127.0.0.1", "-p", "80", "-dial-timeout", "-1s"])
    config = parse_config(["-container-ip", "127.0.0.1", "-p", "80", "-transparent", "-use-listen-fd=false", "--p=81"])
    assert config is not None and config.transparent and len(config.mappings) == 2


def test_help_is_answered_without_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(["-help"]) is None  # the engine parses argv too: it must never exit
    assert "-engine-socket" in capsys.readouterr().out
