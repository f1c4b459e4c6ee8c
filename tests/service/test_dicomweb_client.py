"""The DICOMweb client (cinesr.worker.network.dicomweb) and its settings: STOW-RS batches with per-instance outcome,
QIDO-RS and WADO-RS retrieval into the instance store against Orthanc's DICOMweb plugin; refusals read from a
real store response (CineSR's own STOW-RS); an unreachable peer is a transient error; credentials never show."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.retrieve import retrieve_study, study_series_at_pacs
from cinesr.service.store import InstanceStore
from cinesr.worker.errors import NotConfigured, PacsUnavailable, RetrieveFailed
from cinesr.worker.network.dicomweb import DicomWebNode
from cinesr.worker.network.pacs import DicomNode, StoreOutcome, destination_node, pacs_node, store_files

from tests.orthanc import OrthancServer, dicomweb_plugin, free_port, orthanc_available, write_lowres_study
from tests.service.test_gateway import TOKEN, settings_for
from tests.service.test_stow import live_server, small_instance

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="needs the Orthanc binary")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if dicomweb_plugin() is None:
        pytest.fail("the Orthanc DICOMweb plugin is not installed (run .ci/run, or apt-get install orthanc-dicomweb)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-dicomweb"), dicomweb=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    return write_lowres_study(tmp_path_factory.mktemp("phantom"), seed=31)


def test_settings_choose_the_protocol_per_destination(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, pacs_dicomweb_url="https://pacs.example/dicom-web/", pacs_dicomweb_user="u",
                            pacs_dicomweb_password="pw-secret-1", pacs_ae_title="MAIN", pacs_host="old", pacs_port=104,
                            destinations=["ARCHIVE@archive.local:11112", "CLOUD=https://cloud.example/dw"],
                            dicomweb_credentials="CLOUD=bearer:tok-secret-2")
    pacs = pacs_node(settings)  # by URL when one is set: the DIMSE address is not used
    assert isinstance(pacs, DicomWebNode) and pacs.url == "https://pacs.example/dicom-web" and pacs.name == "MAIN"
    assert (pacs.user, pacs.password, pacs.token) == ("u", "pw-secret-1", "")
    assert destination_node(settings, None) == pacs
    assert destination_node(settings, "ARCHIVE") == DicomNode("ARCHIVE", "archive.local", 11112)
    cloud = destination_node(settings, "CLOUD")
    assert isinstance(cloud, DicomWebNode) and cloud.token == "tok-secret-2"
    for text in (repr(settings), str(settings), repr(pacs), str(pacs), repr(cloud), str(cloud)):
        assert "pw-secret-1" not in text and "tok-secret-2" not in text
    assert pacs_node(settings_for(tmp_path, pacs_ae_title="P", pacs_host="h", pacs_port=1)) == DicomNode("P", "h", 1)
    for bad, words in ((["X=ftp://h/x"], "invalid DICOMweb URL"), (["X=https://u:p@h/x"], "credentials do not"),
                       (["a name too long for=https://h"], "invalid destination name")):
        with pytest.raises(NotConfigured, match=words):
            destination_node(settings_for(tmp_path, destinations=bad), "X")
    with pytest.raises(NotConfigured, match="'CLOUD' is not") as caught:
        destination_node(settings_for(tmp_path, destinations=["CLOUD=https://h"],
                                      dicomweb_credentials="CLOUD=token-without-kind"), "CLOUD")
    assert "token-without-kind" not in str(caught.value)


def test_stow_batches_qido_lists_and_wado_pulls(tmp_path: Path, pacs: OrthancServer,
                                               study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    node = DicomWebNode("ORTHANC", pacs.dicomweb_url)
    settings = settings_for(tmp_path)
    assert study_series_at_pacs(settings, node, study_uid) == []
    batches: list[StoreOutcome] = []
    outcome = store_files(node, files, "CINESR", batch_size=3, on_batch=batches.append)
    assert [len(b.acknowledged) for b in batches] == [3, 3, 2]
    assert outcome.failures == {}
    assert sorted(outcome.acknowledged) == sorted(pacs.series_instances(series_uid))
    assert pacs.instance_origins(series_uid) == {"Plugins"}
    assert study_series_at_pacs(settings, node, study_uid) == [
        {"series_uid": series_uid, "modality": "MR", "instances": str(len(files))}]
    store = InstanceStore(tmp_path / "data", min_free_bytes=0, min_free_fraction=0)
    try:
        result = retrieve_study(settings, node, study_uid, store)
        assert (result.completed, result.failed, result.series) == (len(files), 0, [series_uid])
        pulled = {pydicom.dcmread(p).SOPInstanceUID: p for p in store.instances(study_uid, series_uid)}
        for path in files:
            sent = pydicom.dcmread(path)
            assert pydicom.dcmread(pulled[sent.SOPInstanceUID]).PixelData == sent.PixelData
        with pytest.raises(RetrieveFailed, match="delivered no instances"):
            retrieve_study(settings, node, "1.2.826.0.1.3680043.8.498.777", store)
    finally:
        store.close()


def test_unreachable_peer_is_a_transient_error(tmp_path: Path, study: tuple[str, str, list[Path]]) -> None:
    down = DicomWebNode("NOBODY", f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5)
    with pytest.raises(PacsUnavailable, match="cannot reach NOBODY"):
        store_files(down, study[2][:1], "CINESR")
    with pytest.raises(PacsUnavailable):
        study_series_at_pacs(settings_for(tmp_path), down, study[0])
    store = InstanceStore(tmp_path / "data", min_free_bytes=0, min_free_fraction=0)
    try:
        with pytest.raises(PacsUnavailable, match="WADO-RS"):
            retrieve_study(settings_for(tmp_path), down, study[0], store)
    finally:
        store.close()


def test_refused_instances_are_outcomes_with_the_failure_reason(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    good.write_bytes(small_instance()[0])
    other = tmp_path / "other.dcm"  # not a storage SOP class: CineSR's STOW-RS refuses it with 0x0122
    data, _, other_uid = small_instance(sop_class="1.2.840.10008.5.1.4.1.2.2.1")
    other.write_bytes(data)
    with Service(settings_for(tmp_path / "svc", auto_process=False), dispatch="inline", min_free_bytes=0) as svc:
        with live_server(svc) as url:
            node = DicomWebNode("SELF", f"{url}/dicomweb", token=TOKEN)
            outcome = store_files(node, [good, other], "CINESR")
            assert len(outcome.acknowledged) == 1 and list(outcome.failures) == [other_uid]
            assert outcome.failures[other_uid] == "HTTP 202, FailureReason 0x0122"
            with pytest.raises(PacsUnavailable, match="HTTP 401.*authentication refused"):
                store_files(DicomWebNode("SELF", f"{url}/dicomweb", token="wrong"), [good], "CINESR")
