"""Files and folders that appear whole or not at all: written under a hidden temporary name, then renamed."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _make_staging(final: Path) -> Path:
    # os.mkdir with 0o777 lets the process umask decide the mode, as for any folder the user creates
    # (tempfile.mkdtemp would force 0700, which other readers of the output, e.g. a PACS import, cannot enter).
    for _ in range(100):
        staging = final.parent / f".{final.name[:20]}-{secrets.token_hex(6)}"
        try:
            staging.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free staging name beside {final}")


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; on success it replaces `final`, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_staging(final)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_write(final: Path, *, sync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; on success it replaces `final` (one rename, so a
    reader sees the old file or the new one, never half of one), on error it is removed.

    With ``sync`` the data is flushed to stable storage (fdatasync) before the rename; the caller makes the
    directory entry durable (fsync_dir) when and how often it needs to. The temporary name is hidden and
    unique per process and thread, so concurrent writers of one file never share it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
