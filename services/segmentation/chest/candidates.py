"""Nodule and mass candidates: multi-scale blob detection with vessel suppression, plus pleural
concavities.

* **Blobs.** A Gaussian pyramid of the lung box (~1.3 mm, ~2.6 mm, ~5 mm, ~10 mm grids; two
  scales per level, sigma 1.2-16 mm, i.e. blob diameters ~4-55 mm). At each scale the
  intensity peaks inside the search region are found, and the Hessian is evaluated *only there*
  (finite differences at the peaks, not over the volume). A blob has three negative
  eigenvalues of similar size; a vessel has one near zero (tube), a fissure or wall two (plate).
  The score is Li, Sone and Doi's dot enhancement ``|l3|^2/|l1|`` (``l1 <= l2 <= l3 < 0``),
  scale-normalised by ``sigma^2``. Peaks are kept at half the threshold of solid tissue for
  ground glass (peak > -750 HU).
* **Pleural concavities.** What the lung's closing adds (the search region minus the lung)
  that is denser than lung: juxtapleural nodules and pleural-based masses, which a blob filter
  misses because the chest wall is as bright as they are.

Seeds closer than their radius are merged (strongest first) and capped at ``max_seeds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.segmentation.chest.grid import Box, Grid, bbox, factors_for, host
from services.segmentation.chest.lungs import SIDES, Lungs
from shared.imaging import segment as seg
from shared.imaging.backend import namespace

# (grid target mm, sigmas in mm)
LEVELS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (1.3, (1.2, 1.8)),
    (2.6, (2.6, 3.8)),
    (5.0, (5.5, 8.0)),
    (10.0, (11.0, 16.0)),
)


@dataclass
class Seed:
    zyx: tuple[float, float, float]  # continuous full-resolution index
    radius_mm: float  # estimated lesion radius
    source: str  # "blob" or "pleural"
    score: float  # scale-normalised dot response (pleural: contrast)
    sigma_mm: float
    eig: tuple[float, float, float]  # sigma^2-normalised Hessian eigenvalues, l1 <= l2 <= l3
    peak_hu: float  # smoothed intensity at the seed
    side: str


def resample_mask(mask: Any, src: Grid, dst: Grid) -> Any:
    """Nearest-neighbour resampling of a mask on grid ``src`` to grid ``dst`` (same scan)."""
    xp, _ = namespace(mask)
    idx = []
    for a in range(3):
        centres = dst.box[a].start + (xp.arange(dst.shape[a]) + 0.5) * dst.factors[a]
        i = xp.floor((centres - src.box[a].start) / src.factors[a]).astype(xp.int64)
        idx.append(xp.clip(i, 0, src.shape[a] - 1))
    out = mask[idx[0]][:, idx[1]][:, :, idx[2]]
    return out


def _gaussian(img: Any, sigma_mm: float, spacing: tuple[float, float, float]) -> Any:
    _, ndi = namespace(img)
    return ndi.gaussian_filter(img, sigma=[sigma_mm / s for s in spacing], mode="nearest")


def hessian_at(g: Any, pts: Any, spacing: tuple[float, float, float]) -> np.ndarray:
    """Hessians (n, 3, 3) of image ``g`` at integer points ``pts`` (n, 3), central differences
    (only the points' neighbours are read). Downloaded: n x 6 numbers."""
    xp, _ = namespace(g)
    shape = g.shape
    z, y, x = pts[:, 0], pts[:, 1], pts[:, 2]

    def at(dz: int, dy: int, dx: int) -> Any:
        return g[
            xp.clip(z + dz, 0, shape[0] - 1),
            xp.clip(y + dy, 0, shape[1] - 1),
            xp.clip(x + dx, 0, shape[2] - 1),
        ]

    c = at(0, 0, 0)
    sz, sy, sx = spacing
    hzz = (at(1, 0, 0) - 2 * c + at(-1, 0, 0)) / (sz * sz)
    hyy = (at(0, 1, 0) - 2 * c + at(0, -1, 0)) / (sy * sy)
    hxx = (at(0, 0, 1) - 2 * c + at(0, 0, -1)) / (sx * sx)
    hzy = (at(1, 1, 0) - at(1, -1, 0) - at(-1, 1, 0) + at(-1, -1, 0)) / (4 * sz * sy)
    hzx = (at(1, 0, 1) - at(1, 0, -1) - at(-1, 0, 1) + at(-1, 0, -1)) / (4 * sz * sx)
    hyx = (at(0, 1, 1) - at(0, 1, -1) - at(0, -1, 1) + at(0, -1, -1)) / (4 * sy * sx)
    six = host(xp.stack([hzz, hyy, hxx, hzy, hzx, hyx], axis=1)).astype(np.float64)
    h = np.empty((six.shape[0], 3, 3))
    h[:, 0, 0], h[:, 1, 1], h[:, 2, 2] = six[:, 0], six[:, 1], six[:, 2]
    h[:, 0, 1] = h[:, 1, 0] = six[:, 3]
    h[:, 0, 2] = h[:, 2, 0] = six[:, 4]
    h[:, 1, 2] = h[:, 2, 1] = six[:, 5]
    return h


def dot_score(eig: np.ndarray) -> np.ndarray:
    """Li-Sone-Doi dot enhancement |l3|^2/|l1| where all three eigenvalues are negative."""
    l1, l3 = eig[:, 0], eig[:, 2]
    ok = l3 < 0
    out = np.zeros(eig.shape[0])
    out[ok] = l3[ok] ** 2 / np.maximum(-l1[ok], 1e-9)
    return out


def lung_box(lungs: Lungs, shape: tuple[int, ...]) -> Box | None:
    """Full-resolution box of both search regions."""
    both = lungs.search[SIDES[0]] | lungs.search[SIDES[1]]
    b = bbox(both, pad=(1, 1, 1))
    if b is None:
        return None
    g = lungs.grid
    return tuple(  # type: ignore[return-value]
        slice(s.start * f, n if s.stop >= gn else min(n, s.stop * f))
        for s, f, n, gn in zip(b, g.factors, shape, g.shape, strict=True)
    )


@dataclass
class Pyramid:
    grids: list[Grid]
    images: list[Any]  # the scan; outside the search region set to lung (-850 HU)
    search: list[Any]  # union of both sides' search regions on each level
    deep: Any  # level 0: more than ~3 voxels inside the search region
    side: list[Any]  # int8: 1 left, 2 right, 0 none (level 0 only used)


def pyramid(vol: Any, lungs: Lungs, box: Box, spacing: tuple[float, float, float]) -> Pyramid:
    xp, ndi = namespace(vol)
    grids, images, search, side = [], [], [], []
    both = lungs.search[SIDES[0]] | lungs.search[SIDES[1]]
    sides = lungs.search[SIDES[0]].astype(xp.int8) + 2 * lungs.search[SIDES[1]].astype(xp.int8)
    prev_img = None
    prev_grid: Grid | None = None
    deep = None
    for target, _sig in LEVELS:
        f = factors_for(spacing, target)
        if prev_grid is None:
            g = Grid.over(box, f, spacing)
            img = g.reduce(vol)
            # outside the search region is lung-dark: a nodule on the chest wall becomes an
            # isolated half-blob, the wall itself a plate (rejected by the Hessian test)
            inner = ndi.binary_erosion(resample_mask(both, lungs.grid, g))
            img = xp.where(inner, img, xp.float32(-850.0))
            deep = inner
            for _ in range(2):
                deep = ndi.binary_erosion(deep)
        else:
            rel = tuple(max(1, round(a / b)) for a, b in zip(f, prev_grid.factors, strict=True))
            assert prev_img is not None
            local = Grid.over(
                (
                    slice(0, prev_img.shape[0]),
                    slice(0, prev_img.shape[1]),
                    slice(0, prev_img.shape[2]),
                ),
                (rel[0], rel[1], rel[2]),
                prev_grid.spacing,
            )
            img = local.reduce(prev_img)
            g = Grid(
                prev_grid.box,
                tuple(a * b for a, b in zip(prev_grid.factors, rel, strict=True)),  # type: ignore[arg-type]
                local.spacing,
                local.shape,
            )
        grids.append(g)
        images.append(img)
        search.append(resample_mask(both, lungs.grid, g))
        side.append(resample_mask(sides, lungs.grid, g))
        prev_img, prev_grid = img, g
    return Pyramid(grids, images, search, deep, side)


def blob_seeds(
    pyr: Pyramid,
    *,
    min_peak_hu: float = -750.0,
    min_score: float = 25.0,
    coarse_score: float = 6.0,
    faint_hu: float = -450.0,
    min_faint_score: float = 8.0,
    min_opened_score: float = 2.5,
    solid_hu: float = 100.0,
    per_scale: int = 400,
) -> list[Seed]:
    """Blob seeds over the pyramid. A second, *faint* pass on levels 1-2 looks at the scan
    with everything denser than ``faint_hu`` replaced by lung: a ground-glass nodule crossed
    by a vessel then has its own peak, found at a lower score threshold; its seeds compete in
    their own budget (``merge_seeds``). Levels above the finest pass at ``coarse_score``: a
    spiculated or ellipsoidal nodule on vessels (eigenvalues -140, -80, -40) scores ~12, a
    nodule centred on a vessel nearly as thick 6-12 (one flat direction, along the vessel; an
    8.2 mm juxtavascular nodule had no seed under 2.7's 12), a straight vessel ~0; the coarse
    grids hold few noise peaks and ``merge_seeds`` bounds the seeds."""
    xp, _ = namespace(pyr.images[0])
    seeds: list[Seed] = []
    for level, ((_target, sigmas), g, img, srch, side) in enumerate(
        zip(LEVELS, pyr.grids, pyr.images, pyr.search, pyr.side, strict=True)
    ):
        if min(img.shape) < 3:
            continue
        # solid tissue clipped at soft tissue: contrast-enhanced vessels, calcium and metal
        # are no brighter than a nodule, so a nodule on an enhanced vessel keeps its own peak
        # (the vessel's brightness no longer pulls the maximum onto it)
        passes: list[tuple[Any, float | None]] = [(xp.minimum(img, xp.float32(solid_hu)), None)]
        if level in (1, 2):
            # solid tissue clipped to the ground-glass ceiling, then a grey opening with a
            # 3-voxel cube (min then max filter): vessels thinner than that are gone, a
            # ground-glass nodule (wider) stays, without the holes the vessels crossing it
            # would leave if they were replaced by lung
            _, ndi = namespace(img)
            faint = ndi.grey_opening(xp.minimum(img, xp.float32(faint_hu)), size=(3, 3, 3))
            passes.append((faint, faint_hu))
        for image, clip in passes:
            for sigma in sigmas:
                if sigma < 0.8 * min(g.spacing[1:]):
                    continue
                seeds += _scan(
                    pyr,
                    g,
                    image,
                    srch,
                    side,
                    sigma,
                    original=img,
                    low=min_peak_hu,
                    high=clip,
                    min_score=(min_score if level == 0 else coarse_score)
                    if clip is None
                    else min_opened_score,
                    per_scale=per_scale,
                    faint_hu=faint_hu,
                    min_faint_score=min_faint_score if clip is None else min_opened_score,
                )
    return seeds


def _scan(
    pyr: Pyramid,
    g: Grid,
    img: Any,
    srch: Any,
    side: Any,
    sigma: float,
    *,
    original: Any,
    low: float,
    high: float | None,
    min_score: float,
    per_scale: int,
    faint_hu: float,
    min_faint_score: float,
) -> list[Seed]:
    xp, ndi = namespace(img)
    gs = _gaussian(img, sigma, g.spacing)
    peaks = (ndi.maximum_filter(gs, size=3) == gs) & srch & (gs > low)
    if high is not None:  # faint pass: plateaus of clipped tissue are no peaks
        peaks &= gs < high - 30.0
    pts = xp.argwhere(peaks)
    n = int(pts.shape[0])
    if n == 0:
        return []
    vals = gs[pts[:, 0], pts[:, 1], pts[:, 2]]
    if n > 4 * per_scale:  # brightest first: bounded work on noisy scans
        # stable: tied peaks keep their scan order on either backend (CuPy sorts only stably,
        # NumPy's default does not; the two kept different tied peaks, 2.8.0)
        keep = xp.argsort(-vals, kind="stable")[: 4 * per_scale]
        pts, vals = pts[keep], vals[keep]
    if high is not None:
        # faint pass: the scan itself must be faint there (not the inside of a solid lesion
        # whose partial-volume rim made a faint shell): mean of the 27 neighbours
        acc = xp.zeros(pts.shape[0], dtype=xp.float32)
        for dz in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    acc += original[
                        xp.clip(pts[:, 0] + dz, 0, original.shape[0] - 1),
                        xp.clip(pts[:, 1] + dy, 0, original.shape[1] - 1),
                        xp.clip(pts[:, 2] + dx, 0, original.shape[2] - 1),
                    ]
        keep = xp.flatnonzero(acc / 27.0 < high)
        if int(keep.shape[0]) == 0:
            return []
        pts, vals = pts[keep], vals[keep]
    h = hessian_at(gs, pts, g.spacing) * sigma**2
    eig = np.linalg.eigvalsh(h)  # ascending: l1 <= l2 <= l3
    score = dot_score(eig)
    vals_all = host(vals)
    # faint peaks (ground glass: ~4x less contrast than solid tissue) pass at a lower score
    faint = vals_all < faint_hu
    ok = np.flatnonzero((score >= min_score) | (faint & (score >= min_faint_score)))
    if ok.size > per_scale:
        ok = ok[np.argsort(-score[ok], kind="stable")[:per_scale]]
    if ok.size == 0:
        return []
    pts_h = host(pts[xp.asarray(ok)])
    vals_h = vals_all[ok]
    sides_h = host(side[tuple(xp.asarray(pts_h[:, a]) for a in range(3))])
    g0 = pyr.grids[0]
    at0 = [
        np.clip(
            ((g.box[a].start + (pts_h[:, a] + 0.5) * g.factors[a]) - g0.box[a].start)
            // g0.factors[a],
            0,
            g0.shape[a] - 1,
        ).astype(np.int64)
        for a in range(3)
    ]
    deep_h = host(pyr.deep[tuple(xp.asarray(v) for v in at0)])
    out = []
    for k, i in enumerate(ok):
        zyx = g.to_full((float(pts_h[k, 0]), float(pts_h[k, 1]), float(pts_h[k, 2])))
        if not bool(deep_h[k]):
            source = "blob_edge"
        elif high is not None:
            source = "blob_ggo"
        elif vals_h[k] < faint_hu and max(g.spacing[1:]) < 3.0:
            source = "blob_faint"
        else:
            source = "blob"
        out.append(
            Seed(
                zyx,
                sigma * math.sqrt(3.0),
                source,
                float(score[i]),
                sigma,
                (float(eig[i, 0]), float(eig[i, 1]), float(eig[i, 2])),
                float(vals_h[k]),
                _side_name(int(sides_h[k])),
            )
        )
    return out


def _side_name(code: int) -> str:
    return {1: SIDES[0], 2: SIDES[1]}.get(code, "")


def pleural_seeds(
    lungs: Lungs, *, min_hu: float = -500.0, min_ml: float = 0.04, per_side: int = 30
) -> list[Seed]:
    """Components of the pleural concavities (search minus lung) denser than ``min_hu``, the
    ``per_side`` largest per lung."""
    xp, _ = namespace(lungs.low)
    g = lungs.grid
    vox_ml = g.spacing[0] * g.spacing[1] * g.spacing[2] / 1000.0
    seeds: list[Seed] = []
    for name in SIDES:
        box = bbox(lungs.search[name])
        if box is None:
            continue
        low = lungs.low[box]
        added = lungs.search[name][box] & ~lungs.masks[name][box] & (low > min_hu)
        labels, n = seg.label(added)
        if n == 0:
            continue
        flat = labels.ravel()
        sizes = host(xp.bincount(flat, minlength=n + 1)).astype(np.float64)
        sizes[0] = 0
        ranked = np.argsort(sizes, kind="stable")[::-1][:per_side]  # ties: the same everywhere
        big = [int(i) for i in ranked if sizes[i] * vox_ml >= min_ml]
        if not big:
            continue
        coords = [
            host(
                xp.bincount(
                    flat,
                    weights=xp.broadcast_to(
                        xp.arange(labels.shape[a], dtype=xp.float32).reshape(
                            [-1 if b == a else 1 for b in range(3)]
                        ),
                        labels.shape,
                    ).ravel(),
                    minlength=n + 1,
                )
            )
            for a in range(3)
        ]
        means = host(xp.bincount(flat, weights=low.ravel(), minlength=n + 1))
        for lab in big:
            ml = sizes[lab] * vox_ml
            c = tuple(coords[a][lab] / sizes[lab] + box[a].start for a in range(3))
            r = (3 * ml * 1000 / (4 * math.pi)) ** (1 / 3)
            seeds.append(
                Seed(
                    g.to_full((c[0], c[1], c[2])),
                    max(2.0, 1.4 * r),
                    "pleural",
                    float(ml),
                    0.0,
                    (0.0, 0.0, 0.0),
                    float(means[lab] / sizes[lab]),
                    name,
                )
            )
    return seeds


def wall_seeds(
    lungs: Lungs, *, min_hu: float = -500.0, min_depth_mm: float = 2.8, per_side: int = 40
) -> list[Seed]:
    """Broad-based lesions on the wall: the thickest points of the dense part of the pleural
    concavities (distance-transform maxima of search minus lung, denser than ``min_hu``). A
    nodule bulging from the pleura into the lung is a local maximum of that thickness
    wherever its concavity connects to (the thin rims along the rest of the wall do not
    move its maximum, unlike a component's centroid)."""
    xp, ndi = namespace(lungs.low)
    g = lungs.grid
    seeds: list[Seed] = []
    for name in SIDES:
        box = bbox(lungs.search[name], pad=(1, 1, 1))
        if box is None:
            continue
        low = lungs.low[box]
        added = lungs.search[name][box] & ~lungs.masks[name][box] & (low > min_hu)
        depth = ndi.distance_transform_edt(added, sampling=g.spacing)
        peaks = (ndi.maximum_filter(depth, size=3) == depth) & (depth >= min_depth_mm)
        pts = xp.argwhere(peaks)
        if int(pts.shape[0]) == 0:
            continue
        vals = depth[pts[:, 0], pts[:, 1], pts[:, 2]]
        # thickness is a distance map: many peaks tie, and the cut falls among them; a stable
        # sort keeps the same ones on the CPU and the GPU (the scan order of ``argwhere``)
        keep = xp.argsort(-vals, kind="stable")[: 4 * per_side]
        pts_h = host(pts[keep])
        vals_h = host(vals[keep]).astype(np.float64)
        hu_h = host(low[tuple(xp.asarray(pts_h[:, a]) for a in range(3))]).astype(np.float64)
        for k in range(min(len(vals_h), 4 * per_side)):
            c = tuple(float(pts_h[k, a] + box[a].start) for a in range(3))
            seeds.append(
                Seed(
                    g.to_full((c[0], c[1], c[2])),
                    2.0 * float(vals_h[k]),
                    "wall",
                    float(vals_h[k]),
                    0.0,
                    (0.0, 0.0, 0.0),
                    float(hu_h[k]),
                    name,
                )
            )
    return seeds


def merge_seeds(
    seeds: list[Seed], spacing: tuple[float, float, float], *, max_seeds: int = 240
) -> list[Seed]:
    """Strongest first; a seed within the radius of a kept one of the same source is dropped.
    Budgets per source: interior blobs 45 %, faint interior blobs (ground glass) 15 %, blobs at
    the search region's edge (juxtapleural, near the mediastinum) 25 %, pleural concavities
    15 % (each scored on its own scale)."""
    sp = np.array(spacing)
    budget = {
        "blob": 0.36,
        "blob_faint": 0.1,
        "blob_ggo": 0.08,
        "blob_edge": 0.2,
        "pleural": 0.12,
        "wall": 0.14,
    }
    out: list[Seed] = []
    for source, share in budget.items():
        kept: list[Seed] = []
        for s in sorted((s for s in seeds if s.source == source), key=lambda s: -s.score):
            if len(kept) >= round(share * max_seeds):
                break
            p = np.array(s.zyx) * sp
            if any(
                np.linalg.norm(p - np.array(o.zyx) * sp) < max(min(s.radius_mm, o.radius_mm), 2.0)
                for o in kept
            ):
                continue
            kept.append(s)
        out += kept
    return out
