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

from setuptools import Extension, setup
from setuptools.dist import Distribution

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
    native = Extension("proxy.relays._native", ["proxy/relays/_native.c"],
                       extra_compile_args=["-O2", "-std=gnu11"])
    return {"ext_modules": [*mypycify(COMPILED, opt_level="3", group_name="proxy_relays",
                                      target_dir=os.path.join(BUILD, "mypyc")), native]}


# setuptools' own build_scripts (its copy of distutils'), found as setup() would find it.
_build_scripts: Any = Distribution().get_command_class("build_scripts")


class BuildScripts(_build_scripts):  # type: ignore[misc, valid-type]
    """bin/pyproxy-door is machine code (proxy/waiter/), not a script: build_scripts reads
    each script as Python source (tokenize.open, to rewrite a #!python line) and fails on an
    ELF file. A file that does not start with "#!" is copied byte for byte; pip installs it
    as it is too (it rewrites only a first line of "#!python")."""

    def _copy_script(self, script: str, outfiles: list[str], updated_files: list[str]) -> None:
        with open(script, "rb") as f:
            if f.read(2) == b"#!":
                return super()._copy_script(script, outfiles, updated_files)  # type: ignore[no-any-return]
        outfile = os.path.join(self.build_dir, os.path.basename(script))
        outfiles.append(outfile)
        updated_files.append(outfile)
        self.copy_file(script, outfile)  # the content (a symlink followed), made 0755 later


setup(options={"build": {"build_base": BUILD}}, cmdclass={"build_scripts": BuildScripts},
      **compiled())
