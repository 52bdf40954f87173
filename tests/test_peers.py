"""Real third-party peers on loopback: a DNS server and client, PROXY protocol consumers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from tests.helpers import Proxy, free_port

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("dig")),
                    reason="needs Debian's dnsmasq-base and dnsutils (dig)")
def test_real_dns_exchange_through_the_proxy():
    """dnsmasq is the container on 127.0.0.1; dig asks the proxy on 127.0.0.2 (bound to
    0.0.0.0): dig drops answers from an unexpected source, so this needs PKTINFO replies."""
    dns_port = free_port(kind=socket.SOCK_DGRAM)
    dnsmasq = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
         "--listen-address=127.0.0.1", f"--port={dns_port}", "--address=/pyproxy.test/192.0.2.7",
         "--pid-file=", "--user=root", "--conf-file=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        proxy_port = free_port("0.0.0.0", socket.SOCK_DGRAM)
        Proxy(["-proto", "udp", "-host-ip", "0.0.0.0", "-host-port", str(proxy_port),
               "-container-ip", "127.0.0.1", "-container-port", str(dns_port)])
        deadline = time.monotonic() + 10
        while True:
            dig = subprocess.run(
                ["dig", "@127.0.0.2", "-p", str(proxy_port), "pyproxy.test", "A", "+short",
                 "+tries=1", "+timeout=2"],
                capture_output=True, text=True, timeout=15,
            )
            if dig.stdout.strip() == "192.0.2.7" or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # dnsmasq may still be starting
        assert dig.stdout.strip() == "192.0.2.7", dig.stdout + dig.stderr
    finally:
        dnsmasq.terminate()
        dnsmasq.wait(timeout=5)
        assert dnsmasq.stderr is not None
        dnsmasq.stderr.close()
