"""Fixtures for the DICOM listener tests: a store on a temp dir and a listener on a free port."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cinesr.service.listener import ListenerConfig, ListenerHandle, start_listener
from cinesr.service.store import InstanceStore, StoredInstance

from tests.orthanc import OrthancServer

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise


def require_dcmtk() -> None:
    if shutil.which("storescu") is None or shutil.which("echoscu") is None:
        pytest.skip("dcmtk (storescu, echoscu) is not installed")


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool; return the completed process (output captured)."""
    return subprocess.run(list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def new_store(root: Path, **kwargs: object) -> InstanceStore:
    # Small journal segments keep the tests' zero-filling cheap; no watermark unless asked.
    options: dict[str, object] = {"segment_size": 4 << 20, "spare_segments": 2,
                                  "min_free_fraction": 0.0, "min_free_bytes": 0}
    options.update(kwargs)
    return InstanceStore(root, **options)  # type: ignore[arg-type]


@dataclass
class RunningListener:
    handle: ListenerHandle
    store: InstanceStore
    root: Path
    received: list[StoredInstance] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.handle.port

    def files(self) -> list[Path]:
        """Every visible instance file (after the store has materialised the journal)."""
        self.store.flush(timeout=30)
        return sorted((self.root / "instances").rglob("*.dcm"))


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[Callable[..., RunningListener]]:
    """Factory: make_listener(store_kwargs={...}, **ListenerConfig fields) -> RunningListener."""
    running: list[RunningListener] = []

    def make(store_kwargs: dict[str, object] | None = None, **config: object) -> RunningListener:
        root = tmp_path / f"data{len(running)}"
        store = new_store(root, **(store_kwargs or {}))
        received: list[StoredInstance] = []
        handle = start_listener(ListenerConfig(**{"port": 0, "host": "127.0.0.1", **config}), store,
                                on_instance=received.append)
        listener = RunningListener(handle, store, root, received)
        running.append(listener)
        return listener

    yield make
    for listener in running:
        listener.handle.stop()
        listener.store.close()


@pytest.fixture
def listener(make_listener: Callable[..., RunningListener]) -> RunningListener:
    return make_listener()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc for a test module (modules that need another kind define their own `pacs`)."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()
