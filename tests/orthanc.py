"""A real Orthanc as the PACS in tests: the Debian `Orthanc` binary on free ports, with its own config and
storage in a temporary folder (never the system service).

    with run_orthanc(tmp_path) as pacs:
        pacs.register_modality("CINESR", "127.0.0.1", listener_port)   # destination of C-MOVE
        pacs.upload(files)                                             # a study only the PACS has
        pacs.series_instances(series_uid)                              # what arrived, via Orthanc's REST API

`stop()` and `start()` keep the storage, so a test can take the PACS down and bring it back.
With ``dicomweb=True`` Orthanc loads its DICOMweb plugin (Debian `orthanc-dicomweb`) at ``pacs.dicomweb_url``;
``users={name: password}`` turns on HTTP basic auth (the REST helpers then use the first user).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_PATHS = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                         Path("/usr/lib/orthanc/libOrthancDicomWeb.so"))


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).is_file() and os.access(ORTHANC_BINARY, os.X_OK)


def dicomweb_plugin() -> Path | None:
    """The Orthanc DICOMweb plugin library (Debian package orthanc-dicomweb), if installed."""
    found = [p for p in DICOMWEB_PLUGIN_PATHS if p.is_file()]
    found += sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))  # a missing folder globs nothing
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process; REST helpers read what it holds."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", dicom_port: int | None = None,
                 http_port: int | None = None, dicomweb: bool = False,
                 users: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.ae_title = ae_title
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.modalities: dict[str, list[Any]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "orthanc.log"

    def _write_config(self) -> Path:
        config = {
            "Name": "cinesr-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpThreadsCount": 4,
            "StableAge": 1,
            "SaveJobs": False,
            "DicomScpTimeout": 10,
            "DicomAssociationCloseDelay": 0,
        }
        if self.dicomweb:
            plugin = dicomweb_plugin()
            if plugin is None:
                raise RuntimeError("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
            config["Plugins"] = [str(plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.http_port}"}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, timeout: float = 30) -> None:
        """Start (or restart) Orthanc and wait until its REST API answers."""
        if self._process is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        with open(self.log, "ab") as log:
            # Orthanc's DICOM layer is dcmtk: without TCP_NODELAY every response waits ~40 ms (Nagle)
            env = {**os.environ, "TCP_NODELAY": "1"}
            self._process = subprocess.Popen([ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self.folder, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"Orthanc exited at start; see {self.log}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1, auth=self._auth).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s; see {self.log}")

    def stop(self) -> None:
        """Stop Orthanc (its storage stays for a later start())."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ---- REST helpers ---------------------------------------------------------------------------

    @property
    def _auth(self) -> httpx.BasicAuth | None:
        if not self.users:
            return None
        user, password = next(iter(self.users.items()))
        return httpx.BasicAuth(user, password)

    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}{path}", timeout=30, auth=self._auth, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def register_modality(self, ae_title: str, host: str, port: int, name: str | None = None) -> None:
        """Make an AE known to Orthanc (a C-MOVE destination, and allowed to query); survives restarts."""
        name = name or ae_title.lower()
        self.modalities[name] = [ae_title, host, port]
        if self.running:
            self.rest("PUT", f"/modalities/{name}", json={"AET": ae_title, "Host": host, "Port": port})

    def upload(self, files: Iterable[Path]) -> list[str]:
        """Store files through the REST API; return their Orthanc instance ids."""
        ids = []
        for path in files:
            ids.append(self.rest("POST", "/instances", content=Path(path).read_bytes())["ID"])
        return ids

    def lookup(self, uid: str) -> list[dict[str, str]]:
        return self.rest("POST", "/tools/lookup", content=uid)

    def _orthanc_id(self, uid: str, level: str) -> str | None:
        for item in self.lookup(uid):
            if item.get("Type") == level:
                return item["ID"]
        return None

    def has_study(self, study_uid: str) -> bool:
        return self._orthanc_id(study_uid, "Study") is not None

    def series_instances(self, series_uid: str) -> list[str]:
        """SOP Instance UIDs Orthanc holds for a series (each listed once per stored instance)."""
        orthanc_id = self._orthanc_id(series_uid, "Series")
        if orthanc_id is None:
            return []
        instances = self.rest("GET", f"/series/{orthanc_id}/instances")
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]

    def instance_origins(self, series_uid: str) -> set[str]:
        """How the series' instances reached Orthanc (its 'Origin' metadata: DicomProtocol, RestApi, Plugins...)."""
        orthanc_id = self._orthanc_id(series_uid, "Series")
        if orthanc_id is None:
            return set()
        instances = self.rest("GET", f"/series/{orthanc_id}/instances")
        return {self._text("GET", f"/instances/{i['ID']}/metadata/Origin") for i in instances}

    def _text(self, method: str, path: str) -> str:
        response = httpx.request(method, f"{self.url}{path}", timeout=30, auth=self._auth)
        response.raise_for_status()
        return response.text

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The DICOM file Orthanc holds for an instance."""
        orthanc_id = self._orthanc_id(sop_instance_uid, "Instance")
        assert orthanc_id is not None, f"Orthanc has no instance {sop_instance_uid}"
        response = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30, auth=self._auth)
        response.raise_for_status()
        return response.content

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def study_series(self, study_uid: str) -> list[str]:
        orthanc_id = self._orthanc_id(study_uid, "Study")
        if orthanc_id is None:
            return []
        return [s["MainDicomTags"]["SeriesInstanceUID"] for s in self.rest("GET", f"/studies/{orthanc_id}/series")]

    def delete_study(self, study_uid: str) -> None:
        orthanc_id = self._orthanc_id(study_uid, "Study")
        if orthanc_id is not None:
            self.rest("DELETE", f"/studies/{orthanc_id}")


@contextmanager
def run_orthanc(folder: Path, ae_title: str = "ORTHANC") -> Iterator[OrthancServer]:
    """A started Orthanc in `folder`, stopped on exit."""
    server = OrthancServer(folder, ae_title)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_lowres_study(folder: Path, seed: int) -> tuple[str, str, list[Path]]:
    """A small phantom cine study as DICOM (2 slices x 4 frames, 64x64): (study uid, series uid, files)."""
    from cinesr.model.acquisition import write_phantom
    from cinesr.model.phantom import make_study

    (written,) = write_phantom(make_study(seed, slices=2, frames=32), folder, seed=seed, lowres=True, truth=False)
    return written.study_uid, written.series_uid, list(written.files)


def storescu(port: int, files: list[Path], called_ae: str = "CINESR", calling_ae: str = "MODALITY") -> None:
    """Send files with dcmtk's storescu (TCP_NODELAY on); raises if it reports a failure."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(["storescu", "-aec", called_ae, "-aet", calling_ae, "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=env, capture_output=True, timeout=60)
