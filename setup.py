"""Build: pure Python by default; with PYPROXY_COMPILE=1, the TCP relay's per-connection and
per-read modules, the UDP relay and the access log compiled to C extensions with mypyc
(benchmarks/README.md, "Compiled relays (mypyc), issue 17": −20 % instructions per new
connection).

Opt-in, not automatic, so that `pip install .` gives the same package on every machine, with
or without a C compiler, and a failed compile can never leave a half-compiled install:

    PYPROXY_COMPILE=1 pip install .    # needs a C compiler and Python's headers

Everything else is in pyproject.toml. `proxy.relays.tcp.__file__` ends in `.so` when
compiled, and `pyproxy -version` says so.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from setuptools import setup

# Compiled: what runs per TCP connection and per read, per UDP datagram (its Flow a plain
# class and its constants Final, so that compiled code reads them directly: −16 % user-space
# instructions per datagram in bursts, −5 % in ping-pong), and the access log (with the log
# on, most of what a connection costs more is its line's formatting: integer arithmetic,
# f-strings; 8,800 instructions less compiled, benchmarks/README.md "Access log, issue 16",
# third round). Left interpreted, measured or tried (benchmarks/README.md): splice (bulk
# transfers run in the kernel; compiled, uvloop's remove_reader() returning None where the
# stubs say bool fails at run time), sctp (tested only in the heavy suite's VM), and the
# other ground and mode modules (start-up code, and attrs classes, which mypyc leaves
# interpreted).
COMPILED = [
    "proxy/ground/accesslog.py",
    "proxy/relays/idle.py",
    "proxy/relays/tcp.py",
    "proxy/relays/udp.py",
]
# What the compiled build needs, in the build's own environment only (never beside pyproxy):
# mypy (mypyc), and attrs, whose classes mypy must see to type the modules it compiles.
COMPILE_REQUIRES = ["mypy>=1.11", "attrs>=23.1"]


# A fresh build directory every time: setuptools copies whatever an earlier build left in
# build/lib into the wheel, so a pure build after a compiled one would ship stale .so files.
BUILD = tempfile.mkdtemp(prefix="pyproxy-build-")
atexit.register(shutil.rmtree, BUILD, ignore_errors=True)


def compiled() -> dict[str, Any]:
    if os.environ.get("PYPROXY_COMPILE", "") != "1":
        return {}
    try:
        from mypyc.build import mypycify
    except ImportError:
        # pip's first question to a build ("what do you need?") lands here; it installs
        # these, then runs the build again.
        return {"setup_requires": COMPILE_REQUIRES}
    return {"ext_modules": mypycify(COMPILED, opt_level="3", group_name="proxy_relays",
                                        target_dir=os.path.join(BUILD, "mypyc"))}


setup(options={"build": {"build_base": BUILD}}, **compiled())
