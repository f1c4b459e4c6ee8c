"""Routing: which received series are processed, and clean-up of the ones that are not.

A series is eligible when it reads as a cine (cinesr.worker.eligibility: MR with image geometry; per slice
position at least 2 frames with distinct cardiac trigger times; classic or enhanced MR) and it is not itself a
CineSR output.
Routing limits (settings ROUTING_*: largest matrix, most frames, most slices, SeriesDescription/ProtocolName
include and exclude patterns) are checked on the headers first, so a series far outside them (an already
high-resolution cine pushed by mistake) is refused in milliseconds, without decoding its pixels.
Every decision is recorded (DATA_DIR/routing.sqlite3) with the reason; ineligible series (including
non-image instances such as presentation states or reports) are deleted from the instance store once they
are older than RETENTION_HOURS.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cinesr.worker.eligibility import read_cine
from cinesr.worker.errors import SeriesNotEligible

from .store import InstanceStore

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eligibility:
    study_uid: str
    series_uid: str
    eligible: bool
    reason: str  # why not (empty when eligible)
    instances: int


@dataclass(frozen=True)
class RoutingLimits:
    """What a series may be to be processed (settings ROUTING_*); None / empty = no limit."""

    max_matrix: int | None = None
    max_frames: int | None = None
    max_slices: int | None = None
    include: str = ""
    exclude: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> RoutingLimits:
        return cls(max_matrix=getattr(settings, "routing_max_matrix", None),
                   max_frames=getattr(settings, "routing_max_frames", None),
                   max_slices=getattr(settings, "routing_max_slices", None),
                   include=getattr(settings, "routing_include_pattern", "") or "",
                   exclude=getattr(settings, "routing_exclude_pattern", "") or "")

    def check_headers(self, files: list[Path]) -> str:
        """The reason the series is outside the limits, from its headers alone ("" when within)."""
        import pydicom

        rows = cols = frames = 0
        texts: set[str] = set()
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                    "Rows", "Columns", "NumberOfFrames", "SeriesDescription", "ProtocolName"])
            except Exception:  # noqa: BLE001 - unreadable files are read_series' to explain
                continue
            rows, cols = max(rows, int(ds.get("Rows", 0) or 0)), max(cols, int(ds.get("Columns", 0) or 0))
            frames += int(ds.get("NumberOfFrames", 1) or 1)
            texts |= {str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName")}
        texts.discard("")
        if self.max_matrix and max(rows, cols) > self.max_matrix:
            return (f"matrix {rows}x{cols} is larger than ROUTING_MAX_MATRIX {self.max_matrix} (the output would be "
                    f"{4 * rows}x{4 * cols}; an already high-resolution series?)")
        if self.max_frames and self.max_slices and frames > self.max_frames * self.max_slices:
            return (f"{frames} frames exceed ROUTING_MAX_FRAMES x ROUTING_MAX_SLICES "
                    f"({self.max_frames} x {self.max_slices})")
        if self.include and not any(re.search(self.include, t, re.IGNORECASE) for t in texts):
            return f"SeriesDescription/ProtocolName do not match ROUTING_INCLUDE_PATTERN {self.include!r}"
        if self.exclude:
            hit = next((t for t in sorted(texts) if re.search(self.exclude, t, re.IGNORECASE)), None)
            if hit is not None:
                return f"{hit!r} matches ROUTING_EXCLUDE_PATTERN {self.exclude!r}"
        return ""

    def check_shape(self, slices: int, frames: int) -> str:
        """The reason a read cine (slices x frames per slice) is outside the limits ("" when within)."""
        if self.max_slices and slices > self.max_slices:
            return f"{slices} slices are more than ROUTING_MAX_SLICES {self.max_slices}"
        if self.max_frames and frames > self.max_frames:
            return f"{frames} frames per slice are more than ROUTING_MAX_FRAMES {self.max_frames}"
        return ""


def check_series(store: InstanceStore, study_uid: str, series_uid: str,
                 limits: RoutingLimits | None = None) -> Eligibility:
    """Decide whether a stored series can be super-resolved (within `limits` when given); the reason says
    why not."""
    files = store.instances(study_uid, series_uid)
    if limits is not None and files:
        reason = limits.check_headers(files)
        if reason:
            return Eligibility(study_uid, series_uid, False, reason, len(files))
    try:
        series = read_cine(files, series_uid)
    except SeriesNotEligible as exc:
        return Eligibility(study_uid, series_uid, False, str(exc), len(files))
    except Exception as exc:  # noqa: BLE001 - an undecodable file is a reason, not a crash of the service
        return Eligibility(study_uid, series_uid, False, f"unreadable: {type(exc).__name__}: {exc}", len(files))
    for item in series.header.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "")) == "CineSR":
            return Eligibility(study_uid, series_uid, False, "already a CineSR derived series", len(files))
    if limits is not None:
        reason = limits.check_shape(len(series.slices), int(series.shape[1]))
        if reason:
            return Eligibility(study_uid, series_uid, False, reason, len(files))
    return Eligibility(study_uid, series_uid, True, "", len(files))


class RoutingLog:
    """Decisions per series, persisted: what was eligible, what not and why, and when it was checked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS series (series_uid TEXT PRIMARY KEY, study_uid TEXT, "
                           "eligible INTEGER, reason TEXT, instances INTEGER, checked REAL, removed REAL)")

    def record(self, result: Eligibility, when: float | None = None) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO series VALUES (?,?,?,?,?,?,NULL)",
                               (result.series_uid, result.study_uid, int(result.eligible), result.reason,
                                result.instances, when if when is not None else time.time()))

    def get(self, series_uid: str) -> Eligibility | None:
        with self._lock:
            row = self._conn.execute("SELECT study_uid, eligible, reason, instances FROM series WHERE series_uid=?",
                                     (series_uid,)).fetchone()
        if row is None:
            return None
        return Eligibility(row[0], series_uid, bool(row[1]), row[2], row[3])

    def ineligible(self, older_than: float | None = None) -> list[Eligibility]:
        """Ineligible series still stored (checked before `older_than`, when given)."""
        sql = "SELECT study_uid, series_uid, reason, instances FROM series WHERE eligible=0 AND removed IS NULL"
        args: list[float] = []
        if older_than is not None:
            sql, args = sql + " AND checked < ?", [older_than]
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [Eligibility(r[0], r[1], False, r[2], r[3]) for r in rows]

    def mark_removed(self, series_uid: str) -> None:
        with self._lock:
            self._conn.execute("UPDATE series SET removed=? WHERE series_uid=?", (time.time(), series_uid))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def sweep_ineligible(store: InstanceStore, log: RoutingLog, retention_hours: float, now: float | None = None) -> int:
    """Delete stored ineligible series older than the retention; return how many instances were removed."""
    cutoff = (now if now is not None else time.time()) - retention_hours * 3600
    removed = 0
    for item in log.ineligible(older_than=cutoff):
        try:
            removed += store.remove_series(item.study_uid, item.series_uid)
        except (OSError, ValueError) as exc:
            LOGGER.warning("retention: could not remove series %s: %s", item.series_uid, exc)
            continue
        log.mark_removed(item.series_uid)
        LOGGER.info("retention: removed ineligible series %s (%s)", item.series_uid, item.reason)
    return removed
