"""Hostile values on the command line: each gets a clear message naming its flag and a
non-zero exit (2 for usage, 1 at start-up, on fd 3 where dockerd reads it), never a traceback
and never a hang; and the dial histogram resolves the microseconds a loopback dial takes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ground.config import is_decimal, parse_duration, parse_ip, parse_port
from proxy.ground.flags import UsageError, build_parser, parse_config
from proxy.ground.metrics import make_registry
from proxy.ground.privileges import drop_to
from proxy.ground.sockets import StartupError
from proxy.ground.stats import DIAL_BUCKETS, MappingStats
from tests.helpers import EchoBackend, Proxy, backend, docker_args, exchange, free_port, tcp_proxy

pytestmark = pytest.mark.timeout(60)

# Each is a digit to str.isdigit() and to int(), none is one a port or uid is written with.
NOT_ASCII_DIGITS = ["²", "５", "٣", "८०", "1٣", "８０"]


# -- the parsers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_only_ascii_digits_are_numbers(text: str) -> None:
    assert not is_decimal(text)
    with pytest.raises(ValueError, match="not a port number"):
        parse_port(text)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text + "s")


@pytest.mark.parametrize("flag", ["-udp-max-flows", "-max-conns"])
@pytest.mark.parametrize("text", NOT_ASCII_DIGITS)
def test_counts_take_ascii_digits_only(flag: str, text: str) -> None:
    with pytest.raises(UsageError, match=f"argument {flag}"):
        parse_config(["-container-ip", "127.0.0.1", "-p", "80:80", flag, text])


@pytest.mark.parametrize("argv", [
    ["-container-ip", "127.0.0.1", "-p", "８０:80"], ["-container-ip", "127.0.0.1", "-p", "80:٨٠"],
    ["-host-port", "５", "-container-port", "80"],
    ["-container-ip", "127.0.0.1", "-p", "80:80", "-metrics-addr", "127.0.0.1:９１００"],
])
def test_ports_take_ascii_digits_only(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_config(argv)


def test_ipv6_zone_must_name_an_interface() -> None:
    assert parse_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1%eth0")
    assert parse_ip("[fe80::1%2]") == ipaddress.ip_address("fe80::1%2")
    for text in ("fe80::1%٣", "fe80::1%a b", "fe80::1%eth0\n", "fe80::1%" + "x" * 16):
        with pytest.raises(ValueError):
            parse_ip(text)


@pytest.mark.parametrize("user", ["²", "٣", "５"])
def test_user_with_non_ascii_digits_is_no_such_user(user: str) -> None:
    with pytest.raises(StartupError, match=f"-user {user}: no such user"):
        drop_to(user)


def test_negative_duration_is_its_flags_error_not_a_missing_value() -> None:
    """Go's flag package takes "-1s" as -dial-timeout's value, and then refuses it."""
    for flag in ("-dial-timeout", "--dial-timeout", "-udp-timeout", "-drain-timeout"):
        with pytest.raises(UsageError,
                           match=f"{flag.lstrip('-')}: invalid value '-1s': a duration must not be negative"):
            parse_config(["-container-ip", "127.0.0.1", "-p", "80:80", flag, "-1s"])


def test_every_go_spelling_of_a_value_still_works() -> None:
    spellings = [["-dial-timeout", "5s"], ["-dial-timeout=5s"], ["--dial-timeout", "5s"],
                 ["--dial-timeout=5s"]]
    for spelling in spellings:
        config = parse_config(["-container-ip", "127.0.0.1", "-p", "80:80", *spelling])
        assert config is not None and config.dial_timeout == 5.0
    # a boolean takes no separate value in Go: what follows it is the next flag
    config = parse_config(["-use-listen-fd", "-container-ip", "127.0.0.1", "-p", "80:80"])
    assert config is not None and config.use_listen_fd
    # a value that looks like a flag is still the value, e.g. an -allow that is misspelt
    with pytest.raises(UsageError, match=r"argument -allow.*'-p'"):
        parse_config(["-allow", "-p", "80:80"])


def test_go_syntax_joins_values_and_leaves_what_is_not_a_flag_pair() -> None:
    go_syntax = build_parser().go_syntax  # type: ignore[attr-defined]
    assert go_syntax(["-p", "-1:80", "-use-listen-fd", "y"]) == [
        "--p=-1:80", "--use-listen-fd=true", "y"]
    assert go_syntax(["-p"]) == ["--p"]  # no value: argparse says "expected one argument"
    assert go_syntax(["--", "-p", "1"]) == ["--", "-p", "1"]  # "--" ends the flags


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["-p", "-dial-timeout", "-udp-max-flows", "-allow", "-log-level", "-user"]),
       st.text(max_size=10))
def test_any_value_means_the_same_after_a_space_or_an_equals_sign(flag: str, value: str) -> None:
    def outcome(argv: list[str]) -> object:
        try:
            return parse_config(["-host-port", "1", "-container-port", "2", *argv])
        except UsageError as exc:
            return str(exc)

    assert outcome([flag, value]) == outcome([f"{flag}={value}"])


# -- as dockerd sees them: fd 3, exit code, stderr -----------------------------------------------

def _refused(args: list[str], code: int) -> tuple[bytes, bytes]:
    """Start pyproxy as dockerd does; it must fail with `code`, fd 3 saying why."""
    p = Proxy(args, wait_ready=False)
    assert p.proc.wait(timeout=20) == code
    _, err = p.stop()
    assert p.status.startswith(b"1\n"), p.status
    assert b"Traceback" not in err and b"Logging error" not in err, err
    return p.status, err


def test_user_superscript_two_is_no_such_user():
    status, _ = _refused([*docker_args(free_port(), 80), "-user", "²"], 1)
    assert status == "1\n-user ²: no such user".encode()


def test_fullwidth_port_is_a_usage_error():
    status, _ = _refused([*docker_args(free_port(), 80)[:-1], "８０"], 2)
    assert b"-container-port" in status and b"not a port number" in status


def test_negative_dial_timeout_says_so():
    status, _ = _refused([*docker_args(free_port(), 80), "-dial-timeout", "-1s"], 2)
    assert b"dial-timeout" in status and b"must not be negative" in status
    assert b"expected one argument" not in status


def test_log_file_on_a_fifo_is_refused_at_once(tmp_path):
    """open(2) of a FIFO waits for a reader: start-up hung before fd 3 was answered."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    status, _ = _refused([*docker_args(free_port(), 80), "-log-file", str(fifo)], 1)
    assert status == f"1\n-log-file {fifo}: is a FIFO; give a regular file, a character device " \
                     "or 'syslog'".encode()


def test_log_file_that_cannot_be_written_is_reported_once_and_traffic_flows():
    """/dev/full opens, then every write fails with ENOSPC: said once, not a traceback a line."""
    b = EchoBackend()
    port = free_port()
    p = Proxy([*docker_args(port, b.port), "-log-file", "/dev/full", "-log-level", "debug"])
    for _ in range(3):
        assert exchange("127.0.0.1", port) == b"ping"
    _, err = p.stop(signal.SIGINT)
    assert p.proc.returncode == 0
    assert b"Traceback" not in err and b"Logging error" not in err, err
    assert err.count(b"cannot write") == 1, err
    assert b"-log-file /dev/full: cannot write: No space left on device" in err
    b.close()


def test_unknown_ipv6_zone_names_the_interface():
    args = docker_args(free_port(), 80, host_ip="fe80::1%nosuchif")
    status, _ = _refused(args, 1)
    assert b"no such network interface 'nosuchif'" in status and b"unknown error" not in status
    args = docker_args(free_port(), 80, host_ip="::1")
    args[args.index("-container-ip") + 1] = "fe80::1%nosuchif"
    status, _ = _refused(args, 1)
    assert b"container address fe80::1%nosuchif: no such network interface 'nosuchif'" in status


# -- the dial histogram ----------------------------------------------------------------------------

def test_dial_buckets_resolve_microseconds_to_seconds() -> None:
    assert tuple(sorted(DIAL_BUCKETS)) == DIAL_BUCKETS
    assert DIAL_BUCKETS[0] <= 0.00005 and DIAL_BUCKETS[-1] >= 30
    stats = MappingStats()
    for seconds in (0.00002, 0.000025, 0.00003, 0.0007, 31.0):
        stats.observe_dial(seconds)
    counts = stats.dial_bucket_counts
    assert counts[0] == 2  # a bound holds the value equal to it (Prometheus' "le")
    assert counts[DIAL_BUCKETS.index(0.00005)] == 1
    assert counts[DIAL_BUCKETS.index(0.001)] == 1
    assert counts[-1] == 1


async def test_dial_durations_have_sub_millisecond_resolution() -> None:
    """uvloop's loop.time() ticks in whole milliseconds: every dial measured with it was a
    multiple of 1 ms (mostly 0). Measured with perf_counter, the sum of a few dials is not."""
    async with backend() as bport, tcp_proxy(bport) as server:
        registry = make_registry(server.stats)
        port = server.relays[0].port
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
        labels = {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": str(port),
                  "container_ip": "127.0.0.1", "container_port": str(bport)}
        get = registry.get_sample_value
        assert get("pyproxy_backend_dial_duration_seconds_count", labels) == 5
        total = get("pyproxy_backend_dial_duration_seconds_sum", labels)
        assert total is not None and total > 0
        milliseconds = total * 1000
        assert abs(milliseconds - round(milliseconds)) > 1e-6, total


def test_zero_meaning_none_is_documented_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_config(["-container-ip", "127.0.0.1", "-p", "80:80", "-udp-max-flows", "0", "-dial-timeout", "0"])
    assert config is not None and (config.udp_max_flows, config.dial_timeout) == (0, 0.0)
    assert parse_config(["-h"]) is None  # answered (printed), never an exit: the engine parses too
    text = " ".join(capsys.readouterr().out.split())
    assert "0: no per-mapping cap; the process-wide budget still applies" in text
    assert "backend connect timeout (0: none) (default: 30s)" in text
