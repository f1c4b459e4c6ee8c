"""A model bundle's model.json, read without loading torch: the service asks which model and step counts a
bundle serves on every request, and importing torch for that would cost its process seconds and memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

FORMAT = "cinesr-model-bundle"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
DEFAULT_BUNDLE = BUNDLES_DIR / "tiny"


def read_meta(path: str | Path) -> dict[str, Any]:
    """model.json of a bundle folder (no weights loaded)."""
    file = Path(path) / MODEL_JSON
    if not file.is_file():
        raise InputError(f"not a model bundle (no {MODEL_JSON})", Path(path))
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{MODEL_JSON} is not valid JSON ({exc})", Path(path)) from None
    if doc.get("format") != FORMAT:
        raise InputError(f"{MODEL_JSON} is not a {FORMAT} (format {doc.get('format')!r})", Path(path))
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"bundle format {doc['format_version']} is newer than this CineSR reads "
                         f"({FORMAT_VERSION})", Path(path))
    return doc
