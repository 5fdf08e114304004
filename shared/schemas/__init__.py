"""One pydantic v2 model per topic, versioned; see :mod:`shared.schemas.models`."""

from shared.schemas.models import (
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

__all__ = [
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
    "Record",
    "SegmentationDone",
    "SeriesReady",
    "VolumePrepared",
]
