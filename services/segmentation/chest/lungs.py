"""Lungs that survive real anatomy.

On a ~2 mm working grid (block means of the scan):

1. **Body**: the largest component of ``> -500 HU`` after an in-plane opening (a scanner table,
   straps or a cushion that touch the skin for a few millimetres are cut off), holes filled
   per slice. Air outside it (room air, the foam of the table pad) never becomes lung.
2. **Air in the body** (``< lung_hu``): its components are lungs when deep in-plane (a disc
   of 25 mm radius fits in some slice, vessels filled: the air a table's mattress, straps or
   the arms close against the body is a layer, which hole filling puts inside the body), large
   (>= 15 mL) and either a good fraction of the largest or of a similar height (stomach and
   bowel gas are neither).
3. **Airways**: the trachea is found in the top slices (a round air column near the midline)
   and tracked slice by slice downwards in air darker than parenchyma (``< airway_hu``); each
   branch stops where its area jumps (leak into parenchyma) or 50 mm below the carina. The
   trachea and main bronchi leave the lungs; intrapulmonary bronchi come back with the per-slice
   hole filling (they are surrounded by lung in-plane).
4. **Left/right**: when the lungs touch (anterior/posterior junction thinner than a voxel), the
   distance transform of the joint air is thresholded at increasing depth until two large cores
   on either side of the midline appear; every voxel goes to its nearest core.
5. **Boundary correction**: per lung, a closing with a ball of ``pleural_radius_mm`` (distance
   transforms on a ~4 mm grid, O(N) in the radius) gives the *search region*: the lung plus
   its concavities, where pleural-based nodules and masses (up to ~2x the radius) lie. The heart
   notch and the diaphragm dome are wider than the ball and stay out. Lesions found there are
   added to the lung masks by the caller.

Full-resolution masks: the grid mask's interior, plus the scan's own voxels ``< lung_hu`` in a
one-voxel band at the grid boundary (no blocky outline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.ndimage as scipy_ndi

from services.segmentation.chest.grid import Box, Grid, bbox, disk, factors_for, host
from shared.imaging import segment as seg
from shared.imaging.backend import namespace

SIDES = ("lung_left", "lung_right")


@dataclass
class Lungs:
    grid: Grid  # ~2 mm working grid over the whole scan
    body: Any  # grid masks (bool) from here on
    masks: dict[str, Any]  # side -> lung, per-slice holes filled (vessels, nodules inside)
    search: dict[str, Any]  # side -> lung plus its pleural concavities
    airway: Any  # trachea and main bronchi
    superior: int  # +1 when a higher slice index is nearer the head
    midline_x: float  # grid x index of the body's midline
    low: Any  # the scan on the grid (block means, HU)
    notes: dict[str, float] = field(default_factory=dict)


def _superior(direction: tuple[float, ...]) -> int:
    nz = direction[8] if len(direction) >= 9 else 1.0
    return -1 if nz < -0.3 else 1


def _ranked(labels: Any, n: int, voxel_ml: float, top: int = 8) -> list[dict[str, float]]:
    """The ``top`` largest labels with volume, z extent and mean x, from three bincounts
    (one pass each; only the per-label tables are downloaded)."""
    xp, _ = namespace(labels)
    if n == 0:
        return []
    step = 2 if labels.size > 2_000_000 else 1  # ranks and extents, 4x less work
    if step > 1:
        labels = labels[:, ::step, ::step]
        voxel_ml *= step * step
    flat = labels.ravel()
    sizes = host(xp.bincount(flat, minlength=n + 1))
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes, kind="stable")[::-1][:top] if sizes[int(i)] > 0]
    if not order:
        return []
    nz, _ny, nx = labels.shape
    xs = xp.broadcast_to(xp.arange(nx, dtype=xp.float32), labels.shape).ravel()
    xsum = host(xp.bincount(flat, weights=xs, minlength=n + 1))
    zi = xp.broadcast_to(xp.arange(nz, dtype=xp.int64)[:, None, None], labels.shape).ravel()
    pres = host(xp.bincount(flat.astype(xp.int64) * nz + zi, minlength=(n + 1) * nz))
    pres = pres.reshape(n + 1, nz) > 0
    out = []
    for lab in order:
        zz = np.flatnonzero(pres[lab])
        out.append(
            {
                "label": float(lab),
                "ml": float(sizes[lab]) * voxel_ml,
                "z0": float(zz[0]),
                "z1": float(zz[-1]),
                "x": float(xsum[lab] / sizes[lab]) * step,
            }
        )
    return out


def _thick_labels(
    air: Any,
    labels: Any,
    n: int,
    grid: Grid,
    sp: tuple[float, float, float],
    core_mm: float = 25.0,
) -> set[float]:
    """Labels of ``air`` components that, in some slice with its holes (vessels) filled, hold
    a disc of radius ``core_mm`` (in-plane distances on a ~4 mm grid). A lung is 37 mm deep or
    more in the realistic phantoms and 46 mm or more in the registries' real chests; the air
    between the back and a table's mattress, between the arms and the chest, and stomach gas
    are less than 20 mm deep (a mattress 5-17 mm, an arm gap 13 mm, stomach gas up to 19 mm).
    A lung squeezed thinner than 50 mm in every slice (massive effusion, collapse) is lost."""
    xp, _ = namespace(air)
    full = (slice(0, air.shape[0]), slice(0, air.shape[1]), slice(0, air.shape[2]))
    g = Grid.over(full, factors_for(sp, 4.0), sp)
    core = seg.edt_in_plane(seg.fill_holes_2d(g.reduce(air) >= 0.5), g.spacing) > core_mm
    hit = labels[g.expand(core, air.shape) & air]
    return {float(v) for v in host(xp.unique(hit)).tolist() if v > 0}


def _domes(
    filled: Any, air: Any, sp: tuple[float, float, float], min_contact_mm2: float = 400.0
) -> Any:
    """Per-slice holes of the lungs wider than a vessel (>= 300 mm2) whose 3D component rests
    on tissue outside the lungs over more than ``min_contact_mm2`` (the slice above or below
    is neither lung nor hole there): diaphragm domes. Nodules and masses inside the lung are
    capped by lung."""
    xp, ndi = namespace(filled)
    holes = filled & ~air
    # only in-plane holes wider than a vessel's cross-section (>= 300 mm2) can be domes
    planar = xp.zeros((3, 3, 3), dtype=bool)
    planar[1] = xp.asarray(ndi.generate_binary_structure(2, 1))
    plabels, pn = ndi.label(holes, structure=planar)
    if int(pn) == 0:
        return None
    area = xp.bincount(plabels.ravel(), minlength=int(pn) + 1) * (sp[1] * sp[2])
    area[0] = 0
    holes = (area >= 300.0)[plabels]
    labels, n = seg.label(holes)
    if n == 0:
        return None
    outside = ~filled
    touch = xp.zeros_like(holes)
    touch[1:] |= holes[1:] & outside[:-1]
    touch[:-1] |= holes[:-1] & outside[1:]
    contact = host(xp.bincount(labels[touch], minlength=n + 1)).astype(np.float64)
    contact *= sp[1] * sp[2]
    contact[0] = 0.0
    big = np.flatnonzero(contact >= min_contact_mm2)
    if big.size == 0:
        return None
    table = xp.zeros(n + 1, dtype=bool)
    table[xp.asarray(big)] = True
    return table[labels]


def _fov_clipped(body: Any, tissue: Any, low: Any) -> Any:
    """A body wider than the reconstruction circle: the lungs reach the padding outside the
    field of view (the same value, <= -1020 HU, in every slice) and are no holes. Regions
    that the padding closes are added when they are bounded mostly by tissue (a clipped lung),
    not mostly by the padding (room air between the body and a small circle)."""
    xp, ndi = namespace(body)
    pad2d = (low <= -1020.0).all(axis=0)
    if int(host(pad2d.sum())) < 0.005 * pad2d.size:
        return body
    pad = xp.broadcast_to(pad2d, body.shape)
    extra = seg.fill_holes_2d(body | pad) & ~pad & ~body
    labels, n = seg.label(extra)
    if n == 0:
        return body
    planar = xp.zeros((3, 3, 3), dtype=bool)
    planar[1] = True
    near_pad = extra & ndi.binary_dilation(pad, structure=planar)
    near_tissue = extra & ndi.binary_dilation(tissue, structure=planar)
    by_pad = host(xp.bincount(labels[near_pad], minlength=n + 1)).astype(np.float64)
    by_tissue = host(xp.bincount(labels[near_tissue], minlength=n + 1)).astype(np.float64)
    ok = by_pad < 0.35 * (by_pad + by_tissue + 1e-9)
    ok[0] = False
    return body | xp.asarray(ok)[labels]


def _select_lungs(ranked: list[dict[str, float]], spacing_z: float) -> list[dict[str, float]]:
    if not ranked:
        return []
    big = ranked[0]
    height = (big["z1"] - big["z0"] + 1) * spacing_z
    keep = []
    for c in ranked:
        h = (c["z1"] - c["z0"] + 1) * spacing_z
        if c["ml"] >= 15.0 and (c["ml"] >= 0.2 * big["ml"] or h >= 0.5 * height):
            keep.append(c)
    return keep


def _track_airways(
    dark: np.ndarray,
    lungair: np.ndarray,
    spacing: tuple[float, float, float],
    superior: int,
    midline_x: float,
) -> tuple[np.ndarray, dict[str, float]]:
    """Trachea and main bronchi (host, grid crop): seeded in the top slices, tracked down."""
    nz = dark.shape[0]
    px = spacing[1] * spacing[2]
    order = list(range(nz - 1, -1, -1)) if superior > 0 else list(range(nz))
    zs = [z for z in order if lungair[z].any()]
    out = np.zeros_like(dark)
    if not zs:
        return out, {"airway_found": 0.0}
    top = zs[0]
    start = order.index(top)
    four = scipy_ndi.generate_binary_structure(2, 1)
    current = None
    seed_k = None
    for k in range(start, min(len(order), start + max(2, round(40.0 / spacing[0])))):
        z = order[k]
        lab, n = scipy_ndi.label(dark[z], structure=four)
        best = None
        for i, sl in enumerate(scipy_ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            comp = lab[sl] == i
            area = float(comp.sum()) * px
            if not 60.0 <= area <= 900.0:
                continue
            h, w = (sl[0].stop - sl[0].start) * spacing[1], (sl[1].stop - sl[1].start) * spacing[2]
            if area / (math.pi * max(h, w) ** 2 / 4) < 0.45:
                continue
            cx = (sl[1].start + sl[1].stop - 1) / 2
            off = abs(cx - midline_x) * spacing[2]
            if off > 30.0:
                continue
            if best is None or off < best[0]:
                best = (off, lab == i, area)
        if best is not None:
            current, ref_area, seed_k = best[1], best[2], k
            break
    if current is None or seed_k is None:
        return out, {"airway_found": 0.0}
    out[order[seed_k]] = current
    grow = np.ones((3, 3), bool)
    carina_k = None
    for k in range(seed_k + 1, len(order)):
        z = order[k]
        lab, n = scipy_ndi.label(dark[z], structure=four)
        if n == 0:
            break
        near = scipy_ndi.binary_dilation(current, structure=grow)
        hits = np.unique(lab[near & (lab > 0)])
        prev_lab, pn = scipy_ndi.label(current, structure=np.ones((3, 3), bool))
        prev_areas = np.bincount(prev_lab.ravel(), minlength=pn + 1) * px
        accepted = np.zeros_like(current)
        branches = 0
        for h in hits:
            comp = lab == h
            area = float(comp.sum()) * px
            under = np.unique(prev_lab[scipy_ndi.binary_dilation(comp, structure=grow)])
            parent = max((prev_areas[u] for u in under if u > 0), default=0.0)
            # leak: the lumen suddenly much larger than the branch it continues
            if area > max(2.5 * parent, 40.0) and area > 0.6 * ref_area:
                continue
            if area > 1.6 * ref_area:
                continue
            accepted |= comp
            branches += 1
        if not accepted.any():
            break
        if carina_k is None and branches >= 2:
            carina_k = k
        if carina_k is not None and (k - carina_k) * spacing[0] > 50.0:
            break
        out[z] = accepted
        current = accepted
    return out, {"airway_found": 1.0, "trachea_area_mm2": round(ref_area, 1)}


def _split(
    lung: Any, spacing: tuple[float, float, float], midline_x: float
) -> tuple[Any, Any, float]:
    """Two masks (image-left of the midline first) and the depth (mm) used to part them
    (0: already apart, -1: one lung only)."""
    xp, ndi = namespace(lung)
    vox_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    labels, n = seg.label(lung)
    ranked = _ranked(labels, n, vox_ml, top=4)
    total = sum(c["ml"] for c in ranked) or 1.0
    apart: tuple[Any, Any, float] | None = None
    if (
        len(ranked) >= 2
        and ranked[1]["ml"] >= 0.1 * total
        and (ranked[0]["x"] - midline_x) * (ranked[1]["x"] - midline_x) < 0
    ):
        a, b = labels == int(ranked[0]["label"]), labels == int(ranked[1]["label"])
        rest = lung & ~a & ~b
        if ranked[0]["x"] > ranked[1]["x"]:
            a, b = b, a
        if bool(host(rest.any())):  # small pieces go to their side of the midline
            xs = xp.arange(lung.shape[2])[None, None, :]
            a = a | (rest & (xs < midline_x))
            b = b | (rest & (xs >= midline_x))
        apart = (a, b, 0.0)
        if ranked[1]["ml"] >= 0.3 * ranked[0]["ml"]:
            return apart
    # touching, or a second component much smaller than the first (air trapped by an arm or
    # a cushion, or a small lung): try parting the largest component; if it holds both lungs,
    # the smaller component is no lung
    if ranked:
        lung = labels == int(ranked[0]["label"])
    # touching: erode (distance transform on a ~4 mm grid over the lungs) until two cores
    box = bbox(lung)
    if box is None:
        return lung, xp.zeros_like(lung), -1.0
    g = Grid.over(box, factors_for(spacing, 4.0), spacing)
    small = xp.pad(g.reduce(lung) >= 0.5, 1)
    dist = ndi.distance_transform_edt(small, sampling=g.spacing)
    gmid = (midline_x - box[2].start) / g.factors[2] + 1
    cvox = g.spacing[0] * g.spacing[1] * g.spacing[2] / 1000.0
    cores: list[Any] = []
    depth = 0.0
    for k in range(1, 30):
        depth = k * 2.0
        clab, cn = seg.label(dist > depth)
        cr = _ranked(clab, cn, cvox, top=3)
        if not cr:
            break
        ctot = sum(c["ml"] for c in cr)
        if (
            len(cr) >= 2
            and cr[1]["ml"] >= 0.15 * ctot
            and (cr[0]["x"] - gmid) * (cr[1]["x"] - gmid) < 0
        ):
            first = 0 if cr[0]["x"] < cr[1]["x"] else 1
            cores = [clab == int(cr[first]["label"]), clab == int(cr[1 - first]["label"])]
            break
    if not cores:  # one lung (or no junction found): one mask, named by its side
        if apart is not None:
            return apart
        return lung, xp.zeros_like(lung), -1.0
    # geodesic growth of the two cores inside the lungs (equal speed, so they meet at the
    # junction; never across the mediastinum or the spine as a straight-line nearest core would)
    one, two = cores[0], cores[1]
    cross = ndi.generate_binary_structure(3, 1)
    for _ in range(200):
        free = small & ~one & ~two
        if not bool(host(free.any())):
            break
        grow1 = ndi.binary_dilation(one, structure=cross) & free
        grow2 = ndi.binary_dilation(two, structure=cross) & free & ~grow1
        if not bool(host((grow1 | grow2).any())):
            break
        one, two = one | grow1, two | grow2
    nearest = one[1:-1, 1:-1, 1:-1]
    a = lung & g.expand(nearest, lung.shape)
    # the junction is near the midline: a lung never reaches more than ~20 mm across it
    xs = xp.arange(lung.shape[2])[None, None, :] * spacing[2]
    mid_mm = midline_x * spacing[2]
    a = (a & (xs < mid_mm + 20.0)) | (lung & (xs < mid_mm - 20.0))
    return a, lung & ~a, depth


def _pleural_search(mask: Any, spacing: tuple[float, float, float], radius_mm: float) -> Any:
    """``mask`` plus what a closing with a ball of ``radius_mm`` adds (on a ~4 mm grid)."""
    xp, ndi = namespace(mask)
    f = factors_for(spacing, 4.0)
    box = bbox(mask)
    if box is None:
        return mask
    g = Grid.over(box, f, spacing)
    small = g.reduce(mask) >= 0.5
    pad = [math.ceil(radius_mm / s) + 2 for s in g.spacing]
    small = xp.pad(small, [(p, p) for p in pad])
    d_out = ndi.distance_transform_edt(~small, sampling=g.spacing)
    dil = d_out <= radius_mm
    d_in = ndi.distance_transform_edt(dil, sampling=g.spacing)
    closed = d_in > radius_mm
    # only what the closing adds on the coarse grid (no blocky rim along convex pleura)
    added = (closed & ~small)[pad[0] : -pad[0], pad[1] : -pad[1], pad[2] : -pad[2]]
    return mask | g.expand(added, mask.shape)


def segment_lungs(
    vol: Any,
    *,
    spacing: tuple[float, float, float],
    direction: tuple[float, ...],
    lung_hu: float = -400.0,
    airway_hu: float = -950.0,
    work_mm: float = 2.0,
    pleural_radius_mm: float = 40.0,
) -> Lungs:
    xp, ndi = namespace(vol)
    full: Box = (slice(0, vol.shape[0]), slice(0, vol.shape[1]), slice(0, vol.shape[2]))
    grid = Grid.over(full, factors_for(spacing, work_mm), spacing)
    low = grid.reduce(vol)
    sp = grid.spacing
    vox_ml = sp[0] * sp[1] * sp[2] / 1000.0
    superior = _superior(direction)
    # body: the largest component, holes filled per slice (thin chest walls stay closed)
    tissue = seg.largest_components(low > -500.0)
    body = seg.fill_holes_2d(tissue)
    body = _fov_clipped(body, tissue, low)
    xprof = host(body.sum(axis=(0, 1))).astype(np.float64)
    midline_x = float((xprof * np.arange(xprof.size)).sum() / max(xprof.sum(), 1.0))
    air = (low < lung_hu) & body
    labels, n = seg.label(air)
    # air enclosed between the body and a table, a cushion or the arms is a thin layer, gas in
    # the stomach a small pocket; a lung is deep in-plane
    thick = _thick_labels(air, labels, n, grid, sp)
    keep = _select_lungs([c for c in _ranked(labels, n, vox_ml) if c["label"] in thick], sp[0])
    lungair = xp.zeros_like(air)
    for c in keep:
        lungair |= labels == int(c["label"])
    notes: dict[str, float] = {}
    # airways, on a central slab (explicit download of a small crop)
    airway = xp.zeros_like(air)
    half = int(75.0 / sp[2])
    x0, x1 = max(0, int(midline_x) - half), min(air.shape[2], int(midline_x) + half + 1)
    dark = host((low[:, :, x0:x1] < airway_hu) & lungair[:, :, x0:x1])
    tracked, info = _track_airways(dark, host(lungair[:, :, x0:x1]), sp, superior, midline_x - x0)
    notes.update(info)
    if tracked.any():
        airway[:, :, x0:x1] = xp.asarray(tracked)
        grown = ndi.binary_dilation(airway, structure=xp.asarray(disk(1)))
        lungair = lungair & ~grown
        labels, n = seg.label(lungair)
        keep = _select_lungs(_ranked(labels, n, vox_ml), sp[0])
        lungair = xp.zeros_like(air)
        for c in keep:
            lungair |= labels == int(c["label"])
        notes["airway_ml"] = round(float(host(airway.sum())) * vox_ml, 1)
    a, b, depth = _split(lungair, sp, midline_x)
    notes["split_depth_mm"] = round(depth, 1)
    # image-left of the midline is patient right for a standard orientation (+x = left)
    left_is_image_right = (direction[0] if direction else 1.0) >= 0
    sides = (
        {"lung_right": a, "lung_left": b}
        if left_is_image_right
        else {"lung_left": a, "lung_right": b}
    )
    if depth < 0:  # a single lung: name it by its side of the midline
        xa = float(host(xp.argwhere(a)[:, 2].mean())) if bool(host(a.any())) else midline_x
        right_side = (xa < midline_x) == left_is_image_right
        sides = (
            {"lung_right": a, "lung_left": b} if right_side else {"lung_left": a, "lung_right": b}
        )
    masks: dict[str, Any] = {}
    search: dict[str, Any] = {}
    for name in SIDES:
        m = seg.fill_holes_2d(sides[name]) if bool(host(sides[name].any())) else sides[name]
        masks[name] = m
    # a diaphragm dome (liver, spleen) cut by the lung base is a hole in those slices: per
    # slice it looks like a mass inside the lung; in 3D it sits on tissue outside the lungs
    domes = _domes(masks[SIDES[0]] | masks[SIDES[1]], sides[SIDES[0]] | sides[SIDES[1]], sp)
    if domes is not None:
        for name in SIDES:
            masks[name] = masks[name] & ~domes
        notes["dome_ml"] = round(float(host(domes.sum())) * vox_ml, 1)
    # 0 says no lung was found (and nothing searched): in the findings record's parameters
    both = masks[SIDES[0]] | masks[SIDES[1]]
    notes["lung_ml"] = round(float(host(both.sum())) * vox_ml, 1)
    for name in SIDES:
        other = masks[SIDES[1 - SIDES.index(name)]]
        if bool(host(masks[name].any())):
            # every concavity: pleural, mediastinal and hilar lesions are searched; the heart
            # border and hilar vessels found there are the classifier's to reject
            search[name] = _pleural_search(masks[name], sp, pleural_radius_mm) & body & ~other
        else:
            search[name] = masks[name]
    return Lungs(grid, body, masks, search, airway, superior, midline_x, low, notes)


def full_masks(lungs: Lungs, vol: Any, *, lung_hu: float = -400.0) -> dict[str, Any]:
    """Full-resolution lung masks: the grid mask's interior plus the scan's voxels ``< lung_hu``
    within one grid voxel of its boundary (no blocky outline). Both sides in one pass over
    their common box."""
    xp, ndi = namespace(vol)
    g = lungs.grid
    shape = vol.shape
    left, right = lungs.masks[SIDES[0]], lungs.masks[SIDES[1]]
    box = bbox(left | right, pad=(1, 1, 1))
    if box is None:
        return {name: xp.zeros(shape, dtype=bool) for name in SIDES}
    cross = ndi.generate_binary_structure(3, 1)
    airway = ndi.binary_dilation(lungs.airway[box], structure=cross)
    code = xp.zeros(tuple(b.stop - b.start for b in box), dtype=xp.uint8)
    for k, (m, other) in enumerate(((left[box], right[box]), (right[box], left[box]))):
        inner = ndi.binary_erosion(m, structure=cross)
        band = ndi.binary_dilation(m, structure=cross) & ~inner & ~other & ~airway
        code[band] = 2 * k + 2
        code[inner] = 2 * k + 1
    fbox = tuple(
        slice(b.start * f, s if b.stop >= n else min(s, b.stop * f))
        for b, f, s, n in zip(box, g.factors, shape, g.shape, strict=True)
    )
    sub = Grid(fbox, g.factors, g.spacing, code.shape)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    full = sub.expand_crop(code)
    air = vol[fbox] < lung_hu
    for k, name in enumerate(SIDES):
        res = xp.zeros(shape, dtype=bool)
        res[fbox] = (full == 2 * k + 1) | ((full == 2 * k + 2) & air)
        out[name] = res
    return out
