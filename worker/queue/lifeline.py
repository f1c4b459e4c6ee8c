"""The embedded worker dies with the `cinesr serve` that started it.

Without this, a `kill -9` of serve (or an OOM kill) left its worker running with parent PID 1; after a restart
two workers consumed one queue. `cinesr serve` names itself in CINESR_PARENT_PID; the worker process and each
of its pool children then ask the kernel for SIGKILL when their parent goes (Linux prctl PR_SET_PDEATHSIG, so
nothing has to run in the dying parent). Elsewhere a thread watches the parent PID once a second instead.

SIGKILL, not a warm shutdown: the series in progress is not acknowledged, so the next worker takes it up again
(cinesr.worker.queue.leases), and nothing keeps computing for a service that is gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("cinesr.worker.queue.lifeline")

PARENT_ENV = "CINESR_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def follow_parent(expected_parent: int | None = None) -> bool:
    """Die with our parent when CINESR_PARENT_PID is set (or expected_parent is given); True if armed."""
    if expected_parent is None:
        named = os.environ.get(PARENT_ENV, "")
        if not named.isdigit():
            return False
        expected_parent = int(named)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the parent instead", ctypes.get_errno())
            _watch(expected_parent)
    else:
        _watch(expected_parent)
    # the parent may have gone before the request above took effect
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _watch(parent: int) -> None:
    def run() -> None:
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=run, name="cinesr-parent-watch", daemon=True).start()
