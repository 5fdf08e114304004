"""Head CT: brain, acute haemorrhage (intraparenchymal, subdural, epidural), midline shift.

NumPy or CuPy alike. The volume is cropped to the head and block-averaged to a working grid of
~0.9 mm in-plane and >= ~1.25 mm through-plane (thin-slice series are pooled in z); masks come
back at full resolution. The anatomy (cranial cavity, brain) is found on a coarser ~2 mm grid
and refined on the working grid; blood is searched inside the brain's bounding box only.

1. cranial cavity: the skull (> 180 HU, the head holder and table dropped: only the largest
   body component counts) closed in-plane and filled slice by slice. Each slice takes the
   smallest closing (3, 8 or 16 mm) that encloses what the largest one encloses, so foramina
   and thin or tilted bone do not open it; where even the largest does not close the skull
   (a craniotomy or burr-hole defect) and the convex hull of the bone holds soft tissue only,
   the hull is the cavity. Tissue within 4 mm of the air outside the head is never cavity
   (the scalp sunk into a defect).
2. brain: soft tissue (-40..160 HU) in the cavity, eroded by ~4 mm (cuts the links through
   the skull base: orbits, nasal cavity, infratemporal fossa), the largest component grown
   back and its holes filled (ventricles, calcifications).
3. blood candidates: smoothed HU in the blood range *and* brighter than the local brain
   (background from normal-brain voxels in a ~25 mm box: cupping and beam-hardening bands
   move both); seeds exclude the partial-volume zones of dense structures: around
   calcifications and along the inner table / skull base.
4. the final mask grows from the seeds into the partial-volume rim (hysteresis): a voxel
   within 4 mm of a seed is blood when it is at least half way from the local brain to the
   local blood density; along the inner table, voxels between blood and bone that are at
   least half blood join it (the interface).
5. each candidate is measured (volume, density, contrast, thickness, extent, contact with the
   inner table, solidity) and scored by a logistic model fitted on procedural cases
   (``models/head_bleed.json``, ``benchmarks/fit_head.py``): the score is the finding's
   confidence; candidates under the operating threshold are dropped.
6. subtype by position and shape: away from the inner table intraparenchymal; along it a
   crescent (subdural) or a biconvex lens (epidural).
7. midline shift: ideal midline from the symmetry of the cranial cavity (second moments per
   slice), actual midline from the septum pellucidum / falx ridge between CSF.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as sndi

from services.segmentation.tasks import Geometry, TaskResult
from shared.imaging import segment as seg
from shared.imaging.backend import namespace

VERSION = "3.0.0"
_DEBUG = False
MODEL_PATH = Path(__file__).with_name("models") / "head_bleed.json"
FEATURES = (
    "log_volume_ml",
    "mean_hu",
    "contrast_hu",
    "bone_contact",
    "thickness_mm",
    "extent_mm",
    "z_extent_mm",
    "core_fraction",
    "dense_fraction",
    "solidity",
    "interface_fraction",
    "midline_mm",
)
REPORTED = (
    *FEATURES,
    "long_axis_mm",
    "short_axis_mm",
    "depth_mm",
    "footprint_mm",
    "depth_ratio",
    "fill",
)
BONE_HU = 180.0  # the skull as a barrier (thin temporal squama and tilted vault included)
INPLANE_MM = 0.9  # working grid, in-plane
COARSE_MM = 1.8  # anatomy grid, in-plane


def _host(a: Any) -> np.ndarray:
    """Explicit download of a small array (a crop, a profile) to the host."""
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _box_any(mask: Any, size: tuple[int, int, int]) -> Any:
    """Dilation by a box (separable: a box filter of the mask > 0)."""
    xp, ndi = namespace(mask)
    return ndi.uniform_filter(mask.astype(xp.float32), size=size, mode="constant") > 1e-3


def _box_all(mask: Any, size: tuple[int, int, int]) -> Any:
    """Erosion by a box (the volume's border continues the mask: no erosion from it)."""
    xp, ndi = namespace(mask)
    return ndi.uniform_filter(mask.astype(xp.float32), size=size, mode="nearest") > 1 - 1e-3


def _odd(n: int) -> int:
    return 2 * max(0, n) + 1


def _pool2(vol: Any, c: int) -> Any:
    """Block mean over c x c pixels in-plane (the edge remainder is dropped)."""
    if c == 1:
        return vol
    z, y, x = vol.shape
    v = vol[:, : y - y % c, : x - x % c]
    return v.reshape(z, y // c, c, x // c, c).mean(axis=(2, 4))


def _up2(mask: Any, c: int, shape: tuple[int, ...]) -> Any:
    """Nearest upsampling of a c x c pooled mask back to ``shape`` (the remainder repeats the
    last row / column)."""
    xp, _ = namespace(mask)
    if c == 1:
        return mask
    up = xp.repeat(xp.repeat(mask, c, axis=1), c, axis=2)
    py, px = shape[1] - up.shape[1], shape[2] - up.shape[2]
    if py or px:
        up = xp.pad(up, ((0, 0), (0, py), (0, px)), mode="edge")
    return up


@dataclass(frozen=True)
class Grid:
    """The working grid: the crop ``[z0:z0+depth, y0:y0+ny*f, x0:x0+nx*f]`` of the volume,
    averaged over blocks of ``fz`` slices and ``f`` x ``f`` pixels (the last block of slices
    may be shorter)."""

    shape: tuple[int, int, int]
    z0: int
    y0: int
    x0: int
    nz: int
    ny: int
    nx: int
    fz: int
    f: int
    spacing: tuple[float, float, float]  # working grid (z, y, x) mm

    @property
    def depth(self) -> int:
        return min(self.nz * self.fz, self.shape[0] - self.z0)

    @staticmethod
    def make(vol: Any, spacing: tuple[float, float, float]) -> Grid:
        xp, _ = namespace(vol)
        sz, sy, sx = spacing
        Z, Y, X = (int(v) for v in vol.shape)
        f = max(1, round(INPLANE_MM / sy))
        fz = max(1, int(1.6 // sz)) if sz > 0 else 1
        # the head's in-plane extent, from a sparse probe (head holder and table excluded)
        s = max(1, round(4.0 / sy))
        probe = vol[:: max(1, round(3.0 / sz)), ::s, ::s] > -300
        head = seg.largest_components(probe)
        rows = _host(xp.nonzero(head.any(axis=(0, 2)))[0])
        cols = _host(xp.nonzero(head.any(axis=(0, 1)))[0])
        if rows.size == 0:
            y0, y1, x0, x1 = 0, Y, 0, X
        else:
            margin = 3  # probe pixels (~12 mm): scalp, rounding
            y0 = max(0, (int(rows[0]) - margin) * s)
            y1 = min(Y, (int(rows[-1]) + 1 + margin) * s)
            x0 = max(0, (int(cols[0]) - margin) * s)
            x1 = min(X, (int(cols[-1]) + 1 + margin) * s)
        f = max(1, min(f, y1 - y0, x1 - x0))
        ny, nx = (y1 - y0) // f, (x1 - x0) // f
        nz = -(-Z // fz)
        return Grid((Z, Y, X), 0, y0, x0, nz, ny, nx, fz, f, (sz * fz, sy * f, sx * f))

    def pool(self, vol: Any) -> Any:
        """The working-grid volume (float32), read once from ``vol`` (any dtype): sums of
        strided views, no full-size float copy."""
        xp, _ = namespace(vol)
        f, fz = self.f, self.fz
        v = vol[
            self.z0 : self.z0 + self.depth,
            self.y0 : self.y0 + self.ny * f,
            self.x0 : self.x0 + self.nx * f,
        ]
        full = (v.shape[0] // fz) * fz
        parts = []
        for block, n in ((v[:full], fz), (v[full:], v.shape[0] - full)):
            if block.shape[0] == 0:
                continue
            acc = None
            for dz in range(n):
                for dy in range(f):
                    for dx in range(f):
                        part = block[dz::fz, dy::f, dx::f]
                        if acc is None:
                            acc = part.astype(xp.float32)
                        else:
                            acc += part
            assert acc is not None
            acc *= 1.0 / (n * f * f)
            parts.append(acc)
        return xp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]

    def unpool(self, mask: Any) -> Any:
        """A working-grid mask at full resolution (bool, the volume's shape): strided
        writes, one per position in the block."""
        xp, _ = namespace(mask)
        out = xp.zeros(self.shape, dtype=bool)
        f, fz = self.f, self.fz
        y1, x1 = self.y0 + self.ny * f, self.x0 + self.nx * f
        z1 = self.z0 + self.depth
        for dz in range(fz):
            nzk = len(range(self.z0 + dz, z1, fz))
            for dy in range(f):
                for dx in range(f):
                    out[self.z0 + dz : z1 : fz, self.y0 + dy : y1 : f, self.x0 + dx : x1 : f] = (
                        mask[:nzk]
                    )
        return out

    def box(self, bx: tuple[slice, ...], mask: Any) -> tuple[tuple[slice, ...], Any]:
        """The full-resolution box of the working-grid box ``bx`` and ``mask`` (the crop at
        ``bx``) upsampled into it."""
        xp, _ = namespace(mask)
        f, fz = self.f, self.fz
        z0 = self.z0 + bx[0].start * fz
        z1 = min(self.z0 + bx[0].stop * fz, self.shape[0])
        full = (
            slice(z0, z1),
            slice(self.y0 + bx[1].start * f, self.y0 + bx[1].stop * f),
            slice(self.x0 + bx[2].start * f, self.x0 + bx[2].stop * f),
        )
        m = mask
        if f > 1:
            m = xp.repeat(xp.repeat(m, f, axis=1), f, axis=2)
        if fz > 1:
            m = xp.repeat(m, fz, axis=0)[: z1 - z0]
        return full, m

    def to_full(self, z: float, y: float, x: float) -> tuple[float, float, float]:
        """Working-grid voxel coordinates -> full-resolution voxel coordinates."""
        return (
            self.z0 + (z + 0.5) * self.fz - 0.5,
            self.y0 + (y + 0.5) * self.f - 0.5,
            self.x0 + (x + 0.5) * self.f - 0.5,
        )


@lru_cache(maxsize=4)
def load_model(path: str = str(MODEL_PATH)) -> dict[str, Any]:
    with open(path) as fh:
        model: dict[str, Any] = json.load(fh)
    return model


def confidence(features: dict[str, float], model: dict[str, Any]) -> float:
    """Logistic model over standardised features."""
    z = float(model["intercept"])
    for name, w, mu, sd in zip(
        model["features"], model["coef"], model["mean"], model["std"], strict=True
    ):
        z += w * (features[name] - mu) / sd
    return 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0)))


# ---- anatomy --------------------------------------------------------------------------------
def _hull_2d(mask: Any, directions: int = 32) -> Any:
    """Per slice, the convex hull of ``mask`` (a circumscribed polygon of ``2*directions``
    sides), from the extreme pixels of each row: no host round trip, no per-slice loop."""
    xp, _ = namespace(mask)
    nz, ny, nx = mask.shape
    has = mask.any(axis=2)  # (z, y)
    first = xp.argmax(mask, axis=2).astype(xp.float32)
    last = (nx - 1 - xp.argmax(mask[:, :, ::-1], axis=2)).astype(xp.float32)
    yy = xp.arange(ny, dtype=xp.float32)[None, :]
    lo_x = xp.full((nz, ny), -1e9, dtype=xp.float32)
    hi_x = xp.full((nz, ny), 1e9, dtype=xp.float32)
    for k in range(directions):
        th = math.pi * (k + 0.5) / directions
        c, s = math.cos(th), math.sin(th)
        pa = first * c + yy * s
        pb = last * c + yy * s
        pmax = xp.where(has, xp.maximum(pa, pb), -1e9).max(axis=1)[:, None] + 0.5
        pmin = xp.where(has, xp.minimum(pa, pb), 1e9).min(axis=1)[:, None] - 0.5
        # pmin <= x c + y s <= pmax, solved for x (c is never 0 here)
        a, b = (pmin - yy * s) / c, (pmax - yy * s) / c
        lo_x = xp.maximum(lo_x, xp.minimum(a, b))
        hi_x = xp.minimum(hi_x, xp.maximum(a, b))
    xx = xp.arange(nx, dtype=xp.float32)[None, None, :]
    inside = (xx >= lo_x[:, :, None]) & (xx <= hi_x[:, :, None])
    return inside & has.any(axis=1)[:, None, None]


def _close_fill(bone: Any, k: int) -> Any:
    """Per slice: the bone closed by a k x k box and filled (what it encloses, bone
    included)."""
    xp, _ = namespace(bone)
    p = k
    b = xp.pad(bone, ((0, 0), (p, p), (p, p)))
    closed = _box_all(_box_any(b, (1, k, k)), (1, k, k)) | b
    return seg.fill_holes_2d(closed)[:, p:-p, p:-p]


@dataclass
class Anatomy:
    bone: Any  # working grid: > BONE_HU inside the head
    skull: Any  # bone that is not a calcification inside the brain
    brain: Any  # working grid: intracranial soft tissue, CSF, blood (holes filled)
    inner: Any  # brain with its calcifications (filled)
    open_zone: Any  # within ~6 mm of an outline that is not bone (defect, foramina)
    cavity_slices: int  # slices whose cavity came from the convex hull (a skull defect)


def anatomy(lo: Any, spacing: tuple[float, float, float]) -> Anatomy:
    xp, _ = namespace(lo)
    gz, py, _px = spacing
    c = max(1, round(COARSE_MM / py))
    pc = py * c
    loc = _pool2(lo, c)
    bone = lo > BONE_HU
    body_c = seg.largest_components(loc > -300.0)  # the head: holder and table dropped
    bone_c = (_pool2(bone.astype(xp.float32), c) > 0) & body_c
    fills = [_close_fill(bone_c, _odd(round(r / pc))) for r in (3.0, 8.0, 16.0)]
    areas = [(fl & ~bone_c).sum(axis=(1, 2)) for fl in fills]
    use0 = areas[0] >= 0.85 * areas[2]
    use1 = areas[1] >= 0.85 * areas[2]
    filled = xp.where(
        use0[:, None, None], fills[0], xp.where(use1[:, None, None], fills[1], fills[2])
    )
    # a skull defect: even 16 mm does not close it; the hull does, where it holds soft tissue
    hull = _hull_2d(bone_c)
    inner_h = hull & ~bone_c
    a_hull = inner_h.sum(axis=(1, 2))
    soft_h = (inner_h & (loc > -20.0) & (loc < 100.0)).sum(axis=(1, 2))
    use_hull = (areas[2] < 0.5 * a_hull) & (soft_h > 0.8 * a_hull)
    filled = xp.where(use_hull[:, None, None], hull, filled)
    outside = ~seg.fill_holes_2d(body_c)
    near_out = _box_any(outside, (1, _odd(round(4.0 / pc)), _odd(round(4.0 / pc))))
    cav_c = filled & ~bone_c & ~near_out
    soft_c = cav_c & (loc > -40.0) & (loc < 160.0)
    # cut the links through the skull base, keep the brain, grow it back
    ke = _odd(max(1, round(4.0 / pc)))
    kz = _odd(round(3.0 / gz)) if lo.shape[0] >= 3 else 1
    core = seg.largest_components(_box_all(soft_c, (kz, ke, ke)))
    brain_c = _box_any(core, (kz, ke + 2, ke + 2)) & soft_c
    brain_c = seg.fill_holes_2d(seg.largest_components(brain_c))
    # working grid: one coarse pixel of margin, cut by the bone (the inner table is exact)
    shape = tuple(lo.shape)
    brain_up = _up2(_box_any(brain_c, (1, 3, 3)), c, shape)
    brain = brain_up & ~bone & (lo > -40.0)
    # calcifications: bone well inside the brain (>= ~4 mm from its coarse outline)
    deep = _up2(_box_all(brain_c, (1, _odd(2), _odd(2))), c, shape)
    calc = bone & deep
    skull = bone & ~calc
    inner = brain | calc
    # where the brain's outline is not the inner table (a skull defect, the foramina, the
    # orbits): scar, scalp and vessels there are not searched for blood
    edge_c = brain_c & ~_box_all(brain_c, (1, 3, 3))
    k3 = _odd(round(3.0 / pc))
    open_c = edge_c & ~_box_any(bone_c, (1, k3, k3))
    k6 = _odd(round(6.0 / pc))
    open_zone = _up2(_box_any(open_c, (1, k6, k6)), c, shape)
    return Anatomy(bone, skull, brain, inner, open_zone, int(use_hull.sum()))


# ---- candidates -----------------------------------------------------------------------------
def _contact(comp: np.ndarray, near: np.ndarray) -> float:
    """Fraction of the component's in-plane boundary that lies along the skull."""
    er = sndi.binary_erosion(comp, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    edge = comp & ~er
    return float((edge & near).sum()) / max(float(edge.sum()), 1.0)


def _solidity_and_axes(crop: np.ndarray, py: float, px: float) -> tuple[float, float, float]:
    """On the slice of largest area: area / convex hull area, long and short axis (mm)."""
    from skimage.morphology import convex_hull_image

    areas = crop.sum(axis=(1, 2))
    sl = crop[int(np.argmax(areas))]
    hull = convex_hull_image(sl)  # type: ignore[no-untyped-call]
    solidity = float(sl.sum()) / max(float(hull.sum()), 1.0)
    pts = np.argwhere(sl) * np.array([py, px])
    if len(pts) < 3:
        return solidity, 0.0, 0.0
    cov = np.cov((pts - pts.mean(axis=0)).T)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    return solidity, float(4 * math.sqrt(max(ev[0], 0))), float(4 * math.sqrt(max(ev[1], 0)))


def _classify(f: dict[str, float]) -> str:
    """Intraparenchymal away from the inner table; along it a lens (epidural: convex, thick
    for its length) or a crescent (subdural)."""
    if f["bone_contact"] < 0.2:
        return "intraparenchymal"
    lens = f["solidity"] >= 0.8 and f["thickness_mm"] >= 0.3 * f["long_axis_mm"]
    return "epidural" if lens else "subdural"


def _split(comp: np.ndarray, sampling: tuple[float, float, float], vox_ml: float) -> list[Any]:
    """Touching bleeds (a clot against an epidural lens) as separate parts: a watershed of the
    distance map from its deep maxima (h-maxima, >= 3 mm deeper than the neck between them),
    when each part holds >= 1 mL; one voxel of the larger part is cleared along the cut, so
    the parts are separate regions of the mask too."""
    if comp.sum() * vox_ml < 2.0:
        return [comp]
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    padded = np.pad(comp, 1)
    edt = sndi.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1, 1:-1]
    peaks = h_maxima(edt, 3.0).astype(bool) & comp  # type: ignore[no-untyped-call]
    markers, n = sndi.label(peaks, structure=np.ones((3, 3, 3), bool))
    if n < 2:
        return [comp]
    ws = watershed(-edt, markers, mask=comp)  # type: ignore[no-untyped-call]
    # basins joined across a wide neck (saddle deeper than half the shallower peak): one
    # crescent with a bumpy thickness stays one; a clot against a lens does not
    plus = sndi.generate_binary_structure(3, 1)
    peak = sndi.maximum(edt, ws, index=np.arange(n + 1))
    owner = list(range(n + 1))

    def root(k: int) -> int:
        while owner[k] != k:
            k = owner[k]
        return k

    for k in range(1, n + 1):
        ring = sndi.binary_dilation(ws == k, structure=plus) & (ws > k)
        for j in np.unique(ws[ring]):
            saddle = float(np.minimum(edt[ring & (ws == j)], edt.max()).max())
            if saddle > 0.5 * min(float(peak[k]), float(peak[j])):
                owner[root(int(j))] = root(k)
    ws = np.array([0] + [root(k) for k in range(1, n + 1)])[ws]
    sizes = np.bincount(ws.ravel(), minlength=n + 1)
    big = [k for k in range(1, n + 1) if sizes[k] * vox_ml >= 1.0]
    if len(big) < 2:
        return [comp]
    # small basins join the big part they touch most
    for k in range(1, n + 1):
        if k in big or sizes[k] == 0:
            continue
        ring = sndi.binary_dilation(ws == k, structure=plus) & (ws > 0) & (ws != k)
        touch = np.bincount(ws[ring], minlength=n + 1)
        touch[[j for j in range(n + 1) if j not in big]] = 0
        ws[ws == k] = int(np.argmax(touch)) if touch.any() else big[0]
    parts = [ws == k for k in big]
    # a gap of one voxel on each side of every cut (the cut is only as exact as the neck)
    grown = [sndi.binary_dilation(m, structure=plus) for m in parts]
    return [
        m & ~np.any([g for j, g in enumerate(grown) if j != i], axis=0)
        for i, m in enumerate(parts)
    ]


def _features(
    part: np.ndarray,
    crop: dict[str, np.ndarray],
    sampling: tuple[float, float, float],
    vox_ml: float,
) -> dict[str, float] | None:
    """Measurements of one candidate (host crops around it)."""
    gz, py, px = sampling
    nvox = int(part.sum())
    ncore = int((part & crop["core"]).sum())
    if nvox == 0 or ncore == 0:
        return None
    zz, yy, xx = np.nonzero(part)
    edt = sndi.distance_transform_edt(np.pad(part, 1), sampling=(1e3, py, px))
    thickness = 2.0 * float(edt.max())
    solidity, long_ax, short_ax = _solidity_and_axes(part, py, px)
    zext = (zz.max() - zz.min() + 1) * gz
    ext = math.hypot((yy.max() - yy.min() + 1) * py, (xx.max() - xx.min() + 1) * px)
    blood = part & ~crop["interface"]
    nblood = max(int(blood.sum()), 1)
    sub_sm = crop["sm"][blood] if blood.any() else crop["sm"][part]
    # depth below the inner table, and the shape of the collection along it
    skull = crop["skull"]
    depth = 0.0
    if skull.any():
        d = sndi.distance_transform_edt(~skull, sampling=sampling)
        depth = float(d[part].max())
    pts = np.stack([zz * gz, yy * py, xx * px], axis=1).astype(np.float64)
    ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T))) if nvox > 3 else np.zeros(3)
    ax = [4.0 * math.sqrt(max(float(e), 0.0)) for e in ev[::-1]]  # long, middle, short
    footprint = math.sqrt(max(ax[0] * ax[1], 1e-6))
    return {
        "volume_ml": nvox * vox_ml,
        "log_volume_ml": math.log(nvox * vox_ml),
        "mean_hu": float(sub_sm.mean()),
        "contrast_hu": float(crop["contrast"][blood].mean() if blood.any() else 0.0),
        "bone_contact": _contact(part, crop["near_skull"]),
        "thickness_mm": thickness,
        "extent_mm": ext,
        "z_extent_mm": float(zext),
        "core_fraction": ncore / nvox,
        "dense_fraction": float((sub_sm > 80.0).sum()) / nblood,
        "interface_fraction": 1.0 - nblood / nvox,
        "solidity": solidity,
        "long_axis_mm": long_ax,
        "short_axis_mm": short_ax,
        "depth_mm": depth,
        "footprint_mm": footprint,
        "depth_ratio": depth / footprint,
        "fill": nvox * vox_ml * 1000.0 / max(math.pi / 4 * ax[0] * ax[1] * max(depth, 1.0), 1e-6),
    }


def _grow(
    core: Any,
    lo: Any,
    sm: Any,
    bg: Any,
    contrast: Any,
    *,
    brain: Any,
    calc_zone: Any,
    rim_zone: Any,
    near_skull: Any,
    steps: tuple[int, int],
    blood_low: float,
    blood_high: float,
    min_contrast: float,
) -> tuple[Any, Any]:
    """Candidates: each seed component grows by a few geodesic steps into the blood range,
    then into its partial-volume rim (at least half way from the local brain to the seed's
    blood density), then into the interface with the inner table (at least half blood).
    Growth keeps the seed's label (neighbouring structures — a sinus beside a haematoma —
    stay separate candidates) and runs per cluster of seeds, on crops."""
    xp, ndi = namespace(core)
    seeds, n = seg.label(core, connectivity=1)
    interface_all = xp.zeros(core.shape, dtype=bool)
    if n == 0:
        return seeds, interface_all
    inplane, zsteps = steps
    reach = (_odd(2 * zsteps + 2), _odd(2 * inplane + 4), _odd(2 * inplane + 4))
    zone = _box_any(core, reach)
    clusters, _ = seg.label(zone, connectivity=1)
    out = xp.zeros(core.shape, dtype=seeds.dtype)
    cross = xp.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    zline = xp.ones((3, 1, 1), dtype=bool)
    # the blood level of each seed (mean smoothed HU of its seed voxels)
    cnt = xp.bincount(seeds.ravel(), minlength=n + 1).astype(xp.float32)
    tot = xp.bincount(seeds.ravel(), weights=sm.ravel(), minlength=n + 1).astype(xp.float32)
    level = tot / xp.maximum(cnt, 1.0)
    for k, cb in enumerate(ndi.find_objects(clusters), start=1):
        if cb is None:
            continue
        lab = xp.where(clusters[cb] == k, seeds[cb], 0)
        ok_a = (
            brain[cb]
            & ~calc_zone[cb]
            & (sm[cb] >= blood_low)
            & (contrast[cb] >= min_contrast)
            & ((sm[cb] <= blood_high) | (rim_zone[cb] & (sm[cb] <= 140.0)))
        )
        for _ in range(2):
            for _ in range(inplane):
                lab = _step(lab, ok_a, cross)
            for _ in range(zsteps):
                lab = _step(lab, ok_a, zline)
        # partial-volume rim: half way from the local brain to the seed's blood
        lo_c, bg_c = lo[cb], bg[cb]
        base = brain[cb] & ~calc_zone[cb] & (lo_c <= blood_high + 10.0)
        for fp in (cross, cross) + ((zline,) if zsteps else ()):
            m = ndi.maximum_filter(lab, footprint=fp)
            half = bg_c + 0.5 * (level[m] - bg_c)
            new = (lab == 0) & (m > 0) & base & (lo_c >= xp.maximum(half, blood_low - 6.0))
            lab = xp.where(new, m, lab)
        # the interface with the inner table: between the blood and the bone (the local
        # densest table), at least half blood; two layers (blur, oblique tables)
        table = ndi.maximum_filter(xp.where(near_skull[cb], lo_c, 0.0), size=(1, 5, 5))
        inter = xp.zeros(lab.shape, dtype=bool)
        for _ in range(2):
            m = ndi.maximum_filter(lab, footprint=cross)
            half_b = 0.5 * (level[m] + table)
            new = (lab == 0) & (m > 0) & near_skull[cb] & (lo_c > blood_high) & (lo_c <= half_b)
            new &= ~calc_zone[cb]
            lab = xp.where(new, m, lab)
            inter |= new
        out[cb] = xp.where(lab > 0, lab, out[cb])
        interface_all[cb] |= inter
    return out, interface_all


def _step(lab: Any, ok: Any, footprint: Any) -> Any:
    """One geodesic step: unlabelled allowed voxels take a neighbour's label."""
    xp, ndi = namespace(lab)
    m = ndi.maximum_filter(lab, footprint=footprint)
    return xp.where((lab == 0) & (m > 0) & ok, m, lab)


def head_ct(
    vol: Any,
    geo: Geometry,
    *,
    blood_low: float = 47.0,
    blood_high: float = 95.0,
    min_contrast: float = 13.0,
    min_bleed_ml: float = 0.3,
    threshold: float | None = None,
    model_path: str | None = None,
) -> TaskResult:
    xp, ndi = namespace(vol)
    grid = Grid.make(vol, geo.spacing)
    lo_all = grid.pool(vol)
    gz, py, px = grid.spacing
    vox_ml = gz * py * px / 1000.0
    anat = anatomy(lo_all, grid.spacing)
    model = load_model(model_path or str(MODEL_PATH))
    thr = float(model["threshold"] if threshold is None else threshold)
    params: dict[str, Any] = {
        "blood_low": blood_low,
        "blood_high": blood_high,
        "min_contrast": min_contrast,
        "min_bleed_ml": min_bleed_ml,
        "threshold": thr,
        "model": str(model.get("version", "")),
        "candidates": [],
        "grid": grid,
        "defect_slices": float(anat.cavity_slices),
    }
    found = ndi.find_objects(anat.brain.astype(xp.int8))
    if not found or found[0] is None:
        empty = xp.zeros(grid.shape, dtype=bool)
        return TaskResult("head_ct", {"brain": empty, "haemorrhage": empty}, [], params)
    # work inside the brain's box (+ a margin for the smoothing and the skull)
    m = 4
    bb = tuple(
        slice(max(0, s.start - (1 if i == 0 else m)), min(n, s.stop + (1 if i == 0 else m)))
        for i, (s, n) in enumerate(zip(found[0], lo_all.shape, strict=True))
    )
    lo = lo_all[bb]
    brain, skull, inner = anat.brain[bb], anat.skull[bb], anat.inner[bb]

    def r_px(mm: float) -> int:
        return max(1, round(mm / py))

    def r_z(mm: float) -> int:
        return max(0, math.ceil(mm / gz - 0.5))

    # smoothing that ignores bone (no bone bleeding into blood along the inner table)
    size_s = (3 if gz < 2.0 else 1, 3, 3)
    w_soft = (lo < 150.0).astype(xp.float32)
    sm = ndi.uniform_filter(lo * w_soft, size=size_s) / xp.maximum(
        ndi.uniform_filter(w_soft, size=size_s), 1e-3
    )
    sm = xp.where(w_soft > 0, sm, lo)
    # the local normal brain, on a coarse grid (it is smooth by construction)
    c = 2
    normal = (brain & (sm > 12.0) & (sm < 46.0)).astype(xp.float32)
    nc, smc = _pool2(normal, c), _pool2(sm * normal, c)
    kb = _odd(round(12.0 / (py * c)))
    wsum = ndi.uniform_filter(nc, size=(1, kb, kb))
    bgc = ndi.uniform_filter(smc, size=(1, kb, kb)) / xp.maximum(wsum, 1e-3)
    bgc = xp.where(wsum > 0.05, bgc, 33.0)
    bg = _up2(bgc, c, tuple(lo.shape))
    contrast = sm - bg
    cand = brain & (sm >= blood_low) & (sm <= blood_high) & (contrast >= min_contrast)
    kr = _odd(r_px(2.0))
    near_skull = _box_any(skull, (1, kr, kr))  # in-plane partial volume of the inner table
    # calcifications: dense inside the brain, away from the skull's partial-volume rim
    dense = inner & (lo > 130.0) & ~near_skull
    kc = _odd(r_px(2.5))
    calc_zone = _box_any(dense, (_odd(r_z(2.5)), kc, kc))
    rim_zone = near_skull | _box_any(skull, (3, 3, 3))  # and through-plane, one voxel
    core = cand & ~calc_zone & ~rim_zone & ~anat.open_zone[bb]
    plus = xp.asarray(ndi.generate_binary_structure(3, 1))
    plus[0] = plus[2] = False  # in-plane cross
    core = ndi.binary_opening(core, structure=plus)
    labels, interface = _grow(
        core,
        lo,
        sm,
        bg,
        contrast,
        brain=brain,
        calc_zone=calc_zone,
        rim_zone=rim_zone,
        near_skull=near_skull,
        steps=(r_px(3.0), 1),
        blood_low=blood_low,
        blood_high=blood_high,
        min_contrast=min_contrast,
    )

    candidates: list[dict[str, float]] = []
    findings: list[dict[str, Any]] = []
    bleed = xp.zeros(lo.shape, dtype=bool)
    cand_labels = xp.zeros(lo.shape, dtype=xp.int32)
    mid = _midline(lo_all, anat.brain, grid)
    sampling = (gz, py, px)
    pad = (1, r_px(6.0), r_px(6.0))
    for i, bx in enumerate(ndi.find_objects(labels), start=1):
        if bx is None:
            continue
        pb = tuple(
            slice(max(0, s.start - q), min(n, s.stop + q))
            for s, q, n in zip(bx, pad, lo.shape, strict=True)
        )
        comp = _host(labels[pb] == i)
        if comp.sum() * vox_ml < min_bleed_ml or not _host(core[pb])[comp].any():
            continue
        crop = {
            "core": _host(core[pb]),
            "sm": _host(sm[pb]),
            "contrast": _host(contrast[pb]),
            "interface": _host(interface[pb]),
            "near_skull": _host(near_skull[pb]),
            "skull": _host(skull[pb]),
        }
        for part in _split(comp, sampling, vox_ml):
            feats = _features(part, crop, sampling, vox_ml)
            if feats is None or feats["volume_ml"] < min_bleed_ml:
                continue
            cz, cy, cx = (float(v) for v in sndi.center_of_mass(part))
            cz, cy, cx = (
                cz + pb[0].start + bb[0].start,
                cy + pb[1].start + bb[1].start,
                cx + pb[2].start + bb[2].start,
            )
            feats["midline_mm"] = abs(mid.side_of(cz, cy, cx, py, px)) if mid else 0.0
            p = confidence(feats, model)
            feats["confidence"] = p
            feats["label_id"] = float(len(candidates) + 1)
            fz_, fy_, fx_ = grid.to_full(cz, cy, cx)
            feats["centroid_z"], feats["centroid_y"], feats["centroid_x"] = fz_, fy_, fx_
            candidates.append(feats)
            part_dev = xp.asarray(part)
            cand_labels[pb] = xp.where(part_dev, len(candidates), cand_labels[pb])
            if p < thr:
                continue
            bleed[pb] |= part_dev
            findings.append(
                _finding(
                    geo,
                    f"haemorrhage {len(findings) + 1}",
                    feats["volume_ml"],
                    (fz_, fy_, fx_),
                    grid,
                    _shift_box(pb, bb),
                    part_dev,
                    vol,
                )
                | {
                    "subtype": _classify(feats),
                    "location": _side(geo, mid, cz, cy, cx),
                    "confidence": round(p, 4),
                    "long_axis_mm": round(feats["long_axis_mm"], 1),
                    "short_axis_mm": round(feats["short_axis_mm"], 1),
                    "features": {k: round(v, 4) for k, v in feats.items() if k in REPORTED},
                }
            )
    bleed_all = xp.zeros(lo_all.shape, dtype=bool)
    bleed_all[bb] = bleed
    labels_all = xp.zeros(lo_all.shape, dtype=xp.int32)
    labels_all[bb] = cand_labels
    nb = int(xp.count_nonzero(anat.brain))
    bz_, by_, bx_ = (float(v) for v in ndi.center_of_mass(anat.brain.astype(xp.float32)))
    findings.append(
        _finding(
            geo,
            "brain",
            nb * vox_ml,
            grid.to_full(bz_, by_, bx_),
            grid,
            found[0],
            None,
            None,
            kind="brain",
        )
    )
    if mid is not None and mid.slices:
        findings.append(mid.finding(geo, grid))
    params["candidates"] = candidates
    params["candidate_labels"] = labels_all  # working grid (``grid``), for fitting
    return TaskResult(
        "head_ct",
        {"brain": grid.unpool(anat.brain), "haemorrhage": grid.unpool(bleed_all)},
        findings,
        params,
    )


def _shift_box(bx: tuple[slice, ...], bb: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(a.start + b.start, a.stop + b.start) for a, b in zip(bx, bb, strict=True))


def _finding(
    geo: Geometry,
    label: str,
    volume_ml: float,
    centroid: tuple[float, float, float],
    grid: Grid,
    box: tuple[slice, ...],
    crop: Any,
    vol: Any,
    *,
    kind: str = "haemorrhage",
) -> dict[str, Any]:
    """Measurements from the working grid, in the full volume's voxel frame."""
    lo = grid.to_full(box[0].start, box[1].start, box[2].start)
    hi = grid.to_full(box[0].stop - 1, box[1].stop - 1, box[2].stop - 1)
    half = (0.5 * (grid.fz - 1), 0.5 * (grid.f - 1), 0.5 * (grid.f - 1))
    lo = tuple(max(0.0, a - h) for a, h in zip(lo, half, strict=True))
    hi = tuple(min(float(n - 1), a + h) for a, h, n in zip(hi, half, grid.shape, strict=True))
    corners = [geo.to_patient(lo), geo.to_patient(hi)]  # type: ignore[arg-type]
    out: dict[str, Any] = {
        "type": kind,
        "label": label,
        "volume_ml": round(volume_ml, 3),
        "diameter_mm": round((6 * volume_ml * 1000 / math.pi) ** (1 / 3), 2),
        "centroid_mm": list(geo.to_patient(centroid)),
        "bbox_mm": [min(a, b) for a, b in zip(*corners, strict=True)]
        + [max(a, b) for a, b in zip(*corners, strict=True)],
        "slice_index": round(centroid[0]),
        "voxels": round(volume_ml / geo.voxel_ml),
    }
    if crop is not None and vol is not None:
        full_box, m = grid.box(box, crop)
        vals = vol[full_box][m]
        out["mean_value"] = round(float(vals.astype("float32").mean()), 1)
    return out


# ---- midline --------------------------------------------------------------------------------
class Midline:
    """Ideal midline per slice (from the cavity's symmetry) and the measured shift."""

    def __init__(self) -> None:
        self.lines: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # z -> (centre, normal) px
        self.shift_mm = 0.0  # + toward increasing column
        self.where: tuple[float, float, float] | None = None  # working grid voxel
        self.points = 0
        self.slices = 0
        self.score = 0.0

    def side_of(self, z: float, y: float, x: float, py: float, px: float) -> float:
        if not self.lines:
            return 0.0
        zz = min(self.lines, key=lambda k: abs(k - z))
        c, v = self.lines[zz]
        return float((y - c[0]) * py * v[0] + (x - c[1]) * px * v[1])

    def finding(self, geo: Geometry, grid: Grid) -> dict[str, Any]:
        toward = _patient_side(geo, self.shift_mm) if abs(self.shift_mm) >= 0.5 else None
        conf = min(1.0, self.points / 12.0) * min(1.0, self.slices / 3.0)
        out: dict[str, Any] = {
            "type": "midline_shift",
            "label": "midline shift",
            "shift_mm": round(abs(self.shift_mm), 1),
            "location": toward,
            "confidence": round(conf, 3),
            "features": {
                "signed_shift_mm": round(self.shift_mm, 2),
                "points": float(self.points),
                "slices": float(self.slices),
                "ridge_hu": round(self.score, 1),
            },
        }
        if self.where is not None:
            full = grid.to_full(*self.where)
            out["centroid_mm"] = list(geo.to_patient(full))
            out["slice_index"] = round(full[0])
        return out


def _patient_side(geo: Geometry, toward_columns: float) -> str:
    """'left' or 'right' for a displacement along +columns (LPS: +x is patient left)."""
    return "left" if toward_columns * geo.direction[0] > 0 else "right"


def _side(geo: Geometry, mid: Midline | None, z: float, y: float, x: float) -> str | None:
    if mid is None or not mid.lines:
        return None
    s = mid.side_of(z, y, x, 1.0, 1.0)
    return _patient_side(geo, s)


def _midline(lo: Any, brain: Any, grid: Grid) -> Midline | None:
    """Septum pellucidum / falx versus the cavity's symmetry axis, on the widest slices."""
    gz, py, px = grid.spacing
    filled = brain
    areas = _host(filled.sum(axis=(1, 2))).astype(float)
    if areas.max() <= 0:
        return None
    zs = [int(z) for z in np.nonzero(areas >= 0.6 * areas.max())[0]]
    if len(zs) > 24:  # thin slices: every k-th is enough
        zs = zs[:: math.ceil(len(zs) / 24)]
    out = Midline()
    best: tuple[float, float, float, float] | None = None  # |shift|, shift, z, t
    per_slice: list[tuple[float, float, float]] = []
    s_axis = np.arange(-24.0, 24.01, 0.5)
    for z in zs:
        m = _host(filled[z])
        img = _host(lo[z]).astype(np.float32)
        pts = np.argwhere(m).astype(float)
        if len(pts) < 100:
            continue
        c = pts.mean(axis=0)
        d = (pts - c) * np.array([py, px])
        ev, evec = np.linalg.eigh(np.cov(d.T))
        u = evec[:, 1]  # major axis (anterior-posterior), (y, x) in mm
        if u[0] < 0:
            u = -u
        v = np.array([-u[1], u[0]])  # perpendicular, toward +columns
        if v[1] < 0:
            v = -v
        out.lines[z] = (c, v)
        half = 2.0 * math.sqrt(max(ev[1], 1.0))
        shifts = []
        for t in np.arange(-0.45, 0.2, 0.06) * half:
            prof = np.zeros_like(s_axis)
            for dt in (-3.0, 0.0, 3.0):  # average along the midline (noise)
                yy = c[0] + ((t + dt) * u[0] + s_axis * v[0]) / py
                xx = c[1] + ((t + dt) * u[1] + s_axis * v[1]) / px
                prof += sndi.map_coordinates(img, [yy, xx], order=1, mode="nearest")
            prof /= 3
            score = np.full_like(prof, -1e9)
            for j in range(12, len(s_axis) - 12):
                left = prof[j - 12 : j - 2].min()
                right = prof[j + 3 : j + 13].min()
                if 15 <= prof[j] <= 85:
                    score[j] = prof[j] - 0.5 * (left + right) - 0.5 * abs(left - right)
            score -= 0.3 * np.abs(s_axis)  # prefer the structure nearest the ideal midline
            j = int(np.argmax(score))
            if score[j] >= 10.0:
                shifts.append((float(s_axis[j]), float(score[j]), float(t)))
        if _DEBUG:
            print(z, [(round(a, 1), round(b)) for a, b, _ in shifts])
        if len(shifts) < 4:
            continue
        vals = np.array([v for v, _, _ in shifts])
        med = float(np.median(vals))
        mad = float(np.median(np.abs(vals - med)))
        good = float(np.median([sc for _, sc, _ in shifts]))
        if mad > 2.0 or good < 15.0:
            continue  # no consistent midline structure on this slice
        out.slices += 1
        out.points += len(shifts)
        out.score = max(out.score, good)
        # the falx bows: the larger half of the displacements along the midline
        big = vals[np.argsort(np.abs(vals))[len(vals) // 2 :]]
        val = float(np.median(big)) if np.sign(np.median(big)) == np.sign(med) else med
        per_slice.append((val, float(z), float(shifts[int(np.argmin(np.abs(vals - val)))][2])))
    # a displacement counts when a neighbouring slice agrees (one slice can mislead)
    for val, zf, tt in per_slice:
        agree = len(per_slice) == 1 or any(
            0 < abs(z2 - zf) <= max(2, 12.0 / gz) and abs(v2 - val) <= 3.0
            for v2, z2, _ in per_slice
        )
        if agree and (best is None or abs(val) > best[0]):
            best = (abs(val), val, zf, tt)
    if best is None:
        return out
    _, val, zb, t = best
    c, v = out.lines[int(zb)]
    out.shift_mm = val
    out.where = (zb, float(c[0] + val * v[0] / py), float(c[1] + val * v[1] / px))
    return out
