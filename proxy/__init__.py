"""pyproxy: a user-space TCP/UDP port proxy, drop-in for Docker's docker-proxy."""

from __future__ import annotations

import os

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the TCP relay runs compiled (a build with PYPROXY_COMPILE=1: setup.py). Read
    from the files, not by importing the relays: `-version` answers before anything heavy
    loads (and importlib.machinery only here: the handover path must stay import-light)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    relays = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relays")
    return any(os.path.exists(os.path.join(relays, "tcp" + suffix)) for suffix in EXTENSION_SUFFIXES)
