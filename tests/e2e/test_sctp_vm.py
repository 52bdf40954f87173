"""The SCTP tests, run in a virtual machine whose kernel has SCTP (this one's may not).

See tests/sctpvm.py: Debian's kernel under qemu, this machine's root filesystem read-only
inside, so the guest runs the same interpreter and checkout. PYPROXY_REQUIRE_SCTP turns a
skip for want of SCTP into a failure: in the guest, every SCTP test must run.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import sctpvm
from tests.helpers import REPO

KERNEL_CACHE = os.environ.get("PYPROXY_VM_CACHE", "/var/cache/pyproxy-sctp-vm")

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(sctpvm.available() is not None, reason=str(sctpvm.available())),
]


def test_sctp_suite_passes_in_a_vm_with_sctp() -> None:
    kernel = sctpvm.Kernel.fetch(KERNEL_CACHE)
    result = sctpvm.run(
        kernel,
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--color=no",
         "tests/test_sctp.py"],
        cwd=REPO, env={"PYPROXY_REQUIRE_SCTP": "1"}, timeout=1200,
    )
    print(result.console)  # pytest shows it when the test fails
    assert result.exit_code == 0, result.console[-6000:]
    assert " passed" in result.console and "skipped" not in result.console
