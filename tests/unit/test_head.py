"""Head CT on the procedural set: each bleed shape found with its volume and subtype, normal
heads (calcifications, beam hardening, sinuses) without a bleed, midline shift in mm, masks a
DICOM SEG accepts, the array code within what CuPy implements, the working grid, the traps at
their worst (dense sinuses and falx, posterior-fossa beam hardening), subacute blood, and real
head CTs (a slice, and a whole gantry-tilted head with a craniotomy) clean."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import scipy.ndimage

from services.segmentation import head, tasks
from shared.dicom.seg import Algorithm, build_seg, source_headers
from shared.phantoms.head import BleedSpec, HeadCase, evaluate_head, head_case, write_series

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def analyse(case: HeadCase) -> tasks.TaskResult:
    geo = tasks.Geometry(case.spacing, (0.0, 0.0, 0.0), IDENTITY)
    return head.head_ct(case.hu.astype(np.float32), geo)


def bleeds(res: tasks.TaskResult) -> list[dict[str, Any]]:
    return [f for f in res.findings if f["type"] == "haemorrhage"]


@pytest.mark.parametrize(
    "seed,spec",
    [
        (101, BleedSpec("intraparenchymal", 15.0, side=1, hu=66.0)),
        (102, BleedSpec("subdural", 35.0, side=-1, hu=64.0)),
        (103, BleedSpec("epidural", 25.0, side=1, hu=70.0)),
        (104, BleedSpec("intraparenchymal", 4.0, side=-1, hu=62.0)),
    ],
)
def test_each_bleed_shape_found_with_volume_and_subtype(seed: int, spec: BleedSpec) -> None:
    case = head_case(seed, size=256, bleed=[spec])
    res = analyse(case)
    ev = evaluate_head(case, res)
    (truth,) = ev["bleeds"]
    assert truth["found"], ev
    assert abs(truth["volume_error"]) <= 0.2, ev
    if spec.kind == "epidural":  # lens vs crescent is the weak point: extra-axial at least
        assert truth["subtype"] in ("epidural", "subdural"), ev
    else:
        assert truth["subtype"] == spec.kind, ev
    assert ev["false_bleeds"] == 0, ev
    found = max(bleeds(res), key=lambda f: f["volume_ml"])
    assert found["location"] == ("left" if spec.side == 1 else "right")
    assert 0.5 <= found["confidence"] <= 1.0 and found["features"]
    assert set(head.FEATURES) <= set(found["features"])


@pytest.mark.parametrize(
    "seed,spec,thickness",
    [
        (121, BleedSpec("subdural", 6.0, side=1, hu=64.0), 5.0),
        (122, BleedSpec("epidural", 5.0, side=-1, hu=60.0), 3.0),
    ],
)
def test_thin_extra_axial_collections_along_the_inner_table_are_found(
    seed: int, spec: BleedSpec, thickness: float
) -> None:
    """4-5 mm thin crescents and lenses: every voxel lies within the inner table's partial
    volume zone, where the ordinary seeds are not taken; the extra-axial seeds find them."""
    case = head_case(seed, size=256, thickness_mm=thickness, bleed=[spec])
    res = analyse(case)
    ev = evaluate_head(case, res)
    (truth,) = ev["bleeds"]
    assert truth["found"], ev
    assert truth["subtype"] in ("epidural", "subdural"), ev
    assert ev["false_bleeds"] == 0, ev
    found = max(bleeds(res), key=lambda f: f["volume_ml"])
    assert found["location"] == ("left" if spec.side == 1 else "right")


@pytest.mark.parametrize(
    "seed,first,clot_side",
    [
        (131, BleedSpec("subdural", 15.0, side=1, hu=65.0), -1),
        (132, BleedSpec("epidural", 18.0, side=-1, hu=72.0), -1),
    ],
)
def test_extra_axial_blood_beside_a_large_clot_is_in_the_image_and_found(
    seed: int, first: BleedSpec, clot_side: int
) -> None:
    """An extra-axial collection drawn before a large intraparenchymal clot: the clot's
    oedema rim (a few mm wide) neither covers the collection's blood nor flattens the cortex
    of the hemisphere, so the image holds what the truth says, and both bleeds are found
    (dev seeds 21016 and 21037 lost 15 and 18 mL this way)."""
    clot = BleedSpec("intraparenchymal", 30.0, side=clot_side, hu=62.0)
    case = head_case(seed, size=256, bleed=[first, clot])
    blood = case.hu[case.haemorrhage == 1]
    assert np.median(blood) >= 55, np.percentile(blood, [10, 50, 90])
    ev = evaluate_head(case, analyse(case))
    assert [b["found"] for b in ev["bleeds"]] == [True, True], ev
    assert ev["bleeds"][0]["subtype"] in ("epidural", "subdural"), ev
    assert abs(ev["bleeds"][0]["volume_error"]) <= 0.3, ev
    assert ev["false_bleeds"] == 0, ev


@pytest.mark.parametrize("seed", [201, 202, 203, 204])
def test_normal_heads_with_calcifications_and_beam_hardening_give_no_bleed(seed: int) -> None:
    case = head_case(seed, size=256, bleed="none")
    assert case.calcification.any()  # the traps are there
    res = analyse(case)
    assert bleeds(res) == []
    (shift,) = [f for f in res.findings if f["type"] == "midline_shift"]
    assert shift["shift_mm"] <= 2.0


@pytest.mark.parametrize(
    "seed,spec",
    [(301, BleedSpec("subdural", 60.0, side=1)), (302, BleedSpec("epidural", 40.0, side=-1))],
)
def test_midline_shift_within_2mm_of_truth(seed: int, spec: BleedSpec) -> None:
    case = head_case(seed, size=256, bleed=[spec])
    assert abs(case.midline_shift_mm) >= 4.0  # mass effect pushes away from the blood
    assert np.sign(case.midline_shift_mm) == -spec.side
    ev = evaluate_head(case, analyse(case))
    assert ev["midline_shift_error_mm"] is not None
    assert abs(ev["midline_shift_error_mm"]) <= 2.0, ev


def test_phantom_is_deterministic_and_truth_is_consistent() -> None:
    a = head_case(7, size=192, slices=20, bleed=[BleedSpec("subdural", 20.0, side=1)])
    b = head_case(7, size=192, slices=20, bleed=[BleedSpec("subdural", 20.0, side=1)])
    assert a.hu.dtype == np.int16 and np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.haemorrhage, b.haemorrhage)
    assert not (a.haemorrhage > 0)[~a.brain].any()  # blood is intracranial
    (bl,) = a.bleeds
    assert bl.kind == "subdural" and bl.side == "left"
    counted = (a.haemorrhage == 1).sum() * a.voxel_ml
    assert abs(counted - bl.volume_ml) <= 0.2 * bl.volume_ml  # voxels vs partial volume
    blood = a.hu[a.haemorrhage == 1]
    assert 45 <= np.median(blood) <= 90


def test_evaluate_head_scores_a_perfect_and_an_empty_answer() -> None:
    case = head_case(8, size=128, slices=20, bleed=[BleedSpec("epidural", 20.0, side=1)])
    perfect = types.SimpleNamespace(
        masks={"haemorrhage": case.haemorrhage > 0},
        findings=[{"type": "haemorrhage", "subtype": "epidural", "slice_index": 10}],
    )
    ev = evaluate_head(case, perfect)
    assert ev["found_ge_min"] == ev["bleeds_ge_min"] == 1
    assert ev["false_bleeds"] == 0 and ev["subtype_correct"] == [True]
    assert abs(ev["volume_errors"][0]) <= 0.15
    empty = types.SimpleNamespace(masks={"haemorrhage": np.zeros_like(case.brain)}, findings=[])
    ev = evaluate_head(case, empty)
    assert ev["found_ge_min"] == 0 and ev["midline_shift_error_mm"] is None


def test_masks_make_a_dicom_seg_and_findings_fit_the_schema(tmp_path: Path) -> None:
    from services.segmentation.core import _clean
    from shared.schemas import Finding

    case = head_case(9, size=128, slices=24, bleed=[BleedSpec("intraparenchymal", 20.0)])
    res = analyse(case)
    assert {"brain", "haemorrhage"} <= set(res.masks)
    for m in res.masks.values():
        assert m.shape == case.hu.shape and m.dtype == bool
    files = write_series(case, tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    assert ds.BodyPartExamined == "HEAD" and ds.Rows == 128
    vol = np.stack([pydicom.dcmread(f).pixel_array.astype(np.int32) - 1024 for f in files])
    assert np.array_equal(vol, case.hu)
    seg = build_seg(
        source_headers([f.read_bytes() for f in files]),
        res.masks,
        series_instance_uid=str(ds.SeriesInstanceUID),
        revision=1,
        algorithm=Algorithm("radstream-head_ct", head.VERSION),
    )
    assert pydicom.dcmread(__import__("io").BytesIO(seg)).Modality == "SEG"
    for f in res.findings:
        Finding(**_clean(f))  # strict schema: subtype, location, confidence, features


class _StrictNdimage(types.ModuleType):
    """scipy.ndimage, refusing what cupyx.scipy.ndimage does not implement."""

    def __getattr__(self, name: str) -> Any:
        fn = getattr(scipy.ndimage, name)

        def call(*args: Any, **kw: Any) -> Any:
            if kw.get("iterations", 1) != 1:
                raise NotImplementedError(f"{name}(iterations={kw['iterations']}) on CuPy")
            if "output" in kw:
                raise NotImplementedError(f"{name}(output=...) on CuPy")
            return fn(*args, **kw)

        return call


def test_array_code_stays_within_cupyx(monkeypatch: pytest.MonkeyPatch) -> None:
    strict = _StrictNdimage("strict_ndimage")
    from shared.imaging import segment

    monkeypatch.setattr(head, "namespace", lambda a: (np, strict))
    monkeypatch.setattr(segment, "namespace", lambda a: (np, strict))
    case = head_case(10, size=160, bleed=[BleedSpec("epidural", 30.0, side=1)])
    res = analyse(case)  # raises if a call is outside what CuPy implements
    assert res.masks["haemorrhage"].any() and bleeds(res)


def test_tasks_head_ct_is_the_head_module() -> None:
    assert tasks.head_ct is head.head_ct


def _real_head() -> Path | None:
    try:
        import data_store  # pydicom-data
    except ImportError:
        return None
    path = Path(data_store.__file__).parent / "data" / "693_UNCR.dcm"
    return path if path.exists() else None


@pytest.mark.skipif(_real_head() is None, reason="pydicom-data is not installed")
def test_real_head_ct_slice_has_no_acute_bleed() -> None:
    """A real 512² head CT (5 mm): old hypodense changes and air after surgery, a dense falx
    and skull base, no acute (hyperdense) blood. No bleed may be reported."""
    path = _real_head()
    assert path is not None
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    sp = float(ds.PixelSpacing[0])
    geo = tasks.Geometry((float(ds.SliceThickness), sp, sp), (0.0, 0.0, 0.0), IDENTITY)
    res = head.head_ct(hu[None], geo)
    assert bleeds(res) == []
    (brain,) = [f for f in res.findings if f["type"] == "brain"]
    assert brain["volume_ml"] > 50  # the brain was found (one 5 mm slice)


# ---- the working grid -----------------------------------------------------------------------
def test_grid_pools_blocks_and_unpools_to_the_full_volume() -> None:
    rng = np.random.default_rng(3)
    vol = rng.normal(30, 5, (11, 64, 66)).astype(np.float32)
    vol[:, :, :3] = -1000.0  # air at the edge
    grid = head.Grid.make(vol, (0.5, 0.45, 0.45))
    assert (grid.fz, grid.f) == (3, 2)  # ~1.5 mm slices, ~0.9 mm pixels
    assert grid.spacing == pytest.approx((1.5, 0.9, 0.9))
    lo = grid.pool(vol)
    assert lo.dtype == np.float32 and lo.shape == (4, grid.ny, grid.nx)
    y, x = grid.y0, grid.x0
    block = vol[0:3, y : y + 2, x : x + 2]
    assert lo[0, 0, 0] == pytest.approx(block.mean(), abs=1e-4)
    assert lo[3, 0, 0] == pytest.approx(vol[9:11, y : y + 2, x : x + 2].mean(), abs=1e-4)
    mask = np.zeros(lo.shape, bool)
    mask[3, 0, 0] = True
    full = grid.unpool(mask)
    assert full.shape == vol.shape and full.sum() == 2 * 2 * 2  # the short last block
    assert full[9:11, y : y + 2, x : x + 2].all()
    hu = vol.astype(np.int16)  # any input dtype, no full-size float copy
    np.testing.assert_allclose(grid.pool(hu), grid.pool(hu.astype(np.float32)), atol=1e-4)


@pytest.mark.parametrize("thickness", [0.625])
def test_thin_slices_are_pooled_and_the_bleed_measured(thickness: float) -> None:
    spec = BleedSpec("intraparenchymal", 12.0, side=1, hu=64.0)
    case = head_case(111, size=192, thickness_mm=thickness, slices=120, bleed=[spec])
    res = analyse(case)
    assert res.params["grid"].fz == 2
    ev = evaluate_head(case, res)
    (truth,) = ev["bleeds"]
    assert truth["found"] and abs(truth["volume_error"]) <= 0.2, ev
    assert res.masks["haemorrhage"].shape == case.hu.shape


# ---- the traps at their worst ---------------------------------------------------------------
@pytest.mark.parametrize("seed", [211, 212])
def test_dense_venous_sinuses_and_a_dense_falx_raise_nothing(seed: int) -> None:
    """Sinuses at 75 HU (haemoconcentration) and a 62 HU falx: denser than many bleeds."""
    case = head_case(seed, size=256, bleed="none", anatomy={"sinus_hu": 75.0, "falx_hu": 62.0})
    res = analyse(case)
    assert bleeds(res) == []
    (shift,) = [f for f in res.findings if f["type"] == "midline_shift"]
    assert shift["shift_mm"] is None or shift["shift_mm"] <= 2.0


@pytest.mark.parametrize("seed", [221, 222])
def test_posterior_fossa_beam_hardening_raises_nothing(seed: int) -> None:
    """The strongest dark band between the petrous bones, with bright overshoot, and eight
    +-45 HU streaks from the petrous apices and the occipital protuberance; noisy 2.5 mm."""
    streaks = [(k % 3, 0.4 * k, 45.0 if k % 2 else -45.0, 1.5) for k in range(8)]
    case = head_case(
        seed,
        size=256,
        thickness_mm=2.5,
        bleed="none",
        anatomy={"bar_hu": 45.0, "streaks": streaks, "noise": 5.5},
    )
    assert (case.hu[: case.hu.shape[0] // 3] > 1500).any()  # the petrous bones are in the scan
    assert bleeds(analyse(case)) == []


# ---- real heads -----------------------------------------------------------------------------
def _invesalius() -> Any:
    from shared.evaluation import realdata

    if not realdata.available("invesalius-head"):
        return None
    return realdata.load("invesalius-head")


@pytest.mark.skipif(_invesalius() is None, reason="make setup has not fetched the real head")
def test_real_head_brain_no_bleed_and_midline() -> None:
    """A real adult head (InVesalius example: 256² x 108, 0.96/1.5 mm, gantry-tilted, head
    holder in the field, an old right frontal craniotomy with encephalomalacia): the brain of
    an adult, the skull defect not taken for brain or blood, no bleed, the midline measured
    from the falx with at most a small shift."""
    from services.preprocess.core import DEFAULT_CHAINS, apply_step, chain_for

    case = _invesalius()
    img: Any = case.hu.astype(np.float32)
    spacing = case.spacing
    for step in chain_for("CT", "HEAD", DEFAULT_CHAINS):  # what the service reads
        img, spacing = apply_step(img, step, spacing)
    vol = np.rint(np.asarray(img)).astype(np.float32)
    res = head.head_ct(vol, tasks.Geometry(spacing, (0.0, 0.0, 0.0), IDENTITY))
    (brain,) = [f for f in res.findings if f["type"] == "brain"]
    assert 1100.0 <= brain["volume_ml"] <= 1700.0, brain
    assert res.params["defect_slices"] > 0  # the craniotomy: closed by the hull, not by brain
    assert bleeds(res) == []
    assert not res.masks["haemorrhage"].any()
    (shift,) = [f for f in res.findings if f["type"] == "midline_shift"]
    assert "falx" in shift["label"] or shift["shift_mm"] is None, shift
    assert shift["shift_mm"] is None or shift["shift_mm"] <= 4.0, shift
    # the brain stays inside the head: nothing in the top or bottom rows (holder, table)
    rows = np.nonzero(res.masks["brain"].any(axis=(0, 2)))[0]
    assert rows.min() > 10 and rows.max() < vol.shape[1] - 10
