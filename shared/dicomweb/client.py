"""Delivering DICOM objects (SEG, SR) to a PACS by DICOMweb: QIDO-RS, then STOW-RS.

The DICOMweb twin of :mod:`shared.dicom.pacs`, idempotent the same way: an object's SOP
Instance UID is its identity (deterministic per series revision), so :func:`deliver` first
asks the PACS whether it holds the instance (QIDO-RS at instance level, within its study and
series) and stores it (STOW-RS) only if not; a redo after a crash between the store and the
Kafka commit does not send it twice. A PACS that cannot answer the query gets the STOW again,
which stores the same instance, never a second one.

Errors: an unreachable PACS, a 5xx, an authentication refusal or a FailedSOPSequence for the
object raise :class:`RetriableError` (the runtime retries with backoff; the results stage
records ``failed`` after the last attempt). Synchronous (stdlib HTTP): the results handler
runs in a worker thread.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.dicom.pacs import Delivered, deliverable
from shared.dicomweb.stow import RESPONSE_MEDIA_TYPE, encode_multipart, failed_in
from shared.runtime.errors import RetriableError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class DicomWebPacs:
    """A DICOMweb origin server: ``url`` is its service root (``https://pacs/dicom-web``)."""

    url: str
    token: str | None = None  # bearer token, if the server wants one
    ca_file: Path | None = None  # CA bundle for an https url (default: the system's)
    client_cert: Path | None = None  # mutual TLS
    client_key: Path | None = None
    timeout_s: float = 20.0
    allow_plaintext: bool = False  # http beyond loopback (a PACS on a trusted network only)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the DICOMweb url must be http(s)://host/...")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK and not self.allow_plaintext:
            raise ValueError(
                "plain http to a DICOMweb PACS beyond loopback is refused "
                "(RADSTREAM_RESULTS__PACS_ALLOW_PLAINTEXT=true for a trusted network)"
            )

    def __repr__(self) -> str:  # never the token
        return f"DicomWebPacs(url={self.url!r})"


def _context(pacs: DicomWebPacs) -> ssl.SSLContext | None:
    if not pacs.url.lower().startswith("https:"):
        return None
    ctx = ssl.create_default_context(cafile=str(pacs.ca_file) if pacs.ca_file else None)
    if pacs.client_cert is not None:
        ctx.load_cert_chain(
            str(pacs.client_cert), str(pacs.client_key) if pacs.client_key else None
        )
    return ctx


def _request(
    pacs: DicomWebPacs, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes]:
    url = pacs.url.rstrip("/") + path  # scheme checked when the DicomWebPacs was made
    if pacs.token:
        headers = {**headers, "Authorization": f"Bearer {pacs.token}"}
    req = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(  # noqa: S310 - scheme checked above
            req, timeout=pacs.timeout_s, context=_context(pacs)
        ) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read() or b"")
    except (urllib.error.URLError, OSError) as exc:
        raise RetriableError(f"DICOMweb PACS unreachable ({type(exc).__name__})") from None


def holds(pacs: DicomWebPacs, study_uid: str, series_uid: str, sop_uid: str) -> bool | None:
    """Does the PACS hold this instance? QIDO-RS; None when it cannot tell (a 4xx other than
    404), RetriableError when it cannot be reached or fails (5xx)."""
    query = urllib.parse.urlencode({"SOPInstanceUID": sop_uid})
    path = (
        f"/studies/{urllib.parse.quote(study_uid)}/series/{urllib.parse.quote(series_uid)}"
        f"/instances?{query}"
    )
    status, body = _request(pacs, "GET", path, None, {"Accept": RESPONSE_MEDIA_TYPE})
    if status >= 500:
        raise RetriableError(f"QIDO-RS answered HTTP {status}")
    if status in (204, 404):
        return False
    if status != 200:
        return None
    try:
        found: Any = json.loads(body) if body.strip() else []
    except ValueError:
        return None
    if not isinstance(found, list):
        return None
    return any(_sop_uid(item) == sop_uid for item in found)


def _sop_uid(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    values = (item.get("00080018") or {}).get("Value") or []
    return str(values[0]) if values else None


def stow(pacs: DicomWebPacs, data: bytes, study_uid: str, sop_uid: str) -> None:
    """STOW-RS one Part 10 object to ``/studies/{study}``; RetriableError unless stored."""
    body, content_type = encode_multipart([data])
    status, answer = _request(
        pacs,
        "POST",
        f"/studies/{urllib.parse.quote(study_uid)}",
        body,
        {"Content-Type": content_type, "Accept": RESPONSE_MEDIA_TYPE},
    )
    if status not in (200, 202):
        raise RetriableError(f"STOW-RS answered HTTP {status}")
    try:
        response: Any = json.loads(answer) if answer.strip() else {}
    except ValueError:
        response = {}
    failures = failed_in(response) if isinstance(response, dict) else {}
    if sop_uid in failures:
        raise RetriableError(f"STOW-RS failed the object (FailureReason 0x{failures[sop_uid]:04X})")
    if status == 202 and failures:
        raise RetriableError("STOW-RS failed a part it could not name")


def deliver(pacs: DicomWebPacs, data: bytes) -> Delivered:
    """Store the object unless the PACS holds it already (see the module's docstring)."""
    ds = deliverable(data)
    study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    if holds(pacs, study, series, sop):
        return "already_present"
    stow(pacs, data, study, sop)
    return "delivered"
