"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram to $NOTIFY_SOCKET,
so a `Type=notify` unit starts docker.service only once the engine's socket is listening.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op. Nothing here ever raises: a service
manager that went away must not take the engine down with it.
"""

from __future__ import annotations

import functools
import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
EXEC_PID_ENV = "SYSTEMD_EXEC_PID"
SEND_TIMEOUT = 2.0  # systemd drains its socket at once; this only bounds a wedged manager


@functools.cache  # read once: the variable is removed from the environment when read
def notify_address() -> bytes | None:
    """$NOTIFY_SOCKET as an AF_UNIX address ('@name' is the abstract namespace), or None.

    Removed from the environment as sd_notify(unset_environment=1) does: a process we start
    must not speak for us (systemd would take its READY=1 as ours, or log it as a stranger's).
    """
    value = os.environ.pop(NOTIFY_SOCKET_ENV, "")
    # systemd >= 248 names the process it started. Anyone else holding the variable inherited
    # it: a pyproxy spawned by dockerd has docker.service's, and must not speak for dockerd.
    started = os.environ.get(EXEC_PID_ENV)
    if started and started != str(os.getpid()):
        return None
    address = os.fsencode(value)
    if address.startswith(b"@"):
        return b"\0" + address[1:]
    if address.startswith(b"/"):
        return address
    return None  # unset, empty, or a form we do not speak (vsock:): as libsystemd, ignore it


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", ...) in one datagram; False if there was no one to tell."""
    address = notify_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto("\n".join(fields).encode() + b"\n", address)
    except (OSError, ValueError):  # ENOENT, ECONNREFUSED, a path too long: nobody listens
        return False
    return True


def ready(status: str) -> bool:
    """The engine serves: systemd may now start the units ordered after it."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def stopping() -> bool:
    """The engine is releasing its ports: `systemctl status` shows it deactivating, not dead."""
    return notify("STOPPING=1", "STATUS=stopping")
