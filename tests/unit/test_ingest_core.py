"""Ingest's pure core without a broker: assembly, duplicates, timeouts, revisions, ordering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.ingest.core import IngestCore, order_instances
from shared.config import IngestSettings
from shared.dicom import phantom
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context, Emit
from shared.runtime.state import PartitionState
from shared.schemas import BlobRef, EndOfSeries, InstanceData, InstanceRef, SeriesReady
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend


@pytest.fixture
def core(tmp_path: Path) -> tuple[IngestCore, Keyring]:
    ring = Keyring.generate()
    store = BlobStore(LocalDirBackend(tmp_path / "blobs"), ring)
    return IngestCore(store, IngestSettings(inactivity_timeout_s=10, late_quiet_s=2)), ring


def ctx(ring: Keyring, state: PartitionState, key: bytes | None) -> Context:
    return Context("t.instances", 0, 0, key, 0, state, ring)


def emitted(result: object) -> list[SeriesReady]:
    items = result if isinstance(result, list) else [result] if result else []
    return [e.record for e in items if isinstance(e, Emit) and isinstance(e.record, SeriesReady)]


def test_marker_completes_duplicates_ignored_late_instance_revises(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ingest, ring = core
    ph = phantom.chest_ct(tmp_path / "p", seed=1, size=16, slices=4, nodules_mm=())
    key = ring.keyed_hash(ph.series_instance_uid)
    state = PartitionState()
    c = ctx(ring, state, key)
    files = [f.read_bytes() for f in ph.files]
    for data in reversed(files):
        assert ingest.on_instance(InstanceData(source="t", data=data), c, 100.0) is None
    assert (
        ingest.on_instance(InstanceData(source="t", data=files[0]), c, 101.0) is None
    )  # duplicate
    (ready,) = emitted(
        ingest.on_marker(
            EndOfSeries(source="t", series_instance_uid=ph.series_instance_uid, expected_count=4),
            c,
            102.0,
        )
    )
    assert ready.revision == 1 and ready.instance_count == 4
    assert [r.instance_number for r in ready.instances] == [1, 2, 3, 4]
    # nothing is due yet; a late instance makes a revision once quiet
    assert emitted(ingest.tick(c, 103.0)) == []
    other = phantom.chest_ct(
        tmp_path / "q", seed=1, size=16, slices=5, nodules_mm=()
    )  # same UIDs, 5th slice new
    ingest.on_instance(InstanceData(source="t", data=other.files[4].read_bytes()), c, 104.0)
    assert emitted(ingest.tick(c, 105.0)) == []
    (late,) = emitted(ingest.tick(c, 106.5))
    assert late.revision == 2 and late.instance_count == 5 and late.completed_by == "late"


def test_inactivity_timeout_completes_a_series_without_marker(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ingest, ring = core
    ph = phantom.head_ct(tmp_path / "h", seed=2, size=16, slices=3, bleed_ml=0)
    state = PartitionState()
    c = ctx(ring, state, ring.keyed_hash(ph.series_instance_uid))
    for f in ph.files:
        ingest.on_instance(InstanceData(source="t", data=f.read_bytes()), c, 50.0)
    assert emitted(ingest.tick(c, 55.0)) == []
    (ready,) = emitted(ingest.tick(c, 60.0))
    assert ready.completed_by == "timeout" and ready.instance_count == 3


def test_key_must_be_the_keyed_hash_of_the_series(core, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ingest, ring = core
    ph = phantom.chest_ct(tmp_path / "k", seed=3, size=16, slices=1, nodules_mm=())
    c = ctx(ring, PartitionState(), b"somebody-elses-key")
    with pytest.raises(PoisonError) as info:
        ingest.on_instance(InstanceData(source="t", data=ph.files[0].read_bytes()), c, 1.0)
    assert info.value.reason == "key_mismatch"


def ref(n: int, pos: tuple[float, float, float] | None) -> InstanceRef:
    return InstanceRef(
        blob=BlobRef(digest="0" * 64, size=1, key_id="k"),
        sop_instance_uid=f"1.{n}",
        instance_number=n,
        position=pos,
    )


def test_ordering_follows_the_slice_normal_not_instance_numbers() -> None:
    # instance numbers run against the geometry; oblique orientation (30° about x)
    import math

    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    orient = [1.0, 0.0, 0.0, 0.0, c, s]
    normal = (0.0, -s, c)
    refs = [ref(10 - i, tuple(i * 2.0 * v for v in normal)) for i in range(5)]  # type: ignore[misc]
    shuffled = [refs[3], refs[0], refs[4], refs[1], refs[2]]
    assert [r.sop_instance_uid for r in order_instances(shuffled, orient)] == [
        r.sop_instance_uid for r in refs
    ]
    # without positions: instance number
    assert [
        r.instance_number for r in order_instances([ref(3, None), ref(1, None), ref(2, None)], None)
    ] == [1, 2, 3]


def test_blob_store_is_content_addressed_encrypted_and_verified(tmp_path: Path) -> None:
    ring = Keyring.generate()
    backend = LocalDirBackend(tmp_path / "b")
    store = BlobStore(backend, ring)
    a = store.put(b"PATIENT^NAME pixel bytes", "instances")
    assert store.put(b"PATIENT^NAME pixel bytes", "instances") == a  # idempotent
    assert backend.usage()[0] == 1
    (path,) = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert b"PATIENT" not in path.read_bytes() and a.digest not in path.name
    assert store.get(a) == b"PATIENT^NAME pixel bytes"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    from shared.storage import BlobError

    with pytest.raises(BlobError):
        store.get(a)


def _v1_state(ph: phantom.Phantom, files: list[bytes], store: BlobStore) -> dict[str, object]:
    """What the first ingest wrote to its changelog for these instances (positional layout)."""
    from shared.dicom.safe import inspect_instance

    infos = [inspect_instance(d) for d in files]
    first = infos[0]
    return {
        "study": first.study_instance_uid,
        "series": first.series_instance_uid,
        "modality": first.modality,
        "inst": {
            i.sop_instance_uid: [
                ref.digest,
                ref.size,
                ref.key_id,
                i.instance_number,
                list(i.position) if i.position else None,
            ]
            for i, ref in ((i, store.put(d, "instances")) for i, d in zip(infos, files, strict=True))
        },
        "expected": None,
        "revision": 0,
        "dirty": False,
        "first_rx": 10.0,
        "last_update": 11.0,
        "last_pub": "2025-01-02T03:04:05+00:00",
        "body_part": first.body_part,
        "rows": first.rows,
        "cols": first.columns,
        "spacing": list(first.pixel_spacing) if first.pixel_spacing else None,
        "thick": first.slice_thickness,
        "orient": list(first.orientation) if first.orientation else None,
        "acq": first.acquisition,
    }


def test_state_is_a_versioned_model_in_the_changelog_and_v1_records_are_upgraded(
    core, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from services.ingest.state import SeriesState, load

    ingest, ring = core
    ph = phantom.chest_ct(tmp_path / "v", seed=5, size=16, slices=3, nodules_mm=())
    files = [f.read_bytes() for f in ph.files]
    key = ring.keyed_hash(ph.series_instance_uid)
    # what this ingest writes: schema_version 4, read back as the same model
    state = PartitionState()
    ingest.on_instance(InstanceData(source="t", data=files[0]), ctx(ring, state, key), 1.0)
    ((_, raw),) = state.pending()
    assert raw is not None and b'"schema_version":4' in raw
    st = load(state.get(key))
    assert isinstance(st, SeriesState) and len(st.instances) == 1 and st.revision == 0
    assert load(st.dump()) == st
    # a changelog written by the first ingest (v1) is read, upgraded and carried on with
    old = PartitionState()
    old.restore(key, json.dumps(_v1_state(ph, files[:2], ingest.store)).encode())
    c = ctx(ring, old, key)
    ingest.on_instance(InstanceData(source="t", data=files[2]), c, 12.0)
    (ready,) = emitted(
        ingest.on_marker(
            EndOfSeries(source="t", series_instance_uid=ph.series_instance_uid, expected_count=3),
            c,
            13.0,
        )
    )
    assert ready.instance_count == 3 and ready.revision == 1
    assert [r.instance_number for r in ready.instances] == [1, 2, 3]
    assert ready.series_instance_uid == ph.series_instance_uid
    assert ready.first_received_at.timestamp() == 10.0
    assert load(old.get(key)).schema_version == 4  # rewritten at the current version


def test_unreadable_state_dead_letters_its_series_but_never_stops_the_timer(
    core, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    ingest, ring = core
    ph = phantom.chest_ct(tmp_path / "u", seed=6, size=16, slices=1, nodules_mm=())
    key = ring.keyed_hash(ph.series_instance_uid)
    state = PartitionState()
    state.restore(key, json.dumps({"schema_version": 99, "whatever": 1}).encode())
    state.restore(b"other", json.dumps({"schema_version": 2, "revision": "x"}).encode())
    c = ctx(ring, state, key)
    with pytest.raises(PoisonError) as info:
        ingest.on_instance(InstanceData(source="t", data=ph.files[0].read_bytes()), c, 1.0)
    assert info.value.reason == "schema" and "unknown version 99" in info.value.message
    assert emitted(ingest.tick(c, 10_000.0)) == []  # skipped, not raised
    assert state.pending() == []
