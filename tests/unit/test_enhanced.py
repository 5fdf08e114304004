"""Enhanced multi-frame CT and MR (one instance holding the whole series), without a broker:
ingest completes the series from that one instance; preprocess builds the volume from the
functional groups (per-frame position, shared or per-frame orientation, per-frame rescale,
pixel measures), sorted along the normal whatever the file's frame order, and dead-letters bad
geometry with the reasons a single-frame series gets; the real Enhanced CT that pydicom's data
ships comes out with the geometry its functional groups give; the SEG and SR built over an
enhanced source validate (dciodvfy) and reference the right source frames."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.data import get_testdata_file

from services.ingest.core import IngestCore
from services.preprocess.core import PreprocessCore
from services.preprocess.main import build as build_preprocess
from services.results.core import ResultsCore
from services.segmentation.core import SegmentationCore
from shared.config import IngestSettings, PreprocessSettings, Settings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.imaging.frames import assemble_frames, frame_geometry
from shared.imaging.masks import unpack_masks
from shared.imaging.packed import unpack_volume
from shared.runtime.errors import PoisonError
from shared.runtime.harness import StageHarness
from shared.runtime.stage import Context
from shared.runtime.state import PartitionState
from shared.schemas import EndOfSeries, InstanceData, Reason, SeriesReady, VolumePrepared
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend
from shared.topology import AUDIT
from tests.enhanced import assert_same_findings, enhanced, from_series
from tests.helpers import dciodvfy_errors
from tests.pipeline import files, series_ready

SPACING = (2.0, 0.8, 0.7)  # z, y, x mm


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    ring = Keyring.generate()
    store = BlobStore(LocalDirBackend(tmp_path / "blobs"), ring)
    return {
        "tmp": tmp_path,
        "ring": ring,
        "store": store,
        "ctx": Context("t", 0, 0, b"k", 0, None, ring),
        "pre": PreprocessCore(store, select_backend("cpu"), PreprocessSettings(threads=1)),
    }


def _volume(world: dict[str, Any], data: bytes) -> tuple[VolumePrepared, np.ndarray]:
    """The volume preprocess makes of ``data`` (its default chain)."""
    vp: VolumePrepared = world["pre"].handle(
        series_ready([data], world["store"], world["ring"]), world["ctx"]
    )
    return vp, unpack_volume(world["store"].get(vp.volume))


def _calibrated(world: dict[str, Any], data: bytes) -> tuple[VolumePrepared, np.ndarray]:
    """The calibrated volume alone (no processing chain): exact Hounsfield units."""
    core = PreprocessCore(world["store"], select_backend("cpu"), PreprocessSettings(), chains={})
    vp = core.handle(series_ready([data], world["store"], world["ring"]), world["ctx"])
    return vp, unpack_volume(world["store"].get(vp.volume))


def _hu(z: int = 7, rows: int = 12, cols: int = 10, seed: int = 0) -> np.ndarray:
    """A volume whose every slice differs (so any misordering shows), even HU values (exact
    through a slope of 2)."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-500, 1500, size=(z, rows, cols)) // 2 * 2
    hu[:, 0, 0] = np.arange(z) * 100  # a slice's own signature
    return hu.astype(np.float64)


def _mutate(data: bytes, fn: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    fn(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- ingest ------------------------------------------------------------------------------
def test_ingest_completes_a_series_from_one_enhanced_instance(world: dict[str, Any]) -> None:
    data = enhanced(_hu(), spacing=SPACING, origin=(-5.0, -4.0, 10.0))
    ring: Keyring = world["ring"]
    uid = pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID
    core = IngestCore(world["store"], IngestSettings())
    ctx = Context("t.instances", 0, 0, ring.keyed_hash(uid), 0, PartitionState(), ring)
    emit = core.on_instance(InstanceData(source="t", data=data), ctx, 1.0)
    assert emit is not None and not isinstance(emit, list)
    ready = emit.record
    assert isinstance(ready, SeriesReady)
    assert (ready.completed_by, ready.instance_count, ready.revision) == ("instance", 1, 1)
    assert ready.pixel_spacing_mm == (0.8, 0.7) and ready.orientation == (1, 0, 0, 0, 1, 0)
    # the SDK's marker that follows closes nothing; the same instance again is a re-send
    marker = EndOfSeries(source="t", series_instance_uid=uid, expected_count=1)
    assert core.on_marker(marker, ctx, 2.0) is None
    assert core.on_instance(InstanceData(source="t", data=data), ctx, 3.0) is None
    settled = core.tick(ctx, 10_000.0)
    assert [e.topic for e in settled] == [AUDIT]  # a duplicate: no revision 2


# ---- volume assembly ----------------------------------------------------------------------
@pytest.mark.parametrize(("modality", "dtype"), [("CT", np.int16), ("MR", np.float32)])
def test_shuffled_frames_with_per_frame_rescale_make_the_volume(
    world: dict[str, Any], modality: str, dtype: Any
) -> None:
    hu = _hu()
    order = [4, 0, 6, 2, 5, 1, 3]  # file frame k is volume slice order[k]
    rescale = [(2.0, -2048.0) if k % 2 else (1.0, -1024.0) for k in range(len(order))]
    data = enhanced(
        hu,
        spacing=SPACING,
        origin=(-5.0, -4.0, 10.0),
        frame_order=order,
        rescale=rescale,
        modality=modality,
    )
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert stored[:, 0, 0].tolist() != sorted(stored[:, 0, 0].tolist())  # not in volume order
    vp, vol = _calibrated(world, data)
    assert vp.shape == hu.shape and vp.modality == modality and vp.chain == []
    assert vol.dtype == dtype
    assert vp.spacing_mm == pytest.approx(SPACING)
    assert vp.origin_mm == pytest.approx((-5.0, -4.0, 10.0))
    assert vp.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert np.array_equal(vol, hu.astype(dtype))  # sorted along the normal, each rescaled
    processed, smooth = _volume(world, data)  # the modality's default chain runs on it
    assert processed.chain and smooth[:, 0, 0].tolist() != vol[:, 0, 0].tolist()
    assert np.abs(smooth.astype(float) - vol).mean() < np.abs(np.diff(vol, axis=0)).mean()


def test_oblique_orientation_shared_or_per_frame(world: dict[str, Any]) -> None:
    hu = _hu(z=6, seed=1)
    a = np.deg2rad(25.0)
    ori = (np.cos(a), np.sin(a), 0.0, 0.0, np.cos(0.4), -np.sin(0.4))
    row, col = np.array(ori[:3]), np.array(ori[3:])
    col = col - row * np.dot(row, col)
    col /= np.linalg.norm(col)
    ori = (*row.round(6), *col.round(6))
    normal = np.cross(ori[:3], ori[3:])
    origin = np.array([12.0, -30.0, 55.0])
    for per_frame in (False, True):
        data = enhanced(
            hu,
            spacing=SPACING,
            origin=origin,
            orientation=ori,
            frame_order=[5, 3, 1, 0, 2, 4],
            per_frame_orientation=per_frame,
        )
        vp, vol = _calibrated(world, data)
        assert vp.direction == pytest.approx((*ori, *normal), abs=1e-6)
        assert vp.origin_mm == pytest.approx(tuple(origin), abs=1e-3)
        assert vp.spacing_mm == pytest.approx(SPACING, abs=1e-4)  # positions: 4 decimals
        assert np.array_equal(vol, hu.astype(np.int16))


def test_the_real_enhanced_ct_geometry_follows_its_functional_groups(
    world: dict[str, Any],
) -> None:
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    assert path is not None, "pydicom-data's eCT_Supplemental.dcm (make setup installs it)"
    data = Path(str(path)).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    shared = ds.SharedFunctionalGroupsSequence[0]
    ori = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    px = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    pos = np.array(
        [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
    )
    normal = np.cross(ori[:3], ori[3:])  # (-1,0,0) x (0,1,0): feet-ward
    along = pos @ normal
    first = int(np.argmin(along))
    vp, vol = _calibrated(world, data)
    assert vp.shape == (2, 512, 512) and vp.modality == "CT"
    assert vp.spacing_mm == pytest.approx((abs(along[1] - along[0]), px[0], px[1]))
    assert vp.origin_mm == pytest.approx(tuple(pos[first]))
    assert vp.direction == pytest.approx((*ori, *normal))
    transform = shared.PixelValueTransformationSequence[0]
    slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
    assert np.array_equal(vol, ds.pixel_array[np.argsort(along)] * slope + intercept)


def test_a_real_oblique_enhanced_mr_follows_its_per_frame_groups(world: dict[str, Any]) -> None:
    # nibabel's test data: a Philips 3D MPRAGE as one Enhanced MR instance, 176 oblique
    # sagittal frames, orientation, position, spacing and rescale all in per-frame groups
    path = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    data = gzip.decompress(path.read_bytes())
    ds = pydicom.dcmread(io.BytesIO(data))
    frames = ds.PerFrameFunctionalGroupsSequence
    assert "PlaneOrientationSequence" not in ds.SharedFunctionalGroupsSequence[0]
    ori = np.array(
        [float(v) for v in frames[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    )
    normal = np.cross(ori[:3], ori[3:])
    pos = np.array(
        [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames]
    )
    order = np.argsort(pos @ normal)
    px = [float(v) for v in frames[0].PixelMeasuresSequence[0].PixelSpacing]
    rescale = np.array(
        [
            [
                float(f.PixelValueTransformationSequence[0].RescaleSlope),
                float(f.PixelValueTransformationSequence[0].RescaleIntercept),
            ]
            for f in frames
        ]
    )
    ready = series_ready([data], world["store"], world["ring"])
    assert (ready.completed_by, ready.modality, ready.instance_count) == ("instance", "MR", 1)
    assert ready.orientation == pytest.approx(tuple(ori))
    vp, vol = _calibrated(world, data)
    assert vp.shape == (176, 256, 256) and vp.dtype == "float32"
    assert vp.direction == pytest.approx((*ori, *normal))
    assert vp.origin_mm == pytest.approx(tuple(pos[order[0]]))
    assert vp.spacing_mm == pytest.approx((float(np.diff((pos @ normal)[order]).mean()), *px))
    assert vp.spacing_mm[0] == pytest.approx(1.0, abs=1e-3)
    expected = ds.pixel_array[order] * rescale[order, 0, None, None] + rescale[order, 1, None, None]
    np.testing.assert_allclose(vol, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"]
)
def test_the_real_enhanced_mr_without_functional_groups_is_refused(
    world: dict[str, Any], name: str
) -> None:
    # pydicom's anonymised Enhanced MR files lost their functional groups: no frame has a
    # position, so no volume can be placed in the patient; they are refused, not guessed
    path = get_testdata_file(name, download=False)
    assert path is not None
    data = Path(str(path)).read_bytes()
    ready = series_ready([data], world["store"], world["ring"])  # ingest accepts it
    assert ready.completed_by == "instance" and ready.modality == "MR"
    with pytest.raises(PoisonError) as info:
        world["pre"].handle(ready, world["ctx"])
    assert info.value.reason == Reason.MISSING_FUNCTIONAL_GROUPS


def _positions(z: int, step: float = SPACING[0]) -> np.ndarray:
    return np.array([[-5.0, -4.0, 10.0 + i * step] for i in range(z)])


def _drop_position(ds: pydicom.Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence


def _tilt_one(ds: pydicom.Dataset) -> None:
    item = pydicom.Dataset()
    item.ImageOrientationPatient = [1, 0, 0, 0, 0.94, 0.34]
    ds.PerFrameFunctionalGroupsSequence[2].PlaneOrientationSequence = pydicom.Sequence([item])


def _drop_frame_groups(ds: pydicom.Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[-1]


def _drop_spacing(ds: pydicom.Dataset) -> None:
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence


gap = _positions(7)
gap[4:, 2] += 3.0
shared_z = _positions(7)
shared_z[3] = shared_z[2]
sheared = _positions(7)
sheared[:, 0] += np.arange(7) * 1.5  # a tilted gantry's shear: not one stack


@pytest.mark.parametrize(
    ("positions", "mutate", "reason"),
    [
        (None, _drop_position, Reason.BAD_GEOMETRY),  # a frame without position
        (None, _tilt_one, Reason.MIXED_GEOMETRY),  # inconsistent orientation
        (None, _drop_spacing, Reason.BAD_GEOMETRY),  # no pixel measures
        (None, _drop_frame_groups, Reason.MISSING_FUNCTIONAL_GROUPS),  # items != frames
        (gap, None, Reason.INCONSISTENT_SPACING),  # non-uniform spacing (a missing frame)
        (shared_z, None, Reason.DUPLICATE_SLICES),  # two frames at one position
        (sheared, None, Reason.BAD_GEOMETRY),  # frames not stacked along the normal
    ],
    ids=["no-position", "orientation", "no-spacing", "groups", "gap", "duplicate", "shear"],
)
def test_bad_frame_geometry_is_dead_lettered_with_its_reason(
    world: dict[str, Any],
    positions: np.ndarray | None,
    mutate: Callable[[pydicom.Dataset], None] | None,
    reason: Reason,
) -> None:
    data = enhanced(
        _hu(),
        spacing=SPACING,
        origin=(-5.0, -4.0, 10.0),
        positions=positions,
        per_frame_orientation=mutate is _tilt_one,
    )
    if mutate is not None:
        data = _mutate(data, mutate)
    ready = series_ready([data], world["store"], world["ring"])
    s = Settings(home=world["tmp"], blob_dir=world["tmp"] / "blobs", device="cpu")
    harness = StageHarness(
        build_preprocess(s, world["ring"], CollectorRegistry()), s, world["ring"]
    )
    result = harness.send(ready, key="series")
    (letter,) = result.dead_letters
    assert letter.reason == reason and letter.stage == "preprocess"
    assert ready.series_instance_uid not in letter.message  # no PHI in the dead letter
    assert "PHANTOM" not in letter.message and "MF^TEST" not in letter.message


def test_too_many_frames_are_refused_before_decoding(world: dict[str, Any]) -> None:
    data = enhanced(_hu(z=9), spacing=SPACING, origin=(0.0, 0.0, 0.0))
    core = PreprocessCore(
        world["store"], select_backend("cpu"), PreprocessSettings(max_voxels=8 * 12 * 10)
    )
    ready = series_ready([data], world["store"], world["ring"])
    with pytest.raises(PoisonError) as info:
        core.handle(ready, world["ctx"])
    assert info.value.reason == Reason.VOLUME_TOO_LARGE
    assert "voxels" in info.value.message  # judged on the header: nothing was decoded
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert assemble_frames(frame_geometry(ds)).order == list(range(9))


# ---- SEG and SR over an enhanced source --------------------------------------------------
def test_enhanced_twin_gives_the_same_findings_and_a_seg_on_its_frames(
    world: dict[str, Any],
) -> None:
    tmp: Path = world["tmp"]
    store: BlobStore = world["store"]
    ring: Keyring = world["ring"]
    ctx: Context = world["ctx"]
    chest = phantom.chest_ct(tmp / "c", seed=9, size=128, slices=24, nodules_mm=(10.0, 7.0))
    order = [int(i) for i in np.random.default_rng(5).permutation(24)]
    twin = from_series(chest.files, frame_order=order)
    pre = PreprocessCore(store, select_backend("cpu"), PreprocessSettings())
    seg = SegmentationCore(store, select_backend("cpu"))
    single = seg.handle(pre.handle(series_ready(files(chest.files), store, ring), ctx), ctx)
    multi = seg.handle(pre.handle(series_ready([twin], store, ring), ctx), ctx)
    assert_same_findings(single, multi)
    assert sum(f.type == "nodule" for f in multi.findings) == 2

    (record,) = ResultsCore(store).handle(multi, ctx)
    assert record.not_built is None and record.seg is not None and record.sr is not None
    seg_bytes, sr_bytes = store.get(record.seg), store.get(record.sr)
    assert dciodvfy_errors(seg_bytes, tmp / "mf-seg.dcm") == []
    assert dciodvfy_errors(sr_bytes, tmp / "mf-sr.dcm") == []
    source = pydicom.dcmread(io.BytesIO(twin), stop_before_pixels=True)
    where = {
        k + 1: [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for k, f in enumerate(source.PerFrameFunctionalGroupsSequence)
    }
    sop = source.SOPInstanceUID
    obj = hd.seg.segread(io.BytesIO(seg_bytes))
    assert obj.SOPInstanceUID == record.seg_sop_instance_uid
    # every SEG frame names its source frame, and sits where that frame sits
    for frame in obj.PerFrameFunctionalGroupsSequence:
        (ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == sop
        number = int(ref.ReferencedFrameNumber)
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == (
            pytest.approx(where[number], abs=1e-3)
        )
    # read back by source frame, each segment is the volume's mask at that frame's slice
    masks = unpack_masks(store.get(multi.masks))  # type: ignore[arg-type]
    labels = {str(d.SegmentLabel): int(d.SegmentNumber) for d in obj.SegmentSequence}
    by_frame = obj.get_pixels_by_source_frame(
        source_sop_instance_uid=sop,
        source_frame_numbers=list(range(1, 25)),
        segment_numbers=[labels["Left lung"], labels["Right lung"]],
        assert_missing_frames_are_empty=True,
    ).astype(bool)
    for k, z in enumerate(order):  # file frame k + 1 is volume slice z
        assert np.array_equal(by_frame[k, ..., 0], masks["lung_left"][z])
        assert np.array_equal(by_frame[k, ..., 1], masks["lung_right"][z])
    assert by_frame.any()
    # the SR's groups reference their segment and, as the source images for it, the very
    # frames of the enhanced instance that the segment lies on
    seg_frames: dict[int, set[int]] = {}
    for frame in obj.PerFrameFunctionalGroupsSequence:
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        seg_frames.setdefault(number, set()).add(int(ref.ReferencedFrameNumber))
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(record.segments)
    for group in groups:
        segment, frames_of = _references(group, sop)
        assert segment is not None and frames_of == seg_frames[segment]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    refs = {r.ReferencedSOPInstanceUID for s in evidence for r in s.ReferencedSOPSequence}
    assert sop in refs and record.seg_sop_instance_uid in refs


def _references(group: Any, sop: str) -> tuple[int | None, set[int]]:
    """The segment a measurement group (a sequence of content items) references and the
    frames of ``sop`` it names, anywhere below it."""
    segment: int | None = None
    frames_of: set[int] = set()
    stack = list(group)
    while stack:
        node = stack.pop()
        for ref in node.get("ReferencedSOPSequence", []):
            if "ReferencedSegmentNumber" in ref:
                segment = int(ref.ReferencedSegmentNumber)
            if ref.ReferencedSOPInstanceUID == sop:
                frames_of |= {int(n) for n in _many(ref.get("ReferencedFrameNumber"))}
        stack.extend(node.get("ContentSequence", []))
    return segment, frames_of


def _many(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
