"""The service's settings: the worker's (model, queue, export) plus the DICOM listener, the REST gateway,
STOW-RS, retrieval and routing. Same sources: CINESR_* environment variables over the CINESR_CONFIG file."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from cinesr.worker.settings import Backend, CommaList, WorkerSettings, describe_error, read_settings
from pydantic import Field, field_validator

__all__ = ["Backend", "Settings", "describe_error", "get_settings", "load_settings"]


class Settings(WorkerSettings):
    """Every knob of a running CineSR (README "Settings"); the embedded worker gets them all."""

    dicom_port: int = Field(11112, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    allowed_calling_aets: CommaList = Field(default_factory=list)
    api_tokens: CommaList = Field(default_factory=list)
    series_stable_seconds: float = Field(10.0, ge=0)
    auto_process: bool = True
    # --- pulling a study from the PACS ---
    retrieve_method: Literal["move", "get"] = "move"  # C-MOVE to our own AE, or C-GET on one association
    retrieve_timeout_seconds: float = Field(600.0, gt=0)
    retention_hours: float = Field(24.0, ge=0)  # ineligible series / non-image instances kept this long
    # --- STOW-RS in ---
    stow_max_request_bytes: int = Field(4 << 30, ge=1)  # one request body
    stow_max_part_bytes: int = Field(1 << 30, ge=1)  # one part (one instance, held in memory)
    # --- listener (read by ListenerConfig.from_settings by these names) ---
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
    # --- gateway ---
    http_max_body_bytes: int = Field(1 << 20, ge=1)  # REST request bodies (STOW-RS has its own limits above)
    docs_enabled: bool = False  # /docs and /redoc load their page assets from a public CDN
    probe_calling_ae: str = Field("CINESR-PROBE", max_length=16)  # `cinesr probe dicom`; allowed by the listener
    # --- routing limits: a pushed or requested series outside them is recorded ineligible ---
    # The model is trained on 64x64 acquisitions; 192 leaves room for larger fields of view while refusing
    # an already high-resolution series (256x256 -> 1024x1024 output, gigabytes of worker memory, hours).
    routing_max_matrix: int = Field(192, ge=1)  # largest Rows or Columns of the input
    routing_max_frames: int = Field(128, ge=2)  # most cardiac phases per slice (the output has 8x as many)
    routing_max_slices: int = Field(40, ge=1)  # most slice positions in one series
    # regular expressions searched (case-insensitive) in SeriesDescription and ProtocolName; empty = off.
    # include: at least one of the two must match; exclude: neither may match.
    routing_include_pattern: str = ""
    routing_exclude_pattern: str = ""

    @field_validator("routing_include_pattern", "routing_exclude_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        # a typo in a pattern must stop the service at start-up, not every series later
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


def load_settings(config_file: Path | None = None) -> Settings:
    """The service's settings (CINESR_* environment over the CINESR_CONFIG file)."""
    return read_settings(Settings, config_file)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (a FastAPI dependency too)."""
    return load_settings()
