"""Issue 14 #6: the chart's rendered startup probe, run as the pod would run it (the ConfigMap's settings in the
environment), succeeds against a real listener with an AE allow-list and TLS with client certificates; a caller
the allow-list does not name is still refused."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cinesr.service.cli import CLI
from cinesr.service.listener import start_listener
from cinesr.service.settings import Settings
from deploy_helpers import find, render

from tests.service.conftest import new_store

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _pki(folder: Path) -> dict[str, str]:
    """A CA, and a server certificate it signed (the probe presents it as its client certificate)."""
    ca_key, ca_cert = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "tls.key", folder / "tls.csr", folder / "tls.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
             "-days", "1", "-subj", "/CN=cinesr-test-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=cinesr")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "1")
    return {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca_cert)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_rendered_startup_probe_passes_with_tls_and_an_allow_list(gpu_values: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    values = copy.deepcopy(gpu_values)
    assert values["config"]["allowedCallingAets"], "the production example sets an allow-list"
    # DICOM TLS as an operator turns it on: the settings through the chart's config.extra (files from a Secret)
    values["config"]["extra"] = {**values["config"].get("extra", {}), **_pki(tmp_path)}
    objects = render(values)
    env = dict(find(objects, "ConfigMap")["data"])
    gateway = find(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    command = gateway["startupProbe"]["exec"]["command"]
    assert command[:1] == ["cinesr"]
    # the pod's environment, on a free port and a private data folder
    env.update(CINESR_DICOM_PORT=str(_free_port()), CINESR_DATA_DIR=str(tmp_path / "data"))
    settings = Settings(**{k.removeprefix("CINESR_").lower(): v for k, v in env.items()
                           if k.removeprefix("CINESR_").lower() in Settings.model_fields})
    assert settings.tls_ca and settings.allowed_calling_aets
    store = new_store(tmp_path / "data")
    listener = start_listener(settings, store)
    try:
        probe = subprocess.run([*CLI, *command[1:]], env={**os.environ, **env}, capture_output=True, text=True,
                               timeout=60)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert "dicom ok" in probe.stdout
        assert "CINESR-PROBE" in env["CINESR_ALLOWED_CALLING_AETS"].split(",")  # the chart allowed it
        # the allow-list still holds for anyone else
        other = subprocess.run([*CLI, *command[1:], "--calling-ae", "INTRUDER"], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 1, other.stdout + other.stderr
        # and without TLS nothing answers
        plain = {**env, "CINESR_TLS_CERT": "", "CINESR_TLS_KEY": "", "CINESR_TLS_CA": ""}
        bare = subprocess.run([*CLI, *command[1:], "--timeout", "3"], env={**os.environ, **plain},
                              capture_output=True, text=True, timeout=60)
        assert bare.returncode == 1
    finally:
        listener.stop()
        store.close()
