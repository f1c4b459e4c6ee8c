"""Who holds a series lease or a taken queue message: this process's owner id, and whether an owner of this
host still lives (a dead owner's work is taken up at once instead of after a timeout)."""

from __future__ import annotations

import os
import socket


def _host() -> str:
    # the PID namespace too: containers sharing a host name (host networking) do not see each other's PIDs
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


_HOST = _host()


def owner_id() -> str:
    """This process: host/pid-namespace:pid (a forked pool child is its own owner)."""
    return f"{_HOST}:{os.getpid()}"


def owner_alive(owner: str, this_host: str = _HOST) -> bool:
    """False only when the owner (`host:pid`) is a process of this host that no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != this_host:
        return True  # another machine: only the lease's age can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
