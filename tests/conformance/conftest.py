"""One Orthanc for the conformance tests (started once; each case uploads its own derived series)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..orthanc import OrthancServer, orthanc_available, run_orthanc


@pytest.fixture(scope="session")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not orthanc_available():
        pytest.fail("Orthanc is not installed (run .ci/run, or: apt-get install orthanc)")
    with run_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
