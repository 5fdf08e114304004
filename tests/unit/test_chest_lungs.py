"""Lungs on synthetic worst cases: touching lungs, a table with a foam pad, trachea and main
bronchi, thick slices, a mass on the chest wall, a scan stored feet-first."""

from __future__ import annotations

import numpy as np
import pytest

from services.segmentation.chest import lungs as L
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
