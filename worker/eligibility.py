"""Reading a stored series as a cine, or the reason it cannot be processed.

One check for both ends of a job: the service's routing runs it before a series is queued and
adds its own rules (ROUTING_* limits, not a CineSR output); the task body (cinesr.worker.queue.process) runs it
again when the series is processed, as the stored files may have changed meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cinesr.model.cine import read_series
from cinesr.model.errors import CineSRError
from cinesr.worker.errors import SeriesNotEligible

if TYPE_CHECKING:
    from cinesr.model.cine import CineSeries


def read_cine(files: Sequence[Path], series_uid: str) -> CineSeries:
    """The series `series_uid` read from its stored files; SeriesNotEligible (with the reason) when they are not
    an MR cine series of it. An undecodable file raises what the reader raised."""

    if not files:
        raise SeriesNotEligible("no instances stored")
    try:
        found = read_series(list(files))
    except CineSRError as exc:
        raise SeriesNotEligible(str(getattr(exc, "reason", exc))) from exc
    series = next((s for s in found if s.series_uid == series_uid), None)
    if series is None:
        raise SeriesNotEligible("files do not belong to the series")
    return series
