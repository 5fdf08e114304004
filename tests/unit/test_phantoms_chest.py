"""The procedural chest CT phantoms: determinism, truth that agrees with the pixels, partial
volume that moves edges but conserves totals, DICOM round trip, and the lesion-free twin."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi

from shared.dicom.safe import inspect_instance
from shared.phantoms import KINDS, ChestCase, LesionSpec, chest_case, load_truth, write_series
from shared.phantoms.common import Storage

SMALL = {"size": 96, "thickness_mm": 5.0, "tree_points": 1500}


@pytest.fixture(scope="module")
def case() -> ChestCase:
    return chest_case(8, **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clean() -> ChestCase:
    """Noise-free, one lesion of every kind, at a resolution that resolves them."""
    specs = [
        LesionSpec("solid", 12.0, attachment="isolated"),
        LesionSpec("solid", 9.0, attachment="juxtapleural"),
        LesionSpec("solid", 8.0, attachment="juxtavascular"),
        LesionSpec("ground_glass", 14.0),
        LesionSpec("part_solid", 16.0),
        LesionSpec("calcified", 6.0),
        LesionSpec("mass", 40.0, attachment="juxtapleural", invades=False),
    ]
    return chest_case(11, size=160, thickness_mm=2.5, tree_points=2500, lesions=specs, noise=0.0)


def test_same_seed_same_case(case: ChestCase) -> None:
    again = chest_case(8, **SMALL)  # type: ignore[arg-type]
    assert np.array_equal(again.hu, case.hu)
    for key, mask in case.truth.items():
        assert np.array_equal(again.truth[key], mask), key
    assert again.lesions == case.lesions
    other = chest_case(9, **SMALL)  # type: ignore[arg-type]
    assert other.hu.shape[1:] == case.hu.shape[1:]
    assert not np.array_equal(other.hu[: min(len(other.hu), len(case.hu))],
                              case.hu[: min(len(other.hu), len(case.hu))])


def test_geometry_and_types(case: ChestCase) -> None:
    assert case.hu.dtype == np.int16 and case.hu.shape[1:] == (96, 96)
    assert case.spacing[0] == 5.0 and case.spacing[1] == pytest.approx(case.meta["fov_mm"] / 96)
    for key in ("lung_left", "lung_right", "airways"):
        assert case.truth[key].dtype == bool and case.truth[key].shape == case.hu.shape
    assert case.truth["lesions"].dtype == np.int16
    assert not (case.truth["lung_left"] & case.truth["lung_right"]).any()
    vox_ml = np.prod(case.spacing) / 1000
    for side in ("lung_left", "lung_right"):
        ml = case.truth[side].sum() * vox_ml
        assert 800 < ml < 4500, (side, ml)  # adult lungs
    # the left lung is on the patient's left (+x, image right)
    xs = np.nonzero(case.truth["lung_left"])[2].mean(), np.nonzero(case.truth["lung_right"])[2].mean()
    assert xs[0] > xs[1]


def test_tissue_hu_ranges(clean: ChestCase) -> None:
    hu = clean.hu
    lungs = clean.truth["lung_left"] | clean.truth["lung_right"]
    core = ndi.binary_erosion(lungs, iterations=2) & (clean.truth["lesions"] == 0)
    v = hu[core]
    # parenchyma plus vessels: mostly lung density, vessels a minority
    assert -900 < np.median(v) < -700
    assert (v < -500).mean() > 0.8
    # ventral lung less dense than dorsal (dependent density)
    ys = np.nonzero(core)[1]
    front, back = v[ys < np.percentile(ys, 20)], v[ys > np.percentile(ys, 80)]
    assert np.median(front) < np.median(back) - 20
    # bone (ribs, spine) is dense, fat and soft tissue are present in the body
    assert (hu > 400).sum() > 200
    assert ((hu > -130) & (hu < -70)).sum() > 1000
    assert ((hu > 20) & (hu < 80)).sum() > 1000
    # outside the body: air
    assert hu[:, 0, 0].max() <= -900 or clean.storage.padding_hu is not None


def test_lesions_inside_lung_truth_and_described(clean: ChestCase) -> None:
    lab = clean.truth["lesions"]
    lungs = clean.truth["lung_left"] | clean.truth["lung_right"]
    kinds = {les["kind"] for les in clean.lesions}
    assert kinds == set(KINDS), kinds
    assert lab.max() == len(clean.lesions)
    for les in clean.lesions:
        m = lab == les["label"]
        assert m.sum() == les["voxels"] > 0
        if les["invades_chest_wall_mm"] == 0:
            assert (m & lungs).sum() / m.sum() > 0.98, les
        side = clean.truth["lung_" + les["side"]]
        assert (m & side).sum() / m.sum() > 0.9, les
        assert les["attachment"] in ("isolated", "juxtavascular", "juxtapleural", "mediastinal")
        assert les["volume_ml"] == pytest.approx(m.sum() * np.prod(clean.spacing) / 1000, rel=1e-3)
        # size as requested (shapes are lobulated, so within a margin)
        assert 0.7 * les["nominal_diameter_mm"] < les["equivalent_diameter_mm"] < 1.3 * les[
            "nominal_diameter_mm"] + 2, les
        zc, yc, _ = (round(c) for c in les["centroid_voxel"])
        assert 0 <= zc < lab.shape[0] and 0 <= yc < lab.shape[1]
        vals = clean.hu[m]
        if les["kind"] == "calcified":
            assert vals.max() > 300
        elif les["kind"] == "ground_glass":
            assert -800 < np.median(vals) < -300, les
        elif les["kind"] in ("solid", "mass"):  # partial volume lowers the rim on a coarse grid
            assert np.median(vals) > -250 and vals.max() > 0, les
    att = {les["attachment"] for les in clean.lesions if les["kind"] == "solid"}
    assert att == {"isolated", "juxtapleural", "juxtavascular"}


def test_lung_truth_is_lung_like(case: ChestCase) -> None:
    lungs = case.truth["lung_left"] | case.truth["lung_right"]
    assert (case.hu[lungs] < -400).mean() > 0.75
    # voxels of lung density inside the body but outside the lung truth: airways, stomach gas,
    # background outside the body -- not a second lung
    lungish = (case.hu < -600)
    body = ndi.binary_fill_holes(case.hu > -300, structure=np.ones((1, 3, 3)))
    stray = lungish & body & ~lungs & ~case.truth["airways"]
    assert stray.sum() < 0.08 * lungs.sum()


def test_partial_volume_moves_edges_not_totals() -> None:
    spec = [LesionSpec("solid", 12.0, attachment="isolated")]
    thin = chest_case(21, size=96, thickness_mm=1.25, tree_points=1500, lesions=spec, noise=0.0)
    thick = chest_case(21, size=96, thickness_mm=5.0, tree_points=1500, lesions=spec, noise=0.0)
    n = min(len(thick.hu), len(thin.hu) // 4)
    # mean density of each 5 mm slice equals that of its four 1.25 mm slices
    m_thin = thin.hu[: 4 * n].astype(np.float64).reshape(n, 4, 96, 96).mean(axis=(1, 2, 3))
    m_thick = thick.hu[:n].astype(np.float64).mean(axis=(1, 2))
    diff = np.abs(m_thin - m_thick)
    assert np.median(diff) < 4.0 and diff.max() < 15.0
    # the same for the lung and the lesion volumes
    v = [(c.truth["lung_left"] | c.truth["lung_right"]).sum() * np.prod(c.spacing) / 1000
         for c in (thin, thick)]
    assert v[1] == pytest.approx(v[0], rel=0.03)
    assert thick.lesions[0]["volume_ml"] == pytest.approx(thin.lesions[0]["volume_ml"], rel=0.3)
    # but thin structures blur on thick slices (edges change): vessels lose their peak and
    # more lung voxels hold intermediate densities
    stats = []
    for c in (thin, thick):
        lung = (c.truth["lung_left"] | c.truth["lung_right"]) & (c.truth["lesions"] == 0)
        v = c.hu[lung]
        stats.append((np.percentile(v, 99), ((v > -700) & (v < -300)).mean()))
    assert stats[1][0] < stats[0][0] - 20
    assert stats[1][1] > stats[0][1] + 0.01


def test_normal_twin_has_identical_anatomy(case: ChestCase) -> None:
    twin = chest_case(8, **SMALL, normal=True)  # type: ignore[arg-type]
    assert twin.lesions == [] and twin.truth["lesions"].max() == 0
    assert case.lesions, "the seed should have lesions"
    # lesions touch only themselves and their margins (fuzzy edges, spicules up to ~14 mm)
    dist = ndi.distance_transform_edt(case.truth["lesions"] == 0, sampling=case.spacing)
    same = dist > 16.0
    assert np.array_equal(twin.hu[same], case.hu[same])
    for key in ("lung_left", "lung_right", "airways"):
        assert np.array_equal(twin.truth[key][same], case.truth[key][same]), key
    assert not np.array_equal(twin.hu, case.hu)
    none = chest_case(8, **SMALL, lesions="none")  # type: ignore[arg-type]
    assert np.array_equal(none.hu, twin.hu)


@pytest.mark.parametrize("storage", [Storage(False, -1024, None), Storage(True, -1024, -3024)])
def test_dicom_round_trip(case: ChestCase, tmp_path: Path, storage: Storage) -> None:
    c = dataclasses.replace(case, storage=storage)
    files = write_series(c, tmp_path, uid_seed=77)
    assert len(files) == len(c.hu)
    series = set()
    got = {}
    for f in files:
        info = inspect_instance(f.read_bytes())
        assert info.modality == "CT" and info.body_part == "CHEST"
        assert info.slice_thickness == c.spacing[0]
        assert info.pixel_spacing == pytest.approx((c.spacing[1], c.spacing[2]), abs=1e-4)
        series.add(info.series_instance_uid)
        ds = pydicom.dcmread(f)
        assert ds.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert info.position is not None
        got[round(info.position[2], 3)] = hu
        assert "PatientName" in ds and "PHANTOM" in str(ds.PatientName)
    assert len(series) == 1
    zs = sorted(got)
    vol = np.stack([got[z] for z in zs])  # ascending z, as the pipeline sorts
    assert np.array_equal(vol, c.hu.astype(np.int32))
    assert zs[0] == pytest.approx(c.origin[2], abs=1e-3)
    arrays, meta = load_truth(tmp_path)
    assert np.array_equal(arrays["lung_left"], c.truth["lung_left"])
    assert np.array_equal(arrays["lesions"], c.truth["lesions"])
    assert tuple(arrays["spacing"]) == c.spacing
    assert meta["lesions"] == c.lesions
    # other UIDs for another uid_seed, the same pixels
    again = write_series(c, tmp_path / "again", uid_seed=78)
    a = pydicom.dcmread(again[0])
    b = pydicom.dcmread(files[0])
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        chest_case(1, size=64, thickness_mm=20.0)
    with pytest.raises(ValueError):
        chest_case(1, size=64, thickness_mm=5.0, tree_points=500, lesions="some")
    with pytest.raises(ValueError):
        chest_case(1, size=64, thickness_mm=5.0, tree_points=500,
                   lesions=[LesionSpec("tumour", 10.0)])


def test_contrast_enhances_vessels_and_heart() -> None:
    kw = {"size": 96, "thickness_mm": 5.0, "tree_points": 1500, "noise": 0.0, "lesions": "none"}
    plain = chest_case(5, **kw)  # type: ignore[arg-type]
    cta = chest_case(5, contrast=True, **kw)  # type: ignore[arg-type]
    lungs = cta.truth["lung_left"] | cta.truth["lung_right"]
    # blood pool (heart chambers, aorta, pulmonary arteries) moves from ~40 HU to 150-400 HU;
    # bone marrow is in that range in both
    enhanced = [((c.hu > 140) & (c.hu < 600) & ~lungs).sum() for c in (plain, cta)]
    assert enhanced[1] > enhanced[0] + 3000
    blood = [((c.hu > 25) & (c.hu < 70) & ~lungs).sum() for c in (plain, cta)]
    assert blood[1] < blood[0]
    # same anatomy: the lungs do not move
    assert np.array_equal(plain.truth["lung_left"], cta.truth["lung_left"])


def test_random_mix_has_at_most_one_mass() -> None:
    from shared.phantoms.chest import _random_specs
    from shared.phantoms.common import rng_for

    for seed in range(200):
        specs = _random_specs(rng_for(seed, "lesion-mix"))
        assert 1 <= len(specs) <= 5
        assert sum(s.kind == "mass" for s in specs) <= 1
        assert all(s.kind in KINDS for s in specs)
