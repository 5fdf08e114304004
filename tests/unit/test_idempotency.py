"""Idempotent re-sends at ingest, in memory (StageHarness, fake clock): a completed series sent
again publishes nothing and is audited as a duplicate, before and after its state is compacted
to a fingerprint and after a restart from the changelog; added or changed instances make
revision n+1; state stays bounded and timers read only what is due."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry

from services.ingest import core as ingest_core
from services.ingest.core import DUPLICATE_ACTION, content_digest
from services.ingest.main import build
from shared.config import IngestSettings, Settings
from shared.dicom import phantom
from shared.runtime.harness import StageHarness
from shared.runtime.state import PartitionState
from shared.runtime.timers import KeyTimers
from shared.schemas import (
    AuditEvent,
    EndOfSeries,
    Finding,
    InstanceData,
    SegmentationDone,
    SeriesReady,
)
from shared.security.envelope import Keyring

RETENTION_S = 600.0
FINGERPRINT_S = 7200.0


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        ingest=IngestSettings(
            inactivity_timeout_s=30.0,
            late_quiet_s=5.0,
            retention_s=RETENTION_S,
            fingerprint_retention_s=FINGERPRINT_S,
        ),
    )


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


class Ingest:
    """The ingest service in a harness, with its registry and a phantom series."""

    def __init__(self, settings: Settings, keyring: Keyring, uid: str, datas: list[bytes]) -> None:
        self.registry = CollectorRegistry()
        self.harness: StageHarness[object] = StageHarness(
            build(settings, keyring, self.registry), settings, keyring
        )
        self.uid = uid
        self.key = keyring.keyed_hash(uid)
        self.datas = datas

    def restarted(self, settings: Settings, keyring: Keyring) -> Ingest:
        """A new process, its state restored from the changelog (last value per key)."""
        other = Ingest(settings, keyring, self.uid, self.datas)
        other.harness.clock.now = self.harness.clock.now
        last = {c.key: c.value for c in self.harness.history.state_changes}
        for key, value in last.items():
            encoded = None if value is None else json.dumps(value).encode()
            other.harness.state(0).restore(key, encoded)
        return other

    def send(self, datas: list[bytes], marker: int | None = None) -> list[SeriesReady]:
        before = len(self.harness.outputs("series"))
        for data in datas:
            self.harness.send(InstanceData(source="t", data=data), key=self.uid)
        if marker is not None:
            m = EndOfSeries(source="t", series_instance_uid=self.uid, expected_count=marker)
            self.harness.send(m, key=self.uid)
        return self.series()[before:]

    def series(self) -> list[SeriesReady]:
        return [r for r in self.harness.outputs("series") if isinstance(r, SeriesReady)]

    def duplicates_audited(self) -> list[AuditEvent]:
        return [
            r
            for r in self.harness.outputs("audit")
            if isinstance(r, AuditEvent) and r.action == DUPLICATE_ACTION
        ]

    def counted(self) -> float:
        return self.registry.get_sample_value("radstream_series_duplicates_total") or 0.0

    def state(self) -> dict[str, object]:
        value = self.harness.state(0).get(self.key)
        assert isinstance(value, dict)
        return value


@pytest.fixture
def ingest(settings: Settings, keyring: Keyring, tmp_path: Path) -> Ingest:
    ph = phantom.chest_ct(tmp_path / "ph", seed=3, size=16, slices=6, nodules_mm=())
    return Ingest(settings, keyring, ph.series_instance_uid, [f.read_bytes() for f in ph.files])


def changed(data: bytes) -> bytes:
    """The same instance (SOP Instance UID) with one pixel changed."""
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array.copy()
    arr.flat[0] += 7
    ds.PixelData = arr.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def added(data: bytes, n: int) -> bytes:
    """One more instance of the same series (new SOP Instance UID, next position)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    uid = f"{ds.SOPInstanceUID.rsplit('.', 1)[0]}.{90000 + n}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = n
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 50]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_resent_series_is_a_duplicate_with_or_without_its_marker(ingest: Ingest) -> None:
    n = len(ingest.datas)
    (first,) = ingest.send(ingest.datas, marker=n)
    assert first.revision == 1
    # the whole series again with its marker: nothing published, one audit at the marker
    assert ingest.send(ingest.datas, marker=n) == []
    (audit,) = ingest.duplicates_audited()
    assert audit.resource == ingest.key.decode() and ingest.uid not in audit.model_dump_json()
    assert ingest.counted() == 1
    # without a marker (an aborted association): settled once quiet for late_quiet_s
    assert ingest.send(ingest.datas[::-1]) == []
    assert len(ingest.duplicates_audited()) == 1
    assert ingest.harness.advance(6.0).outputs.get("series") is None
    assert len(ingest.duplicates_audited()) == 2
    # a part of the series again (a forward of some slices) is a duplicate too
    assert ingest.send(ingest.datas[:2], marker=2) == []
    assert len(ingest.duplicates_audited()) == 3
    assert ingest.harness.advance(RETENTION_S / 2).outputs.get("series") is None
    assert [s.revision for s in ingest.series()] == [1]


def test_added_or_changed_instance_makes_one_new_revision_with_every_instance(
    ingest: Ingest,
) -> None:
    n = len(ingest.datas)
    ingest.send(ingest.datas, marker=n)
    extra = added(ingest.datas[-1], 99)
    # the series re-sent with one instance more: revision 2 at its marker, all n + 1
    (second,) = ingest.send([*ingest.datas, extra], marker=n + 1)
    assert second.revision == 2 and second.instance_count == n + 1
    assert second.completed_by == "late"
    assert ingest.harness.advance(10.0).outputs.get("series") is None
    # one instance changed in content, same SOP Instance UID: revision 3 once quiet
    fixed = changed(ingest.datas[2])
    assert ingest.send([fixed]) == []
    (third,) = ingest.harness.advance(6.0).outputs["series"]
    assert isinstance(third, SeriesReady) and third.revision == 3
    assert third.instance_count == n + 1
    # the revision carries the corrected instance 3
    new = next(r for r in third.instances if r.instance_number == 3)
    old = next(r for r in second.instances if r.instance_number == 3)
    assert new.sop_instance_uid == old.sop_instance_uid and new.blob.digest != old.blob.digest
    assert ingest.duplicates_audited() == []


def test_state_compacts_to_a_fingerprint_that_still_recognises_resends(
    ingest: Ingest,
) -> None:
    n = len(ingest.datas)
    ingest.send(ingest.datas, marker=n)
    full = ingest.harness.history.state_changes[-1].value
    result = ingest.harness.advance(RETENTION_S + 2)
    (compact,) = result.state_changes
    assert compact.value is not None and compact.value["compacted"] is True
    assert compact.value["instances"] == {} and compact.value["fingerprint"]["count"] == n
    assert len(json.dumps(compact.value)) < 1200 < len(json.dumps(full))
    # the whole series again: compared as a set with the fingerprint, a duplicate
    assert ingest.send(ingest.datas, marker=n) == []
    assert len(ingest.duplicates_audited()) == 1
    assert ingest.state()["instances"] == {}  # the re-send is not kept
    # the same again without a marker, in another order: settled when quiet
    ingest.send(ingest.datas[::-1])
    assert ingest.harness.advance(6.0).outputs.get("series") is None
    assert len(ingest.duplicates_audited()) == 2
    # the series with an instance more: revision 2 with what was sent
    extra = added(ingest.datas[0], 77)
    (second,) = ingest.send([*ingest.datas, extra], marker=n + 1)
    assert second.revision == 2 and second.instance_count == n + 1
    # forgotten after the fingerprint's retention (counted from the last sighting)
    ingest.harness.advance(RETENTION_S + 2)
    assert ingest.state()["compacted"] is True
    result = ingest.harness.advance(FINGERPRINT_S + 2)
    assert [c.value for c in result.state_changes] == [None]
    assert ingest.harness.state(0).get(ingest.key) is None


def test_resend_after_a_restart_from_the_changelog_is_a_duplicate(
    settings: Settings, keyring: Keyring, ingest: Ingest
) -> None:
    n = len(ingest.datas)
    ingest.send(ingest.datas, marker=n)
    # restarted while the instance list is kept, and again once only the fingerprint is
    for compacted in (False, True):
        if compacted:
            ingest.harness.advance(RETENTION_S + 2)
        assert ingest.state()["compacted"] is compacted
        again = ingest.restarted(settings, keyring)
        assert again.send(again.datas, marker=n) == []
        assert len(again.duplicates_audited()) == 1 and again.counted() == 1
        assert again.harness.advance(RETENTION_S / 2).outputs.get("series") is None
        # and an added instance is still revision 2 there: with every instance while the
        # list is kept; once compacted, of what was (re-)sent (the fingerprint has no list)
        (second,) = again.send([added(again.datas[0], 55)], marker=1)
        assert second.revision == 2
        assert second.instance_count == (1 if compacted else n + 1)


def test_a_version_2_state_is_upgraded_and_compares_by_blob_digest(
    ingest: Ingest,
) -> None:
    n = len(ingest.datas)
    ingest.send(ingest.datas, marker=n)
    v2 = dict(ingest.state())
    for name in ("resend", "compacted", "fingerprint"):
        del v2[name]
    v2["schema_version"] = 2
    v2["instances"] = {
        sop: {k: v for k, v in inst.items() if k != "content"}  # type: ignore[union-attr]
        for sop, inst in v2["instances"].items()  # type: ignore[attr-defined]
    }
    state = ingest.harness.state(0)
    state.restore(ingest.key, json.dumps(v2).encode())
    assert ingest.send(ingest.datas, marker=n) == []
    assert len(ingest.duplicates_audited()) == 1
    assert ingest.state()["schema_version"] == 4
    ingest.harness.advance(RETENTION_S + 2)
    assert ingest.state()["fingerprint"]["basis"] == "blob"  # type: ignore[index]
    assert ingest.send(ingest.datas, marker=n) == []
    assert len(ingest.duplicates_audited()) == 2


def test_content_digest_ignores_the_file_meta_and_sees_the_pixels(tmp_path: Path) -> None:
    ph = phantom.chest_ct(tmp_path / "c", seed=4, size=16, slices=1, nodules_mm=())
    data = ph.files[0].read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.ImplementationVersionName = "OTHER_WRITER"
    ds.file_meta.SourceApplicationEntityTitle = "GATEWAY"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    rewritten = out.getvalue()
    assert rewritten != data
    assert content_digest(rewritten) == content_digest(data)
    assert content_digest(changed(data)) != content_digest(data)
    assert len(content_digest(b"x" * 300)) == 64  # no meta to walk: the whole bytes


def test_assembly_decodes_and_encodes_the_series_state_once_per_transaction(
    ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each slice is its own transaction here: the state is encoded once per commit and never
    decoded again (it was decoded and re-encoded whole at every slice: O(n^2) in a series)."""
    loads = dumps = 0
    real_load, real_dump = ingest_core.load, ingest_core.SeriesState.encoded

    def counting_load(doc: object) -> object:
        nonlocal loads
        loads += 1
        return real_load(doc)

    def counting_dump(st: ingest_core.SeriesState) -> bytes:
        nonlocal dumps
        dumps += 1
        return real_dump(st)

    monkeypatch.setattr(ingest_core, "load", counting_load)
    monkeypatch.setattr(ingest_core.SeriesState, "encoded", counting_dump)
    n = len(ingest.datas)
    [ready] = ingest.send(ingest.datas, marker=n)
    assert ready.instance_count == n
    assert loads == 0, "the state written by the last slice is not decoded again"
    assert dumps == n + 1  # one per transaction: n slices and the marker
    assert len(ingest.state()["instances"]) == n  # type: ignore[arg-type]


def test_timers_read_only_due_series_not_every_fingerprint(
    settings: Settings, keyring: Keyring, ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = len(ingest.datas)
    ingest.send(ingest.datas, marker=n)
    ingest.harness.advance(RETENTION_S + 2)
    template = ingest.state()
    state = ingest.harness.state(0)
    for i in range(3000):  # weeks of completed series, compacted
        state.restore(f"{i:032x}".encode(), json.dumps(template).encode())
    reads = 0  # reads of a series' state, decoded or remembered (PartitionState's memo)
    real = ingest_core._get

    def counting(state: object, key: bytes) -> object:
        nonlocal reads
        reads += 1
        return real(state, key)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_core, "_get", counting)
    ingest.harness.advance(1.0)  # restored values are re-read once (the index catches up)
    reads = 0
    ingest.harness.advance(60.0)
    assert reads == 0, "a tick with nothing due reads no state"
    ingest.send(ingest.datas[:1])
    reads = 0
    ingest.harness.advance(6.0)
    assert 0 < reads < 20  # only the series being re-sent


def test_key_timers_survive_aborted_writes_and_failed_timers() -> None:
    state = PartitionState()
    values = {b"a": 10.0, b"b": 50.0}
    timers = KeyTimers(lambda key, st: (values[key], "") if st.get(key) is not None else None)
    state.restore(b"a", b"1")
    state.restore(b"b", b"1")
    assert timers.due(state, 20.0) == [b"a"]
    # the timer failed before scheduling it again: still due next time
    assert timers.due(state, 21.0) == [b"a"]
    timers.schedule(state, b"a", 100.0)
    assert timers.due(state, 60.0) == [b"b"]
    # a handler wrote b (scheduling it later), then its transaction aborted: re-read
    state.put(b"b", 2)
    timers.schedule(state, b"b", 1000.0)
    state.abort()
    assert timers.due(state, 60.0) == [b"b"]
    # deleted keys leave the index
    timers.forget(state, b"b")
    assert timers.due(state, 10_000.0) == [b"a"]
    assert len(timers) == 1


# ---- the alert stage: an alert id is published once ------------------------------------------


def _findings(revision: int = 1) -> SegmentationDone:
    return SegmentationDone(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        revision=revision,
        modality="CT",
        task="chest_ct",
        findings=[
            Finding(type="haemorrhage", label="bleed-1", volume_ml=1.5, confidence=0.9),
            Finding(type="nodule", label="nodule-1", diameter_mm=9.0, confidence=0.9),
        ],
        algorithm="test",
        algorithm_version="1",
        source_offset=0,
        source_partition=0,
        last_published_at=datetime.now(UTC),
    )


def _alert_stage(settings: Settings, keyring: Keyring) -> tuple[StageHarness[object], Any]:
    from services.alert.main import build as build_alert

    registry = CollectorRegistry()
    harness: StageHarness[object] = StageHarness(
        build_alert(settings, keyring, registry), settings, keyring
    )
    return harness, registry


def test_alert_ids_are_published_once_across_replays_restarts_and_retention(
    settings: Settings, keyring: Keyring
) -> None:
    harness, registry = _alert_stage(settings, keyring)
    first = harness.send(_findings(), key="1.2.3.4").outputs["alerts"]
    assert len(first) == 2
    # replayed findings (the same revision) raise nothing, in this process...
    assert "alerts" not in harness.send(_findings(), key="1.2.3.4").outputs
    # ...and after a restart that restores the changelog (or a new owner after a rebalance)
    restarted, reg2 = _alert_stage(settings, keyring)
    restarted.clock.now = harness.clock.now
    for change in harness.history.state_changes:
        assert change.key == keyring.keyed_hash("1.2.3.4")  # keyed hash, no UID
        restarted.state(change.partition).restore(change.key, json.dumps(change.value).encode())
    assert "alerts" not in restarted.send(_findings(), key="1.2.3.4").outputs
    assert reg2.get_sample_value("radstream_alert_duplicates_total") == 2
    # metrics count what was raised, not what was suppressed
    assert (
        registry.get_sample_value("radstream_e2e_latency_seconds_count", {"severity": "critical"})
        == 1
    )
    assert (
        reg2.get_sample_value("radstream_e2e_latency_seconds_count", {"severity": "critical"})
        is None
    )
    # a new revision raises its own alerts
    assert len(restarted.send(_findings(2), key="1.2.3.4").outputs["alerts"]) == 2
    # the ids are kept for the retention after the series' last alert, then forgotten
    retention = settings.alert.raised_retention_s
    assert restarted.advance(retention - 120).state_changes == []
    result = restarted.advance(240)
    assert [c.value for c in result.state_changes] == [None]


def test_the_encoded_state_is_the_dump_as_json() -> None:
    """The changelog's text (pydantic's serialiser) is the same document as ``dump``, and
    reads back as the same state."""
    from services.ingest.state import SeriesState, StoredInstance, load

    st = SeriesState.new(1.0, "1.2.3")
    st.study_instance_uid, st.body_part = "1.2.4", "CHEST é"
    st.last_published_at = datetime(2026, 11, 28, 12, 0, 1, 250000, tzinfo=UTC)
    st.instances["1.2.3.1"] = StoredInstance(
        digest="a" * 64, size=5, key_id="k", instance_number=1, position=(0.5, -1e-7, 2.0)
    )
    doc = json.loads(st.encoded())
    assert doc == st.dump()
    assert load(doc) == st
    # a DS "NaN" or "inf" position passes ingest's checks: written as json.dumps writes it,
    # not as null (which would make the state unreadable after a restart)
    st.pixel_spacing_mm = (float("inf"), 0.5)
    st.instances["1.2.3.2"] = StoredInstance(
        digest="b" * 64, size=5, key_id="k", position=(float("nan"), 0.0, 1.0)
    )
    assert b'"position":[NaN,0.0,1.0]' in st.encoded()
    assert b'"pixel_spacing_mm":[Infinity,0.5]' in st.encoded()
    back = load(json.loads(st.encoded()))
    assert back.pixel_spacing_mm == (float("inf"), 0.5)
    position = back.instances["1.2.3.2"].position
    assert position is not None and np.isnan(position[0]) and position[1:] == (0.0, 1.0)
