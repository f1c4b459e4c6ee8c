"""The worker's settings: environment variables with the prefix CINESR_, or a config file.

The config file (YAML or .env style) is named by CINESR_CONFIG; the environment wins over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "tensorrt", "onnx", "torch"]
S = TypeVar("S", bound=BaseSettings)


def split_commas(value: object) -> object:
    """Operators write lists as "A,B" in the environment; JSON lists also work."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# NoDecode: the environment gives these as comma lists, not JSON.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]


class WorkerSettings(BaseSettings):
    """What a worker reads: model, engine, queue, PACS export (README "Settings"). The service's settings
    (cinesr's gateway and listener) extend these, so one environment configures both."""

    model_config = SettingsConfigDict(env_prefix="CINESR_", extra="ignore")

    ae_title: str = Field("CINESR", max_length=16)  # ours: called by the PACS, calling when we export
    data_dir: Path = Path("./cinesr-data")
    broker_url: str = ""
    pacs_ae_title: str = ""
    pacs_host: str = ""
    pacs_port: int = Field(0, ge=0, le=65535)
    model_dir: Path | None = None  # None: the bundled model
    backend: Backend = "auto"
    # data consistency of the model's output with the acquisition (cinesr.model.consistency); off: research only;
    # None: the bundle's shipped choice (measured on validation data, in its model.json)
    consistency: Literal["both", "auto", "area", "kspace", "off"] | None = None
    fidelity_floor_db: float = Field(30.0, ge=0)  # below this the series is flagged (job warning, ImageComments)
    # sampler steps of the model (None: the bundle's choice); one the bundle supports (its T, or a step count
    # its distilled student serves), checked when the model loads and for every REST request
    steps: int | None = Field(None, ge=1, le=1000)
    # uncertainty series: 0 off; N >= 2 writes, beside every model output, the per-pixel standard deviation over
    # N draws (N runs of the model). Also the draw count of a REST request with {"uncertainty": true}.
    uncertainty_draws: int = Field(0, ge=0, le=32)
    # --- workers ---
    heartbeat_file: Path = Path("/tmp/cinesr/heartbeat")  # written once the engine is loaded; probes read it
    engine_cache: Path | None = None  # TensorRT plans (per GPU, TensorRT version, bundle); None: a temp folder
    task_soft_time_limit: float = Field(1800.0, gt=0)  # seconds: the task is told to stop (SoftTimeLimitExceeded)
    task_time_limit: float = Field(2100.0, gt=0)  # seconds: the worker child is killed; must exceed the soft one
    # a series being processed renews a lease every SERIES_LEASE_SECONDS / 6; a lease older than this means
    # its worker is gone, and any live worker requeues the series (instead of waiting for the broker's
    # visibility timeout, which must exceed the task time limit)
    series_lease_seconds: float = Field(60.0, ge=5)
    # --- method and export to the PACS ---
    default_method: Literal["auto", "model", "baseline"] = "auto"  # auto: model if a trained bundle is installed
    export_batch_size: int = Field(64, ge=1)  # instances sent per association
    export_retries: int = Field(5, ge=0)  # further attempts after the first, exponential backoff
    export_backoff_seconds: float = Field(2.0, ge=0)  # first wait; doubles each attempt
    # extra destinations for the REST `destination` field: comma list of AE@host:port (C-STORE) or
    # NAME=https://host/dicom-web (STOW-RS)
    destinations: CommaList = Field(default_factory=list)
    # derived series: transfer syntax of the written files (lossless only; see cinesr.model.instance)
    output_transfer_syntax: Literal["jpeg2000-lossless", "jpeg-ls-lossless", "rle-lossless",
                                    "explicit-little-endian"] = "jpeg2000-lossless"
    # --- DICOMweb PACS ---
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

    @field_validator("uncertainty_draws")
    @classmethod
    def _draws(cls, value: int) -> int:
        if value == 1:
            raise ValueError("an uncertainty series needs at least 2 draws (0: off)")
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


def read_settings(cls: type[S], config_file: Path | None = None) -> S:
    """Settings of class `cls` from the environment, over values from a config file if one is named."""
    config_file = config_file or (Path(os.environ["CINESR_CONFIG"]) if os.environ.get("CINESR_CONFIG") else None)
    base = _file_values(config_file) if config_file else {}
    # The environment wins: drop file values that the environment sets.
    base = {k: v for k, v in base.items() if f"CINESR_{k.upper()}" not in os.environ}
    return cls(**base)


def describe_error(exc: ValidationError) -> str:
    """One line naming the first invalid setting as an operator writes it (CINESR_NAME)."""
    first = exc.errors()[0]
    name = ".".join(str(p) for p in first.get("loc", ()))
    return f"invalid setting CINESR_{name.upper()}: {first.get('msg')}"


def load_settings(config_file: Path | None = None) -> WorkerSettings:
    """The worker's settings (CINESR_* environment over the CINESR_CONFIG file)."""
    return read_settings(WorkerSettings, config_file)
