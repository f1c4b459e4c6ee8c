"""A small DICOMweb client (PS3.18) for a PACS or destination configured by URL: STOW-RS to store derived
series, QIDO-RS to see what a study holds, WADO-RS to pull it. Basic or bearer auth.

Errors follow the DIMSE side (cinesr.worker.network.pacs): a peer that cannot be reached, answers 5xx, 401/403,
408 or 429 raises PacsUnavailable (transient: the export retries it with backoff); an instance the peer
refuses is an outcome (StoreOutcome.failures, with the FailureReason and HTTP status), not an exception.
Logs carry URLs without credentials and UIDs, never patient attributes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pydicom
from cinesr.worker.errors import NotConfigured, PacsUnavailable
from cinesr.worker.network.multipart import MultipartReader, encode_related, new_boundary, parse_content_type
from cinesr.worker.network.outcome import StoreOutcome

if TYPE_CHECKING:
    from cinesr.worker.settings import WorkerSettings

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")
_TRANSIENT = {401, 403, 408, 425, 429}  # auth problems are retried too: a rotated secret can be fixed in time


@dataclass(frozen=True)
class DicomWebNode:
    """A DICOMweb service root (…/dicom-web) with its credentials (never printed)."""

    name: str
    url: str
    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    timeout: float = 60.0  # seconds per HTTP operation (DICOMWEB_TIMEOUT_SECONDS)

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"

    @property
    def ae_title(self) -> str:  # the name a job's `destination` uses, as for a DIMSE node
        return self.name


def check_url(url: str) -> str:
    """The service root without a trailing slash; NotConfigured for what is not an http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise NotConfigured(f"invalid DICOMweb URL {url!r} (expected http(s)://host[:port]/path)")
    if parts.username or parts.password:
        raise NotConfigured("credentials do not belong in a DICOMweb URL: use the *_USER/_PASSWORD/_TOKEN "
                            "settings or DICOMWEB_CREDENTIALS (from a Secret)")
    return url.strip().rstrip("/")


def _credentials(settings: WorkerSettings) -> dict[str, tuple[str, str, str]]:
    """DICOMWEB_CREDENTIALS: NAME=bearer:TOKEN or NAME=basic:USER:PASSWORD, comma separated."""
    text = getattr(settings, "dicomweb_credentials", "") or ""
    found: dict[str, tuple[str, str, str]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, spec = entry.partition("=")
        kind, _, rest = spec.partition(":")
        if kind == "bearer" and rest:
            found[name.strip()] = ("", "", rest)
        elif kind == "basic" and ":" in rest:
            user, _, password = rest.partition(":")
            found[name.strip()] = (user, password, "")
        else:  # never echo the entry: it holds a secret
            raise NotConfigured(f"DICOMWEB_CREDENTIALS entry for {name.strip()!r} is not NAME=bearer:TOKEN or "
                                "NAME=basic:USER:PASSWORD")
    return found


def pacs_dicomweb_node(settings: WorkerSettings) -> DicomWebNode | None:
    """The PACS configured by PACS_DICOMWEB_URL (named PACS_AE_TITLE, else PACS), or None."""
    url = getattr(settings, "pacs_dicomweb_url", "")
    if not url:
        return None
    return DicomWebNode(settings.pacs_ae_title or "PACS", check_url(url), settings.pacs_dicomweb_user,
                        settings.pacs_dicomweb_password, settings.pacs_dicomweb_token,
                        float(settings.dicomweb_timeout_seconds))


def parse_dicomweb_destination(text: str, settings: WorkerSettings) -> DicomWebNode | None:
    """'NAME=https://host/dicom-web' -> DicomWebNode (credentials from DICOMWEB_CREDENTIALS); None for other
    forms (AE@host:port)."""
    name, sep, url = text.partition("=")
    if not sep:
        return None
    name = name.strip()
    if not _NAME_RE.match(name):
        raise NotConfigured(f"invalid destination name {name!r} (1-16 letters, digits, '_', '.', '-')")
    user, password, token = _credentials(settings).get(name, ("", "", ""))
    return DicomWebNode(name, check_url(url), user, password, token, float(settings.dicomweb_timeout_seconds))


def client(node: DicomWebNode) -> httpx.Client:
    headers = {"User-Agent": "CineSR"}
    auth: httpx.Auth | None = None
    if node.token:
        headers["Authorization"] = f"Bearer {node.token}"
    elif node.user:
        auth = httpx.BasicAuth(node.user, node.password)
    return httpx.Client(auth=auth, headers=headers, timeout=httpx.Timeout(node.timeout),
                        follow_redirects=False)


def _short(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ") if response.content else ""
    return f"HTTP {response.status_code}" + (f" {text[:160]}" if text else "")


def _check_transient(node: DicomWebNode, response: httpx.Response, what: str) -> None:
    if response.status_code >= 500 or response.status_code in _TRANSIENT:
        reason = {401: "authentication refused", 403: "access forbidden"}.get(response.status_code, "")
        raise PacsUnavailable(f"{node}: {what} failed: {_short(response)}" + (f" ({reason})" if reason else ""))


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag) or {}
    return element.get("Value") or []


def _first(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]) if values else ""


# ---- STOW-RS --------------------------------------------------------------------------------------------

def _stow_batch(http: httpx.Client, node: DicomWebNode, items: list[tuple[str, bytes]]) -> StoreOutcome:
    boundary = new_boundary()
    body = encode_related((data for _, data in items), boundary)
    try:
        response = http.post(f"{node.url}/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON})
    except httpx.HTTPError as exc:
        raise PacsUnavailable(f"cannot reach {node}: {type(exc).__name__}: {exc}") from exc
    _check_transient(node, response, "STOW-RS")
    outcome = StoreOutcome()
    uids = [uid for uid, _ in items]
    try:
        result = response.json() if response.content else {}
    except (json.JSONDecodeError, ValueError):
        result = {}
    if isinstance(result, list):  # some servers wrap the dataset in a list
        result = result[0] if result else {}
    referenced = {_first(i, "00081155") for i in _values(result, "00081199")}
    failed = {_first(i, "00081155"): _first(i, "00081197") for i in _values(result, "00081198")}
    for uid in uids:
        if uid in failed:
            code = failed[uid]
            outcome.failures[uid] = f"HTTP {response.status_code}, FailureReason " + (
                f"0x{int(code):04X}" if code.isdigit() else "unknown")
        elif uid in referenced or (response.status_code == 200 and not referenced and not failed):
            # 200 with no sequences: a minimal server saying "all stored"
            outcome.acknowledged.append(uid)
        else:
            outcome.failures[uid] = f"not stored: {_short(response)}"
    return outcome


def _sop_instance_uid(data: bytes, path: Path) -> str:
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid:
        raise ValueError(f"{path} has no SOPInstanceUID")
    return uid


def stow_files(node: DicomWebNode, files: Iterable[Path], batch_size: int = 64,
               on_batch: Callable[[StoreOutcome], None] | None = None) -> StoreOutcome:
    """STOW-RS every file (Part 10, sent as it is), batch_size instances per request.

    on_batch is called after each request with its outcome; raises PacsUnavailable when the peer cannot be
    reached or answers with a transient error (after reporting what got through)."""
    total = StoreOutcome()
    items: list[tuple[str, bytes]] = []
    with client(node) as http:
        def flush() -> None:
            outcome = _stow_batch(http, node, items)
            total.add(outcome)
            if on_batch is not None:
                on_batch(outcome)
            items.clear()

        for path in files:
            data = Path(path).read_bytes()
            items.append((_sop_instance_uid(data, Path(path)), data))
            if len(items) >= batch_size:
                flush()
        if items:
            flush()
    LOGGER.info("stored %d instances at %s by STOW-RS (%d refused)", len(total.acknowledged), node,
                len(total.failures))
    return total


# ---- QIDO-RS --------------------------------------------------------------------------------------------

def find_study_series(node: DicomWebNode, study_uid: str) -> list[dict[str, str]]:
    """QIDO-RS: the series of a study, [{series_uid, modality, instances}]; [] when the peer does not have it."""
    with client(node) as http:
        try:
            response = http.get(f"{node.url}/studies/{study_uid}/series", headers={"Accept": DICOM_JSON},
                                params={"includefield": "00201209"})
        except httpx.HTTPError as exc:
            raise PacsUnavailable(f"cannot reach {node}: {type(exc).__name__}: {exc}") from exc
    _check_transient(node, response, "QIDO-RS")
    if response.status_code in (204, 404) or not response.content:
        return []
    if response.status_code != 200:
        raise PacsUnavailable(f"{node}: QIDO-RS failed: {_short(response)}")
    try:
        matches = response.json()
    except (json.JSONDecodeError, ValueError) as exc:
        raise PacsUnavailable(f"{node}: QIDO-RS answered with something other than DICOM JSON") from exc
    series = []
    for item in matches if isinstance(matches, list) else []:
        uid = _first(item, "0020000E")
        if uid:
            series.append({"series_uid": uid, "modality": _first(item, "00080060"),
                           "instances": _first(item, "00201209")})
    return series


# ---- WADO-RS --------------------------------------------------------------------------------------------

_ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'


def retrieve_study(node: DicomWebNode, study_uid: str, max_part_bytes: int = 1 << 30) -> Iterator[bytes | str]:
    """WADO-RS: the study's instances as Part 10 bytes, one at a time as the response streams in (a str in
    their place for a part that could not be read: truncated, too large). Asks for the files as stored
    (transfer-syntax=*), falling back to the peer's default syntax where that is refused."""
    with client(node) as http:
        for accept in (_ACCEPT_AS_STORED, _ACCEPT_DEFAULT):
            try:
                with http.stream("GET", f"{node.url}/studies/{study_uid}", headers={"Accept": accept}) as response:
                    if response.status_code in (400, 406) and accept == _ACCEPT_AS_STORED:
                        continue
                    _check_transient(node, response, "WADO-RS")
                    if response.status_code in (204, 404):
                        return
                    if response.status_code != 200:
                        response.read()
                        raise PacsUnavailable(f"{node}: WADO-RS failed: {_short(response)}")
                    media, params = parse_content_type(response.headers.get("content-type", ""))
                    if media != "multipart/related" or not params.get("boundary"):
                        raise PacsUnavailable(f"{node}: WADO-RS answered {media or 'no content type'}, not "
                                              "multipart/related")
                    reader = MultipartReader(params["boundary"], max_part_bytes)
                    for chunk in response.iter_bytes():
                        for part in reader.feed(chunk):
                            yield part.data if part.data is not None else (part.error or "unreadable part")
                    for part in reader.close():
                        yield part.error or "unreadable part"
                    return
            except httpx.HTTPError as exc:
                raise PacsUnavailable(f"{node}: WADO-RS of study {study_uid} failed: {type(exc).__name__}: "
                                      f"{exc}") from exc
