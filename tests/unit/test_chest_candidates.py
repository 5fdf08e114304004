"""Candidates: Hessian blob-vs-tube-vs-plate, every lesion kind seeded and segmented on a
synthetic chest with a vessel tree, and the features a classifier reads."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.ndimage as ndi

from services.segmentation.chest import candidates as C
from services.segmentation.chest.features import FEATURES
from services.segmentation.chest.pipeline import analyse
from services.segmentation.tasks import Geometry
from tests import chest_synth as cs

SP = (1.0, 1.0, 1.0)


def _shape(kind: str, r: float = 4.0, n: int = 41) -> np.ndarray:
    zz, yy, xx = np.mgrid[:n, :n, :n] - n // 2
    if kind == "sphere":
        m = zz**2 + yy**2 + xx**2 <= r * r
    elif kind == "tube":
        m = yy**2 + xx**2 <= r * r
    else:  # plate
        m = np.abs(xx) <= r
    return np.where(m, 40.0, -850.0).astype(np.float32)


@pytest.mark.parametrize("r", [2.0, 4.0])
def test_dot_filter_prefers_blobs_to_tubes_and_plates(r: float) -> None:
    sigma = r / np.sqrt(3)
    c = np.array([[20, 20, 20]])
    score = {}
    for kind in ("sphere", "tube", "plate"):
        g = ndi.gaussian_filter(_shape(kind, r), sigma)
        eig = np.linalg.eigvalsh(C.hessian_at(g, c, SP) * sigma**2)
        score[kind] = float(C.dot_score(eig)[0])
    assert score["sphere"] > 50
    assert score["tube"] < 0.05 * score["sphere"] and score["plate"] < 0.05 * score["sphere"]


def test_a_nodule_centred_on_a_vessel_passes_the_coarse_score_and_the_vessel_does_not() -> None:
    """2.8.0: an 8 mm nodule centred on a 6 mm vessel, on a 3 mm grid (the pyramid's level 1)
    smoothed at its scale, has one flat direction (along the vessel): it scores 6-12, under
    2.7's coarse threshold of 12 (an unseen phantom's 8.2 mm juxtavascular nodule had no seed
    at all), over 2.8's 6. The straight vessel alone scores about 0 (a bend scores ~40 at
    either threshold: the classifier, not the seed stage, rejects bends)."""
    n, f, sigma = 81, 3, 2.6
    zz, yy, xx = np.mgrid[:n, :n, :n] - n // 2
    sp = (float(f),) * 3

    def coarse_dot(img: np.ndarray, at: tuple[int, int, int]) -> float:
        m = n // f * f
        lv = img[:m, :m, :m].reshape(n // f, f, n // f, f, n // f, f).mean(axis=(1, 3, 5))
        g = C._gaussian(np.minimum(lv, np.float32(100.0)), sigma, sp)
        q = np.array([[v // f for v in at]])
        return float(C.dot_score(np.linalg.eigvalsh(C.hessian_at(g, q, sp) * sigma**2))[0])

    vessel = yy**2 + xx**2 <= 3.0**2
    nodule = zz**2 + yy**2 + xx**2 <= 4.0**2
    img = np.where(vessel, 100.0, -850.0).astype(np.float32)
    alone = coarse_dot(img, (n // 2,) * 3)
    img[nodule] = 80.0
    on = coarse_dot(img, (n // 2,) * 3)
    default = inspect.signature(C.blob_seeds).parameters["coarse_score"].default
    assert default <= on < 12.0, on
    assert alone < 0.1 * default, alone


def _distances(an, geo, centre):  # type: ignore[no-untyped-def]
    """Each candidate's distance (mm) from ``centre`` (patient mm)."""
    return [np.linalg.norm(np.array(geo.to_patient(c.centroid)) - centre) for c in an.candidates]


def _analysed(lesions):  # type: ignore[no-untyped-def]
    """The candidate stage on the synthetic chest of seed 3 (192², 1.25 mm) with ``lesions``."""
    case = cs.chest(seed=3, size=192, thickness=1.25, z_mm=220, lesions=lesions)
    geo = Geometry(case.spacing, case.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return case, geo, analyse(case.vol, geo)


def _nearest(an, geo, centre):  # type: ignore[no-untyped-def]
    d = _distances(an, geo, centre)
    k = int(np.argmin(d))
    return an.candidates[k], d[k]


def test_every_lesion_kind_is_a_candidate_and_is_measured() -> None:
    lesions = (
        ("solid", 8.0),
        ("juxtavascular", 7.0),
        ("juxtapleural", 10.0),
        ("ground_glass", 12.0),
        ("calcified", 5.0),
        ("mass", 45.0),
        ("solid", 20.0),
    )
    case, geo, an = _analysed(lesions)
    assert 0 < len(an.candidates) <= 150
    for les in case.lesions:
        cand, dist = _nearest(an, geo, np.array(les.centre_mm))
        assert dist <= max(les.diameter_mm / 2, 3.0), (les.kind, les.diameter_mm, dist)
        assert set(cand.features) == set(FEATURES)
        if les.kind in ("solid", "juxtavascular"):
            assert abs(cand.features["diameter_mm"] - les.diameter_mm) <= 0.25 * les.diameter_mm + 1
        if les.kind == "calcified":
            assert cand.features["max_hu"] > 200
        if les.kind == "ground_glass":
            assert -800 < cand.features["mean_hu"] < -300
        if les.kind == "mass":
            assert cand.features["diameter_mm"] >= 25 and cand.features["wall_frac"] > 0


def test_a_normal_chest_has_few_candidates_and_none_look_like_large_nodules() -> None:
    case = cs.chest(seed=8, size=160, thickness=2.5, z_mm=220, lesions=())
    geo = Geometry(case.spacing, case.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    an = analyse(case.vol, geo)
    interior = [
        c
        for c in an.candidates
        if c.seed.source == "blob"
        and c.features["dist_pleura_mm"] > 10
        and c.features["diameter_mm"] >= 6
    ]
    # vessels survive as elongated or cut-away candidates, never as round isolated blobs
    assert all(c.features["cut_frac"] > 0.2 or c.features["elongation"] < 0.6 for c in interior)


def test_a_nodule_on_contrast_enhanced_vessels_has_a_candidate_of_its_own() -> None:
    """Enhanced vessels (250 HU) are brighter than a nodule (~40 HU): the blob pass clips
    solid tissue, so the nodule's own peak is found and segmented, not the vessel's."""
    case = cs.chest(
        seed=5, size=192, thickness=1.25, z_mm=220, contrast=True, lesions=(("juxtavascular", 9.0),)
    )
    geo = Geometry(case.spacing, case.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    an = analyse(case.vol, geo)
    (les,) = case.lesions
    cand, dist = _nearest(an, geo, np.array(les.centre_mm))
    assert dist <= max(les.diameter_mm / 2, 3.0)
    assert abs(cand.features["diameter_mm"] - les.diameter_mm) <= 0.4 * les.diameter_mm + 1


def test_a_juxtapleural_nodule_is_segmented_whole_not_cut_at_the_coarse_search_region() -> None:
    # the search region comes from a ~4 mm grid and the pyramid's image is dark outside it:
    # segmented there, a nodule on the pleura lost the base of its dome (a 10 mm nodule came
    # out 3 mm, a 14 mm one 6 mm); the lung closed at the crop's own resolution keeps it
    lesions = (
        ("juxtapleural", 8.0),
        ("juxtapleural", 10.0),
        ("juxtapleural", 14.0),
        ("solid", 8.0),
    )
    case, geo, an = _analysed(lesions)
    for les in case.lesions[:3]:
        near = zip(an.candidates, _distances(an, geo, np.array(les.centre_mm)), strict=True)
        on = [c.features["diameter_mm"] for c, d in near if d <= max(les.diameter_mm / 2, 3.0)]
        assert on, les.diameter_mm
        # part of the sphere lies in the chest wall: the lung side is most of it
        assert 0.65 * les.diameter_mm <= max(on) <= 1.2 * les.diameter_mm, (les.diameter_mm, on)
