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
   calcifications and along the inner table / skull base. Thin extra-axial collections lie
   entirely in the inner table's zone: there, blood-dense voxels that are not next to bone
   (>= 200 HU in-plane) seed when they form a sheet of >= 0.15 mL along the table. The
   superior sagittal sinus's strip (within 10 mm of the ideal midline, along the table) gets
   no such seeds, and its candidates grow and merge only within it.
4. the final mask grows from the seeds into the partial-volume rim (hysteresis): a voxel
   within 4 mm of a seed is blood when it is at least half way from the local brain to the
   local blood density; along the inner table, voxels between blood and bone that are at
   least half blood join it (the interface).
5. each candidate is measured (volume, contrast, thickness, contact with the inner table,
   distance from the ideal midline, shape: elongation, flatness — a sinus in its groove is a
   tube, an extra-axial collection a sheet) and scored by a logistic model fitted on
   procedural cases (``models/head_bleed.json``, ``benchmarks/fit_head.py``): the score is
   the finding's confidence; candidates under the operating threshold are dropped. Accepted
   pieces that touch are one finding.
6. subtype by position and shape: away from the inner table intraparenchymal; along it a
   crescent (subdural) or a biconvex lens (epidural), by a second fitted model.
7. midline shift: the ideal midline is the mid-sagittal plane through the falx where it
   meets the inner table front and back (where no falx is found: the cavity's symmetry axis,
   with a lower confidence); the actual midline is the septum pellucidum / falx ridge between
   CSF on the middle slices; no ridge -> "not measured".
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

from services.segmentation.tasks import Geometry, TaskResult, finding_record
from shared.imaging import segment as seg
from shared.imaging.backend import namespace

VERSION = "3.3.0"
_DEBUG = False
MODEL_PATH = Path(__file__).with_name("models") / "head_bleed.json"
FEATURES = (
    "log_volume_ml",
    "log_volume_over_3ml",
    "contrast_hu",
    "midline_near_mm",
    "bone_contact",
    "thickness_mm",
    "elongation",
    "flatness",
    "contact_flatness",
)
SUBTYPE_FEATURES = ("log_depth_ratio", "solidity", "log_volume_ml", "bone_contact")
REPORTED = (
    *FEATURES,
    "midline_mm",
    "mean_hu",
    "extent_mm",
    "z_extent_mm",
    "core_fraction",
    "dense_fraction",
    "solidity",
    "interface_fraction",
    "long_axis_mm",
    "short_axis_mm",
    "depth_mm",
    "footprint_mm",
    "depth_ratio",
    "lens_probability",
)
BONE_HU = 180.0  # the skull as a barrier (thin temporal squama and tilted vault included)
INPLANE_MM = 0.9  # working grid, in-plane
COARSE_MM = 1.8  # anatomy grid, in-plane
SHELL_MIN_ML: float | None = 0.15  # extra-axial seeds along the inner table (None: off)
SINUS_BAND_MM = 10.0  # the superior sagittal sinus's strip: no extra-axial seeds, own growth


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


def _close_fill(bone: Any, k: int) -> tuple[Any, Any]:
    """Per slice: the bone closed by a k x k box, and what that encloses (bone included)."""
    xp, _ = namespace(bone)
    p = k
    b = xp.pad(bone, ((0, 0), (p, p), (p, p)))
    closed = _box_all(_box_any(b, (1, k, k)), (1, k, k)) | b
    return closed[:, p:-p, p:-p], seg.fill_holes_2d(closed)[:, p:-p, p:-p]


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
    closings = [_close_fill(bone_c, _odd(round(r / pc))) for r in (3.0, 8.0, 16.0)]
    fills = [fl for _, fl in closings]
    # narrow gaps in the bone (burr holes, sutures, foramina) are skull, not brain
    gap_c = closings[0][0] & ~bone_c
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
    cav_c = filled & ~bone_c & ~gap_c & ~near_out
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
    brain = brain_up & ~bone & ~_up2(gap_c, c, shape) & (lo > -40.0)
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
    open_c = _box_any(open_c, (1, k6, k6))
    # nor is tissue within 9 mm of the air outside the head (a normal brain is deeper:
    # scalp and skull): scar and bone dust in a craniotomy margin, skin over a defect
    _, ndi = namespace(lo)
    ext = ndi.distance_transform_edt(~outside, sampling=(1e3 * max(gz, 1.0), pc, pc))
    open_zone = _up2(open_c | (ext < 9.0), c, shape)
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


def _classify(f: dict[str, float], model: dict[str, Any]) -> tuple[str, float]:
    """Intraparenchymal away from the inner table; along it a biconvex lens (epidural: deep
    for its footprint, solid in-plane) or a crescent (subdural: shallow and wide, concave
    inner margin), by the fitted subtype model (``model['subtype']``). Returns the subtype
    and the probability of a lens (0 for intraparenchymal)."""
    if f["bone_contact"] < 0.2:
        return "intraparenchymal", 0.0
    sub = model.get("subtype")
    if sub is None:  # a model without a subtype part: the geometric rule
        lens = f["solidity"] >= 0.85 and f["depth_ratio"] >= 0.17
        return ("epidural" if lens else "subdural"), float(lens)
    p = confidence(f, sub)
    return ("epidural" if p >= 0.5 else "subdural"), round(p, 4)


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
        m & ~np.any([g for j, g in enumerate(grown) if j != i], axis=0) for i, m in enumerate(parts)
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
    thickness = 2.0 * float(seg.edt_in_plane(part, sampling).max())
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
    out = {
        "volume_ml": nvox * vox_ml,
        "log_volume_ml": math.log(nvox * vox_ml),
        # collections over ~3 mL: more evidence of blood than the log volume alone (no
        # venous sinus segment or partial-volume rim grows that large)
        "log_volume_over_3ml": max(0.0, math.log(nvox * vox_ml / 3.0)),
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
        # shape: a tube (a venous sinus) is long and narrow, a sheet (an extra-axial
        # collection) long and wide but thin, a clot round
        "elongation": ax[1] / max(ax[0], 1e-6),
        "flatness": ax[2] / max(ax[1], 1e-6),
        "log_depth_ratio": math.log(max(depth / footprint, 1e-3)),
    }
    return out


def derived(f: dict[str, float]) -> None:
    """Features computed from the others (``midline_mm`` set): also applied to cached training
    rows by ``benchmarks/fit_head.py``.

    * ``midline_near_mm``: the distance from the ideal midline up to 20 mm. Near it lie the
      superior sagittal and straight sinuses and the falx; farther out the distance says
      nothing about blood (the transverse sinuses lie ~40 mm out, a haematoma anywhere).
    * ``contact_flatness``: along the inner table, a tube (a venous sinus in its groove) has
      a high flatness, a sheet (subdural or epidural blood) a low one; 0 away from the table.
    """
    f["midline_near_mm"] = min(f["midline_mm"], 20.0)
    f["contact_flatness"] = f["bone_contact"] * f["flatness"]


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
    band: Any,
    steps: tuple[int, int],
    blood_low: float,
    blood_high: float,
    min_contrast: float,
) -> tuple[Any, Any]:
    """Candidates: each seed component grows by a few geodesic steps into the blood range,
    then into its partial-volume rim (at least half way from the local brain to the seed's
    blood density), then into the interface with the inner table (at least half blood).
    Growth keeps the seed's label (neighbouring structures — a sinus beside a haematoma —
    stay separate candidates) and runs per cluster of seeds, on crops. ``band`` (the midline
    strip along the inner table, where the superior sagittal sinus lies) partitions growth: a
    seed mostly in it grows only in it, any other seed only outside it, and pieces on the two
    sides are never merged (a sinus beside extra-axial blood of the same density)."""
    xp, ndi = namespace(core)
    seeds, n = seg.label(core, connectivity=1)
    interface_all = xp.zeros(core.shape, dtype=bool)
    if n == 0:
        return seeds, interface_all
    cnt = xp.bincount(seeds.ravel(), minlength=n + 1).astype(xp.float32)
    in_band = xp.bincount(seeds.ravel(), weights=band.ravel().astype(xp.float32), minlength=n + 1)
    side = in_band * 2.0 > cnt  # per seed: in the band
    side[0] = False
    inplane, zsteps = steps
    reach = (_odd(3 * zsteps + 2), _odd(3 * inplane + 4), _odd(3 * inplane + 4))
    zone = _box_any(core, reach)
    clusters, _ = seg.label(zone, connectivity=1)
    out = xp.zeros(core.shape, dtype=seeds.dtype)
    cross = xp.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    zline = xp.ones((3, 1, 1), dtype=bool)
    # the blood level of each seed (mean smoothed HU of its seed voxels)
    tot = xp.bincount(seeds.ravel(), weights=sm.ravel(), minlength=n + 1).astype(xp.float32)
    level = tot / xp.maximum(cnt, 1.0)
    for k, cb in enumerate(ndi.find_objects(clusters), start=1):
        if cb is None:
            continue
        lab = xp.where(clusters[cb] == k, seeds[cb], 0)
        band_c = band[cb]
        ok_a = (
            brain[cb]
            & ~calc_zone[cb]
            & (sm[cb] >= blood_low)
            & (contrast[cb] >= min_contrast)
            & ((sm[cb] <= blood_high) | (rim_zone[cb] & (sm[cb] <= 140.0)))
        )
        for _ in range(3):
            for _ in range(inplane):
                lab = _step(lab, ok_a, cross, side, band_c)
            for _ in range(zsteps):
                lab = _step(lab, ok_a, zline, side, band_c)
        # partial-volume rim: half way from the local brain to the seed's blood
        lo_c, bg_c = lo[cb], bg[cb]
        base = brain[cb] & ~calc_zone[cb] & (lo_c <= blood_high + 10.0)
        for fp in (cross, cross) + ((zline,) if zsteps else ()):
            m = ndi.maximum_filter(lab, footprint=fp)
            half = bg_c + 0.5 * (level[m] - bg_c)
            new = (lab == 0) & (m > 0) & base & (lo_c >= xp.maximum(half, blood_low - 6.0))
            new &= side[m] == band_c
            lab = xp.where(new, m, lab)
        # the interface with the inner table: between the blood and the bone (the local
        # densest table), at least half blood; two layers (blur, oblique tables)
        table = ndi.maximum_filter(xp.where(near_skull[cb], lo_c, 0.0), size=(1, 5, 5))
        inter = xp.zeros(lab.shape, dtype=bool)
        for _ in range(2):
            m = ndi.maximum_filter(lab, footprint=cross)
            half_b = 0.5 * (level[m] + table)
            new = (lab == 0) & (m > 0) & near_skull[cb] & (lo_c > blood_high) & (lo_c <= half_b)
            new &= ~calc_zone[cb] & (side[m] == band_c)
            lab = xp.where(new, m, lab)
            inter |= new
        out[cb] = xp.where(lab > 0, lab, out[cb])
        interface_all[cb] |= inter
    return _merge_alike(out, level, side), interface_all


def _merge_alike(labels: Any, level: Any, side: Any, max_step_hu: float = 10.0) -> Any:
    """Grown pieces that touch and have the same blood density (within ``max_step_hu``) are
    one collection: the slices of a crescent under the vertex, the two sides of a calcified
    spot. Pieces of different density stay apart (a sinus beside a haematoma rarely matches
    it). One pass over the touching pairs (downloaded: few), union-find on the host."""
    xp, _ = namespace(labels)
    pairs = []
    for axis in range(3):
        n = labels.shape[axis]
        a = xp.take(labels, xp.arange(n - 1), axis=axis)
        b = xp.take(labels, xp.arange(1, n), axis=axis)
        touch = (a > 0) & (b > 0) & (a != b)
        pairs.append(xp.stack([a[touch], b[touch]], axis=1))
    pp = _host(xp.concatenate(pairs, axis=0))
    if pp.size == 0:
        return labels
    pp = np.unique(np.sort(pp, axis=1), axis=0)
    lv = _host(level)
    sd = _host(side)
    parent = np.arange(lv.size)

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = int(parent[k])
        return k

    for i, j in pp:
        if abs(float(lv[i]) - float(lv[j])) <= max_step_hu and sd[i] == sd[j]:
            ri, rj = root(int(i)), root(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    mapping = np.array([root(k) for k in range(lv.size)], dtype=np.int32)
    return xp.asarray(mapping)[labels]


def _step(lab: Any, ok: Any, footprint: Any, side: Any, band: Any) -> Any:
    """One geodesic step: unlabelled allowed voxels take a neighbour's label (on its side of
    the midline band)."""
    xp, ndi = namespace(lab)
    m = ndi.maximum_filter(lab, footprint=footprint)
    return xp.where((lab == 0) & (m > 0) & ok & (side[m] == band), m, lab)


def _shell_seeds(lo: Any, zone: Any, vox_ml: float, blood_low: float, blood_high: float) -> Any:
    """Seeds of thin extra-axial collections, in the inner table's partial-volume zone where
    the ordinary seeds are not taken (``zone``: blood candidates there). The bone's own
    partial volume is a band one or two voxels wide whose density climbs steeply toward the
    bone; a crescent or lens of blood is a plateau of blood density between the bone and the
    brain. Seeds: blood-dense voxels (``lo`` in the blood range) not next to a voxel of
    >= 200 HU in-plane, in connected pieces of >= ``SHELL_MIN_ML`` (a sheet along the table,
    not a speck of partial volume)."""
    near_bone = _box_any(lo >= 200.0, (1, 3, 3))
    shell = zone & ~near_bone & (lo >= blood_low) & (lo <= blood_high)
    lab, n = seg.label(shell, connectivity=2)
    if n == 0:
        return shell
    sizes = seg.component_sizes(lab, n)
    keep = sizes * vox_ml >= SHELL_MIN_ML
    keep[0] = False
    return keep[lab]


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
    # and through-plane: under (or over) the skull of the next slice, near this slice's skull
    # (a tangential cut of the vault); deeper in, a collection under the vertex still seeds
    k4 = _odd(r_px(4.0))
    rim_zone = near_skull | (_box_any(skull, (3, 3, 3)) & _box_any(skull, (1, k4, k4)))
    core = cand & ~calc_zone & ~rim_zone & ~anat.open_zone[bb]
    plus = xp.asarray(ndi.generate_binary_structure(3, 1))
    plus[0] = plus[2] = False  # in-plane cross
    core = ndi.binary_opening(core, structure=plus)
    # the superior sagittal sinus: on the inner table at the midline (the strip within
    # SINUS_BAND_MM of the ideal midline and 12 mm of the skull)
    mid = _midline(lo_all, anat.brain, grid)
    band = xp.zeros(lo.shape, dtype=bool)
    if mid is not None and mid.plane is not None:
        k12 = _odd(r_px(12.0))
        band = xp.abs(mid.distance_map(lo.shape, bb, py, px, xp)) < SINUS_BAND_MM
        band &= _box_any(skull, (1, k12, k12))
    if SHELL_MIN_ML is not None:
        zone = cand & rim_zone & ~calc_zone & ~anat.open_zone[bb] & ~band
        core |= _shell_seeds(lo, zone, vox_ml, blood_low, blood_high)
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
        band=band,
        steps=(r_px(3.0), 1),
        blood_low=blood_low,
        blood_high=blood_high,
        min_contrast=min_contrast,
    )

    candidates: list[dict[str, float]] = []
    findings: list[dict[str, Any]] = []
    bleed = xp.zeros(lo.shape, dtype=bool)
    cand_labels = xp.zeros(lo.shape, dtype=xp.int32)
    sampling = (gz, py, px)
    pad = (1, r_px(6.0), r_px(6.0))
    accepted: dict[int, float] = {}  # candidate id -> confidence

    def crops(pb: tuple[slice, ...]) -> dict[str, np.ndarray]:
        """Host copies of what the measurements need around one candidate."""
        return {
            "core": _host(core[pb]),
            "sm": _host(sm[pb]),
            "contrast": _host(contrast[pb]),
            "interface": _host(interface[pb]),
            "near_skull": _host(near_skull[pb]),
            "skull": _host(skull[pb]),
        }

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
        crop = crops(pb)
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
            feats["midline_mm"] = (
                abs(mid.side_of(cz, cy, cx, py, px)) if mid and mid.plane else 30.0
            )
            derived(feats)
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
            accepted[len(candidates)] = p
    # one finding per connected region of accepted candidates (pieces of one crescent that
    # grew into each other); measured, and typed, as a whole
    regions, _ = seg.label(bleed, connectivity=1)
    for k, rb in enumerate(ndi.find_objects(regions), start=1):
        if rb is None:
            continue
        pb = tuple(
            slice(max(0, s.start - q), min(n, s.stop + q))
            for s, q, n in zip(rb, pad, lo.shape, strict=True)
        )
        region = regions[pb] == k
        members = [int(v) for v in _host(xp.unique(cand_labels[pb][region])) if int(v) in accepted]
        part = _host(region)
        feats = _features(part, crops(pb), sampling, vox_ml)
        if feats is None or not members:
            continue
        p = max(accepted[m] for m in members)
        cz, cy, cx = (float(v) for v in sndi.center_of_mass(part))
        cz, cy, cx = (
            cz + pb[0].start + bb[0].start,
            cy + pb[1].start + bb[1].start,
            cx + pb[2].start + bb[2].start,
        )
        feats["midline_mm"] = abs(mid.side_of(cz, cy, cx, py, px)) if mid and mid.plane else 30.0
        derived(feats)
        subtype, p_lens = _classify(feats, model)
        feats["lens_probability"] = p_lens
        findings.append(
            _finding(
                geo,
                f"haemorrhage {len(findings) + 1}",
                feats["volume_ml"],
                grid.to_full(cz, cy, cx),
                grid,
                _shift_box(pb, bb),
                region,
                vol,
            )
            | {
                "subtype": subtype,
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
    if mid is not None and mid.plane is not None:
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
    first = grid.to_full(box[0].start, box[1].start, box[2].start)
    last = grid.to_full(box[0].stop - 1, box[1].stop - 1, box[2].stop - 1)
    half = (0.5 * (grid.fz - 1), 0.5 * (grid.f - 1), 0.5 * (grid.f - 1))
    lo = (
        max(0.0, first[0] - half[0]),
        max(0.0, first[1] - half[1]),
        max(0.0, first[2] - half[2]),
    )
    hi = (
        min(float(grid.shape[0] - 1), last[0] + half[0]),
        min(float(grid.shape[1] - 1), last[1] + half[1]),
        min(float(grid.shape[2] - 1), last[2] + half[2]),
    )
    out = finding_record(
        geo, kind, label, volume_ml, centroid, lo, hi, round(volume_ml / geo.voxel_ml)
    )
    if crop is not None and vol is not None:
        full_box, m = grid.box(box, crop)
        vals = vol[full_box][m]
        out["mean_value"] = round(float(vals.astype("float32").mean()), 1)
    return out


# ---- midline --------------------------------------------------------------------------------
class Midline:
    """The ideal midline (the mid-sagittal plane through the falx where it meets the inner
    table, front and back: mass effect does not move it there) and the displacement of the
    septum pellucidum / falx from it, in the middle third of the brain."""

    def __init__(self) -> None:
        # the plane x = a + b*y + c*z in working-grid voxels (x columns, y rows, z slices)
        self.plane: tuple[float, float, float] | None = None
        self.shift_mm = 0.0  # + toward increasing column
        self.where: tuple[float, float, float] | None = None  # working grid voxel
        self.points = 0  # falx points that fixed the plane
        self.slices = 0  # slices with a consistent septum / falx displacement
        self.score = 0.0
        self.spacing = (1.0, 1.0, 1.0)
        self.method = ""  # how the ideal midline was found: falx | symmetry

    def side_of(self, z: float, y: float, x: float, py: float, px: float) -> float:
        """Signed in-plane distance (mm, + toward increasing column) from the ideal midline."""
        if self.plane is None:
            return 0.0
        a, b, c = self.plane
        return float((x - (a + b * y + c * z)) * px / math.hypot(1.0, b * px / py))

    def distance_map(
        self, shape: tuple[int, ...], at: tuple[slice, ...], py: float, px: float, xp: Any
    ) -> Any:
        """Signed in-plane distance (mm) from the ideal midline of every voxel of the box
        ``at`` (working grid) of ``shape``; needs ``plane``."""
        assert self.plane is not None
        a, b, c = self.plane
        z = xp.arange(shape[0], dtype=xp.float32)[:, None, None] + at[0].start
        y = xp.arange(shape[1], dtype=xp.float32)[None, :, None] + at[1].start
        x = xp.arange(shape[2], dtype=xp.float32)[None, None, :] + at[2].start
        return (x - (a + b * y + c * z)) * (px / math.hypot(1.0, b * px / py))

    def finding(self, geo: Geometry, grid: Grid) -> dict[str, Any]:
        """The measurement, with how it was made in its label: the ideal midline from the
        falx (or, failing that, the cavity's symmetry: less exact, lower confidence); no
        septum / falx ridge between -> no shift is reported (``shift_mm`` None)."""
        toward = _patient_side(geo, self.shift_mm) if abs(self.shift_mm) >= 0.5 else None
        conf = min(1.0, self.points / 3.0) * min(1.0, self.slices / 3.0)
        if self.method != "falx":
            conf *= 0.5
        if not self.slices:
            label = "midline not measured: no septum or falx ridge"
        elif self.method == "falx":
            label = "midline shift (ideal midline: falx)"
        else:
            label = "midline shift (ideal midline: skull symmetry)"
        out: dict[str, Any] = {
            "type": "midline_shift",
            "label": label,
            "shift_mm": round(abs(self.shift_mm), 1) if self.slices else None,
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
    if mid is None or mid.plane is None:
        return None
    return _patient_side(geo, mid.side_of(z, y, x, 1.0, 1.0))


def _ridge(
    img: np.ndarray,
    centre: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    t: float,
    s_axis: np.ndarray,
    py: float,
    px: float,
) -> tuple[float, float, float]:
    """The falx / septum across the midline at ``t`` mm along it: a thin line brighter than
    the darkest tissue within 5 mm on both sides (CSF of the ventricles or the fissure).
    Profile averaged over 8 mm along the line. Returns (position along ``v`` in mm, ridge
    height in HU, level of the darker side in HU)."""
    prof = np.zeros_like(s_axis)
    for dt in (-4.0, -2.0, 0.0, 2.0, 4.0):
        yy = centre[0] + ((t + dt) * u[0] + s_axis * v[0]) / py
        xx = centre[1] + ((t + dt) * u[1] + s_axis * v[1]) / px
        prof += sndi.map_coordinates(img, [yy, xx], order=1, mode="nearest")
    prof /= 5
    step = float(s_axis[1] - s_axis[0])
    w = max(2, round(5.0 / step))
    g = max(1, round(1.0 / step))
    score = np.full_like(prof, -1e9)
    sides = np.zeros_like(prof)
    for j in range(w + g, len(s_axis) - w - g):
        left = prof[j - w - g : j - g].min()
        right = prof[j + g + 1 : j + g + w + 1].min()
        if -5 <= prof[j] <= 85:
            score[j] = prof[j] - 0.5 * (left + right) - 0.5 * abs(left - right)
            sides[j] = max(left, right)
    j = int(np.argmax(score))
    pos = float(s_axis[j])
    if 0 < j < len(prof) - 1 and score[j - 1] > -1e8 and score[j + 1] > -1e8:
        den = score[j - 1] - 2 * score[j] + score[j + 1]  # sub-sample peak
        off = 0.5 * (score[j - 1] - score[j + 1]) / den if den < 0 else 0.0
        pos += float(np.clip(off, -0.5, 0.5)) * step
    return pos, float(score[j]), float(sides[j])


def _falx_line(
    img: np.ndarray,
    c: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    front: float,
    back: float,
    py: float,
    px: float,
) -> list[tuple[float, float, float]] | None:
    """The falx where it meets the inner table, front and back, as one straight line per
    slice: the line whose samples over the first and last ~18 mm of the brain are brightest
    against the tissue 2 mm to either side (fissure CSF beside the falx, brain beside the
    sinus), searched over the offsets of its two ends (+-14 mm, refined to 0.25 mm).
    Returns its two end points (t along ``u``, offset along ``v``, response in HU)."""
    t_f = front + np.arange(1.0, 13.0, 1.0)
    t_b = back - np.arange(1.0, 13.0, 1.0)
    ts = np.concatenate([t_f, t_b])
    ss = np.arange(-17.0, 17.01, 0.25)
    tt, sv = np.meshgrid(ts, ss, indexing="ij")
    yy = c[0] + (tt * u[0] + sv * v[0]) / py
    xx = c[1] + (tt * u[1] + sv * v[1]) / px
    strip = sndi.map_coordinates(img, [yy, xx], order=1, mode="nearest")  # (t, s)
    inside = (img.shape[0] > yy) & (yy >= 0) & (img.shape[1] > xx) & (xx >= 0)
    strip = np.where(inside, strip, np.nan)
    ta, tb = float(t_f.mean()), float(t_b.mean())
    rows = np.arange(len(ts))
    # nearest the inner table counts most: mass effect bends the falx least there
    dist = np.concatenate([t_f - front, back - t_b])
    wt = np.clip(1.5 - dist / 10.0, 0.3, 1.0)
    near_table = dist <= 5.0

    def response(sf: np.ndarray, sb: np.ndarray) -> np.ndarray:
        frac = (ts[None, :] - ta) / (tb - ta)
        off = sf[:, None] + (sb - sf)[:, None] * frac  # (lines, t)

        def at(o: np.ndarray) -> np.ndarray:
            j = np.clip((o - ss[0]) / 0.25, 0, len(ss) - 1.001)
            j0 = j.astype(int)
            w = j - j0
            return np.asarray(strip[rows, j0] * (1 - w) + strip[rows, j0 + 1] * w)

        mid = at(off)
        # beside the falx: the fissure 2 mm away; beside the sinus at the table: brain
        side = np.where(
            near_table[None, :],
            0.5 * (at(off - 5.5) + at(off + 5.5)),
            0.5 * (at(off - 2.0) + at(off + 2.0)),
        )
        ok = (mid >= 15.0) & (mid <= 90.0)
        r = np.where(ok, np.clip(mid - side, -10.0, 40.0), -10.0)
        w = np.where(np.isfinite(r), wt[None, :], 0.0)
        return np.asarray(np.nansum(r * w, axis=1) / np.maximum(w.sum(axis=1), 1e-6))

    grid = np.arange(-14.0, 14.01, 1.0)
    sf, sb = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
    r = response(sf, sb)
    k = int(np.nanargmax(r))
    best = (float(sf[k]), float(sb[k]))
    fine = np.arange(-1.0, 1.01, 0.25)
    f1, f2 = (g.ravel() for g in np.meshgrid(fine, fine, indexing="ij"))
    r2 = response(best[0] + f1, best[1] + f2)
    k2 = int(np.nanargmax(r2))
    sc = float(r2[k2])
    if _DEBUG:
        print("falx line", round(sc, 1))
    if not np.isfinite(sc) or sc < 9.0:
        return None
    return [(ta, best[0] + float(f1[k2]), sc), (tb, best[1] + float(f2[k2]), sc)]


def _wmedian(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][int(np.searchsorted(cum, 0.5 * cum[-1]))])


def _midline(lo: Any, brain: Any, grid: Grid) -> Midline | None:
    """Falx at the front and back of the upper brain -> the mid-sagittal plane; septum /
    falx ridge in the middle third -> its displacement from the plane."""
    xp, _ = namespace(lo)
    gz, py, px = grid.spacing
    areas = _host(brain.sum(axis=(1, 2))).astype(float)
    if areas.max() <= 0:
        return None
    out = Midline()
    out.spacing = grid.spacing
    zs = [int(z) for z in np.nonzero(areas >= 0.35 * areas.max())[0]]
    if len(zs) > 40:  # thin slices: every k-th is enough
        zs = zs[:: math.ceil(len(zs) / 40)]
    ends: list[tuple[float, float, float, float, float]] = []  # z, y, x, weight, AP length
    kz = round(2.0 / gz)  # the falx and septum are upright: average ~5 mm of slices

    def image(z: int) -> np.ndarray:
        """The slice averaged with its neighbours, inside the brain only (no skull from the
        neighbours where the vault curves)."""
        sl = slice(max(0, z - kz), z + kz + 1)
        w = brain[sl].astype(xp.float32)
        num = (lo[sl] * w).sum(axis=0)
        den = w.sum(axis=0)
        avg = _host(num / (den + 1e-6)).astype(np.float32)
        own = _host(lo[z]).astype(np.float32)
        return np.where(_host(den) > 0.5, avg, own)

    middle: list[tuple[int, float, np.ndarray, np.ndarray, np.ndarray, float]] = []
    longest = 0.0
    np.arange(-12.0, 12.01, 0.5)
    for z in zs:
        m = _host(brain[z])
        pts = np.argwhere(m).astype(float)
        if len(pts) < 100:
            continue
        c = pts.mean(axis=0)
        d = (pts - c) * np.array([py, px])
        _ev, evec = np.linalg.eigh(np.cov(d.T))
        u = evec[:, 1]  # major axis (anterior-posterior), (y, x) in mm
        if u[0] < 0:
            u = -u
        v = np.array([-u[1], u[0]])  # perpendicular, toward +columns
        if v[1] < 0:
            v = -v
        if abs(u[0]) < 0.7:
            continue  # not a front-to-back oval here (skull base, vertex)
        along = d @ u
        front, back = float(along.min()), float(along.max())
        longest = max(longest, back - front)
        img = image(z)
        line = _falx_line(img, c, u, v, front, back, py, px)
        if line is not None:
            for t, s_off, sc in line:
                yy = c[0] + (t * u[0] + s_off * v[0]) / py
                xx = c[1] + (t * u[1] + s_off * v[1]) / px
                ends.append((float(z), float(yy), float(xx), sc, back - front))
        if areas[z] >= 0.6 * areas.max():
            middle.append((z, 0.5 * (back - front), c, u, v, front))
    if _DEBUG:
        print("ends", [(int(a), round(b), round(c), round(d)) for a, b, c, d, _ in ends])
    # the falx is fixed where it meets the inner table on the longest slices (the level of
    # the ventricles); higher up, the ends of a shorter brain are bent with the falx
    out.method = "falx"
    if len(ends) < 2:
        # no falx found: the symmetry axis of the cavity on the middle slices
        out.method = "symmetry"
        ends = []
        for z, half, c, u, _v, front in middle:
            for t in (front + 0.2 * half, front + 1.8 * half):
                ends.append((float(z), c[0] + t * u[0] / py, c[1] + t * u[1] / px, 1.0, longest))
        if len(ends) < 2:
            return out
    e = np.array(ends)  # pairs of rows per slice (front, back): z, y, x, response, length
    fr, bk = e[0::2], e[1::2]
    dy = bk[:, 1] - fr[:, 1]
    slope = (bk[:, 2] - fr[:, 2]) / np.where(np.abs(dy) > 1, dy, 1)
    # the yaw from every slice (mass effect moves both ends alike), the offset from the
    # longest slices, where the falx meets the inner table unbent; the plane is upright (a
    # roll of the head is not modelled)
    b = _wmedian(slope, fr[:, 3])
    y_ref = float(np.median(e[:, 1]))
    x_s = 0.5 * (fr[:, 2] + b * (y_ref - fr[:, 1]) + bk[:, 2] + b * (y_ref - bk[:, 1]))
    for frac in (0.9, 0.8, 0.0):
        sel = fr[:, 4] >= frac * longest
        if sel.any():
            break
    a = _wmedian(x_s[sel], fr[sel, 3])
    coef = np.array([a - b * y_ref, b, 0.0])
    out.plane = (float(coef[0]), float(coef[1]), 0.0)
    out.points = int(sel.sum()) if out.method == "falx" else 0
    # the septum / falx between: displacement from the plane along the profile direction
    s_mid = np.arange(-24.0, 24.01, 0.5)
    per_slice: list[tuple[float, float, float, float]] = []  # shift, z, y, x
    for z, half, c, u, v, front in middle:
        img = image(z)
        found = []
        for t in front + half * np.arange(0.55, 1.25, 0.1):
            # profile centred on the ideal midline at this position
            yy0 = c[0] + t * u[0] / py
            x_ideal = coef[0] + coef[1] * yy0 + coef[2] * z
            base = np.array([yy0, x_ideal])
            pos, sc, side = _ridge(img, base, u, v, 0.0, s_mid, py, px)
            sc -= 0.3 * abs(pos)  # prefer the structure nearest the ideal midline
            # the septum between the ventricles: thin, faint, but CSF on both sides
            if sc >= (5.0 if side < 15.0 else 10.0):
                found.append((pos * float(np.hypot(v[0], v[1])), sc, base + pos * v / [py, px]))
        if _DEBUG:
            print(z, [(round(a, 1), round(b)) for a, b, _ in found])
        if len(found) < 3:
            continue
        vals = np.array([f[0] for f in found])
        med = float(np.median(vals))
        near = np.abs(vals - med) <= 2.0  # the septum / falx, not a sulcus beside it
        if near.sum() < 3 or near.mean() < 0.6:
            continue  # no consistent midline structure on this slice
        val = float(np.median(vals[near]))
        good = float(np.median([f[1] for f, ok in zip(found, near, strict=True) if ok]))
        out.slices += 1
        out.score = max(out.score, good)
        k = int(np.argmin(np.abs(vals - val)))
        per_slice.append((val, float(z), float(found[k][2][0]), float(found[k][2][1])))
    best: tuple[float, float, float, float] | None = None
    # a displacement counts when a neighbouring slice agrees (one slice can mislead)
    for val, zf, yf, xf in per_slice:
        agree = any(
            0 < abs(z2 - zf) <= max(2, 12.0 / gz) and abs(v2 - val) <= 2.0
            for v2, z2, _, _ in per_slice
        )
        if agree and (best is None or abs(val) > abs(best[0])):
            best = (val, zf, yf, xf)
    if best is not None:
        out.shift_mm = best[0]
        out.where = (best[1], best[2], best[3])
    return out
