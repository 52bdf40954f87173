"""The Dockerfile: built from the checkout by a local dockerd with no registry and no network
(its wheelhouse made on the host), then run with --network host in front of a backend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator

import pytest

from proxy import __version__
from tests.dockerlab import DockerLab, docker_available
from tests.helpers import REPO, EchoBackend, exchange, free_port

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (docker_available() and shutil.which("debootstrap")),
                       reason="needs root, docker.io, containerd, runc and debootstrap"),
]


@pytest.fixture(scope="module")
def lab() -> Iterator[DockerLab]:
    lab = DockerLab(os.path.join(os.path.dirname(sys.executable), "pyproxy"),
                    env={"PYPROXY_ENGINE_SOCKET": ""})
    try:
        yield lab
    finally:
        lab.close()


def build_context(dest: str) -> str:
    """The checkout as `docker build .` sees it, plus wheels/: what pip would fetch from PyPI
    (pyproxy's dependencies and its build backend), fetched here on the host."""
    context = os.path.join(dest, "context")
    shutil.copytree(REPO, context, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "wheels", "build"))
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    needs = [*meta["build-system"]["requires"], *meta["project"]["dependencies"]]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", os.path.join(context, "wheels"),
                    *needs], check=True, timeout=600)
    return context


def test_image_builds_offline_and_relays_with_host_network(lab: DockerLab) -> None:
    lab.import_debian_python()
    context = build_context(tempfile.mkdtemp(dir=lab.tmp))
    lab.docker("build", "--network", "none", "--build-arg", "BASE=pp-python:bookworm",
               "--build-arg", "PIP_NO_INDEX=1", "-t", "pyproxy:test", context, timeout=900)
    assert lab.docker("run", "--rm", "pyproxy:test", "-v").stdout.startswith(b"pyproxy version ")
    user = lab.docker("inspect", "-f", "{{.Config.User}}", "pyproxy:test").stdout.decode().strip()
    assert user == "65534:65534"
    labels = json.loads(lab.docker("inspect", "-f", "{{json .Config.Labels}}", "pyproxy:test").stdout)
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # the runtime stage holds the interpreter and the venv: nothing that installs or builds
    for python in ("/opt/pyproxy/bin/python", "python3"):
        found = lab.docker("run", "--rm", "--entrypoint", python, "pyproxy:test", "-c",
                           "import importlib.util as u; print([m for m in ('pip', 'setuptools') "
                           "if u.find_spec(m)])").stdout
        assert found.strip() == b"[]", (python, found)
    # the engine's waiter binary came through pip with its mode, executable by the image's user
    if os.uname().machine == "x86_64":
        waiter = lab.docker("run", "--rm", "--entrypoint", "/opt/pyproxy/bin/python", "pyproxy:test",
                            "-c", "from proxy.handover import waiter_binary; print(waiter_binary())")
        assert waiter.stdout.strip().endswith(b"/proxy/waiter/x86_64/pyproxy-wait"), waiter.stdout

    backend = EchoBackend()
    port = free_port()
    lab.docker("run", "-d", "--name", "pyproxy", "--network", "host", "pyproxy:test",
               "-host-ip", "127.0.0.1", "-host-port", str(port),
               "-container-ip", "127.0.0.1", "-container-port", str(backend.port))
    try:
        deadline = 30
        for _ in range(deadline * 5):
            try:
                assert exchange("127.0.0.1", port, b"through the image") == b"through the image"
                break
            except ConnectionRefusedError:
                time.sleep(0.2)
        else:
            logs = lab.docker("logs", "pyproxy", check=False)
            pytest.fail(f"the container never served: {logs.stderr!r}")
    finally:
        lab.docker("rm", "-f", "pyproxy", check=False)
        backend.close()
