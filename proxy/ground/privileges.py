"""-user NAME: once every listener is bound, stop being root. The relay never needs root
again: accepting, dialling and relaying are unprivileged; only binding a port below 1024
was not, and that is done.
"""

from __future__ import annotations

import os
import pwd

from proxy.ground.config import is_decimal
from proxy.ground.sockets import StartupError


def drop_to(user: str) -> None:
    """Become `user` (and its primary group, no supplementary groups), for good."""
    try:
        entry = pwd.getpwuid(int(user)) if is_decimal(user) else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):  # ValueError: a NUL in the name
        raise StartupError(f"-user {user}: no such user") from None
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)  # real, effective and saved: there is no way back
    except PermissionError as exc:
        raise StartupError(f"-user {user}: {exc.strerror} (only root can change user)") from None
