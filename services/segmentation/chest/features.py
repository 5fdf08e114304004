"""Candidate segmentation and the features the classifier reads.

Each seed is segmented in a small crop of the ~1.3 mm grid (downloaded once: a few thousand
to a few hundred thousand voxels): a local half-maximum threshold between the lung background
and the seed's peak (clamped to -750...-350 HU, so ground glass and solid nodules both keep
their rim), the connected part containing the seed inside the search region (the chest wall is
outside it), then a morphological opening with a ball of ~0.45 x the seed's radius
(distance transforms) that cuts attached vessels thinner than the lesion, which regains its
rim inside the thresholded part.

Features (all floats, named; the classifier's file lists the ones it uses): size (volume,
equivalent diameter, axes), shape (sphericity, elongation and flatness from the inertia
eigenvalues, fill of the bounding box), Hessian at the best scale (dot score, eigenvalue
ratios, scale), intensity (mean, SD, percentiles, solid and calcified fractions, contrast
against the surrounding lung), surroundings (fraction of the shell on dense tissue inside the
lung = attached vessels, on the chest wall/mediastinum = pleural contact, fraction cut away by
the opening), location (distance to the pleura and to the hilum, height in the lung, medial
position) and the seed's source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from services.segmentation.chest.candidates import Pyramid, Seed
from services.segmentation.chest.grid import Grid, host

FEATURES: tuple[str, ...] = (
    "volume_ml",
    "diameter_mm",
    "long_axis_mm",
    "short_axis_mm",
    "z_extent_mm",
    "slices",
    "sphericity",
    "elongation",
    "flatness",
    "fill",
    "dot",
    "sigma_mm",
    "eig_ratio_31",
    "eig_ratio_21",
    "mean_hu",
    "sd_hu",
    "p10_hu",
    "p50_hu",
    "p90_hu",
    "max_hu",
    "solid_frac",
    "calcified_frac",
    "contrast_hu",
    "attached_frac",
    "wall_frac",
    "cut_frac",
    "border_frac",
    "dist_pleura_mm",
    "dist_hilum_mm",
    "height_rel",
    "medial_rel",
    "pleural_seed",
    "threshold_hu",
    "background_hu",
    "ggo_seed",
    "ray_cv",
    "ray_long",
    "ray_wall",
    "ray_pair",
    "ray_dir",
    "ray_min_rel",
    "ray_lung_cv",
    "dense_frac",
    "core_hu",
    "edge_hu",
)

# unit directions to the 26 neighbours (antipodes at k and 25 - k)
_DIRS = np.array(
    [
        (z, y, x)
        for z in (-1, 0, 1)
        for y in (-1, 0, 1)
        for x in (-1, 0, 1)
        if (z, y, x) != (0, 0, 0)
    ],
    dtype=np.float64,
)
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


@dataclass
class Candidate:
    seed: Seed
    grid: Grid  # the pyramid level it was segmented on
    box: tuple[slice, slice, slice]  # on ``grid``
    mask: np.ndarray  # lesion inside ``box`` (host)
    centroid: tuple[float, float, float]  # continuous full-resolution index
    features: dict[str, float] = field(default_factory=dict)


def _surface_mm2(mask: np.ndarray, sp: tuple[float, float, float]) -> float:
    face = (sp[1] * sp[2], sp[0] * sp[2], sp[0] * sp[1])
    total = 0.0
    for a in range(3):
        m = np.pad(mask, [(1, 1) if b == a else (0, 0) for b in range(3)])
        total += float(np.count_nonzero(np.diff(m.astype(np.int8), axis=a))) * face[a]
    return total


def _rays(
    sm: np.ndarray,
    search: np.ndarray,
    centre: np.ndarray,
    radius_mm: float,
    thr: float,
    sp: tuple[float, float, float],
) -> dict[str, float]:
    """Shape and attachment from 26 rays cast from the lesion's centre through the smoothed
    crop: each ray's length is where the scan falls below the lesion's threshold (capped at 3
    radii or the crop), and a ray *walls* when it leaves the search region first (chest wall,
    mediastinum). A blob: rays about one radius, none long. A vessel: an antipodal pair (or
    more at a fork) long, the rest short. A nodule on a vessel: one or two long rays on one
    side. A wall-based lesion: a hemisphere of walled rays, a round dome toward the lung."""
    step = 0.5 * min(sp)
    r = max(radius_mm, 1.0)
    n = max(2, math.ceil(3.0 * r / step))
    t = (np.arange(1, n + 1) * step)[None, :, None]  # (1, n, 1) mm
    pts = centre[None, None, :] + _DIRS[:, None, :] * t / np.array(sp)[None, None, :]
    shape = np.array(sm.shape)
    inside = ((pts >= 0) & (pts <= shape - 1)).all(axis=2)  # (26, n)
    idx = np.clip(np.rint(pts).astype(np.int64), 0, shape - 1)
    vals = sm[idx[..., 0], idx[..., 1], idx[..., 2]]
    srch = search[idx[..., 0], idx[..., 1], idx[..., 2]]
    below = (vals < thr) | ~inside
    wall = ~srch & inside
    first_below = np.where(below.any(axis=1), below.argmax(axis=1), n)
    first_wall = np.where(wall.any(axis=1), wall.argmax(axis=1), n)
    length = (np.minimum(first_below, n) + 0.5) * step
    # outside the search region the pyramid holds lung: the scan falls there too, so a ray
    # walls when it leaves the region within a voxel of where it falls
    walled = first_wall <= first_below + 2
    # a ray that leaves the crop while still above the threshold has not ended: it runs on
    # (a vessel cut by the crop is no compact blob)
    first_out = np.where((~inside).any(axis=1), (~inside).argmax(axis=1), n)
    cut = (first_out <= first_below) & (first_out < n) & OPEN_RAYS
    long_ = ((length >= 2.0 * r) | cut) & ~walled
    out_ = long_ | walled
    pair = long_ & long_[::-1]
    free = ~out_
    lens = length[free]
    return {
        "ray_cv": float(length.std() / max(length.mean(), 1e-6)),
        "ray_long": float(long_.mean()),
        "ray_wall": float(walled.mean()),
        "ray_pair": float(pair.sum() / max(long_.sum(), 1)),
        "ray_dir": float(np.linalg.norm(_DIRS[out_].sum(axis=0)) / max(int(out_.sum()), 1)),
        "ray_min_rel": float(length.min() / r),
        "ray_lung_cv": float(lens.std() / max(lens.mean(), 1e-6)) if lens.size >= 3 else 1.0,
    }


def level_for(radius_mm: float, pyr: Pyramid) -> int:
    """The coarsest pyramid level with at least ~3 voxels per lesion radius in-plane."""
    best = 0
    for i, g in enumerate(pyr.grids):
        if max(g.spacing[1:]) <= radius_mm / 3.0:
            best = i
    return best


MIN_LESION_MM = 4.0  # the pipeline reports nothing smaller
OPEN_RAYS = False  # rays cut by the crop count as running on (needs a retrained model)


def runs_out(lesion: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> list[bool]:
    """Per axis, whether ``lesion`` touches a face of its crop that is not the image's edge."""
    out = []
    for a in range(3):
        lo = [slice(None)] * 3
        lo[a] = slice(0, 1)
        hi = [slice(None)] * 3
        hi[a] = slice(-1, None)
        out.append(
            bool(box[a].start > 0 and lesion[tuple(lo)].any())
            or bool(box[a].stop < shape[a] and lesion[tuple(hi)].any())
        )
    return out


def _opened(
    comp: np.ndarray,
    edt: np.ndarray,
    dist_seed: np.ndarray,
    rho: float,
    r: float,
    sp: tuple[float, float, float],
) -> np.ndarray:
    """``comp`` opened with a ball of radius ``rho``: the core part nearest the seed grown back
    by ``rho`` inside ``comp`` (``comp`` itself when the ball is below a voxel or no core part
    lies within ``r`` of the seed)."""
    if rho < 0.6 * min(sp[1:]):
        return comp
    clab, cn = ndi.label(edt > rho)
    if not cn:
        return comp
    dmin = ndi.minimum(dist_seed, clab, index=np.arange(1, cn + 1))
    best = int(np.argmin(dmin)) + 1
    if dmin[best - 1] > r:
        return comp
    keep = clab == best
    out: np.ndarray = (ndi.distance_transform_edt(~keep, sampling=sp) <= rho + 0.5 * min(sp)) & comp
    return out


# the ball that closes the lung around a candidate (at least 1.6 x its seed's radius): a
# juxtapleural nodule is a bump of tissue into the lung, narrower than the ball
CLOSING_MM = 10.0
MAX_CLOSING_MM = 20.0  # larger lesions (masses) rely on the search region (a 40 mm ball)


def _closed(lung: np.ndarray, radius_mm: float, sp: tuple[float, float, float]) -> np.ndarray:
    """``lung`` closed with a ball of ``radius_mm``, on a grid of about 2 mm (the lung mask's
    own resolution: ``lungs.segment_lungs`` works at 2 mm) and brought back by nearest
    neighbour. Distance transforms; the crop is extended by replicating its faces, so a wall
    that runs on past the crop stays a flat wall."""
    radius_mm = min(radius_mm, MAX_CLOSING_MM)
    if not lung.any():
        return lung
    f = [max(1, round(2.0 / s)) for s in sp]
    small = lung[:: f[0], :: f[1], :: f[2]]
    ssp = tuple(s * k for s, k in zip(sp, f, strict=True))
    pad = [math.ceil(radius_mm / s) + 1 for s in ssp]
    big = np.pad(small, [(p, p) for p in pad], mode="edge")
    dil = ndi.distance_transform_edt(~big, sampling=ssp) <= radius_mm
    closed = ndi.distance_transform_edt(dil, sampling=ssp) > radius_mm
    closed = closed[pad[0] : -pad[0], pad[1] : -pad[1], pad[2] : -pad[2]]
    for a, k in enumerate(f):
        if k > 1:
            closed = np.repeat(closed, k, axis=a)
    out: np.ndarray = closed[: lung.shape[0], : lung.shape[1], : lung.shape[2]] | lung
    return out


def _raw_crop(
    volume: Any,
    pyr: Pyramid,
    level: int,
    box: tuple[slice, ...],
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """The scan itself (not darkened outside the search region) on ``box`` of pyramid level
    ``level``: block means as the pyramid makes them (level 0 from the scan, each coarser level
    from the one below)."""
    g0, g = pyr.grids[0], pyr.grids[level]
    rel = tuple(a // b for a, b in zip(g.factors, g0.factors, strict=True))
    full = tuple(
        slice(
            g.box[a].start + box[a].start * g.factors[a],
            g.box[a].start + box[a].stop * g.factors[a],
        )
        for a in range(3)
    )
    img = Grid.over(full, g0.factors, spacing).reduce(volume)  # type: ignore[arg-type]
    if any(f > 1 for f in rel):
        local = Grid.over(
            (slice(0, img.shape[0]), slice(0, img.shape[1]), slice(0, img.shape[2])),
            rel,  # type: ignore[arg-type]
            g0.spacing,
        )
        img = local.reduce(img)
    return host(img).astype(np.float32)


def segment_seed(
    seed: Seed,
    pyr: Pyramid,
    lungs_at: Any,
    *,
    hila: dict[str, tuple[float, float, float]],
    lung_z: tuple[float, float],
    midline_x: float,
    half_width: float,
    full_spacing: tuple[float, float, float],
    superior: int,
    grow_steps: int = 0,
    grown: tuple[bool, bool, bool] = (False, False, False),
    volume: Any = None,
    closing_mm: float = CLOSING_MM,
) -> Candidate | None:
    level = level_for(seed.radius_mm, pyr)
    g = pyr.grids[level]
    sp = g.spacing
    c = [(seed.zyx[a] - g.box[a].start + 0.5) / g.factors[a] - 0.5 for a in range(3)]
    r = max(seed.radius_mm, 1.5)
    # ``grown``: axes whose crop starts doubled (a candidate known to run out of its crop)
    half0 = [math.ceil((2.0 * r + 5.0) / s) for s in sp]  # the first crop's
    half = [h * (2 if gr else 1) for h, gr in zip(half0, grown, strict=True)]
    # the crop grows (x2, at most ``grow_steps`` times) while the segment runs into one of its
    # inner faces: a vessel cut by a small crop looks like a compact blob (the cartoon
    # phantom's apex: a juxtapleural vessel column cut 5 slices below its pleural notch)
    for step in range(grow_steps + 1):
        box = tuple(
            slice(max(0, round(c[a]) - half[a]), min(g.shape[a], round(c[a]) + half[a] + 1))
            for a in range(3)
        )
        search = host(pyr.search[level][box]).astype(bool)
        lung = host(lungs_at(level)[box]).astype(bool)
        p = tuple(min(max(round(c[a]) - box[a].start, 0), search.shape[a] - 1) for a in range(3))
        zz, yy, xx = np.meshgrid(
            *[(np.arange(search.shape[a]) - p[a]) * sp[a] for a in range(3)], indexing="ij"
        )
        dist_seed = np.sqrt(zz**2 + yy**2 + xx**2)
        if volume is not None:  # the pipeline's way (``analyse`` passes the scan)
            # the search region comes from a ~4 mm grid and the pyramid's image is dark
            # outside it (eroded by a voxel): a juxtapleural nodule loses the base of its dome,
            # the widest part. The lung closed at this crop's own resolution gives it back:
            # a bump of tissue narrower than the ball is filled, the flat wall is not. Only
            # inside the seed's first crop: a grown crop (``regrow``) adds the scan around it,
            # not more of what the closing fills there (the hilum, the mediastinum's folds),
            # which would join the lesion to them
            ball = max(closing_mm, 1.6 * r)  # _closed caps it at MAX_CLOSING_MM
            if closing_mm > 0 and not search.all():  # 0: the scan, no closing
                first = (
                    (np.abs(zz) <= half0[0] * sp[0])
                    & (np.abs(yy) <= half0[1] * sp[1])
                    & (np.abs(xx) <= half0[2] * sp[2])
                )
                search = search | (_closed(lung, ball, sp) & first)
            img = np.where(
                search, _raw_crop(volume, pyr, level, box, full_spacing), np.float32(-850.0)
            )
        else:
            img = host(pyr.images[level][box]).astype(np.float32)
        sm = ndi.gaussian_filter(img, sigma=[0.5 * min(sp) / s for s in sp])
        bg_vox = sm[lung & (sm < -500) & (dist_seed > r)]
        background = float(np.median(bg_vox)) if bg_vox.size > 20 else -850.0
        near = dist_seed <= max(0.5 * r, 1.01 * max(sp))
        # the lesion's own level: a high percentile near the seed, not the maximum (a vessel
        # crossing a ground-glass nodule, or a part-solid nodule's core, would set the threshold
        # above the ground glass)
        peak = (
            float(np.percentile(sm[near & search], 70)) if (near & search).any() else float(sm[p])
        )
        thr = float(np.clip(background + 0.5 * (peak - background), -750.0, -350.0))
        region = (sm > thr) & search
        labels, n = ndi.label(region)
        if n == 0:
            return None
        hit = labels[p]
        if hit == 0:  # nearest voxel of the region within the seed's radius
            cand = np.where(labels > 0, dist_seed, np.inf)
            k = np.unravel_index(np.argmin(cand), cand.shape)
            if cand[k] > max(0.6 * r, 2.0 * max(sp)):
                return None
            hit = labels[k]
        comp = labels == hit
        # opening radius from the lesion's own thickness: 0.7 x the largest inscribed ball near
        # the seed, so a vessel thinner than that is cut off however the seed's scale came out;
        # when that leaves less than a reportable lesion (a thin wall nodule shrunk to its core),
        # 0.45 x the seed's radius instead
        edt = ndi.distance_transform_edt(comp, sampling=sp)
        near_r = dist_seed <= max(0.6 * r, 1.5 * max(sp))
        inscribed = float(edt[near_r].max()) if (near_r & comp).any() else 0.0
        rho = 0.7 * inscribed if inscribed > 0 else 0.45 * r
        lesion = _opened(comp, edt, dist_seed, rho, r, sp)
        small = lesion.sum() * sp[0] * sp[1] * sp[2] < math.pi / 6 * MIN_LESION_MM**3
        if small and 0.45 * r > rho:
            lesion = _opened(comp, edt, dist_seed, 0.45 * r, r, sp)
        runs = runs_out(lesion, box, pyr.images[level].shape)
        if step == grow_steps or not any(runs):
            break
        half = [2 * h if ra else h for h, ra in zip(half, runs, strict=True)]
    n_vox = int(lesion.sum())
    if n_vox < 2:
        return None
    vox_mm3 = sp[0] * sp[1] * sp[2]
    vol_mm3 = n_vox * vox_mm3
    idx = np.argwhere(lesion)
    cen = idx.mean(axis=0)
    cen_full = g.to_full(tuple(float(cen[a] + box[a].start) for a in range(3)))  # type: ignore[arg-type]
    pts = (idx - cen) * np.array(sp)
    cov = pts.T @ pts / max(n_vox, 1)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1].clip(min=1e-6)
    ext = [(int(idx[:, a].max()) - int(idx[:, a].min()) + 1) for a in range(3)]
    # in-plane axes on the slice of largest area
    areas = lesion.sum(axis=(1, 2))
    zs = int(np.argmax(areas))
    pl = np.argwhere(lesion[zs]) * np.array(sp[1:])
    if pl.shape[0] >= 3:
        pc = pl - pl.mean(axis=0)
        e2 = np.sort(np.linalg.eigvalsh(pc.T @ pc / pl.shape[0]))[::-1].clip(min=0)
        long_ax = 4 * math.sqrt(e2[0]) + min(sp[1:])
        short_ax = 4 * math.sqrt(e2[1]) + min(sp[1:])
    else:
        long_ax = short_ax = math.sqrt(max(pl.shape[0], 1) * sp[1] * sp[2])
    shell = ndi.binary_dilation(lesion, iterations=2) & ~lesion
    shell_n = max(int(shell.sum()), 1)
    vals = sm[lesion]
    ring = shell & lung & (sm < thr)
    contrast = float(vals.mean() - (sm[ring].mean() if ring.any() else background))
    border = np.zeros_like(lesion)
    border[[0, -1], :, :] = True
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    surf = _surface_mm2(lesion, sp)
    sphericity = (math.pi ** (1 / 3) * (6 * vol_mm3) ** (2 / 3)) / max(surf, 1e-6)
    # distance to the pleura: to the nearest voxel outside the search region in the crop
    # (capped by the crop's size)
    outside = np.argwhere(~search)
    d_pl = (
        float(np.sqrt((((outside - cen) * np.array(sp)) ** 2).sum(axis=1)).min())
        if len(outside)
        else float(min(h * s for h, s in zip(half, sp, strict=True)))
    )
    side = seed.side or (min(hila, key=lambda k: abs(hila[k][2] - cen_full[2])) if hila else "")
    hil = hila.get(side)
    dist_hilum = (
        float(np.linalg.norm((np.array(cen_full) - np.array(hil)) * np.array(full_spacing)))
        if hil is not None
        else 100.0
    )
    z0, z1 = lung_z
    height = (cen_full[0] - z0) / max(z1 - z0, 1.0)
    if superior < 0:
        height = 1.0 - height
    r_eq = (3 * vol_mm3 / (4 * math.pi)) ** (1 / 3)
    rays = _rays(sm, search, cen, r_eq, thr, sp)
    ii = np.indices(lesion.shape, dtype=np.float64)
    d_cen = np.sqrt(sum(((ii[a] - cen[a]) * sp[a]) ** 2 for a in range(3)))
    core_v = sm[lesion & (d_cen <= 0.5 * r_eq)]
    edge_v = sm[lesion & (d_cen > 0.75 * r_eq)]
    f = {
        "volume_ml": vol_mm3 / 1000.0,
        "diameter_mm": (6 * vol_mm3 / math.pi) ** (1 / 3),
        "long_axis_mm": long_ax,
        "short_axis_mm": short_ax,
        "z_extent_mm": ext[0] * sp[0],
        "slices": ext[0] * sp[0] / full_spacing[0],
        "sphericity": sphericity,
        "elongation": math.sqrt(ev[2] / ev[0]),
        "flatness": math.sqrt(ev[1] / ev[0]),
        "fill": n_vox / float(ext[0] * ext[1] * ext[2]),
        "dot": seed.score if seed.source != "pleural" else 0.0,
        "sigma_mm": seed.sigma_mm,
        "eig_ratio_31": seed.eig[2] / seed.eig[0] if seed.eig[0] < 0 else 0.0,
        "eig_ratio_21": seed.eig[1] / seed.eig[0] if seed.eig[0] < 0 else 0.0,
        "mean_hu": float(vals.mean()),
        "sd_hu": float(vals.std()),
        "p10_hu": float(np.percentile(vals, 10)),
        "p50_hu": float(np.percentile(vals, 50)),
        "p90_hu": float(np.percentile(vals, 90)),
        "max_hu": float(vals.max()),
        "solid_frac": float((vals > -300).mean()),
        "calcified_frac": float((vals > 200).mean()),
        "contrast_hu": contrast,
        "attached_frac": float((shell & search & (sm > thr)).sum()) / shell_n,
        "wall_frac": float((shell & ~search).sum()) / shell_n,
        "cut_frac": 1.0 - n_vox / max(int(comp.sum()), 1),
        "border_frac": float((lesion & border).sum()) / max(n_vox, 1),
        "dist_pleura_mm": d_pl,
        "dist_hilum_mm": dist_hilum,
        "height_rel": float(height),
        "medial_rel": abs(cen_full[2] - midline_x) / max(half_width, 1.0),
        "pleural_seed": {"blob": 0.0, "blob_faint": 0.0, "blob_ggo": 0.0, "blob_edge": 0.5}.get(
            seed.source, 1.0
        ),
        "ggo_seed": 1.0 if seed.source == "blob_ggo" else 0.0,
        "threshold_hu": thr,
        "background_hu": background,
        **rays,
        # enhanced vessels (contrast) are dense too, but tubular and continuous
        "dense_frac": float((vals > 150).mean()),
        "core_hu": float(core_v.mean()) if core_v.size else float(vals.mean()),
        "edge_hu": float(edge_v.mean()) if edge_v.size else float(vals.mean()),
    }
    return Candidate(seed, g, box, lesion, cen_full, {k: round(float(v), 4) for k, v in f.items()})  # type: ignore[arg-type]
