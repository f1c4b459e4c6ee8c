"""Routing: which received series are processed, and clean-up of the ones that are not.

A series is eligible when cinesr.model.cine.read_series accepts it (MR with image geometry; per slice
position at least 2 frames with distinct cardiac trigger times; classic or enhanced MR) and it is not itself a
CineSR output.
Every decision is recorded (DATA_DIR/routing.sqlite3) with the reason; ineligible series (including
non-image instances such as presentation states or reports) are deleted from the instance store once they
are older than RETENTION_HOURS.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cinesr.model.errors import CineSRError

from .store import InstanceStore

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eligibility:
    study_uid: str
    series_uid: str
    eligible: bool
    reason: str  # why not (empty when eligible)
    instances: int


def check_series(store: InstanceStore, study_uid: str, series_uid: str) -> Eligibility:
    """Decide whether a stored series can be super-resolved; the reason says why not."""
    from cinesr.model.cine import read_series

    files = store.instances(study_uid, series_uid)
    if not files:
        return Eligibility(study_uid, series_uid, False, "no instances stored", 0)
    try:
        found = read_series(files)
    except CineSRError as exc:
        return Eligibility(study_uid, series_uid, False, str(getattr(exc, "reason", exc)), len(files))
    except Exception as exc:  # noqa: BLE001 - an undecodable file is a reason, not a crash of the service
        return Eligibility(study_uid, series_uid, False, f"unreadable: {type(exc).__name__}: {exc}", len(files))
    series = next((s for s in found if s.series_uid == series_uid), None)
    if series is None:
        return Eligibility(study_uid, series_uid, False, "files do not belong to the series", len(files))
    for item in series.header.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "")) == "CineSR":
            return Eligibility(study_uid, series_uid, False, "already a CineSR derived series", len(files))
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
