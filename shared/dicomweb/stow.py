"""DICOMweb STOW-RS (DICOM PS3.18 §10.5), the parts both ends share. Pure: no sockets here.

* the request body: ``multipart/related; type="application/dicom"``, one Part 10 instance per
  part (:func:`encode_multipart`, :func:`is_stow_content_type`);
* the response: a DICOM JSON dataset with ReferencedSOPSequence (0008,1199) for the stored
  instances and FailedSOPSequence (0008,1198) with a FailureReason (0008,1197) for the others
  (:func:`response_dataset`), answered 200 when every instance was stored, 202 when some were,
  409 when none was (:func:`response_status`); :func:`failed_in` reads it back on the client.

Failure reasons follow PS3.18 Table 10.5.3-1 / PS3.4 C-STORE statuses; each RadStream dead-
letter reason a part can be refused for maps to one of them (:data:`FAILURE_REASON`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.schemas.reasons import Reason

OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (too large, broker did not acknowledge)
DOES_NOT_MATCH = 0xA900  # Error: data set does not match SOP class (content is wrong)
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (not DICOM, unparsable)
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # Referenced transfer syntax not supported
PROCESSING_FAILURE = 0x0110

FAILURE_REASON: dict[str, int] = {
    Reason.TOO_LARGE: OUT_OF_RESOURCES,
    Reason.EMPTY: CANNOT_UNDERSTAND,
    Reason.NOT_DICOM: CANNOT_UNDERSTAND,
    Reason.MALFORMED: CANNOT_UNDERSTAND,
    Reason.SEQUENCE_TOO_DEEP: CANNOT_UNDERSTAND,
    Reason.UNSUPPORTED_MEDIA_TYPE: CANNOT_UNDERSTAND,
    Reason.UNSUPPORTED_TRANSFER_SYNTAX: TRANSFER_SYNTAX_NOT_SUPPORTED,
    Reason.MISSING_ATTRIBUTE: DOES_NOT_MATCH,
    Reason.INVALID_UID: DOES_NOT_MATCH,
    Reason.TRUNCATED: DOES_NOT_MATCH,
    Reason.PIXEL_SIZE_MISMATCH: DOES_NOT_MATCH,
    Reason.PIXEL_SIZE_IMPLAUSIBLE: DOES_NOT_MATCH,
    Reason.STUDY_MISMATCH: DOES_NOT_MATCH,
}

MEDIA_TYPE = "application/dicom"
RESPONSE_MEDIA_TYPE = "application/dicom+json"


def failure_reason(reason: str | None) -> int:
    """The STOW-RS FailureReason for a dead-letter reason; None: the broker did not ack."""
    if reason is None:
        return OUT_OF_RESOURCES
    return FAILURE_REASON.get(reason, PROCESSING_FAILURE)


@dataclass(frozen=True)
class PartResult:
    """What became of one part: stored (``failure`` None) or refused with a FailureReason."""

    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None

    @property
    def stored(self) -> bool:
        return self.failure is None


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def response_dataset(results: Sequence[PartResult], retrieve_url: str = "") -> dict[str, Any]:
    """The STOW-RS response body (DICOM JSON model), stored and failed instances in order."""
    url: dict[str, Any] = {"vr": "UR", "Value": [retrieve_url]} if retrieve_url else {"vr": "UR"}
    out: dict[str, Any] = {"00081190": url}
    failed = [
        {
            "00081150": _uid(r.sop_class_uid),
            "00081155": _uid(r.sop_instance_uid),
            "00081197": {"vr": "US", "Value": [r.failure]},
        }
        for r in results
        if not r.stored
    ]
    stored = [
        {"00081150": _uid(r.sop_class_uid), "00081155": _uid(r.sop_instance_uid)}
        for r in results
        if r.stored
    ]
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": stored}
    return out


def response_status(results: Sequence[PartResult]) -> int:
    """200: every instance stored; 202: some stored, some failed; 409: none stored."""
    stored = sum(r.stored for r in results)
    if results and stored == len(results):
        return 200
    return 202 if stored else 409


def parse_media_type(header: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` → (type, params);
    the type and parameter names lower-cased, quotes removed from values."""
    kind, *rest = header.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), params


def is_stow_content_type(header: str) -> bool:
    """A STOW-RS request body of Part 10 instances (the only kind the gateway takes)."""
    kind, params = parse_media_type(header)
    return (
        kind == "multipart/related"
        and params.get("type", "").lower() == MEDIA_TYPE
        and bool(params.get("boundary"))
    )


def encode_multipart(parts: Iterable[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type header for these Part 10 instances."""
    boundary = f"radstream-{secrets.token_hex(16)}"
    chunks: list[bytes] = []
    for data in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {MEDIA_TYPE}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="{MEDIA_TYPE}"; boundary={boundary}'
    return b"".join(chunks), content_type


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    if not isinstance(element, dict):
        return []
    values = element.get("Value", [])
    return values if isinstance(values, list) else []


def failed_in(response: dict[str, Any]) -> dict[str, int]:
    """SOP Instance UID → FailureReason of every failed instance in a STOW-RS response."""
    out: dict[str, int] = {}
    for item in _values(response, "00081198"):
        if not isinstance(item, dict):
            continue
        uids = _values(item, "00081155")
        reasons = _values(item, "00081197")
        out[str(uids[0]) if uids else ""] = int(reasons[0]) if reasons else PROCESSING_FAILURE
    return out


def stored_in(response: dict[str, Any]) -> list[str]:
    """SOP Instance UIDs the server says it stored (ReferencedSOPSequence)."""
    out = []
    for item in _values(response, "00081199"):
        if isinstance(item, dict):
            uids = _values(item, "00081155")
            if uids:
                out.append(str(uids[0]))
    return out
