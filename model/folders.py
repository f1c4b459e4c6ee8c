"""Files and folders that appear whole or not at all: written under a hidden temporary name, then renamed."""

from __future__ import annotations

import os
import secrets
import shutil
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
def atomic_write(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write; on success it replaces `final` (one rename, so a
    reader sees the old file or the new one, never half of one), on error it is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
