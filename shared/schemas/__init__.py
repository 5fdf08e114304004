"""One pydantic v2 model per topic, versioned; see :mod:`shared.schemas.models`."""

from shared.schemas.models import (
    RECORD_TYPES,
    Alert,
    AuditEvent,
    BlobRef,
    DeadLetter,
    EndOfSeries,
    Finding,
    InstanceData,
    InstanceRef,
    InstancesRecord,
    NamedBlob,
    Probe,
    Record,
    SegmentationDone,
    SeriesReady,
    VolumePrepared,
)
from shared.schemas.reasons import Reason

__all__ = [
    "RECORD_TYPES",
    "Alert",
    "AuditEvent",
    "BlobRef",
    "DeadLetter",
    "EndOfSeries",
    "Finding",
    "InstanceData",
    "InstanceRef",
    "InstancesRecord",
    "NamedBlob",
    "Probe",
    "Reason",
    "Record",
    "SegmentationDone",
    "SeriesReady",
    "VolumePrepared",
]
