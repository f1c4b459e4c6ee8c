"""Receiving one association's instances into the store: each dataset streams into the journal as its PDUs
arrive, and is validated, filed and made durable at its last fragment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cinesr.service.journal import JournalRecord, Segment
from cinesr.service.wire import file_meta_bytes, is_valid_uid

if TYPE_CHECKING:  # the store creates writers; only its types are needed here
    from cinesr.service.store import InstanceStore, StoredInstance


class InstanceWriter:
    """Receives the instances of one association, one at a time (not thread-safe).

    ``begin`` when a C-STORE request arrives, ``feed`` with everything received so far after each
    PDU (the new bytes are written to the journal at once, overlapping the sender), ``commit``
    with the whole dataset at its last fragment; ``close`` when the association ends.
    """

    def __init__(self, store: InstanceStore, source_ae: str = "") -> None:
        self.store = store
        self.source_ae = source_ae
        self.transfer_syntax = ""
        self.sop_class_uid = ""
        self.sop_instance_uid = ""
        self.requested_class = ""  # the request's UIDs as sent: they must be the dataset's
        self.requested_instance = ""
        self._space_counted = 0  # dataset bytes already counted against the free-space watermark
        self._segment: Segment | None = None
        self._record: JournalRecord | None = None

    def _segment_for(self, size: int) -> Segment:
        journal = self.store.journal
        assert journal is not None
        if self._segment is not None and self._segment.size - self._segment.tail < size + (1 << 16):
            journal.give_back(self._segment)
            self._segment = None
        if self._segment is None:
            self._segment = journal.acquire(max(size + (1 << 16), min(1 << 20, journal.segment_size // 2)))
        return self._segment

    @property
    def space_counted(self) -> int:
        """Dataset bytes already counted against the free-space watermark."""
        return self._space_counted

    def begin(self, transfer_syntax: str, sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        self.transfer_syntax = transfer_syntax
        self.requested_class, self.requested_instance = sop_class_uid.strip(), sop_instance_uid.strip()
        self.sop_class_uid = sop_class_uid if is_valid_uid(sop_class_uid) else ""
        self.sop_instance_uid = sop_instance_uid if is_valid_uid(sop_instance_uid) else ""
        self._record = None
        self._space_counted = 0
        journal = self.store.journal
        if journal is not None and self.sop_class_uid and self.sop_instance_uid:
            self.store.raise_if_halted()
            meta = file_meta_bytes(self.sop_class_uid, self.sop_instance_uid, transfer_syntax, self.source_ae)
            # room for a typical instance (its size is not known yet); small segments are not abandoned
            # for a guess larger than they are (a longer instance moves on as it streams in)
            guess = min(1 << 20, journal.segment_size // 4)
            self._record = JournalRecord(journal, self._segment_for(guess), meta)

    def feed(self, received: memoryview) -> None:
        """Stream the dataset bytes received so far (all of them, from the start).

        Raises StoreFull before writing bytes that would cross the free-space watermark."""
        if self._record is not None:
            self.store.raise_if_halted()
            self.store.check_space(len(received) - self._space_counted)
            self._space_counted = len(received)
            self._record.feed(received)
            self._segment = self._record.segment

    def commit(self, dataset: memoryview) -> StoredInstance:
        """Validate, file and make durable; raises InvalidDataset or StoreFull (nothing stored)."""
        try:
            return self.store.commit(self, dataset)
        except BaseException:
            self.abandon()
            raise
        finally:
            self._record = None
            self.transfer_syntax = self.sop_class_uid = self.sop_instance_uid = ""
            self.requested_class = self.requested_instance = ""
            self._space_counted = 0

    def journal_commit(self, dataset: memoryview, meta: bytes, texts: Sequence[str]) -> tuple[int, int, int]:
        """Finish the instance's journal record (the file meta, the dataset, the texts that file it) and
        flush it; return (segment, offset, length) of the file bytes in the journal."""
        journal = self.store.journal
        assert journal is not None
        record = self._record
        if record is None or record.meta != meta:
            record = JournalRecord(journal, self._segment_for(len(dataset)), meta)
        result = record.commit(dataset, texts)
        self._segment = record.segment
        return result

    def abandon(self) -> None:
        """Drop a refused instance's streamed bytes: the segment goes back (released if nothing committed
        is in it), and the free space is measured afresh for the next check."""
        self._record = None
        self._space_counted = 0
        self.transfer_syntax = ""
        if self._segment is not None and self.store.journal is not None:
            self.store.journal.give_back(self._segment)
        self._segment = None
        self.store.remeasure_space()

    def close(self) -> None:
        if self._segment is not None and self.store.journal is not None:
            self.store.journal.give_back(self._segment)
        self._segment = None
