"""Schema evolution: a reader accepts the versions it knows, and a newer record whose writer
declares it additive (``rs-min-reader``) is projected onto the reader's fields.

``SegmentationDone`` is at version 3 (2: the ``Finding`` fields subtype, location, confidence,
likely_benign, features, axes, shift; 3: the volume, geometry and source instances the results
stage reads), ``Alert`` at version 2 (subtype, confidence, features). The v1 classes below are
frozen copies of version 1 as it was: what a reader built before the change knows. Version 4 of
``SegmentationDone`` stands for a future one."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.config import Settings
from shared.runtime.codec import Codec, aad
from shared.runtime.errors import PoisonError
from shared.runtime.harness import StageHarness
from shared.schemas import Alert, Finding, Reason, SegmentationDone
from shared.schemas.models import BlobRef, NamedBlob, Record, Uid, utcnow
from shared.security.envelope import Keyring
from shared.topology import purpose_of

TOPIC = "radstream.findings"
KEY = b"series-key"


# ---- version 1, frozen ---------------------------------------------------------------------
class FindingV1(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    type: str = Field(max_length=32)
    label: str = Field(max_length=64)
    volume_ml: float | None = None
    diameter_mm: float | None = None
    area_mm2: float | None = None
    centroid_mm: list[float] | None = None
    bbox_mm: list[float] | None = None
    slice_index: int | None = None
    mean_value: float | None = None
    voxels: int | None = None
    contour_points: int | None = None
    edge_pixels: int | None = None


class SegmentationDoneV1(Record):
    SCHEMA: ClassVar[str] = "radstream.segmentation_done"
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    task: str = Field(max_length=32)
    findings: list[FindingV1] = Field(default_factory=list)
    masks: BlobRef | None = None
    seg: BlobRef | None = None
    seg_sop_instance_uid: Uid | None = None
    overlays: list[NamedBlob] = Field(default_factory=list)
    algorithm: str = Field(max_length=64)
    algorithm_version: str = Field(max_length=32)
    parameters: dict[str, float | str] = Field(default_factory=dict)
    source_offset: int = Field(ge=0)
    source_partition: int = Field(ge=0)
    timings_s: dict[str, float] = Field(default_factory=dict)
    acquired_at: str | None = Field(None, max_length=32)
    last_published_at: datetime


class AlertV1(Record):
    SCHEMA: ClassVar[str] = "radstream.alert"
    alert_id: str = Field(max_length=64)
    severity: Literal["critical", "high", "medium", "low"]
    finding: str = Field(max_length=64)
    finding_label: str = Field(max_length=64)
    rule: str = Field(max_length=48)
    routes: list[str] = Field(default_factory=list)
    study_instance_uid: Uid
    series_instance_uid: Uid
    revision: int = Field(ge=1)
    modality: str = Field(max_length=16)
    body_part: str | None = Field(None, max_length=16)
    measurements: dict[str, float] = Field(default_factory=dict)
    centroid_mm: list[float] | None = None
    seg_sop_instance_uid: Uid | None = None
    algorithm: str = Field(max_length=64)
    algorithm_version: str = Field(max_length=32)
    parameters: dict[str, float | str] = Field(default_factory=dict)
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)
    latency_seconds: float = Field(ge=0)
    acquisition_latency_seconds: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


# ---- records -------------------------------------------------------------------------------
COMMON_SEG: dict[str, Any] = {
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "revision": 1,
    "modality": "CT",
    "task": "chest_ct",
    "algorithm": "chest",
    "algorithm_version": "2",
    "source_offset": 5,
    "source_partition": 1,
    "last_published_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
}
COMMON_ALERT: dict[str, Any] = {
    "alert_id": "a-1",
    "severity": "high",
    "finding": "nodule",
    "finding_label": "nodule-1",
    "rule": "large-nodule",
    "routes": ["worklist"],
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "revision": 1,
    "modality": "CT",
    "measurements": {"diameter_mm": 9.0},
    "algorithm": "chest",
    "algorithm_version": "2",
    "source_partition": 0,
    "source_offset": 3,
    "latency_seconds": 1.5,
}
NEW_FINDING_FIELDS = {
    "subtype": "part_solid",
    "location": "lung_right",
    "confidence": 0.87,
    "confidence_source": "main_model",
    "likely_benign": False,
    "features": {"sphericity": 0.9},
    "long_axis_mm": 11.0,
    "short_axis_mm": 8.0,
    "shift_mm": None,
}


def seg_v2() -> SegmentationDone:
    nodule = Finding(type="nodule", label="nodule-1", diameter_mm=9.5, **NEW_FINDING_FIELDS)
    return SegmentationDone(findings=[nodule], **COMMON_SEG)


def seg_v1() -> SegmentationDoneV1:
    return SegmentationDoneV1(
        findings=[FindingV1(type="nodule", label="nodule-1", diameter_mm=9.5)], **COMMON_SEG
    )


def sealed(codec: Codec, body: dict[str, Any], schema: str, headers: dict[str, bytes]) -> bytes:
    """A record as some other writer would seal it (version headers as given)."""
    extra = (headers["rs-min-reader"],) if "rs-min-reader" in headers else ()
    context = aad(TOPIC, KEY, schema.encode(), headers["rs-version"], *extra)
    body_bytes = b"J" + json.dumps(body, default=str).encode()
    return codec.keyring.seal(body_bytes, context, purpose_of(TOPIC))


@pytest.fixture
def codec() -> Codec:
    return Codec(Keyring.generate())


# ---- v2 writer, v1 reader and the reverse --------------------------------------------------
def test_v2_writer_declares_an_additive_change(codec: Codec) -> None:
    _, headers = codec.encode(TOPIC, KEY, seg_v2())
    assert dict(headers) == {
        "rs-schema": b"radstream.segmentation_done",
        "rs-version": b"4",
        "rs-min-reader": b"1",
    }
    _, v1_headers = codec.encode(TOPIC, KEY, seg_v1())  # a v1 writer: no declaration
    assert dict(v1_headers) == {"rs-schema": b"radstream.segmentation_done", "rs-version": b"1"}


def test_a_v1_reader_projects_a_v2_record_onto_its_fields(codec: Codec) -> None:
    value, headers = codec.encode(TOPIC, KEY, seg_v2())
    old = codec.decode(TOPIC, KEY, value, headers, TypeAdapter(SegmentationDoneV1))
    assert isinstance(old, SegmentationDoneV1) and old.schema_version == 1
    assert old == seg_v1()  # every v1 field as written, the v2 fields dropped


def test_a_v2_reader_upgrades_a_v1_record(codec: Codec) -> None:
    value, headers = codec.encode(TOPIC, KEY, seg_v1())
    new = codec.decode(TOPIC, KEY, value, headers, TypeAdapter(SegmentationDone))
    assert isinstance(new, SegmentationDone) and new.schema_version == 4
    assert new.volume is None and new.source_instances == []  # v3 fields: their defaults
    (finding,) = new.findings
    assert finding.diameter_mm == 9.5 and finding.subtype is None and finding.features == {}
    v1_fields = set(SegmentationDoneV1.model_fields) - {"schema_version", "findings"}
    assert new.model_dump(include=v1_fields) == seg_v1().model_dump(include=v1_fields)


def test_alert_v2_and_v1_interoperate_both_ways(codec: Codec) -> None:
    v2 = Alert(
        subtype="solid",
        confidence=0.5,
        confidence_source="large_candidate_model",
        features={"contrast": 120.0},
        **COMMON_ALERT,
    )
    value, headers = codec.encode("radstream.alerts", KEY, v2)
    old = codec.decode("radstream.alerts", KEY, value, headers, TypeAdapter(AlertV1))
    assert isinstance(old, AlertV1) and old.schema_version == 1
    assert old.model_dump(exclude={"schema_version"}) == v2.model_dump(
        exclude={"schema_version", "subtype", "confidence", "confidence_source", "features"}
    )
    v1 = AlertV1(**COMMON_ALERT)
    value, headers = codec.encode("radstream.alerts", KEY, v1)
    new = codec.decode("radstream.alerts", KEY, value, headers, TypeAdapter(Alert))
    assert new.schema_version == 3 and new.confidence is None and new.alert_id == "a-1"
    assert new.confidence_source is None


def test_the_version_declaration_is_bound_by_the_envelope(codec: Codec) -> None:
    value, headers = codec.encode(TOPIC, KEY, seg_v2())
    adapter = TypeAdapter(SegmentationDoneV1)
    stripped = [h for h in headers if h[0] != "rs-min-reader"]  # "not additive" claimed
    lowered = [h if h[0] != "rs-version" else ("rs-version", b"1") for h in headers]
    smuggled = [h if h[0] != "rs-version" else ("rs-version", b"2\x001") for h in stripped]
    for forged, reason in [(stripped, "integrity"), (lowered, "integrity"), (smuggled, "schema")]:
        with pytest.raises(PoisonError) as info:
            codec.decode(TOPIC, KEY, value, forged, adapter)
        assert info.value.reason == reason


# ---- unknown versions ------------------------------------------------------------------------
def _future_body(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = seg_v2().model_dump(mode="json")
    body["schema_version"] = 5  # SegmentationDone.VERSION + 1
    body.update(extra or {})
    return body


@pytest.mark.parametrize(
    "headers",
    [
        {"rs-version": b"5"},  # a breaking version 5
        {"rs-version": b"5", "rs-min-reader": b"5"},  # readable from version 5 on only
    ],
)
def test_an_unknown_version_is_a_schema_poison_in_the_codec(
    codec: Codec, headers: dict[str, bytes]
) -> None:
    value = sealed(codec, _future_body(), "radstream.segmentation_done", headers)
    wire = [("rs-schema", b"radstream.segmentation_done"), *headers.items()]
    with pytest.raises(PoisonError) as info:
        codec.decode(TOPIC, KEY, value, wire, TypeAdapter(SegmentationDone))
    assert info.value.reason == Reason.SCHEMA
    assert "version 5" in info.value.message and "1.2.3" not in info.value.message


def test_body_and_header_versions_must_agree(codec: Codec) -> None:
    body = seg_v1().model_dump(mode="json")  # says version 1 inside...
    headers = {"rs-version": b"4"}  # ...and 4 outside
    value = sealed(codec, body, "radstream.segmentation_done", headers)
    wire = [("rs-schema", b"radstream.segmentation_done"), ("rs-version", b"4")]
    with pytest.raises(PoisonError) as info:
        codec.decode(TOPIC, KEY, value, wire, TypeAdapter(SegmentationDone))
    assert info.value.reason == "schema"


def test_projection_is_only_for_newer_versions(codec: Codec) -> None:
    # a record at the reader's own version never has unknown fields, declaration or not
    body = seg_v2().model_dump(mode="json") | {"surprise": "Doe^John"}
    headers = {"rs-version": b"4", "rs-min-reader": b"1"}
    value = sealed(codec, body, "radstream.segmentation_done", headers)
    wire = [("rs-schema", b"radstream.segmentation_done"), *headers.items()]
    with pytest.raises(PoisonError) as info:
        codec.decode(TOPIC, KEY, value, wire, TypeAdapter(SegmentationDone))
    assert info.value.reason == "schema" and "Doe" not in info.value.message


# ---- through the alert stage ---------------------------------------------------------------
@pytest.fixture
def alert_stage(tmp_path: Path) -> StageHarness[SegmentationDone]:
    from services.alert.main import build

    settings = Settings(home=tmp_path)
    keyring = Keyring.generate()
    return StageHarness(build(settings, keyring, CollectorRegistry()), settings, keyring)


def _raw(harness: StageHarness[SegmentationDone], body: dict[str, Any], **headers: bytes) -> Any:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    topic = harness.dispatcher.input_topic
    context = aad(topic, KEY, b"radstream.segmentation_done", *hdrs.values())
    value = harness.keyring.seal(b"J" + json.dumps(body).encode(), context, purpose_of(topic))
    wire = [("rs-schema", b"radstream.segmentation_done"), *hdrs.items()]
    return harness.send_raw(value, wire, key=KEY)


def test_unknown_versions_are_dead_lettered_with_reason_schema_by_the_stage(
    alert_stage: StageHarness[SegmentationDone],
) -> None:
    result = _raw(alert_stage, _future_body(), rs_version=b"5")
    (letter,) = result.dead_letters
    assert letter.reason == Reason.SCHEMA and letter.stage == "alert"
    assert "version 5" in letter.message
    assert result.outputs == {}


def test_the_alert_stage_reads_v1_records_and_a_future_additive_v5(
    alert_stage: StageHarness[SegmentationDone],
) -> None:
    v1 = _raw(alert_stage, seg_v1().model_dump(mode="json"), rs_version=b"1")
    # a v1 finding carries no confidence: it reaches the worklist at low, it never pages
    assert [a.rule for a in v1.outputs["alerts"]] == ["nodule-review"]  # type: ignore[attr-defined]
    future = _future_body({"new_in_v5": [1, 2]})
    future["findings"][0]["also_new"] = "x"
    future["revision"] += 1  # the same revision again would be a duplicate: no alert
    v5 = _raw(alert_stage, future, rs_version=b"5", rs_min_reader=b"2")
    (alert,) = v5.outputs["alerts"]
    assert isinstance(alert, Alert) and alert.rule == "large-nodule"
    assert v5.dead_letters == []


def test_every_topic_model_writes_its_version_and_declares_additivity_consistently() -> None:
    from shared.schemas import RECORD_TYPES

    for schema, cls in RECORD_TYPES.items():
        assert cls.SCHEMA == schema
        assert cls.model_fields["schema_version"].default == cls.VERSION, schema
        assert cls.MIN_READER is None or 1 <= cls.MIN_READER < cls.VERSION, schema
    assert (SegmentationDone.VERSION, SegmentationDone.MIN_READER) == (4, 1)
    assert (Alert.VERSION, Alert.MIN_READER) == (3, 1)
    # built in Python: the current version; an older one is upgraded, a newer one refused
    assert seg_v2().schema_version == 4
    for old in (1, 2, 3):
        assert SegmentationDone(schema_version=old, **COMMON_SEG).schema_version == 4
    with pytest.raises(ValueError, match="version 5"):
        SegmentationDone(schema_version=5, **COMMON_SEG)
