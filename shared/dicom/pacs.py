"""Delivering DICOM objects (SEG, Comprehensive 3D SR) to a PACS: C-FIND, then C-STORE
(pynetdicom SCU).

Idempotent by construction: an object's SOP Instance UID is its identity (deterministic per
series revision). :func:`deliver` first asks the PACS whether it holds the instance already
(C-FIND at IMAGE level) and stores it only if not, so a delivery redone after a crash between
the store and the Kafka commit does not send the object a second time; a PACS that does not
answer queries gets the C-STORE again, which stores the same instance, never a second one.
"""

from __future__ import annotations

import io
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from shared.runtime.errors import PoisonError, RetriableError
from shared.schemas.reasons import Reason

DELIVERABLE = {SegmentationStorage: "SEG", Comprehensive3DSRStorage: "SR"}
"""SOP classes RadStream delivers, by SOP Class UID."""

Delivered = Literal["delivered", "already_present"]


@dataclass(frozen=True)
class Pacs:
    host: str
    port: int
    called_ae: str
    calling_ae: str = "RADSTREAM"
    timeout_s: float = 20.0
    tls: ssl.SSLContext | None = None  # DICOM TLS (PS3.15 B.1): verifies the PACS by host

    def associate(self, ae: AE) -> Any:
        """An association with the PACS, over TLS when configured (never downgraded)."""
        if self.tls is None:
            return ae.associate(self.host, self.port, ae_title=self.called_ae)
        return ae.associate(
            self.host, self.port, ae_title=self.called_ae, tls_args=(self.tls, self.host)
        )


class PacsConfigError(ValueError):
    """The PACS settings would send images in clear beyond this host."""


def pacs_tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context that verifies the PACS against ``ca`` (and its host name), with a
    client certificate when the PACS requires mutual TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configured(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout_s: float,
    *,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    allow_plaintext: bool = False,
) -> Pacs:
    """The PACS from settings: TLS when a CA is given; a PACS beyond loopback without TLS
    only when ``allow_plaintext`` says so (:class:`PacsConfigError` otherwise)."""
    tls = pacs_tls_context(tls_ca, tls_cert, tls_key) if tls_ca is not None else None
    if tls is None and not allow_plaintext and not loopback(host):
        raise PacsConfigError(
            "the PACS is beyond this host and has no TLS: set RADSTREAM_RESULTS__PACS_TLS_CA "
            "(or PACS_ALLOW_PLAINTEXT=true for a PACS on the same trusted network)"
        )
    return Pacs(host, port, called_ae, calling_ae, timeout_s, tls)


def _ae(pacs: Pacs) -> AE:
    ae = AE(ae_title=pacs.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = pacs.timeout_s
    return ae


def _read(data: bytes) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class = ds.SOPClassUID
    except (pydicom.errors.InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
        why = f"not a readable DICOM object ({type(exc).__name__})"
        raise PoisonError(Reason.MALFORMED, why) from None
    if sop_class not in DELIVERABLE:
        raise PoisonError(Reason.UNSUPPORTED_OBJECT, "only DICOM SEG and 3D SR are delivered")
    return ds


def deliverable(data: bytes) -> Dataset:
    """The object parsed, if it is one RadStream delivers (SEG, 3D SR); PoisonError if not.
    Shared with the DICOMweb delivery (:mod:`shared.dicomweb.client`)."""
    return _read(data)


def c_store(pacs: Pacs, data: bytes) -> str:
    """Send one Part 10 object; returns its SOP Instance UID. Raises RetriableError when the
    PACS is unreachable or answers a failure status (the runtime retries with backoff)."""
    return _store(pacs, _read(data))


def _store(pacs: Pacs, ds: Dataset) -> str:
    ae = _ae(pacs)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = pacs.associate(ae)
    if not assoc.is_established:
        raise RetriableError("PACS association not established")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise RetriableError("no C-STORE response from the PACS")
    if code not in (0x0000, 0xB000, 0xB006, 0xB007):
        raise RetriableError(f"PACS answered C-STORE status 0x{code:04X}")
    return str(ds.SOPInstanceUID)


def holds(pacs: Pacs, study_uid: str, series_uid: str, sop_uid: str) -> bool | None:
    """Does the PACS hold this instance? C-FIND (study root, IMAGE level). None when it cannot
    tell (no query service for us); RetriableError when it cannot be reached."""
    ae = _ae(pacs)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = pacs.associate(ae)
    if not assoc.is_established:
        raise RetriableError("PACS association not established")
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = sop_uid
    found = False
    try:
        if not any(
            cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
            for cx in assoc.accepted_contexts
        ):
            return None
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            code = getattr(status, "Status", None)
            if code is None:
                raise RetriableError("no C-FIND response from the PACS")
            if code in (0xFF00, 0xFF01) and identifier is not None:
                found = found or identifier.get("SOPInstanceUID") == sop_uid
            elif code != 0x0000:
                return None  # the PACS refuses or cannot answer the query: it cannot tell
    finally:
        assoc.release()
    return found


def deliver(pacs: Pacs, data: bytes) -> Delivered:
    """Store the object unless the PACS holds it already. RetriableError when the PACS cannot
    be reached or refuses the store; PoisonError for an object RadStream does not deliver."""
    ds = _read(data)
    if holds(pacs, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        return "already_present"
    _store(pacs, ds)
    return "delivered"
