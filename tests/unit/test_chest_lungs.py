"""Lungs on synthetic worst cases: touching lungs, a table with a foam pad, trachea and main
bronchi, thick slices, a mass on the chest wall, a scan stored feet-first."""

from __future__ import annotations

import numpy as np
import pytest

from services.segmentation.chest import lungs as L
from services.segmentation.chest.pipeline import chest_ct
from services.segmentation.tasks import Geometry
from shared.imaging import segment as seg
from tests import chest_synth as cs

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize(
    "seed,size,thickness,junction",
    [(1, 160, 2.5, 0.0), (2, 128, 5.0, 0.3), (3, 192, 1.25, 0.0)],
)
def test_touching_lungs_split_with_table_and_trachea(
    seed: int, size: int, thickness: float, junction: float
) -> None:
    c = cs.chest(seed=seed, size=size, thickness=thickness, junction_mm=junction, z_mm=220)
    lungs = L.segment_lungs(c.vol, spacing=c.spacing, direction=IDENTITY)
    full = L.full_masks(lungs, c.vol)
    for side in L.SIDES:
        assert dice(full[side], c.truth[side]) >= 0.97, side
    assert lungs.notes["airway_found"] == 1.0
    # the trachea (above the lungs, at the midline) is in no lung
    top = c.vol.shape[0] - 2
    centre = (top, size // 2, size // 2)
    assert c.vol[centre] < -900 and not full["lung_left"][centre] and not full["lung_right"][centre]
    # nothing below the body (table pad, room air) is lung
    below = np.zeros_like(full["lung_left"])
    below[:, int(size * 0.85) :, :] = True
    assert not (full["lung_left"] & below).any() and not (full["lung_right"] & below).any()


def test_lungs_that_touch_along_the_whole_junction_are_parted() -> None:
    c = cs.chest(seed=4, size=128, thickness=2.5, junction_mm=0.0, z_mm=200)
    # force contact: air over the septum wherever both lungs are within 4 mm of the midline
    xs = (np.arange(128) - 63.5) * c.spacing[2]
    both = c.truth["lung_left"] | c.truth["lung_right"]
    band = both.any(axis=2, keepdims=True) & (np.abs(xs) < 4)[None, None, :]
    near = band & (np.roll(both, 3, axis=2) | np.roll(both, -3, axis=2))
    vol = np.where(near, -860.0, c.vol).astype(np.float32)
    lungs = L.segment_lungs(vol, spacing=c.spacing, direction=IDENTITY)
    assert lungs.notes["split_depth_mm"] > 0
    full = L.full_masks(lungs, vol)
    vols = [float(full[s].sum()) for s in L.SIDES]
    assert min(vols) / max(vols) > 0.7
    for side in L.SIDES:
        assert dice(full[side], c.truth[side]) >= 0.95, side


def test_mass_on_the_chest_wall_is_inside_the_search_region() -> None:
    c = cs.chest(seed=5, size=160, thickness=2.5, lesions=(("mass", 50.0),), z_mm=220)
    (mass,) = c.lesions
    lungs = L.segment_lungs(c.vol, spacing=c.spacing, direction=IDENTITY)
    truth = c.truth["lesions"] == mass.label
    search = lungs.grid.expand(lungs.search["lung_left"] | lungs.search["lung_right"], truth.shape)
    # a closing cannot reach the base of a bump wider than its ball: most of the mass is in
    assert (search & truth).sum() >= 0.6 * truth.sum()
    # the heart notch and mediastinum are not swallowed: search is at most 10 % above the lungs
    full = L.full_masks(lungs, c.vol)
    both = full["lung_left"] | full["lung_right"]
    assert search.sum() <= 1.10 * (both | truth).sum()


def test_feet_first_order_and_names_by_patient_side() -> None:
    c = cs.chest(seed=6, size=128, thickness=2.5, z_mm=200)
    flipped = c.vol[::-1].copy()
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    lungs = L.segment_lungs(flipped, spacing=c.spacing, direction=direction)
    full = L.full_masks(lungs, flipped)
    assert lungs.notes["airway_found"] == 1.0
    for side in L.SIDES:
        assert dice(full[side], c.truth[side][::-1]) >= 0.97, side


def _enclose_mattress_and_arm_gaps(vol: np.ndarray, sxy: float) -> tuple[np.ndarray, np.ndarray]:
    """The air a patient lies in that tissue closes around: a 14 mm mattress under the back,
    closed by a table shell and straps that join the body, and a 22 mm gap between each arm
    and the chest, closed by the arms' contact above and below. Both are holes of the body in
    every slice, as in a realistic phantom whose arms are down on a cradle table."""
    from scipy import ndimage as ndi

    out = vol.copy()
    nz, ny, nx = vol.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    pocket = np.zeros(vol.shape, bool)
    for z in range(nz):
        body = seg.largest_components(seg.fill_holes_2d(vol[z] > -500))
        ys, xs = np.nonzero(body)
        cy, cx = ys.mean(), xs.mean()
        half_h, half_w = (ys.max() - ys.min()) / 2, (xs.max() - xs.min()) / 2
        d = ndi.distance_transform_edt(~body) * sxy
        low = yy > cy + 0.35 * half_h
        mattress = (d > 0) & (d <= 14.0) & low
        shell = (d > 14.0) & (d <= 20.0) & low
        strap = (d > 0) & (d <= 20.0) & (np.abs(yy - (cy + 0.35 * half_h)) <= 1.5)
        out[z][mattress] = -880.0
        out[z][shell | strap] = 60.0
        for side in (-1, 1):
            gap = 22.0 / sxy
            ax = cx + side * (half_w + gap + 35.0 / sxy)
            arm = ((xx - ax) / (35.0 / sxy)) ** 2 + ((yy - cy) / (45.0 / sxy)) ** 2 <= 1
            out[z][arm] = 40.0
            between = (np.sign(xx - cx) == side) & ~body & ~arm & (np.abs(yy - cy) < 30.0 / sxy)
            between &= np.abs(xx - cx) < half_w + gap + 36.0 / sxy
            contact = between & (np.abs(np.abs(yy - cy) - 28.0 / sxy) < 2.0 / sxy)
            out[z][contact] = 40.0
            pocket[z] |= between & ~contact & (np.abs(yy - cy) < 26.0 / sxy)
        pocket[z] |= mattress
    return out, pocket


def test_air_enclosed_under_the_back_and_beside_the_arms_is_no_lung() -> None:
    # realistic-phantom seed 30136: a mattress (208 mL) and the gap between an arm and the
    # chest (50 mL) were holes of the body, thicker than 6 mm and as tall as the lungs, and
    # were kept as lung (Dice 0.930); the false "masses" in them paged. With the lungs apart
    # (a 2 mm septum), every other kept piece joins the lung on its side.
    c = cs.chest(
        seed=7, size=192, fov_mm=500.0, thickness=2.5, z_mm=220, table=False, junction_mm=2.0
    )
    vol, pocket = _enclose_mattress_and_arm_gaps(c.vol, c.spacing[1])
    assert pocket.sum() * np.prod(c.spacing) / 1000.0 > 200.0  # mL of enclosed air
    lungs = L.segment_lungs(vol, spacing=c.spacing, direction=IDENTITY)
    assert bool((lungs.grid.expand(lungs.body, vol.shape) & pocket).any())  # inside the body
    full = L.full_masks(lungs, vol)
    both = full["lung_left"] | full["lung_right"]
    assert not (both & pocket).any()
    for side in L.SIDES:
        assert dice(full[side], c.truth[side]) >= 0.97, side
    truth_ml = float((c.truth["lung_left"] | c.truth["lung_right"]).sum()) * np.prod(c.spacing)
    assert lungs.notes["lung_ml"] == pytest.approx(truth_ml / 1000.0, rel=0.05)


def test_a_chest_without_a_lung_deep_enough_reports_none_and_says_so() -> None:
    # a water body with a 9 mm layer of air across it: no lung, no finding, lung_ml 0
    vol = np.full((40, 128, 128), -1000.0, np.float32)
    yy, xx = np.mgrid[0:128, 0:128]
    body = ((yy - 64) / 40) ** 2 + ((xx - 64) / 55) ** 2 <= 1
    vol[:, body] = 40.0
    vol[:, body & (np.abs(yy - 64) < 3) & (np.abs(xx - 64) < 40)] = -850.0
    geo = Geometry((2.5, 1.5, 1.5), (0.0, 0.0, 0.0), IDENTITY)
    result = chest_ct(vol, geo)
    assert result.findings == []
    assert result.params["lung_ml"] == 0.0
    assert not any(m.any() for m in result.masks.values())
