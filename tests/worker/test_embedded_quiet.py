"""The embedded transport (BROKER_URL empty) connects without kombu's "No hostname was supplied" warning,
which confused demo users: the queue is a SQLite file, there is no host."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cinesr.service.settings import Settings
from cinesr.worker.queue.celery_app import get_app


def test_embedded_connection_logs_no_hostname_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = get_app(Settings(data_dir=tmp_path))
    with caplog.at_level(logging.DEBUG, logger="kombu"), app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        info = connection.info()
        with connection.Producer() as producer:  # a real round trip through the SQLite queue
            producer.publish({"ping": 1}, routing_key="quiet-test", declare=[], retry=False)
    assert info["transport"].endswith("embedded_broker:Transport") or "cinesr" in str(info["transport"])
    assert not [r for r in caplog.records if "hostname" in r.getMessage().lower()], caplog.text
