"""The Dockerfile: built by a local dockerd with no registry and no network, then run with
--network host in front of a backend on the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, free_port
from tests.dockerlab import DockerLab, docker_available
from tests.test_contract import EchoBackend, exchange

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


def test_image_builds_offline_and_relays_with_host_network(lab: DockerLab) -> None:
    lab.import_debian_python()
    context = tempfile.mkdtemp(dir=lab.tmp)
    shutil.copy(os.path.join(REPO, "Dockerfile"), context)
    # the wheels are made on the host (with the registry); the build itself has no network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", os.path.join(context, "wheels"),
                    REPO], check=True, timeout=600)
    lab.docker("build", "--network", "none", "--build-arg", "BASE=pp-python:bookworm",
               "-t", "pyproxy:test", context, timeout=900)
    assert lab.docker("run", "--rm", "pyproxy:test", "-v").stdout.startswith(b"pyproxy version ")
    user = lab.docker("inspect", "-f", "{{.Config.User}}", "pyproxy:test").stdout.decode().strip()
    assert user == "65534:65534"

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
                import time

                time.sleep(0.2)
        else:
            logs = lab.docker("logs", "pyproxy", check=False)
            pytest.fail(f"the container never served: {logs.stderr!r}")
    finally:
        lab.docker("rm", "-f", "pyproxy", check=False)
        backend.close()
