"""CineSR settings: environment variables with the prefix CINESR_, or a config file.

The config file (YAML or .env style) is named by CINESR_CONFIG; the environment wins over it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "tensorrt", "onnx", "torch"]


class Settings(BaseSettings):
    """Every knob of a running CineSR, read from CINESR_* environment variables (README "Settings")."""

    model_config = SettingsConfigDict(env_prefix="CINESR_", extra="ignore")

    ae_title: str = Field("CINESR", max_length=16)
    dicom_port: int = Field(11112, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("./cinesr-data")
    broker_url: str = ""
    # NoDecode: the environment gives these as comma lists, not JSON.
    allowed_calling_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    pacs_ae_title: str = ""
    pacs_host: str = ""
    pacs_port: int = Field(0, ge=0, le=65535)
    series_stable_seconds: float = Field(10.0, ge=0)
    auto_process: bool = True
    model_dir: Path | None = None  # None: the bundled model
    backend: Backend = "auto"
    # data consistency of the model's output with the acquisition (cinesr.model.consistency); off: research only;
    # None: the bundle's shipped choice (measured on validation data, in its model.json)
    consistency: Literal["auto", "area", "kspace", "off"] | None = None
    fidelity_floor_db: float = Field(30.0, ge=0)  # below this the series is flagged (job warning, ImageComments)
    # sampler steps of the model (None: the bundle's choice); one the bundle supports (its T, or a step count
    # its distilled student serves), checked when the model loads and for every REST request
    steps: int | None = Field(None, ge=1, le=1000)
    # uncertainty series: 0 off; N >= 2 writes, beside every model output, the per-pixel standard deviation over
    # N draws (N runs of the model). Also the draw count of a REST request with {"uncertainty": true}.
    uncertainty_draws: int = Field(0, ge=0, le=32)
    # --- workers (issue 7) ---
    heartbeat_file: Path = Path("/tmp/cinesr/heartbeat")  # written once the engine is loaded; probes read it
    engine_cache: Path | None = None  # TensorRT plans (per GPU, TensorRT version, bundle); None: a temp folder
    task_soft_time_limit: float = Field(1800.0, gt=0)  # seconds: the task is told to stop (SoftTimeLimitExceeded)
    task_time_limit: float = Field(2100.0, gt=0)  # seconds: the worker child is killed; must exceed the soft one
    # --- end workers ---
    # --- service: PACS export/pull, gateway, routing (issue 6) ---
    default_method: Literal["auto", "model", "baseline"] = "auto"  # auto: model if a trained bundle is installed
    export_batch_size: int = Field(64, ge=1)  # instances sent per association
    export_retries: int = Field(5, ge=0)  # further attempts after the first, exponential backoff
    export_backoff_seconds: float = Field(2.0, ge=0)  # first wait; doubles each attempt
    retrieve_method: Literal["move", "get"] = "move"  # C-MOVE to our own AE, or C-GET on one association
    retrieve_timeout_seconds: float = Field(600.0, gt=0)
    # extra destinations for the REST `destination` field: comma list of AE@host:port (C-STORE) or
    # NAME=https://host/dicom-web (STOW-RS)
    destinations: Annotated[list[str], NoDecode] = Field(default_factory=list)
    retention_hours: float = Field(24.0, ge=0)  # ineligible series / non-image instances kept this long
    # --- DICOMweb (issue 17) ---
    # The PACS by URL (e.g. https://pacs/dicom-web): when set, results go to it by STOW-RS and studies are
    # found by QIDO-RS and pulled by WADO-RS, instead of C-STORE / C-FIND / C-MOVE to PACS_HOST.
    pacs_dicomweb_url: str = ""
    # Secrets: plain strings (the embedded worker gets the settings as environment variables), kept out of
    # repr() so that a logged Settings never shows them.
    pacs_dicomweb_user: str = ""  # basic auth, with PACS_DICOMWEB_PASSWORD (from a Secret)
    pacs_dicomweb_password: str = Field("", repr=False)
    pacs_dicomweb_token: str = Field("", repr=False)  # bearer auth (from a Secret); wins over user/password
    # credentials of DICOMweb entries in DESTINATIONS (from a Secret): NAME=bearer:TOKEN or NAME=basic:USER:PASSWORD
    dicomweb_credentials: str = Field("", repr=False)
    dicomweb_timeout_seconds: float = Field(60.0, gt=0)  # per HTTP operation (connect, read, write)
    stow_max_request_bytes: int = Field(4 << 30, ge=1)  # STOW-RS in: one request body
    stow_max_part_bytes: int = Field(1 << 30, ge=1)  # STOW-RS in: one part (one instance, held in memory)
    # --- end DICOMweb ---
    # listener (read by cinesr.service.listener.ListenerConfig.from_settings by these names)
    dicom_host: str = "0.0.0.0"
    max_associations: int = Field(32, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(120.0, gt=0)
    tls_cert: str | None = None  # PEM certificate + key: DICOM TLS on the listener
    tls_key: str | None = None
    tls_ca: str | None = None  # clients must present a certificate signed by this CA
    max_pdu_size: int = Field(1 << 20, ge=0)  # announced; a longer P-DATA PDU aborts the association (0 = no limit)
    receive_buffer_bytes: int = Field(256 << 20, ge=1 << 20)  # dataset buffers of all associations (beyond: 0xA700)
    # disk watermark: C-STORE answers "out of resources" rather than fill the disk
    disk_min_free_bytes: int = Field(1 << 30, ge=0)
    disk_min_free_fraction: float = Field(0.05, ge=0, lt=1)
    # write-ahead journal of the instance store: segment size and how many are kept zero-filled ahead
    # (its footprint: the spares plus one segment per association writing, plus what awaits filing)
    journal_segment_bytes: int = Field(8 << 20, ge=1 << 20)
    journal_spare_segments: int = Field(2, ge=0)
    # --- end service ---
    # --- hardening (issue 14) ---
    # a series being processed renews a lease every SERIES_LEASE_SECONDS / 6; a lease older than this means
    # its worker is gone, and any live worker requeues the series (instead of waiting for the broker's
    # visibility timeout, which must exceed the task time limit)
    series_lease_seconds: float = Field(60.0, ge=5)
    http_max_body_bytes: int = Field(1 << 20, ge=1)  # REST request bodies (STOW-RS has its own limits above)
    docs_enabled: bool = False  # /docs and /redoc load their page assets from a public CDN
    probe_calling_ae: str = Field("CINESR-PROBE", max_length=16)  # `cinesr probe dicom`; allowed by the listener
    # --- end hardening ---
    # --- routing limits (issue 18): a pushed or requested series outside them is recorded ineligible ---
    # The model is trained on 64x64 acquisitions; 192 leaves room for larger fields of view while refusing
    # an already high-resolution series (256x256 -> 1024x1024 output, gigabytes of worker memory, hours).
    routing_max_matrix: int = Field(192, ge=1)  # largest Rows or Columns of the input
    routing_max_frames: int = Field(128, ge=2)  # most cardiac phases per slice (the output has 8x as many)
    routing_max_slices: int = Field(40, ge=1)  # most slice positions in one series
    # regular expressions searched (case-insensitive) in SeriesDescription and ProtocolName; empty = off.
    # include: at least one of the two must match; exclude: neither may match.
    routing_include_pattern: str = ""
    routing_exclude_pattern: str = ""
    # --- end routing limits ---
    # derived series: transfer syntax of the written files (lossless only; see cinesr.model.instance)
    output_transfer_syntax: Literal["jpeg2000-lossless", "jpeg-ls-lossless", "rle-lossless",
                                    "explicit-little-endian"] = "jpeg2000-lossless"

    @field_validator("allowed_calling_aets", "api_tokens", "destinations", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # Operators write lists as "A,B" in the environment; JSON lists also work.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("uncertainty_draws")
    @classmethod
    def _draws(cls, value: int) -> int:
        if value == 1:
            raise ValueError("an uncertainty series needs at least 2 draws (0: off)")
        return value

    @field_validator("routing_include_pattern", "routing_exclude_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        # a typo in a pattern must stop the service at start-up, not every series later
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @property
    def pacs_configured(self) -> bool:
        return bool(self.pacs_dicomweb_url) or bool(self.pacs_ae_title and self.pacs_host and self.pacs_port)


def _file_values(path: Path) -> dict[str, object]:
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else None
    if data is None:
        data = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, val = line.partition("=")
                data[key.strip()] = val.strip()
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    # Accept both AE_TITLE and ae_title (and CINESR_AE_TITLE) spellings.
    return {str(k).lower().removeprefix("cinesr_"): v for k, v in data.items()}


def load_settings(config_file: Path | None = None) -> Settings:
    """Settings from the environment, over values from a config file if one is named."""
    config_file = config_file or (Path(os.environ["CINESR_CONFIG"]) if os.environ.get("CINESR_CONFIG") else None)
    base = _file_values(config_file) if config_file else {}
    # The environment wins: drop file values that the environment sets.
    base = {k: v for k, v in base.items() if f"CINESR_{k.upper()}" not in os.environ}
    return Settings(**base)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (a FastAPI dependency too)."""
    return load_settings()
