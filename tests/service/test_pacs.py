"""PACS client and task bodies against a real Orthanc: C-STORE batching and per-instance outcome, export that
skips what was acknowledged, C-FIND, C-GET and C-MOVE retrieval into the instance store, a PACS that is down."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cinesr.service.retrieve import retrieve_study, study_series_at_pacs
from cinesr.service.store import InstanceStore
from cinesr.worker.errors import ExportFailed, PacsUnavailable, RetrieveFailed
from cinesr.worker.network.pacs import (
    VERIFICATION,
    DicomNode,
    StoreOutcome,
    associate,
    destination_node,
    echo,
    make_ae,
    parse_node,
    store_files,
)
from cinesr.worker.queue.jobs import open_job_store
from cinesr.worker.queue.process import export_series, process_series

from tests.orthanc import OrthancServer, free_port, orthanc_available, write_lowres_study
from tests.service.test_gateway import settings_for

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="needs the Orthanc binary")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    server.register_modality("CINESR", "127.0.0.1", free_port())  # Orthanc answers C-FIND only to known AEs
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    return write_lowres_study(tmp_path_factory.mktemp("phantom"), seed=21)


def node_of(pacs: OrthancServer) -> DicomNode:
    return DicomNode(pacs.ae_title, pacs.host, pacs.dicom_port)


def test_store_files_batches_and_reports_each_association(pacs: OrthancServer,
                                                          study: tuple[str, str, list[Path]]) -> None:
    _study_uid, series_uid, files = study
    batches: list[StoreOutcome] = []
    outcome = store_files(node_of(pacs), files, "CINESR", batch_size=3, on_batch=batches.append)
    assert [len(b.acknowledged) for b in batches] == [3, 3, 2]
    assert outcome.failures == {}
    assert sorted(outcome.acknowledged) == sorted(pacs.series_instances(series_uid))


def test_associations_send_without_nagle_delay(pacs: OrthancServer) -> None:
    """Each C-STORE is two small writes (command, data set); with Nagle on, every instance waited out the peer's
    delayed ACK (about 50 ms on loopback). Our associations turn it off."""
    ae = make_ae("CINESR", 10)
    ae.add_requested_context(VERIFICATION)
    assoc = associate(ae, node_of(pacs))
    try:
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_c_find_lists_series_or_nothing(pacs: OrthancServer, study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    pacs.upload(files)
    settings = settings_for(Path("/nonexistent"))
    found = study_series_at_pacs(settings, node_of(pacs), study_uid)
    assert found == [{"series_uid": series_uid, "modality": "MR", "instances": str(len(files))}]
    assert study_series_at_pacs(settings, node_of(pacs), "1.2.826.0.1.3680043.8.498.12345") == []


def test_unreachable_pacs_raises_transient_error(tmp_path: Path, study: tuple[str, str, list[Path]]) -> None:
    down = DicomNode("NOBODY", "127.0.0.1", free_port())
    assert echo(down, "CINESR", timeout=2) is False
    with pytest.raises(PacsUnavailable, match="NOBODY"):
        store_files(down, study[2][:1], "CINESR")
    with pytest.raises(PacsUnavailable):
        study_series_at_pacs(settings_for(tmp_path), down, study[0])


def test_destinations_from_settings(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, pacs_ae_title="PACS", pacs_host="pacs", pacs_port=104,
                            destinations=["ARCHIVE@archive.local:11112"])
    assert destination_node(settings, None) == DicomNode("PACS", "pacs", 104)
    assert destination_node(settings, "ARCHIVE") == DicomNode("ARCHIVE", "archive.local", 11112)
    assert destination_node(settings_for(tmp_path), None) is None
    with pytest.raises(Exception, match="expected AE@host:port"):
        parse_node("nonsense")


def test_export_skips_acknowledged_instances_and_fails_with_the_reason(
        tmp_path: Path, pacs: OrthancServer, study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    settings = settings_for(tmp_path, pacs_ae_title=pacs.ae_title, pacs_host=pacs.host, pacs_port=pacs.dicom_port,
                            export_batch_size=16, export_retries=2, export_backoff_seconds=0.01)
    target = tmp_path / "instances" / study_uid / series_uid
    target.mkdir(parents=True)
    for i, path in enumerate(files):
        shutil.copy(path, target / f"{i}.dcm")
    jobs = open_job_store(settings)
    job, _ = jobs.create_or_get(study_uid, [series_uid], {"method": "baseline"})
    process_series(job.job_id, series_uid, settings)
    entry = jobs.get(job.job_id).entry(series_uid)
    assert entry.status == "processed" and entry.instances_total == 64
    # pretend the first 10 were acknowledged in an earlier attempt: they must not be sent again
    derived = sorted((tmp_path / "outputs" / job.job_id / entry.output_series_uid).glob("*.dcm"))
    import pydicom

    first = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in derived[:10]]
    jobs.acknowledge(job.job_id, series_uid, first)
    export_series(job.job_id, series_uid, settings)
    at_pacs = set(pacs.series_instances(entry.output_series_uid))
    assert len(at_pacs) == 54 and not at_pacs & set(first)
    done = jobs.get(job.job_id)
    assert done.status == "succeeded" and done.entry(series_uid).instances_sent == 64

    # a destination that stays down: the series and the job end failed with the reason, after the retries
    job2, _ = jobs.create_or_get(study_uid, [series_uid], {"method": "baseline", "steps": 2})
    process_series(job2.job_id, series_uid, settings)
    waits: list[float] = []
    down = settings.model_copy(update={"pacs_port": free_port()})
    with pytest.raises(ExportFailed, match="after 3 attempts"):
        export_series(job2.job_id, series_uid, down, sleep=waits.append)
    assert waits == [0.01, 0.02]  # exponential backoff
    failed = jobs.get(job2.job_id)
    assert failed.status == "failed" and "after 3 attempts" in failed.error
    assert failed.entry(series_uid).output_series_uid  # the result is kept for a retry
    jobs.close()


@pytest.mark.parametrize("method", ["get", "move"])
def test_retrieve_study_into_the_store(tmp_path: Path, pacs: OrthancServer, study: tuple[str, str, list[Path]],
                                       method: str) -> None:
    from cinesr.service.listener import start_listener

    study_uid, series_uid, files = study
    pacs.upload(files)
    settings = settings_for(tmp_path, retrieve_method=method, retrieve_timeout_seconds=30)
    with InstanceStore(tmp_path, min_free_bytes=1 << 20) as store:
        listener = start_listener(settings, store)  # the C-MOVE destination
        try:
            pacs.register_modality(settings.ae_title, "127.0.0.1", listener.port)
            result = retrieve_study(settings, node_of(pacs), study_uid, store)
        finally:
            listener.stop()
        # everything the PACS has for the study arrives (earlier tests exported a derived series into it)
        at_pacs = pacs.study_series(study_uid)
        assert series_uid in at_pacs and sorted(result.series) == sorted(at_pacs)
        assert result.completed == sum(len(pacs.series_instances(s)) for s in at_pacs) and result.failed == 0
        assert len(store.instances(study_uid, series_uid)) == len(files)
        with pytest.raises(RetrieveFailed):
            retrieve_study(settings, node_of(pacs), "1.2.826.0.1.3680043.8.498.54321", store)


def test_a_response_taken_by_the_association_thread_goes_back_to_the_waiting_operation(make_listener) -> None:
    """pynetdicom's association thread may take a fast response as an unexpected request and drop it (the
    operation then waits out the DIMSE timeout): our SCU puts such a message back on the DIMSE queue, and
    still serves a real request."""
    from types import SimpleNamespace

    from cinesr.worker.network.pacs import DicomNode, _keep_responses, associate, make_ae
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    listener = make_listener()
    ae = make_ae("PUSHER", 5)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = associate(ae, DicomNode("CINESR", "127.0.0.1", listener.port))
    try:
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.Status = 0x0000
        assoc._serve_request(response, 1)  # what the association thread does with a message it takes
        assert assoc.dimse.msg_queue.get(timeout=1) == (1, response)
        served = []
        request = C_ECHO()
        request.MessageID, request.AffectedSOPClassUID = 3, "1.2.840.10008.1.1"
        assert request.is_valid_request
        fake = SimpleNamespace(_serve_request=lambda msg, cid: served.append((cid, msg)), dimse=assoc.dimse)
        _keep_responses(fake)
        fake._serve_request(request, 1)  # a real request still goes to pynetdicom's handler, not the queue
        assert served == [(1, request)] and assoc.dimse.msg_queue.empty()
    finally:
        assoc.release()
