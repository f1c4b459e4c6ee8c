"""The one write-then-rename helper: a reader sees the old file or the new one, and a failed write leaves
neither a half file nor its temporary."""

from __future__ import annotations

from pathlib import Path

import pytest
from cinesr.model.folders import atomic_write


@pytest.mark.parametrize("sync", [False, True])
def test_atomic_write_replaces_whole(tmp_path: Path, sync: bool) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    with atomic_write(target, sync=sync) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
