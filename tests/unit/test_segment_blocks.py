"""The classical blocks against scikit-image / SciPy references."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from skimage import filters

from shared.imaging import segment as seg

RNG = np.random.default_rng(1)


def test_otsu_matches_scikit_image() -> None:
    img = np.concatenate([RNG.normal(-800, 40, 5000), RNG.normal(40, 30, 5000)]).astype(np.float32)
    assert abs(seg.otsu(img, bins=256) - filters.threshold_otsu(img, nbins=256)) < 8.0


def test_fill_holes_2d_equals_per_slice_scipy() -> None:
    mask = RNG.random((6, 40, 40)) > 0.35
    mask = ndi.binary_opening(mask)
    expected = np.stack([ndi.binary_fill_holes(m) for m in mask])
    np.testing.assert_array_equal(seg.fill_holes_2d(mask), expected)


def test_region_growing_is_the_seeded_component_in_range() -> None:
    img = np.zeros((5, 30, 30), np.float32)
    img[1:4, 5:12, 5:12] = 50
    img[1:4, 20:25, 20:25] = 50
    grown = seg.region_grow(img, seed=(2, 8, 8), low=40, high=60)
    assert grown.sum() == 3 * 7 * 7 and not grown[2, 22, 22]
    assert not seg.region_grow(img, seed=(0, 0, 0), low=40, high=60).any()


def test_largest_components_and_border_touching() -> None:
    mask = np.zeros((4, 50, 50), bool)
    mask[:, 5:25, 5:25] = True  # large
    mask[:, 30:35, 30:35] = True  # small
    mask[:, 45:50, 0:5] = True  # touches the border
    big = seg.largest_components(mask, count=1)
    assert big.sum() == 4 * 20 * 20
    labels, n = seg.label(mask)
    border = seg.touches_border(labels, n)
    assert border.sum() == 1 and border[labels[0, 47, 2]]


def test_kmeans_recovers_tissue_classes() -> None:
    values = np.concatenate(
        [RNG.normal(-850, 20, 3000), RNG.normal(-100, 20, 3000), RNG.normal(40, 15, 3000)]
    )
    centers, labels = seg.kmeans_1d(values.astype(np.float32), k=3)
    assert np.allclose(centers, [-850, -100, 40], atol=10)
    assert (labels[:3000] == 0).mean() > 0.99 and (labels[-3000:] == 2).mean() > 0.99


def test_canny_edges_and_external_contours_of_a_disc() -> None:
    y, x = np.mgrid[0:64, 0:64]
    disc = ((y - 32) ** 2 + (x - 32) ** 2 <= 15**2).astype(np.float32) * 100
    edges = seg.canny(disc, sigma=1.5)
    ring = np.hypot(*np.nonzero(edges)[::-1] - np.array([[32], [32]]))
    assert edges.sum() > 60 and np.abs(ring - 15).max() < 2.5
    (contour,) = seg.external_contours(disc > 50)
    assert abs(np.hypot(contour[:, 0] - 32, contour[:, 1] - 32).mean() - 15) < 1.0


def test_morphology_and_threshold() -> None:
    mask = np.zeros((3, 20, 20), bool)
    mask[:, 5:15, 5:15] = True
    mask[1, 2, 2] = True  # speck
    opened = seg.opening(mask, iterations=1)
    assert not opened[1, 2, 2] and opened[1, 10, 10]
    assert seg.closing(mask, iterations=1)[1, 10, 10]
    img = np.linspace(-1000, 1000, 100)
    assert seg.threshold(img, low=-100, high=100).sum() == 10


def test_edt_in_plane_equals_per_slice_scipy_with_the_border_as_background() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((5, 40, 50)) > 0.2
    mask[2] = True  # a full slice: its distances come from the border, never from z
    got = seg.edt_in_plane(mask, (2.5, 0.7, 0.9))
    for z in range(mask.shape[0]):
        want = ndi.distance_transform_edt(np.pad(mask[z], 1), sampling=(0.7, 0.9))[1:-1, 1:-1]
        np.testing.assert_allclose(got[z], want, rtol=0, atol=1e-9)
