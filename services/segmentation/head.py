"""Head CT: brain, acute haemorrhage (intraparenchymal, subdural, epidural), midline shift.

Works on a ~1 mm in-plane grid (the volume is block-averaged; masks come back at full
resolution), NumPy or CuPy alike:

1. skull (> 300 HU) closed in-plane, its inside filled slice by slice: the cranial cavity;
   the brain is the largest soft-tissue component inside it (robust to the open skull base).
2. blood candidates: smoothed HU in the blood range *and* brighter than the local brain
   (background from normal-brain voxels in a ~25 mm box: cupping and beam-hardening bands
   move both); seeds exclude the partial-volume zones of dense structures: around
   calcifications (> 130 HU inside the brain, dilated by the in-plane blur and one slice)
   and along the inner table / skull base (distance to bone); seeds grow back a few mm into
   the bone zone, so blood on the inner table keeps its rim, but a rim alone never seeds.
3. each candidate is measured (volume, density, contrast, thickness, extent, contact with the
   inner table, solidity) and scored by a logistic model fitted on procedural cases
   (``models/head_bleed.json``, ``benchmarks/fit_head.py``): the score is the finding's
   confidence; candidates under the operating threshold are dropped.
4. subtype by position and shape: away from the inner table intraparenchymal; along it a
   crescent (subdural) or a biconvex lens (epidural).
5. midline shift: ideal midline from the symmetry of the cranial cavity (second moments per
   slice), actual midline from the septum pellucidum / falx ridge between CSF.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as sndi

from services.segmentation.tasks import Geometry, TaskResult, _measure
from shared.imaging import segment as seg
from shared.imaging.backend import namespace

VERSION = "2.0.0"
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


def _host(a: Any) -> np.ndarray:
    """Explicit download of a small array (a crop, a profile) to the host."""
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _box_any(mask: Any, size: tuple[int, int, int]) -> Any:
    """Dilation by a box (separable: a box filter of the mask > 0)."""
    _, ndi = namespace(mask)
    return ndi.uniform_filter(mask.astype("float32"), size=size, mode="constant") > 1e-3


def _box_all(mask: Any, size: tuple[int, int, int]) -> Any:
    """Erosion by a box."""
    _, ndi = namespace(mask)
    return ndi.uniform_filter(mask.astype("float32"), size=size, mode="constant") > 1 - 1e-3


def _pool(vol: Any, f: int) -> Any:
    """Block mean over f x f pixels in-plane (crops the edge remainder)."""
    if f == 1:
        return vol
    z, y, x = vol.shape
    v = vol[:, : y - y % f, : x - x % f]
    return v.reshape(z, y // f, f, x // f, f).mean(axis=(2, 4))


def _unpool(mask: Any, f: int, shape: tuple[int, ...]) -> Any:
    xp, _ = namespace(mask)
    if f == 1:
        return mask
    up = xp.repeat(xp.repeat(mask, f, axis=1), f, axis=2)
    out = xp.zeros(shape, dtype=bool)
    out[:, : up.shape[1], : up.shape[2]] = up
    return out


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


def _contact(comp: np.ndarray, near: np.ndarray) -> float:
    """Fraction of the component's in-plane boundary that lies along the skull."""
    er = sndi.binary_erosion(comp, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    edge = comp & ~er
    return float((edge & near).sum()) / max(float(edge.sum()), 1.0)


def _classify(f: dict[str, float]) -> str:
    """Intraparenchymal away from the inner table; along it a lens (epidural: convex, thick
    for its length) or a crescent (subdural)."""
    if f["bone_contact"] < 0.2:
        return "intraparenchymal"
    lens = f["solidity"] >= 0.8 and f["thickness_mm"] >= 0.3 * f["long_axis_mm"]
    return "epidural" if lens else "subdural"


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
    vol = vol.astype(xp.float32)
    sz, sy, sx = geo.spacing
    f = max(1, round(0.9 / sy))
    lo = _pool(vol, f)
    py, px = sy * f, sx * f
    vox_ml = sz * py * px / 1000.0

    def r_px(mm: float) -> int:
        return max(1, round(mm / py))

    def r_z(mm: float) -> int:
        return max(0, math.ceil(mm / sz - 0.5))

    # 1. skull, cranial cavity, brain
    bone = lo > 300.0
    k = 2 * r_px(3.0) + 1
    closed = _box_all(_box_any(bone, (1, k, k)), (1, k, k)) | bone
    cavity = seg.fill_holes_2d(closed) & ~closed
    soft = cavity & (lo > -40.0) & (lo < 160.0)
    opened = _box_any(_box_all(soft, (1, 3, 3)), (1, 3, 3)) & soft  # thin links go
    brain_lo = seg.largest_components(opened)
    brain_lo = seg.fill_holes_2d(brain_lo) & soft | (seg.fill_holes_2d(brain_lo) & (lo >= 160))
    brain_lo &= ~bone
    masks_shape = tuple(vol.shape)
    found = ndi.find_objects(brain_lo.astype(xp.int8))
    empty = xp.zeros(masks_shape, dtype=bool)
    if not found or found[0] is None:
        return TaskResult("head_ct", {"brain": empty, "haemorrhage": empty}, [], {})

    # 2. candidates
    size_s = (3 if sz < 2.0 else 1, 3, 3)
    # smoothing that ignores bone (no bone bleeding into blood along the inner table)
    w_soft = (lo < 150.0).astype(xp.float32)
    sm = ndi.uniform_filter(lo * w_soft, size=size_s) / xp.maximum(
        ndi.uniform_filter(w_soft, size=size_s), 1e-3
    )
    sm = xp.where(w_soft > 0, sm, lo)
    normal = (brain_lo & (sm > 12.0) & (sm < 46.0)).astype(xp.float32)
    kb = 2 * r_px(12.0) + 1
    wsum = ndi.uniform_filter(normal, size=(1, kb, kb))
    bg = ndi.uniform_filter(sm * normal, size=(1, kb, kb)) / xp.maximum(wsum, 1e-3)
    bg = xp.where(wsum > 0.05, bg, 33.0)
    contrast = sm - bg
    cand = brain_lo & (sm >= blood_low) & (sm <= blood_high) & (contrast >= min_contrast)
    inner = seg.fill_holes_2d(brain_lo)
    skull = bone & ~inner
    kr = 2 * r_px(2.0) + 1
    near_skull = _box_any(skull, (1, kr, kr))  # in-plane partial volume of the inner table
    # calcifications: dense inside the brain, away from the skull's partial-volume rim
    dense = inner & (lo > 130.0) & ~near_skull
    kc = 2 * r_px(2.5) + 1
    calc_zone = _box_any(dense, (2 * r_z(2.5) + 1, kc, kc))
    rim_zone = near_skull | _box_any(skull, (3, 3, 3))  # and through-plane, one voxel
    core = cand & ~calc_zone & ~rim_zone
    plus = xp.asarray(ndi.generate_binary_structure(3, 1))
    plus[0] = plus[2] = False  # in-plane cross
    core = ndi.binary_opening(core, structure=plus)
    # seeds grow back into the blood range, and along the inner table into its rim
    allowed = (
        brain_lo
        & ~calc_zone
        & (sm >= blood_low)
        & (contrast >= min_contrast)
        & ((sm <= blood_high) | (rim_zone & (sm <= 140.0)))
    )
    zstep = xp.zeros((3, 3, 3), dtype=bool)
    zstep[:, 1, 1] = True
    grown = core
    for _ in range(2):
        for _ in range(r_px(3.0)):
            grown = ndi.binary_dilation(grown, structure=plus) & allowed
        grown = ndi.binary_dilation(grown, structure=zstep) & allowed
    # the interface with the inner table: voxels at least half blood (between blood and
    # bone in density), one step from the blood
    interface = ndi.binary_dilation(grown, structure=plus) & near_skull & (lo > blood_high)
    interface &= (lo < 600.0) & ~calc_zone
    grown = grown | interface
    labels, n = seg.label(grown, connectivity=1)

    model = load_model(model_path or str(MODEL_PATH))
    thr = float(model["threshold"] if threshold is None else threshold)
    findings: list[dict[str, Any]] = []
    candidates: list[dict[str, float]] = []
    bleed_lo = xp.zeros(lo.shape, dtype=bool)
    near = near_skull  # contact with the inner table
    mid = _midline(lo, brain_lo, bone, geo, f)
    boxes = ndi.find_objects(labels) if n else []
    for i, bx in enumerate(boxes, start=1):
        if bx is None:
            continue
        comp = labels[bx] == i
        nvox = int(comp.sum())
        if nvox * vox_ml < min_bleed_ml:
            continue
        ncore = int((comp & core[bx]).sum())
        if ncore == 0:
            continue
        # features (small crops, downloaded on purpose)
        c_host = _host(comp)
        pad = np.pad(c_host, ((1, 1), (1, 1), (1, 1)))
        edt = sndi.distance_transform_edt(pad, sampling=(1e3, py, px))
        thickness = 2.0 * float(edt.max())
        solidity, long_ax, short_ax = _solidity_and_axes(c_host, py, px)
        zext = (bx[0].stop - bx[0].start) * sz
        ext = math.hypot((bx[1].stop - bx[1].start) * py, (bx[2].stop - bx[2].start) * px)
        blood = comp & ~interface[bx]
        nblood = max(int(blood.sum()), 1)
        sub_sm = sm[bx][blood]
        feats = {
            "log_volume_ml": math.log(nvox * vox_ml),
            "mean_hu": float(sub_sm.mean()),
            "contrast_hu": float(contrast[bx][blood].mean()),
            "bone_contact": _contact(c_host, _host(near[bx])),
            "thickness_mm": thickness,
            "extent_mm": ext,
            "z_extent_mm": float(zext),
            "core_fraction": ncore / nvox,
            "dense_fraction": float((sub_sm > 80.0).sum()) / nblood,
            "interface_fraction": 1.0 - nblood / nvox,
            "solidity": solidity,
            "long_axis_mm": long_ax,
            "short_axis_mm": short_ax,
        }
        cz, cy, cx = (float(v) for v in ndi.center_of_mass(comp))
        cz, cy, cx = cz + bx[0].start, cy + bx[1].start, cx + bx[2].start
        off = mid.side_of(cz, cy, cx, py, px) if mid is not None else 0.0
        feats["midline_mm"] = abs(off)
        p = confidence(feats, model)
        feats["confidence"] = p
        feats["label_id"] = float(i)
        feats["centroid_z"], feats["centroid_y"], feats["centroid_x"] = cz, cy * f, cx * f
        candidates.append(feats)
        if p < thr:
            continue
        bleed_lo[bx] |= comp
        side = _side(geo, mid, cz, cy, cx)
        full = xp.zeros(masks_shape, dtype=bool)
        full_box = (
            bx[0],
            slice(bx[1].start * f, bx[1].stop * f),
            slice(bx[2].start * f, bx[2].stop * f),
        )
        full[full_box] = _unpool(comp, f, tuple(s.stop - s.start for s in full_box))
        m = _measure(
            full[full_box],
            geo,
            "haemorrhage",
            f"haemorrhage {len(findings) + 1}",
            vol,
            box=full_box,
        )
        m["volume_ml"] = round(nvox * vox_ml, 3)
        m.update(
            subtype=_classify(feats),
            location=side,
            confidence=round(p, 4),
            long_axis_mm=round(long_ax, 1),
            short_axis_mm=round(short_ax, 1),
            features={
                k: round(v, 4)
                for k, v in feats.items()
                if k in FEATURES or k in ("long_axis_mm", "short_axis_mm")
            },
        )
        findings.append(m)
    brain = _unpool(brain_lo, f, masks_shape)
    bleed = _unpool(bleed_lo, f, masks_shape)
    fb = _measure(brain, geo, "brain", "brain")
    findings.append(
        {k: fb[k] for k in ("type", "label", "volume_ml", "centroid_mm", "bbox_mm", "voxels")}
    )
    if mid is not None and mid.slices:
        findings.append(mid.finding(geo))
    return TaskResult(
        "head_ct",
        {"brain": brain, "haemorrhage": bleed},
        findings,
        {
            "blood_low": blood_low,
            "blood_high": blood_high,
            "min_contrast": min_contrast,
            "min_bleed_ml": min_bleed_ml,
            "threshold": thr,
            "model": str(model.get("version", "")),
            "candidates": candidates,
            "candidate_labels": labels,  # low-res grid (factor ``pool``), for fitting
            "pool": f,
        },
    )


class Midline:
    """Ideal midline per slice (from the cavity's symmetry) and the measured shift."""

    def __init__(self) -> None:
        self.lines: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # z -> (centre, normal) px
        self.shift_mm = 0.0  # + toward increasing column
        self.where: tuple[float, float, float] | None = None
        self.points = 0
        self.slices = 0
        self.score = 0.0

    def side_of(self, z: float, y: float, x: float, py: float, px: float) -> float:
        if not self.lines:
            return 0.0
        zz = min(self.lines, key=lambda k: abs(k - z))
        c, v = self.lines[zz]
        return float((y - c[0]) * py * v[0] + (x - c[1]) * px * v[1])

    def finding(self, geo: Geometry) -> dict[str, Any]:
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
            out["centroid_mm"] = list(geo.to_patient(self.where))
            out["slice_index"] = round(self.where[0])
        return out


def _patient_side(geo: Geometry, toward_columns: float) -> str:
    """'left' or 'right' for a displacement along +columns (LPS: +x is patient left)."""
    return "left" if toward_columns * geo.direction[0] > 0 else "right"


def _side(geo: Geometry, mid: Midline | None, z: float, y: float, x: float) -> str | None:
    if mid is None or not mid.lines:
        return None
    s = mid.side_of(z, y, x, 1.0, 1.0)
    return _patient_side(geo, s)


def _midline(lo: Any, brain: Any, bone: Any, geo: Geometry, f: int) -> Midline | None:
    """Septum pellucidum / falx versus the cavity's symmetry axis, on the widest slices."""
    sz, sy, sx = geo.spacing
    py, px = sy * f, sx * f
    filled = seg.fill_holes_2d(brain)
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
            0 < abs(z2 - zf) <= max(2, 12.0 / sz) and abs(v2 - val) <= 3.0
            for v2, z2, _ in per_slice
        )
        if agree and (best is None or abs(val) > best[0]):
            best = (abs(val), val, zf, tt)
    if best is None:
        return out
    _, val, zb, t = best
    c, v = out.lines[int(zb)]
    out.shift_mm = val
    # a midline point is c + t*u + val*v; report its voxel position
    out.where = (zb, float(c[0] + val * v[0] / py) * f, float(c[1] + val * v[1] / px) * f)
    return out
