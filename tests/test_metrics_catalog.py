"""The metric names pyproxy exports, checked against everything that names them: the README's
list, the Grafana dashboard's queries, and Prometheus' own linter. Each compares with a live
scrape, never a list written here, so a metric added or renamed shows up as a failure."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__, compiled
from tests.helpers import REPO, EchoBackend, Proxy, docker_args, exchange, free_port

pytestmark = pytest.mark.timeout(60)

DASHBOARD = os.path.join(REPO, "contrib", "grafana", "pyproxy.json")
# what a family's samples add to its name, by type (prometheus-client's parser drops _total
# from a counter family's name; _created is what the client adds to counters it owns)
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}


@pytest.fixture
def scrape() -> Iterator[str]:
    """The /metrics text of a pyproxy serving a TCP and a UDP mapping, after traffic on both."""
    tcp_backend = EchoBackend()
    udp_backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_backend.bind(("127.0.0.1", 0))
    tcp_port, udp_front, metrics_port = free_port(), free_port(kind=socket.SOCK_DGRAM), free_port()
    Proxy([*docker_args(tcp_port, tcp_backend.port),
           "-p", f"127.0.0.1:{udp_front}:{udp_backend.getsockname()[1]}/udp",
           "-metrics-addr", f"127.0.0.1:{metrics_port}"])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert exchange("127.0.0.1", tcp_port, b"counted") == b"counted"
        client.sendto(b"flow", ("127.0.0.1", udp_front))
        udp_backend.settimeout(5)
        assert udp_backend.recvfrom(100)[0] == b"flow"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            yield r.read().decode()
    finally:
        client.close()
        udp_backend.close()
        tcp_backend.close()


def exported(text: str) -> dict[str, set[str]]:
    """Each family in a scrape -> every name a query may use for it. Families with no samples
    yet (SCTP's, with no SCTP mapping) count: the exposition declares them all the same."""
    names = {}
    for family in text_string_to_metric_families(text):
        forms = {family.name} | {s.name for s in family.samples}
        forms |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ())}
        names[family.name] = forms
    return names


def family_of(name: str, families: dict[str, set[str]]) -> str | None:
    return next((family for family, forms in families.items() if name in forms), None)


def test_readme_lists_exactly_the_exported_metrics(scrape: str, engine) -> None:  # type: ignore[no-untyped-def]
    # the engine's own families, such as pyproxy_engine_reattached_mappings_total, too
    with urllib.request.urlopen(f"http://127.0.0.1:{engine[1].metrics_port}/metrics",
                                timeout=5) as r:
        engine_scrape = r.read().decode()
    families = {f: forms for f, forms in (exported(scrape) | exported(engine_scrape)).items()
                if f.startswith("pyproxy_")}
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    named = set(re.findall(r"\bpyproxy_[a-z0-9_]+", readme))
    unknown = {n for n in named if family_of(n, families) is None}
    assert not unknown, f"the README names metrics pyproxy does not export: {sorted(unknown)}"
    missing = {f for f, forms in families.items() if not forms & named}
    assert not missing, f"the README's metric list misses: {sorted(missing)}"


def dashboard_metric_names() -> set[str]:
    """Every metric the dashboard's queries (panels and variables) select: a name before a
    `{` label matcher, and any pyproxy_*/process_* name written bare."""
    with open(DASHBOARD) as f:
        board = json.load(f)
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    queries += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    names: set[str] = set()
    for q in queries:
        names |= set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", q))
        names |= set(re.findall(r"\b(?:pyproxy|process)_[a-z0-9_]+", q))
    return names


def test_dashboard_queries_only_exported_metrics(scrape: str) -> None:
    names = dashboard_metric_names()
    assert len(names) >= 10, names  # the extraction found the queries
    families = exported(scrape)
    unknown = {n for n in names if family_of(n, families) is None}
    assert not unknown, f"the dashboard queries metrics pyproxy does not export: {sorted(unknown)}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="no promtool (Debian's prometheus package; .ci/run extracts it)")
def test_scrape_passes_promtool(scrape: str) -> None:
    done = subprocess.run(["promtool", "check", "metrics"], input=scrape.encode(),
                          capture_output=True, check=False, timeout=30)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done


def test_build_info_names_the_version(scrape: str) -> None:
    [sample] = [s for f in text_string_to_metric_families(scrape) for s in f.samples
                if s.name == "pyproxy_build_info"]
    assert sample.value == 1
    assert sample.labels["version"] == __version__
    assert sample.labels["python"] == platform.python_version()
    assert sample.labels["compiled"] == ("true" if compiled() else "false")  # setup.py's build
