"""Topic schemas. Every record names its schema and version; unknown fields and wrong types are
rejected (``extra="forbid"``, strict types). Identifiers that are PHI (UIDs) only ever travel
inside the encrypted envelope, never in keys or headers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

ReasonCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{1,47}$")]
Uid = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ReadContext:
    """What the envelope's authenticated headers say about a record being read: the version it
    was written at and the oldest reader version that can read it (``rs-min-reader``; equal to
    ``version`` when the writer declared nothing). ``project``: read it at the reader's own
    version, unknown fields ignored (the codec's second try for an additive newer version)."""

    version: int
    min_reader: int
    project: bool = False


class Record(BaseModel):
    """Base of every topic model.

    Versions: a class writes ``VERSION`` and reads every version from 1 to ``VERSION``. A
    change that only adds fields with defaults is *additive*: older records are read with the
    defaults, and the class sets ``MIN_READER`` to the oldest version whose readers can still
    read what it writes (they project it onto the fields they know). A breaking change leaves
    ``MIN_READER`` unset, so older readers dead-letter the record with reason ``schema`` (and
    needs its own upgrade step for older records). The codec carries both numbers in
    authenticated headers (``rs-version``, ``rs-min-reader``).
    """

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )
    SCHEMA: ClassVar[str] = "radstream.record"
    ATTACHMENT: ClassVar[str | None] = None  # bulk bytes field carried outside the JSON
    VERSION: ClassVar[int] = 1
    MIN_READER: ClassVar[int | None] = None  # None: readers older than VERSION cannot read it
    schema_version: int = Field(
        1, validate_default=True, description="version of this schema (the class's VERSION)"
    )

    @field_validator("schema_version", mode="before")
    @classmethod
    def _evolve(cls, version: Any, info: ValidationInfo) -> Any:
        """A record of a version this class reads becomes this class's version; any other
        version is refused. (A field validator: a model one would make pydantic validate the
        JSON as Python objects, which strict mode refuses for datetimes and bytes.)"""
        read = info.context if isinstance(info.context, ReadContext) else None
        if type(version) is not int:
            return version  # the field's own (strict) validation rejects it
        if read is not None and version != read.version:
            raise ValueError(f"schema_version {version} disagrees with the rs-version header")
        if read is not None and read.project:
            if version > cls.VERSION and read.min_reader <= cls.VERSION:
                return cls.VERSION
            raise ValueError(f"version {version} of {cls.SCHEMA} cannot be projected")
        if 1 <= version <= cls.VERSION:
            return cls.VERSION
        raise ValueError(
            f"version {version} of {cls.SCHEMA} is unknown to this reader "
            f"(it reads versions 1 to {cls.VERSION})"
        )


class BlobRef(BaseModel):
    """Claim check: a reference to an encrypted, content-addressed object in the blob store."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    digest: Sha256 = Field(description="SHA-256 of the plaintext, hex")
    size: int = Field(ge=0, description="plaintext size in bytes")
    key_id: str = Field(max_length=64, description="id of the key-encryption key used")


class InstanceData(Record):
    """``instances``: one DICOM instance exactly as the scanner sent it (judged by ingest)."""

    SCHEMA: ClassVar[str] = "radstream.instance"
    ATTACHMENT: ClassVar[str] = "data"
    kind: Literal["instance"] = "instance"
    source: str = Field(max_length=64, description="sending scanner, gateway or SDK name")
    sent_at: datetime = Field(default_factory=utcnow, description="publish time (UTC)")
    data: bytes = Field(b"", description="the DICOM Part 10 file bytes (sent raw, not in JSON)")


class EndOfSeries(Record):
    """``instances``: the sender says a series is complete with ``expected_count`` instances."""

    SCHEMA: ClassVar[str] = "radstream.end_of_series"
    kind: Literal["end_of_series"] = "end_of_series"
    source: str = Field(max_length=64, description="sending scanner, gateway or SDK name")
    sent_at: datetime = Field(default_factory=utcnow, description="publish time (UTC)")
    series_instance_uid: Uid = Field(description="series the marker closes")
    expected_count: int = Field(ge=0, le=100_000, description="instances sent in this series")


class InstanceRef(BaseModel):
    """One accepted instance of a series: where its bytes are and where it sits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    blob: BlobRef
    sop_instance_uid: Uid
    instance_number: int | None = None
    position: tuple[float, float, float] | None = Field(None, description="ImagePositionPatient")


InstancesRecord = Annotated[InstanceData | EndOfSeries, Field(discriminator="kind")]
"""What the ``instances`` topic carries."""


class SeriesReady(Record):
    """``series``: ingest assembled a complete series revision."""

    SCHEMA: ClassVar[str] = "radstream.series_ready"
    # 2: completed_by "instance" (an enhanced multi-frame instance is a whole series). Additive
    # for every other record; a v1 reader dead-letters an "instance" one with reason schema.
    VERSION: ClassVar[int] = 2
    MIN_READER: ClassVar[int | None] = 1
    schema_version: int = Field(
        2, validate_default=True, description="version of this schema (the class's VERSION)"
    )
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1, description="1 for the first completion, +1 per late change")
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16, description="BodyPartExamined")
    instances: list[InstanceRef] = Field(description="accepted instances, ordered by position")
    instance_count: int = Field(ge=0)
    expected_count: int | None = Field(None, description="count the end-of-series marker gave")
    completed_by: Literal["marker", "timeout", "late", "instance"] = Field(
        description="what closed it: the end-of-series marker, inactivity, a late change, or "
        "the instance itself (an enhanced multi-frame instance holds the whole series)"
    )
    rows: int = Field(0, ge=0)
    columns: int = Field(0, ge=0)
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_thickness_mm: float | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    acquired_at: str | None = Field(
        None, max_length=32, description="DICOM date+time of acquisition"
    )
    first_received_at: datetime = Field(description="when ingest accepted the first instance")
    last_published_at: datetime = Field(description="publish time of the last instance")
    ready_at: datetime = Field(default_factory=utcnow)


class VolumePrepared(Record):
    """``volumes``: a calibrated, preprocessed volume in the blob store."""

    SCHEMA: ClassVar[str] = "radstream.volume_prepared"
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    volume: BlobRef = Field(description="the volume: .npy (z, y, x), zstd-compressed, encrypted")
    dtype: Literal["int16", "float32"] = Field(description="int16 = Hounsfield units (CT)")
    shape: tuple[int, int, int] = Field(description="(z, y, x) voxels")
    spacing_mm: tuple[float, float, float] = Field(description="(z, y, x)")
    origin_mm: tuple[float, float, float] = Field(description="first voxel, patient coordinates")
    direction: tuple[float, float, float, float, float, float, float, float, float] = Field(
        description="row cosines, column cosines, slice normal"
    )
    source_instances: list[InstanceRef] = Field(description="instances, in volume order")
    excluded_instances: list[Uid] = Field(
        default_factory=list, description="SOP Instance UIDs left out: off the slice grid"
    )
    backend: Literal["cpu", "gpu"]
    chain: list[dict[str, str | float | list[float]]] = Field(description="steps applied, in order")
    timings_s: dict[str, float] = Field(description="decode, calibrate, chain, store, total")
    stats: dict[str, float] = Field(description="intensity percentiles, mean, sd, noise")
    acquired_at: str | None = Field(None, max_length=32)
    last_published_at: datetime


class Finding(BaseModel):
    """One measured finding, in physical units and patient coordinates (LPS, mm)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    type: str = Field(
        max_length=32,
        description="lung, nodule, mass, brain, haemorrhage, midline_shift, structure, edges",
    )
    label: str = Field(max_length=64)
    subtype: str | None = Field(
        None,
        max_length=32,
        description="nodule: solid, part_solid, ground_glass, calcified; haemorrhage: "
        "intraparenchymal, subdural, epidural",
    )
    location: str | None = Field(
        None, max_length=32, description="anatomical side/region, e.g. lung_right, left"
    )
    confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="probability that the finding is real (calibrated)"
    )
    confidence_source: str | None = Field(
        None,
        max_length=32,
        description="the model the confidence came from (chest: main_model, or "
        "large_candidate_model, the capped second opinion on candidates of 20 mm or more)",
    )
    likely_benign: bool | None = Field(None, description="e.g. a calcified granuloma")
    features: dict[str, float] = Field(
        default_factory=dict,
        max_length=48,
        description="the candidate features the confidence was computed from",
    )
    long_axis_mm: float | None = Field(None, description="longest in-plane axis")
    short_axis_mm: float | None = Field(None, description="perpendicular in-plane axis")
    shift_mm: float | None = Field(None, description="midline shift (midline_shift findings)")
    volume_ml: float | None = None
    diameter_mm: float | None = Field(None, description="equivalent-sphere diameter")
    area_mm2: float | None = None
    centroid_mm: list[float] | None = None
    bbox_mm: list[float] | None = Field(None, description="x0, y0, z0, x1, y1, z1")
    slice_index: int | None = Field(None, description="volume slice of the centroid")
    mean_value: float | None = Field(None, description="mean HU (CT) inside")
    voxels: int | None = None
    contour_points: int | None = None
    edge_pixels: int | None = None


class NamedBlob(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str = Field(max_length=64)
    blob: BlobRef


class SegmentationDone(Record):
    """``findings``: masks and measured findings for one series revision."""

    SCHEMA: ClassVar[str] = "radstream.segmentation_done"
    # 2: Finding.subtype, location, confidence, likely_benign, features, long/short_axis_mm,
    # shift_mm; 3: volume, shape, spacing_mm, origin_mm, direction, source_instances (what the
    # results stage builds the SEG, SR and pictures from); 4: Finding.confidence_source. All
    # additive.
    VERSION: ClassVar[int] = 4
    MIN_READER: ClassVar[int | None] = 1
    schema_version: int = Field(
        4, validate_default=True, description="version of this schema (the class's VERSION)"
    )
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    task: str = Field(max_length=32, description="chest_ct, head_ct, radiograph, onnx:<name>, none")
    findings: list[Finding] = Field(default_factory=list)
    masks: BlobRef | None = Field(
        None,
        description="the boolean masks (z, y, x) by name: shared.imaging.masks format (bit-packed, "
        "zstd; .npz before v3, still read)",
    )
    seg: BlobRef | None = Field(
        None, description="DICOM SEG (Part 10); before v3 only: now on the results record"
    )
    seg_sop_instance_uid: Uid | None = Field(
        None, description="the SEG's identity; before v3 only: now on the results record"
    )
    overlays: list[NamedBlob] = Field(
        default_factory=list, description="PNG key slices; before v3 only: now on results"
    )
    volume: BlobRef | None = Field(None, description="the analysed volume (VolumePrepared's)")
    shape: tuple[int, int, int] | None = Field(None, description="(z, y, x) voxels of the masks")
    spacing_mm: tuple[float, float, float] | None = Field(None, description="(z, y, x)")
    origin_mm: tuple[float, float, float] | None = Field(
        None, description="first voxel, patient coordinates"
    )
    direction: tuple[float, float, float, float, float, float, float, float, float] | None = Field(
        None, description="row cosines, column cosines, slice normal"
    )
    source_instances: list[InstanceRef] = Field(
        default_factory=list, description="the series' instances in volume order (SEG sources)"
    )
    algorithm: str = Field(max_length=64)
    algorithm_version: str = Field(max_length=32)
    parameters: dict[str, float | str] = Field(default_factory=dict)
    source_offset: int = Field(ge=0, description="offset of the VolumePrepared it came from")
    source_partition: int = Field(ge=0)
    timings_s: dict[str, float] = Field(default_factory=dict)
    acquired_at: str | None = Field(None, max_length=32)
    last_published_at: datetime


class Alert(Record):
    """``alerts``: one alert per matching finding per series revision."""

    SCHEMA: ClassVar[str] = "radstream.alert"
    # 2: subtype, confidence, features; 3: confidence_source (both additive)
    VERSION: ClassVar[int] = 3
    MIN_READER: ClassVar[int | None] = 1
    schema_version: int = Field(
        3, validate_default=True, description="version of this schema (the class's VERSION)"
    )
    alert_id: str = Field(max_length=64, description="deterministic id, idempotency key")
    severity: Literal["critical", "high", "medium", "low"]
    finding: str = Field(max_length=64, description="finding type")
    finding_label: str = Field(max_length=64)
    rule: str = Field(max_length=48, description="the rule that raised it")
    routes: list[str] = Field(default_factory=list, description="worklist, pager, webhook:...")
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    measurements: dict[str, float] = Field(default_factory=dict)
    subtype: str | None = Field(None, max_length=32, description="the finding's subtype")
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="finding confidence")
    confidence_source: str | None = Field(
        None, max_length=32, description="the model the confidence came from (the finding's)"
    )
    features: dict[str, float] = Field(
        default_factory=dict, max_length=48, description="features behind the confidence"
    )
    centroid_mm: list[float] | None = None
    seg_sop_instance_uid: Uid | None = Field(
        None,
        description="set by alerts from findings before v3 only: the SEG now follows the alert; "
        "join the results record (series, revision, finding label)",
    )
    algorithm: str = Field(max_length=64)
    algorithm_version: str = Field(max_length=32)
    parameters: dict[str, float | str] = Field(default_factory=dict)
    source_partition: int = Field(ge=0, description="findings partition it came from")
    source_offset: int = Field(ge=0)
    latency_seconds: float = Field(ge=0, description="last instance published → alert created")
    acquisition_latency_seconds: float | None = Field(None, description="acquisition → alert")
    created_at: datetime = Field(default_factory=utcnow)


class SegmentRef(BaseModel):
    """Where one finding is in the results: its SEG segment and SR measurement group."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    finding_label: str = Field(max_length=64, description="the finding's (and its alert's) label")
    type: str = Field(max_length=32, description="finding type")
    segment_number: int | None = Field(None, ge=1, description="its segment in the SEG, if any")
    tracking_uid: Uid | None = Field(
        None, description="Tracking UID of its SEG segment and SR measurement group"
    )
    in_sr: bool = Field(False, description="the SR has a measurement group for it")


class Delivery(BaseModel):
    """What became of one DICOM object sent to the PACS."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    object: Literal["SEG", "SR"]
    sop_instance_uid: Uid = Field(description="the object's identity (idempotency key)")
    outcome: Literal["delivered", "already_present", "failed", "not_configured"] = Field(
        description="stored now; found in the PACS already (a redo); not stored after every "
        "retry; no PACS configured"
    )
    message: str | None = Field(None, max_length=200, description="why it failed, without PHI")


class ResultsReady(Record):
    """``results``: the paperwork of one series revision, after its alerts: the DICOM SEG and
    SR (TID 1500), the pictures, and their delivery to the PACS. Keyed like the findings and
    alerts of the series; join on (series_instance_uid, revision) and finding label."""

    SCHEMA: ClassVar[str] = "radstream.results_ready"
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    task: str = Field(max_length=32, description="the segmentation task the findings came from")
    algorithm: str = Field(max_length=64)
    algorithm_version: str = Field(max_length=32)
    seg: BlobRef | None = Field(None, description="DICOM SEG (Part 10), BINARY, no empty frames")
    seg_sop_instance_uid: Uid | None = Field(None, description="the SEG's identity")
    seg_frames: int = Field(0, ge=0, description="frames in the SEG")
    sr: BlobRef | None = Field(None, description="DICOM Comprehensive 3D SR, TID 1500 (Part 10)")
    sr_sop_instance_uid: Uid | None = Field(None, description="the SR's identity")
    segments: list[SegmentRef] = Field(
        default_factory=list, description="per finding: its SEG segment and SR group"
    )
    organs_left_out: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="organ segments left out to keep the SEG within its frame budget",
    )
    not_built: str | None = Field(
        None,
        max_length=200,
        description="why there is no SEG/SR for a task that has them (no PHI)",
    )
    overlays: list[NamedBlob] = Field(default_factory=list, description="PNG key slices")
    deliveries: list[Delivery] = Field(default_factory=list, description="per DICOM object")
    delivery: Literal["delivered", "failed", "not_configured", "nothing_to_deliver"] = Field(
        description="all objects in the PACS; one or more not; no PACS; no objects"
    )
    source_partition: int = Field(ge=0, description="findings partition it came from")
    source_offset: int = Field(ge=0)
    timings_s: dict[str, float] = Field(default_factory=dict, description="build steps, s")
    created_at: datetime = Field(default_factory=utcnow)


class DeadLetter(Record):
    """``deadletter``: an input a stage could not handle. Never carries PHI."""

    SCHEMA: ClassVar[str] = "radstream.dead_letter"
    stage: str = Field(max_length=32, description="stage that rejected the input")
    reason: ReasonCode = Field(
        description="a code of shared.schemas.reasons.Reason, e.g. integrity, schema (a plain "
        "string here, so that a reader also reads codes newer than it knows)"
    )
    message: str = Field(max_length=2000, description="what was wrong, without PHI")
    source_topic: str = Field(max_length=249)
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)
    attempts: int = Field(ge=1, description="handler attempts made before giving up")
    failed_at: datetime = Field(default_factory=utcnow)


class AuditEvent(Record):
    """``audit``: who accessed what, when, with what outcome."""

    SCHEMA: ClassVar[str] = "radstream.audit"
    actor: str = Field(max_length=64, description="principal")
    action: str = Field(max_length=64)
    resource: str = Field(max_length=256, description="keyed hash or topic, never a UID")
    outcome: Literal["success", "denied", "error"]
    at: datetime = Field(default_factory=utcnow)


class AlertAck(Record):
    """``acks``: a person acknowledged an alert on the worklist. Keyed like the alert (keyed
    hash of its series), so it shares the alert's partition. Carries no patient identity."""

    SCHEMA: ClassVar[str] = "radstream.alert_ack"
    ack_id: str = Field(max_length=64, description="unique id of this acknowledgement")
    alert_id: str = Field(max_length=64, description="the alert acknowledged")
    action: Literal["acknowledged"] = "acknowledged"
    user: str = Field(max_length=64, description="worklist account (staff, not a patient)")
    role: Literal["clinician", "operator"] = Field(description="the account's worklist role")
    source: str = Field(max_length=64, description="the worklist instance that wrote it")
    at: datetime = Field(default_factory=utcnow)


class AuditEntry(Record):
    """``audit``: one link of the hash-chained audit trail, written only by the audit
    sequencer (services/auditlog). ``principal`` is broker-verified: the intake topic the event
    came from (``audit.in.<principal>``) is writable by that principal alone; ``actor`` is what
    the event said. ``hash`` = SHA-256 over ``prev`` and every other field (canonical JSON), so
    editing, dropping or reordering an entry breaks the chain (shared/security/audit.py)."""

    SCHEMA: ClassVar[str] = "radstream.audit_entry"
    seq: int = Field(ge=0, description="position in the chain, from 0, no gaps")
    principal: str = Field(max_length=64, description="broker-verified writer")
    actor: str = Field(max_length=64, description="the actor the event names")
    action: str = Field(max_length=64)
    resource: str = Field(max_length=256, description="keyed hash or topic, never a UID")
    outcome: Literal["success", "denied", "error"]
    at: datetime = Field(description="when the event happened (the writer's clock)")
    recorded_at: datetime = Field(description="when the sequencer chained it")
    source: str = Field(max_length=300, description="intake topic/partition/offset")
    prev: Sha256 = Field(description="hash of the previous entry (64 zeros for the first)")
    hash: Sha256 = Field(description="SHA-256 of this entry without this field")


class Probe(Record):
    """A synthetic record for canaries, the pass-through stage and benchmarks."""

    SCHEMA: ClassVar[str] = "radstream.probe"
    ATTACHMENT: ClassVar[str] = "payload"
    id: str = Field(max_length=64)
    seq: int = Field(ge=0)
    payload: bytes = Field(b"", description="opaque bytes, any size up to the message cap")
    poison: bool = Field(False, description="a handler that honours it rejects the record")


RECORD_TYPES: dict[str, type[Record]] = {
    cls.SCHEMA: cls
    for cls in (
        InstanceData,
        EndOfSeries,
        SeriesReady,
        VolumePrepared,
        SegmentationDone,
        Alert,
        ResultsReady,
        AlertAck,
        DeadLetter,
        AuditEvent,
        AuditEntry,
        Probe,
    )
}
"""Every topic model by its ``rs-schema`` name (what a generic reader decodes a record as)."""
