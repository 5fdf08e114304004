"""Delivering DICOM objects to a PACS by C-STORE (pynetdicom SCU).

Idempotent by construction: the object's SOP Instance UID is its identity, so a retry after
an unclear outcome stores the same instance again, never a second one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import SegmentationStorage  # type: ignore[attr-defined]

from shared.runtime.errors import PoisonError, RetriableError


@dataclass(frozen=True)
class Pacs:
    host: str
    port: int
    called_ae: str
    calling_ae: str = "RADSTREAM"
    timeout_s: float = 20.0


def c_store(pacs: Pacs, data: bytes) -> str:
    """Send one Part 10 object; returns its SOP Instance UID. Raises RetriableError when the
    PACS is unreachable or answers a failure status (the runtime retries with backoff)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.SOPClassUID != SegmentationStorage:
        raise PoisonError("unsupported_object", "only DICOM SEG objects are delivered")
    ae = AE(ae_title=pacs.calling_ae)
    ae.add_requested_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = pacs.timeout_s
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.called_ae)
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
