"""The results stage's core (no broker): findings → DICOM SEG + Comprehensive 3D SR (TID 1500)
+ pictures, validated by dicom3tools' dciodvfy and read back with highdicom; deterministic
identities; the SEG's frame budget; old mask blobs; bad input as dead letters with a reason;
a PACS that cannot be reached. Inputs come from the real preprocess and segmentation cores on
phantoms, so the findings record is exactly what segmentation publishes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from pydicom.sr.codedict import codes

from services.preprocess.core import PreprocessCore
from services.results.core import ResultsCore
from services.results.main import build
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings, Settings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.imaging.masks import pack_masks, unpack_masks
from shared.runtime.harness import StageHarness
from shared.runtime.stage import Context
from shared.schemas import AuditEvent, Reason, ResultsReady, SegmentationDone
from shared.security.envelope import Keyring
from shared.stack.broker import free_port
from shared.storage import BlobStore, LocalDirBackend
from tests.helpers import dciodvfy_errors
from tests.pipeline import files, series_ready


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A chest CT with two nodules and a head CT with a bleed, through preprocess and
    segmentation: their findings records (and the store and keyring they live in)."""
    tmp = tmp_path_factory.mktemp("results")
    ring = Keyring.generate()
    store = BlobStore(LocalDirBackend(tmp / "blobs"), ring)
    ctx = Context("t", 0, 3, b"k", 0, None, ring)
    pre = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
    seg = SegmentationCore(store, select_backend("cpu"))
    chest = phantom.chest_ct(tmp / "c", seed=9, size=128, slices=24, nodules_mm=(10.0, 7.0))
    head = phantom.head_ct(tmp / "h", seed=3, size=160, slices=30, bleed_ml=6.0)
    normal = phantom.chest_ct(tmp / "n", seed=4, size=128, slices=20, nodules_mm=())
    done = {
        name: seg.handle(pre.handle(series_ready(files(ph.files), store, ring), ctx), ctx)
        for name, ph in (("chest", chest), ("head", head), ("normal", normal))
    }
    return {"tmp": tmp, "ring": ring, "store": store, "ctx": ctx, "done": done, "chest": chest}


def test_segmentation_publishes_findings_and_masks_only(world: dict[str, Any]) -> None:
    for done in world["done"].values():
        assert done.seg is None and done.seg_sop_instance_uid is None and done.overlays == []
        assert done.masks is not None and done.volume is not None and done.source_instances
        assert "outputs" in done.timings_s and done.timings_s["outputs"] < 1.0


LESION_CODES = (codes.SCT.Nodule, codes.SCT.Mass, codes.SCT.Hemorrhage)


def _groups(sr: Any, lesions: bool = True) -> list[Any]:
    return [
        g
        for g in sr.content.get_volumetric_roi_measurement_groups()
        if (g.finding_type in LESION_CODES) == lesions
    ]


def _value(group: Any, name: Any) -> tuple[float, str]:
    (m,) = [m for m in group.get_measurements() if m.name == name]
    return float(m.value), str(m.unit.value)


def _algorithm_names(group: Any, name: Any) -> list[str]:
    (m,) = [m for m in group.get_measurements() if m.name == name]
    return [
        str(item.TextValue)
        for item in m[0].get("ContentSequence", [])
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"
    ]


@pytest.mark.parametrize("name", ["chest", "head"])
def test_seg_and_sr_validate_read_back_and_agree_with_the_findings(
    world: dict[str, Any], name: str
) -> None:
    store: BlobStore = world["store"]
    done: SegmentationDone = world["done"][name]
    (record,) = ResultsCore(store).handle(done, world["ctx"])
    assert isinstance(record, ResultsReady)
    assert record.seg is not None and record.sr is not None and record.delivery == "not_configured"
    assert (record.series_instance_uid, record.revision) == (done.series_instance_uid, 1)
    seg_bytes, sr_bytes = store.get(record.seg), store.get(record.sr)
    tmp: Path = world["tmp"]
    assert dciodvfy_errors(seg_bytes, tmp / f"{name}-seg.dcm") == []
    assert dciodvfy_errors(sr_bytes, tmp / f"{name}-sr.dcm") == []

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    assert seg.SOPInstanceUID == record.seg_sop_instance_uid
    assert seg.SegmentationType == "BINARY" and seg.BitsAllocated == 1
    # no empty frames: one frame per (segment, slice) that holds pixels of that segment
    sources = [ref.sop_instance_uid for ref in done.source_instances]
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
    ).astype(bool)
    nonempty = int(pixels.reshape(len(sources), -1, len(numbers)).any(axis=1).sum())
    assert int(seg.NumberOfFrames) == nonempty == record.seg_frames

    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPInstanceUID == record.sr_sop_instance_uid
    lesions = [f for f in done.findings if f.type in ("nodule", "mass", "haemorrhage")]
    groups = _groups(sr)
    assert lesions and len(groups) == len(lesions)
    if name == "chest":  # the chest task says which model each confidence came from
        assert all(f.confidence_source == "main_model" for f in lesions)
    by_label = {d.SegmentLabel.split(":")[0]: d for d in seg.SegmentSequence}
    refs = {r.finding_label: r for r in record.segments}
    for finding, group in zip(lesions, groups, strict=True):
        assert str(group.tracking_identifier) == finding.label
        assert group.tracking_uid == refs[finding.label].tracking_uid
        # the group references this finding's segment in this SEG
        ref = group.referenced_segment
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        assert number == refs[finding.label].segment_number
        assert by_label[finding.label].SegmentNumber == number
        assert seg.SegmentSequence[number - 1].TrackingUID == group.tracking_uid
        # its segment holds the finding's voxels
        segment_voxels = int(pixels[..., numbers.index(number)].sum())
        if finding.voxels is not None:
            assert abs(segment_voxels - finding.voxels) <= max(2, 0.02 * finding.voxels)
        # measurements in UCUM units, the finding's values
        assert _value(group, codes.SCT.Diameter) == pytest.approx((finding.diameter_mm, "mm"))
        assert _value(group, codes.SCT.Volume) == pytest.approx((finding.volume_ml, "mL"))
        if finding.confidence is not None:
            value, unit = _value(group, codes.DCM.CertaintyOfFinding)
            assert unit == "%" and value == pytest.approx(100 * finding.confidence)
            # the certainty names the model it came from (its own algorithm identification)
            names = _algorithm_names(group, codes.DCM.CertaintyOfFinding)
            if finding.confidence_source:
                assert names == [f"{done.algorithm} {finding.confidence_source}"]
            else:
                assert names == []
        if finding.mean_value is not None:
            assert _value(group, codes.SCT.Mean) == pytest.approx((finding.mean_value, "[hnsf'U]"))
        evaluations = {str(e.name.value): e.value for e in group.get_qualitative_evaluations()}
        if finding.subtype:
            assert evaluations["finding-subtype"].meaning == finding.subtype.replace("_", " ")
        assert group.finding_type in LESION_CODES
    # organs in the SEG are measured too (their volume), referencing their segment
    organs = [f for f in done.findings if f.type in ("lung", "brain")]
    organ_groups = _groups(sr, lesions=False)
    assert len(organ_groups) == len(organs) > 0
    for finding, group in zip(organs, organ_groups, strict=True):
        assert str(group.tracking_identifier) == finding.label
        assert _value(group, codes.SCT.Volume) == pytest.approx((finding.volume_ml, "mL"))
        ref = group.referenced_segment
        assert ref is not None and ref.referenced_segment_numbers == [
            refs[finding.label].segment_number
        ]
    # the algorithm is identified (device observer) and every group names it
    text = str(sr)
    assert done.algorithm in text and done.algorithm_version in text
    # overlays: real PNGs with colour outlines
    assert record.overlays
    for overlay in record.overlays:
        img = np.asarray(Image.open(io.BytesIO(store.get(overlay.blob))))
        assert img.ndim == 3 and (img[..., 0] != img[..., 1]).any()


def test_the_seg_references_its_series_and_its_segments_are_the_masks(
    world: dict[str, Any],
) -> None:
    store: BlobStore = world["store"]
    done: SegmentationDone = world["done"]["chest"]
    (record,) = ResultsCore(store).handle(done, world["ctx"])
    assert isinstance(record, ResultsReady) and record.seg is not None and done.masks is not None
    raw = store.get(record.seg)
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == done.series_instance_uid
    assert ds.StudyInstanceUID == done.study_instance_uid
    masks = unpack_masks(store.get(done.masks))
    labels = [str(d.SegmentLabel) for d in ds.SegmentSequence]
    pixels = hd.seg.segread(io.BytesIO(raw)).get_pixels_by_source_instance(
        source_sop_instance_uids=[ref.sop_instance_uid for ref in done.source_instances],
        segment_numbers=list(range(1, len(labels) + 1)),
        assert_missing_frames_are_empty=True,
    )
    names = {"Left lung": "lung_left", "Right lung": "lung_right"}
    lesions = np.zeros(masks["nodules"].shape, bool)
    for k, label in enumerate(labels):
        if label in names:
            np.testing.assert_array_equal(pixels[..., k].astype(bool), masks[names[label]])
        else:  # one segment per finding: together they are the task's lesion mask
            assert label.startswith(("nodule", "mass")), label
            assert not (lesions & pixels[..., k].astype(bool)).any()
            lesions |= pixels[..., k].astype(bool)
    np.testing.assert_array_equal(lesions, masks["nodules"])


def test_a_study_without_lesions_still_gets_a_valid_report_of_what_was_measured(
    world: dict[str, Any],
) -> None:
    store: BlobStore = world["store"]
    done: SegmentationDone = world["done"]["normal"]
    assert not [f for f in done.findings if f.type in ("nodule", "mass")]
    (record,) = ResultsCore(store).handle(done, world["ctx"])
    assert isinstance(record, ResultsReady) and record.seg and record.sr
    assert dciodvfy_errors(store.get(record.sr), world["tmp"] / "normal-sr.dcm") == []
    sr = hd.sr.srread(io.BytesIO(store.get(record.sr)))
    assert _groups(sr) == [] and len(_groups(sr, lesions=False)) == 2  # both lungs
    assert {r.finding_label for r in record.segments} == {"lung_left", "lung_right"}
    # nothing to measure in the SEG (organs over budget, no lesion): no SEG, no SR
    (bare,) = ResultsCore(store, seg_max_frames=5).handle(done, world["ctx"])
    assert isinstance(bare, ResultsReady)
    assert bare.seg is None and bare.sr is None and bare.delivery == "nothing_to_deliver"
    assert bare.organs_left_out == ["lung_left", "lung_right"] and bare.overlays


def test_identities_are_deterministic_per_series_revision(world: dict[str, Any]) -> None:
    store, ctx = world["store"], world["ctx"]
    done: SegmentationDone = world["done"]["head"]
    (a,) = ResultsCore(store).handle(done, ctx)
    (b,) = ResultsCore(store).handle(done, ctx)
    assert isinstance(a, ResultsReady) and isinstance(b, ResultsReady)
    assert (a.seg_sop_instance_uid, a.sr_sop_instance_uid) == (
        b.seg_sop_instance_uid,
        b.sr_sop_instance_uid,
    )
    (c,) = ResultsCore(store).handle(done.model_copy(update={"revision": 2}), ctx)
    assert isinstance(c, ResultsReady)
    assert {c.seg_sop_instance_uid, c.sr_sop_instance_uid}.isdisjoint(
        {a.seg_sop_instance_uid, a.sr_sop_instance_uid}
    )


def test_organs_stay_out_of_a_seg_past_its_frame_budget(world: dict[str, Any]) -> None:
    store: BlobStore = world["store"]
    done: SegmentationDone = world["done"]["chest"]
    (full,) = ResultsCore(store).handle(done, world["ctx"])
    (small,) = ResultsCore(store, seg_max_frames=20).handle(done, world["ctx"])
    assert isinstance(full, ResultsReady) and isinstance(small, ResultsReady)
    assert full.organs_left_out == [] and small.organs_left_out == ["lung_left", "lung_right"]
    assert 0 < small.seg_frames < full.seg_frames
    assert small.seg is not None
    seg = hd.seg.segread(io.BytesIO(store.get(small.seg)))
    labels = [str(d.SegmentLabel) for d in seg.SegmentSequence]
    assert labels and all(label.startswith("nodule") for label in labels)
    # the SR still references each nodule's segment, renumbered in the smaller SEG
    assert [r.segment_number for r in small.segments] == list(range(1, len(labels) + 1))


def test_masks_written_in_the_old_format_are_still_read(world: dict[str, Any]) -> None:
    store: BlobStore = world["store"]
    done: SegmentationDone = world["done"]["head"]
    assert done.masks is not None
    buf = io.BytesIO()
    np.savez_compressed(buf, **unpack_masks(store.get(done.masks)))
    old = done.model_copy(update={"masks": store.put(buf.getvalue(), "findings")})
    (new,) = ResultsCore(store).handle(done, world["ctx"])
    (record,) = ResultsCore(store).handle(old, world["ctx"])
    assert isinstance(record, ResultsReady) and isinstance(new, ResultsReady)
    assert record.segments == new.segments and record.seg_frames == new.seg_frames > 0


def test_a_record_without_geometry_gets_pictures_but_no_dicom(world: dict[str, Any]) -> None:
    done: SegmentationDone = world["done"]["chest"]
    v2 = done.model_copy(update={"source_instances": [], "spacing_mm": None})
    (record,) = ResultsCore(world["store"]).handle(v2, world["ctx"])
    assert isinstance(record, ResultsReady)
    assert record.seg is None and record.sr is None and record.not_built
    assert record.overlays and record.delivery == "nothing_to_deliver"


def _harness(world: dict[str, Any], **settings: Any) -> StageHarness[SegmentationDone]:
    s = Settings(home=world["tmp"], blob_dir=world["tmp"] / "blobs", **settings)
    return StageHarness(build(s, world["ring"], CollectorRegistry()), s, world["ring"])


def test_bad_input_is_dead_lettered_with_a_known_reason(world: dict[str, Any]) -> None:
    done: SegmentationDone = world["done"]["head"]
    harness = _harness(world)
    store: BlobStore = world["store"]
    missing = store.put(b"x", "findings").model_copy(update={"digest": "0" * 64})
    garbage = store.put(b"neither format", "findings")
    for masks, reason in ((missing, Reason.BLOB_MISSING), (garbage, Reason.UNDECODABLE)):
        result = harness.send(done.model_copy(update={"masks": masks}), key="series")
        (letter,) = result.dead_letters
        assert letter.reason == reason and letter.stage == "results"
        assert done.series_instance_uid not in letter.message
        assert result.outputs == {}


# pynetdicom 3.0 drops the socket of a refused connection without closing it (transport.py:449)
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning")
def test_an_unreachable_pacs_is_retried_then_recorded_as_failed(world: dict[str, Any]) -> None:
    done: SegmentationDone = world["done"]["head"]
    harness = _harness(
        world,
        retry_attempts=3,
        results={"pacs_host": "127.0.0.1", "pacs_port": free_port(), "pacs_timeout_s": 2.0},
    )
    result = harness.send(done, key=done.series_instance_uid)
    assert result.dead_letters == [] and len(harness.clock.waits) == 2  # retried, then kept
    (record,) = result.outputs["results"]
    assert isinstance(record, ResultsReady) and record.delivery == "failed"
    assert [(d.object, d.outcome) for d in record.deliveries] == [
        ("SEG", "failed"),
        ("SR", "failed"),
    ]
    assert all(d.message and done.series_instance_uid not in d.message for d in record.deliveries)
    audits = result.outputs["audit"]
    assert [a.action for a in audits if isinstance(a, AuditEvent)] == ["pacs_failed"] * 2
    assert all(isinstance(a, AuditEvent) and a.outcome == "error" for a in audits)
    assert record.sr_sop_instance_uid not in str([a.model_dump() for a in audits])


def test_findings_that_were_not_segmented_give_an_empty_record(world: dict[str, Any]) -> None:
    done: SegmentationDone = world["done"]["head"]
    nothing = done.model_copy(update={"task": "none", "masks": None, "findings": []})
    no_masks = done.model_copy(update={"masks": world["store"].put(pack_masks({}), "findings")})
    for msg in (nothing, no_masks):
        result = _harness(world).send(msg, key="series")
        (record,) = result.outputs["results"]
        assert isinstance(record, ResultsReady) and result.dead_letters == []
        assert record.delivery == "nothing_to_deliver" and record.seg is None
        assert not record.overlays


def test_no_phi_in_what_the_results_stage_logs(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    done: SegmentationDone = world["done"]["chest"]
    bad = done.model_copy(update={"source_instances": done.source_instances[:-1]})
    with caplog.at_level("DEBUG"):
        _harness(world).send(done, key="series")
        _harness(world).send(bad, key="series")
    assert done.series_instance_uid not in caplog.text and "PHANTOM" not in caplog.text
    ds = pydicom.dcmread(world["chest"].files[0], stop_before_pixels=True)
    assert str(ds.PatientID) not in caplog.text
