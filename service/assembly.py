"""Series assembly: a series with no new instance for ``stable_seconds`` is complete.

PACS and modalities send a series as a stream of C-STOREs (possibly over several associations,
possibly interleaved with other series), with no "end of series" message. The assembler
tracks the last arrival per series; once a series has been quiet for ``stable_seconds`` it
calls ``on_complete(study_uid, series_uid)`` once. If more instances of that series arrive
later, the series is armed again and completes again after the next quiet period (the caller
decides whether that means re-processing).

Time comes from an injectable clock; ``poll()`` does the work and is either called by the
background thread (``start()``) or directly by tests with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cinesr.service.store import StoredInstance

LOGGER = logging.getLogger(__name__)


@dataclass
class _SeriesState:
    study_uid: str
    last_arrival: float
    instances: int = 0
    modality: str = ""


class SeriesAssembler:
    """Tracks series as instances arrive and reports each one complete after a quiet period."""

    def __init__(self, stable_seconds: float, on_complete: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stable_seconds < 0:
            raise ValueError("stable_seconds must be >= 0")
        self.stable_seconds = stable_seconds
        self.on_complete = on_complete
        self.clock = clock
        self._pending: dict[str, _SeriesState] = {}  # series uid -> state, while not yet complete
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- input -------------------------------------------------------------------------------

    def instance_arrived(self, study_uid: str, series_uid: str, modality: str = "") -> None:
        """Record an arrival (re-arms a series that had completed)."""
        now = self.clock()
        with self._lock:
            state = self._pending.get(series_uid)
            if state is None:
                state = self._pending[series_uid] = _SeriesState(study_uid, now, 0, modality)
            state.last_arrival = now
            state.instances += 1
        self._wake.set()

    def on_instance(self, instance: StoredInstance) -> None:
        """Adapter for the listener/store callback."""
        self.instance_arrived(instance.study_uid, instance.series_uid, instance.modality)

    # ---- state -------------------------------------------------------------------------------

    def pending(self) -> dict[str, tuple[str, int]]:
        """Series not complete yet: series uid -> (study uid, instances seen since armed)."""
        with self._lock:
            return {uid: (s.study_uid, s.instances) for uid, s in self._pending.items()}

    def next_due(self) -> float | None:
        """Clock time at which the next series becomes complete, if any is pending."""
        with self._lock:
            if not self._pending:
                return None
            return min(s.last_arrival for s in self._pending.values()) + self.stable_seconds

    def poll(self) -> list[tuple[str, str]]:
        """Complete every series quiet for ``stable_seconds``; return them as (study, series)."""
        now = self.clock()
        with self._lock:
            due = [(uid, s) for uid, s in self._pending.items() if now - s.last_arrival >= self.stable_seconds]
            for uid, _state in due:
                del self._pending[uid]
        completed = []
        for series_uid, state in due:
            LOGGER.info("series %s complete (%d instances, quiet for %.1f s)", series_uid, state.instances,
                        now - state.last_arrival)
            try:
                self.on_complete(state.study_uid, series_uid)
            except Exception:  # one failing consumer must not stop assembly of other series
                LOGGER.exception("on_complete failed for series %s", series_uid)
            completed.append((state.study_uid, series_uid))
        return completed

    # ---- background thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Poll in a background thread (sleeping until the next series is due)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cinesr-assembler", daemon=True)
        self._thread.start()

    def stop(self, flush: bool = False) -> None:
        """Stop the thread; with ``flush`` complete every pending series now."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if flush:
            with self._lock:
                for state in self._pending.values():
                    state.last_arrival = float("-inf")
            self.poll()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            due = self.next_due()
            # A real clock: sleep until the next series is due or a new arrival comes in.
            timeout = None if due is None else max(0.0, min(due - self.clock(), 1.0))
            self._wake.wait(timeout)
            self._wake.clear()
