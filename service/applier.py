"""The journal applier: a background thread that turns journalled instances into their files.

Once arrivals pause (or the backlog grows large) it writes each instance's file from its journal record
(temporary name, in-kernel copy, rename), in arrival order, syncs the files and their directories in
batches, and then releases the records' journal space. While a stage fails (a full disk) it retries the same
item and reports a ``fault``, which makes the store refuse new instances until the stage works again.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cinesr.model.folders import fsync_dir
from cinesr.service.filing import InstanceFiles
from cinesr.service.journal import Journal, decode_segment
from cinesr.service.wire import is_valid_uid

if TYPE_CHECKING:  # the store creates the applier; only its record type is needed here
    from cinesr.service.store import StoredInstance

LOGGER = logging.getLogger(__name__)

_T = TypeVar("_T")


class _GiveUp(Exception):
    """The store is closing while a background stage still fails."""


@dataclass
class _Pending:
    """A journalled instance waiting to become a file: where its file bytes lie in the journal."""

    info: StoredInstance
    segment: int
    offset: int
    length: int
    done: threading.Event | None = None  # only flush markers carry one
    checkpoint: bool = False  # a marker that also waits for the files to be fsynced


class JournalApplier:
    """Files the instances the store journals (``add``), on its own thread (``start``, ``close``)."""

    def __init__(self, journal: Journal, files: InstanceFiles, notify: Callable[[StoredInstance], None],
                 idle_seconds: float, max_bytes: int) -> None:
        self.journal = journal
        self.files = files
        self.notify = notify  # called with each instance once its file is visible
        # Files are written after a pause in arrivals (or a large backlog), so that while instances
        # stream in the only work per instance is one journal append.
        self.idle_seconds = idle_seconds
        self.max_bytes = max_bytes
        self.fault: str | None = None  # set while a stage fails (see _retry)
        self._fault_stage = ""
        self._closing = False
        self._lock = threading.Lock()
        self._pending_bytes = 0  # journalled, not yet checkpointed (the free-space check counts them)
        self._last_put = 0.0
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="cinesr-store-applier", daemon=True)

    @property
    def pending_bytes(self) -> int:
        """File bytes journalled but not yet checkpointed as files."""
        return self._pending_bytes

    def start(self) -> None:
        self.thread.start()

    def add(self, info: StoredInstance, segment: int, offset: int, length: int) -> None:
        """A committed journal record to file: its file bytes lie at ``offset`` in ``segment``."""
        self._last_put = time.monotonic()
        with self._lock:
            self._pending_bytes += length
        # The file bytes are copied out of the journal (page cache), so the caller's buffer is free for
        # reuse as soon as this returns.
        self._queue.put(_Pending(info, segment, offset, length))

    def flush(self, timeout: float | None = None, checkpoint: bool = False) -> bool:
        """Wait until every instance added so far is visible as a file (with ``checkpoint``, also synced and
        out of the journal); False on timeout."""
        marker = _Pending(None, -1, 0, 0, threading.Event(), checkpoint)  # type: ignore[arg-type]
        self._queue.put(marker)
        return marker.done.wait(timeout)  # type: ignore[union-attr]

    def close(self) -> None:
        """File and checkpoint everything added (a stage that still fails gives up), then stop."""
        self._closing = True
        if self.thread.is_alive():
            self._queue.put(None)
            self.thread.join()

    def recover(self, instances_dir: Path) -> dict[str, Path]:
        """Replay journal records that were acknowledged but not yet checkpointed (before ``start``);
        return the instances filed (SOPInstanceUID -> path)."""
        segments = self.journal.segment_files()
        filed: dict[str, Path] = {}
        fds: list[int] = []
        for seg in segments:
            for texts, file_bytes in decode_segment(seg.read_bytes(), int(seg.stem)):
                study, series, sop = texts[:3]
                if not (is_valid_uid(study) and is_valid_uid(series) and is_valid_uid(sop)):
                    continue
                path = instances_dir / study / series / f"{sop}.dcm"
                fds.append(self.files.write(path, lambda fd, data=file_bytes: os.write(fd, data), sync=False))
                filed[sop] = path
        self.files.sync(fds)  # the files and every directory written to
        for seg in segments:
            self.journal.retire_file(seg)
        if segments:
            fsync_dir(self.journal.dir)
            LOGGER.info("replayed %d journalled instances from %d segments", len(fds), len(segments))
        return filed

    def _retry(self, stage: str, action: Callable[..., _T], *args: object) -> _T:
        """Run one stage of the background filing until it works.

        While it fails (a full disk, an unwritable directory) the store refuses new instances (``fault``,
        StoreHalted: C-STORE answers 0xA7xx, /readyz 503) and retries with a growing pause of at most a
        second, so it recovers by itself once the cause is gone. Nothing is skipped: the item that failed
        is the one retried. On close, a stage that still fails gives up: the journal keeps what was not
        filed and the next start files it."""
        delay = 0.05
        while True:
            try:
                result = action(*args)
            except Exception as exc:  # noqa: BLE001 - any failure stops the filing, none may pass silently
                reason = f"{stage} failed: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                if self.fault != reason:
                    LOGGER.error("store: %s; refusing new instances until it works again", reason)
                self.fault, self._fault_stage = reason, stage
                if self._closing:
                    raise _GiveUp() from exc
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            if self.fault is not None and self._fault_stage == stage:
                LOGGER.warning("store: %s works again; accepting instances", stage)
                self.fault = None
            return result

    def _loop(self) -> None:
        """Turn journal records into files: after a pause in arrivals (or when the journal fills),
        in arrival order; fsync them in batches, then release their journal space."""
        batch: list[tuple[int, _Pending]] = []  # (open fd, item) written but not yet fsynced
        waiters: list[_Pending] = []  # flush(checkpoint=True) callers
        segment_fds: dict[int, int] = {}
        stopping = False
        try:
            while True:
                quiet = False
                try:
                    item = self._queue.get(timeout=0.2 if batch else None)
                except queue.Empty:
                    item, quiet = None, True
                if item is None and not quiet:
                    stopping = True
                elif item is not None and item.info is None:  # a flush marker: all before it is visible
                    if item.checkpoint:
                        waiters.append(item)
                    else:
                        item.done.set()  # type: ignore[union-attr]
                elif item is not None:
                    while (time.monotonic() - self._last_put < self.idle_seconds
                           and self._pending_bytes < self.max_bytes and not stopping):
                        time.sleep(self.idle_seconds / 2)
                    fd = self._retry("writing an instance file", self._copy_out, item, segment_fds)
                    batch.append((fd, item))
                    self.notify(item.info)
                if batch and (quiet or waiters or stopping or len(batch) >= 512):
                    self._retry("syncing instance files", self._checkpoint_batch, batch)
                    self._released(batch)
                    batch = []
                    for seg in [s for s in segment_fds if not self.journal.is_active(s)]:
                        os.close(segment_fds.pop(seg))  # retired: its blocks may be recycled
                if waiters and not batch:
                    for waiter in waiters:
                        waiter.done.set()  # type: ignore[union-attr]
                    waiters = []
                if stopping and self._queue.empty():
                    if batch:
                        self._retry("syncing instance files", self._checkpoint_batch, batch)
                        self._released(batch)
                    for fd in segment_fds.values():
                        os.close(fd)
                    return
        except _GiveUp:
            LOGGER.error("store closed while its filing failed: the journal keeps what is not yet filed; "
                         "the next start files it")
            for fd in segment_fds.values():
                os.close(fd)
            for waiter in waiters:
                waiter.done.set()  # type: ignore[union-attr]

    def _copy_out(self, item: _Pending, segment_fds: dict[int, int]) -> int:
        """Write an instance's file from its journal record; return the open file descriptor."""
        src = segment_fds.get(item.segment)
        if src is None:
            src = segment_fds[item.segment] = os.open(self.journal.segment_path(item.segment), os.O_RDONLY)

        def copy(fd: int) -> None:
            offset, left = item.offset, item.length
            while left > 0:  # in-kernel copy from the page cache; no bytes through Python
                n = os.copy_file_range(src, fd, left, offset)
                if n <= 0:
                    raise OSError(f"journal record of {item.info.sop_instance_uid} is short")
                offset += n
                left -= n

        return self.files.write(item.info.path, copy, sync=False)

    def _checkpoint_batch(self, batch: list[tuple[int, _Pending]]) -> None:
        """Make a batch of written files durable (their descriptors are closed, whatever happens)."""
        t0 = time.perf_counter()
        fds = [fd for fd, _item in batch if fd >= 0]
        if len(fds) < len(batch):  # a retry: the failed attempt closed them
            for fd in fds:
                os.close(fd)
            fds = []
            for _fd, item in batch:
                fds.append(os.open(item.info.path, os.O_RDONLY))
        batch[:] = [(-1, item) for _fd, item in batch]
        self.files.sync(fds, {item.info.path.parent for _fd, item in batch})
        LOGGER.debug("checkpointed %d instances in %.1f ms", len(batch), 1000 * (time.perf_counter() - t0))

    def _released(self, batch: list[tuple[int, _Pending]]) -> None:
        """A durable batch: its journal records are no longer needed."""
        segments: dict[int, int] = {}
        released = 0
        for _fd, item in batch:
            segments[item.segment] = segments.get(item.segment, 0) + 1
            released += item.length
        try:
            self.journal.checkpointed(segments)
        except OSError as exc:  # only the journal directory's fsync: the next retirement syncs it again
            LOGGER.warning("journal directory sync failed: %s", exc.strerror or exc)
        with self._lock:
            self._pending_bytes -= released
        if self._queue.empty():
            self.journal.prepare_spares()  # top up while nothing streams in
