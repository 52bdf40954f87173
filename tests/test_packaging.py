"""pyproxy as users meet it first: the package metadata, the image recipe's version label, and
the command line's help and usage errors (-h with every default, -p mistakes named as such)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES

import pytest

from proxy import __version__, compiled
from proxy.ground.flags import UsageError, build_parser, parse_config
from proxy.relays import tcp
from tests.helpers import PROXY_CWD, REPO, EchoBackend, Proxy, exchange, free_port, output

pytestmark = pytest.mark.timeout(60)


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_metadata_the_usual_way() -> None:
    meta = pyproject()
    project = meta["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    with open(os.path.join(REPO, "LICENSE")) as f:
        assert "Apache License" in f.read(200)
    # SPDX strings need setuptools 77; an older one would reject the metadata
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in meta["build-system"]["requires"])
    for wanted in ("Operating System :: POSIX :: Linux", "Framework :: AsyncIO",
                   "Topic :: System :: Networking", "Programming Language :: Python :: 3.11"):
        assert wanted in project["classifiers"]
    assert "urls" not in project  # none exists yet; an invented one would mislead


def test_one_version_everywhere() -> None:
    with open(os.path.join(REPO, "Dockerfile")) as f:
        dockerfile = f.read()
    [label_version] = re.findall(r"^ARG VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert pyproject()["project"]["version"] == __version__ == label_version


def test_version_says_whether_the_relays_are_compiled() -> None:
    """The build made with PYPROXY_COMPILE=1 (setup.py) runs the TCP relay as an extension
    module; -version says so (the suite runs on both builds in .ci/run)."""
    extension = tcp.__file__.endswith(tuple(EXTENSION_SUFFIXES))
    assert compiled() == extension
    done = subprocess.run([sys.executable, "-m", "proxy", "-version"], cwd=PROXY_CWD,
                          capture_output=True, check=False, timeout=30)
    assert done.returncode == 0 and not done.stderr
    assert done.stdout.decode() == (f"pyproxy version {__version__}"
                                    f"{' (compiled relays)' if extension else ''}\n")


def help_entries() -> dict[str, str]:
    """`pyproxy -h` as printed, one entry per flag: its first option string -> its text."""
    done = subprocess.run([sys.executable, "-m", "proxy", "-h"], cwd=REPO, capture_output=True,
                          check=False, timeout=30, env={**os.environ, "PYPROXY_ENGINE_SOCKET": ""})
    assert done.returncode == 0 and not done.stderr
    entries: dict[str, str] = {}
    current = None
    for line in done.stdout.decode().split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_help_shows_every_default() -> None:
    entries = help_entries()
    flags = [a.option_strings[0] for a in build_parser()._actions
             if a.dest not in ("help", "version")]
    assert flags and set(flags) <= set(entries)
    assert [f for f in flags if "default" not in entries[f]] == []
    # written as a user writes them, not as parsed values (90.0, IPv4Address(...))
    assert "(default: 90s)" in entries["-udp-timeout"]
    assert "(default: 0.0.0.0)" in entries["-host-ip"]
    assert "(default: tcp)" in entries["-proto"]
    assert "(default: false)" in entries["-use-listen-fd"]


def test_defaults_written_as_strings_still_parse() -> None:
    config = parse_config(["-host-port", "8080", "-container-port", "80"])
    assert config is not None
    assert (config.udp_timeout, config.udp_max_flows, config.dial_timeout, config.max_conns,
            config.drain_timeout) == (90.0, 16384, 30.0, 0, 0.0)
    assert str(config.mappings[0].host_ip) == "0.0.0.0"


def test_publish_without_container_ip_is_a_usage_error() -> None:
    port = free_port()
    p = Proxy(["-p", f"127.0.0.1:{port}:80"], wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    _, err = output(p.proc)
    assert b"-p" in err and b"-container-ip" in err and b"Traceback" not in err
    assert p.status.startswith(b"1\n") and b"-container-ip" in p.status


def test_docker_proxy_form_keeps_its_container_ip_default() -> None:
    """docker-proxy's -container-ip defaults to 0.0.0.0, which Linux dials as this host."""
    backend = EchoBackend()
    port = free_port()
    Proxy(["-host-ip", "127.0.0.1", "-host-port", str(port),
           "-container-port", str(backend.port)])
    assert exchange("127.0.0.1", port, b"to 0.0.0.0") == b"to 0.0.0.0"
    backend.close()


def test_same_publish_twice_is_named_a_duplicate() -> None:
    port = free_port()
    spec = f"127.0.0.1:{port}:80"
    p = Proxy(["-container-ip", "127.0.0.1", "-p", spec, "-p", spec], wait_ready=False)
    assert p.proc.wait(timeout=10) == 2
    _, err = output(p.proc)
    assert b"duplicate mapping" in err and spec.encode() in err
    assert b"already in use" not in err and b"Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["-host-ip", "127.0.0.1", "-host-port", "8080", "-container-port", "80",
     "-p", "127.0.0.1:8080:81"],
    ["-p", "eth0:8080:80", "-p", "eth0:8080:81"],
])
def test_duplicates_across_forms_and_interfaces(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="duplicate mapping"):
        parse_config(["-container-ip", "10.0.0.2", *argv])


@pytest.mark.parametrize("argv", [
    ["-p", "8080:80", "-p", "8080:80/udp"],  # another protocol
    ["-p", "127.0.0.1:8080:80", "-p", "127.0.0.2:8080:80"],  # another address
    ["-p", "[::1]:8080:80", "-p", "127.0.0.1:8080:80"],  # another family
    ["-p", "8000-8010:80", "-p", "8000-8010:80"],  # a range takes its first free port: two
    ["-p", "80", "-p", "80"],  # kernel-chosen ports
])
def test_distinct_mappings_are_not_duplicates(argv: list[str]) -> None:
    config = parse_config(["-container-ip", "10.0.0.2", *argv])
    assert config is not None and len(config.mappings) == 2
