"""Procedural head CT with exact truth: the evaluation set for haemorrhage analysis.

A head in a frame of its own (x: patient left, y: posterior, z: superior, mm, origin at the
centre of the cranial vault near the foramen of Monro), yawed and offset in the image by a
seed. Anatomy, outside in: scalp (skin, fat, temporalis), skull (outer and inner tables,
diploe, coronal and sagittal sutures, frontal sinus), skull base (anterior, middle and
posterior fossae, sella, clivus, petrous ridges, mastoid air cells, sphenoid sinus, orbits),
dura, subarachnoid CSF, cortex with sulci, white matter, deep grey nuclei, lateral / third /
fourth ventricles, septum pellucidum, interhemispheric fissure with the falx, tentorium,
cerebellum and brainstem, venous sinuses (superior sagittal, straight, transverse, sigmoid:
dense blood that is normal). Physiological calcifications (pineal, choroid plexus, falx
plaques, basal ganglia) vary by seed.

Acquisition: each slice integrates sub-planes across its thickness (partial volume of the
skull base and the inner table in thick slices), an in-plane point-spread blur, residual
cupping, beam-hardening bands and streaks at the skull base, correlated noise.

Bleeds: intraparenchymal (irregular blob with an oedema rim), subdural (crescent along the
convexity, crossing sutures, never the midline), epidural (biconvex lens, stopped by the
coronal suture); mass effect shifts the midline (falx, septum, ventricles) away from the blood
by an amount proportional to the volume, and compresses the ipsilateral ventricle.

Everything is a deterministic function of the seed. ``head_case`` returns arrays;
``write_series`` writes a DICOM CT series with real geometry.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.ndimage as ndi
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from shared.evaluation.metrics import score_bleeds

BleedKind = Literal["intraparenchymal", "subdural", "epidural"]
KINDS: tuple[BleedKind, ...] = ("intraparenchymal", "subdural", "epidural")
# midline shift per mL of blood (mm/mL): extra-axial blood pushes harder than a parenchymal
# clot of the same volume (no oedema counted here); capped at 15 mm
SHIFT_PER_ML: dict[str, float] = {"intraparenchymal": 0.12, "subdural": 0.17, "epidural": 0.15}
F32 = np.float32


@dataclass(frozen=True)
class BleedSpec:
    """One haemorrhage. ``side``: +1 patient left, -1 right. ``hu``: mean density (acute
    55-80, subacute 40-50). Unset fields are drawn from the case's seed."""

    kind: BleedKind
    volume_ml: float
    side: int | None = None
    hu: float | None = None
    age: Literal["acute", "subacute"] = "acute"


@dataclass
class BleedTruth:
    label: int  # value in HeadCase.haemorrhage
    kind: BleedKind
    side: Literal["left", "right"]
    volume_ml: float  # partial-volume-exact (sub-plane fractions), not a voxel count
    centroid_zyx: tuple[float, float, float]  # voxel indices
    hu: float
    age: str


@dataclass
class HeadCase:
    hu: np.ndarray  # int16 (z, y, x), Hounsfield units
    spacing: tuple[float, float, float]  # z, y, x mm (z = slice thickness = spacing)
    brain: np.ndarray  # bool: intracranial contents (parenchyma, CSF, blood, dura)
    haemorrhage: np.ndarray  # uint8 labels, 0 = none, i = bleeds[i - 1]
    calcification: np.ndarray  # bool: physiological calcifications
    bleeds: list[BleedTruth]
    midline_shift_mm: float  # displacement of the septum pellucidum, + = toward patient left
    seed: int
    params: dict[str, float] = field(default_factory=dict)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


# ---------------------------------------------------------------------------------------------
# primitives (all broadcast over x, y, z arrays in mm)


def _ell(
    x: np.ndarray, y: np.ndarray, z: float, c: Sequence[float], r: Sequence[float]
) -> np.ndarray:
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def _capsule(
    x: np.ndarray, y: np.ndarray, z: float, a: Sequence[float], b: Sequence[float]
) -> np.ndarray:
    """Distance (mm) from the segment a-b."""
    ab = np.subtract(b, a, dtype=np.float64)
    L2 = float(ab @ ab)
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / L2, 0.0, 1.0)
    return np.asarray(
        np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
    )


def _smoothstep(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return np.asarray(v * v * (3 - 2 * v))


@dataclass
class _Anatomy:
    """The seed's head: sizes, positions, textures, calcifications, bleeds."""

    rng: np.random.Generator
    normal: bool

    def __post_init__(self) -> None:
        r = self.rng
        self.a = r.uniform(68, 76)  # outer skull semi-axes (mm)
        self.b = r.uniform(86, 96)
        self.c_up = r.uniform(72, 80)
        self.c_low = self.c_up * r.uniform(1.25, 1.4)
        self.t_skull = r.uniform(5.0, 7.5)
        self.scalp = r.uniform(4.5, 7.0)
        self.wob = [(r.uniform(0, 0.02), r.uniform(0, 2 * np.pi), k) for k in (2, 3, 4)]
        self.csf_w = r.uniform(0.6, 2.6)  # subarachnoid width (atrophy)
        self.vent = r.uniform(0.75, 1.5)  # ventricle size
        self.gm, self.wm = r.uniform(37, 42), r.uniform(27, 32)
        self.csf = r.uniform(2, 9)
        self.sinus_hu = r.uniform(55, 70)
        self.falx_hu = r.uniform(44, 58)
        self.waves = [
            (r.normal(size=3) / np.linalg.norm(r.normal(size=3) + 1e-9), r.uniform(0, 2 * np.pi))
            for _ in range(5)
        ]
        self.sulc_k = 2 * np.pi / r.uniform(18, 26)
        self.sulc_depth = r.uniform(8, 15)
        self.cupping = r.uniform(0, 6)
        self.bar_hu = r.uniform(15, 45)  # dark band between the petrous bones
        self.streaks = [
            (r.integers(0, 3), r.uniform(0, np.pi), r.uniform(-40, 40), r.uniform(0.6, 2.0))
            for _ in range(int(r.integers(3, 9)))
        ]
        self.noise = r.uniform(3.0, 5.5)  # HU at 5 mm
        self.petrous_hu = r.uniform(1700, 2300)
        p = 0.9 if self.normal else 0.6  # normal cases: calcifications everywhere
        calcs: list[tuple[tuple[float, float, float], tuple[float, float, float], float]] = []
        if r.random() < p + 0.1:  # pineal
            rr = r.uniform(2.0, 4.5)
            calcs.append(
                ((0.0, r.uniform(13, 18), r.uniform(-2, 4)), (rr, rr, rr), r.uniform(120, 600))
            )
        if r.random() < p:  # choroid plexus glomus, both atria
            for s in (-1, 1):
                rr = r.uniform(1.5, 4.0)
                calcs.append(
                    (
                        (s * r.uniform(19, 24), r.uniform(20, 26), r.uniform(6, 12)),
                        (rr, rr * 1.3, rr),
                        r.uniform(120, 500),
                    )
                )
        for _ in range(int(r.integers(0, 4)) if r.random() < p else 0):  # falx plaques
            calcs.append(
                (
                    (0.0, r.uniform(-55, 60), r.uniform(25, 60)),
                    (0.8, r.uniform(2, 6), r.uniform(1.5, 4)),
                    r.uniform(150, 900),
                )
            )
        if r.random() < p * 0.5:  # globus pallidus, punctate, both sides
            for s in (-1, 1):
                rr = r.uniform(1.0, 2.5)
                calcs.append(
                    (
                        (s * r.uniform(16, 20), r.uniform(-4, 4), r.uniform(-3, 3)),
                        (rr, rr * 1.5, rr),
                        r.uniform(110, 400),
                    )
                )
        if r.random() < p * 0.4:  # dural plaque on the convexity, a few mm under the inner table
            az = r.uniform(0, 2 * np.pi)
            calcs.append(
                ((0.0, 0.0, 0.0), (az, r.uniform(20, 55), r.uniform(2, 5)), -r.uniform(150, 700))
            )
        self.calcs = calcs
        self.shift = 0.0  # midline shift amplitude (mm, + toward patient left)
        self.ipsi = 0  # side whose ventricle is compressed
        self.bleeds: list[_Bleed] = []

    # ---- skull
    def outer(self, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
        """(depth under the outer skull surface in mm, skull thickness there)."""
        c = self.c_up if z > 0 else self.c_low
        rho = np.sqrt((x / self.a) ** 2 + (y / self.b) ** 2 + (z / c) ** 2) + 1e-6
        rad = np.sqrt(x * x + y * y + z * z)
        phi = np.arctan2(y, x)
        w = 1.0
        for amp, ph, k in self.wob:
            w = w + amp * np.cos(k * phi + ph)
        depth = rad / rho * w - rad
        lateral = np.abs(np.cos(phi)) ** 4 * (z < 30)  # temporal squama is thinner
        return depth, self.t_skull * (1 - 0.4 * lateral)

    def floor(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the cranial floor: anterior, middle (with the sella) and posterior
        fossae; the foramen magnum opens it."""
        ax = np.abs(x)
        ridge = (ax - 18.0) * 0.8  # petrous ridge line (y) between middle and posterior fossa
        w_post = _smoothstep((y - np.maximum(ridge, 2.0)) / 8 + 0.5)
        w_ant = _smoothstep((-22.0 - y) / 8 + 0.5)
        mid = -42 + 16 * np.exp(-((x / 13) ** 2)) * np.exp(-(((y + 8) / 14) ** 2))
        post = -62 + 0.004 * x * x
        f = w_ant * -20 + (1 - w_ant) * ((1 - w_post) * mid + w_post * post)
        fm = x * x + (y - 28) ** 2 < 15**2
        return np.where(fm, -300.0, f)

    def tentorium(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(-10.0 - 0.42 * np.abs(x) - 0.25 * np.maximum(y - 30, 0))

    def deform_x(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Where the brain content seen at x came from (mass effect: the midline moves by
        ``shift`` at the septum, nothing moves at the skull)."""
        if self.shift == 0:
            return x
        W = (self.a - 8) * np.sqrt(np.clip(1 - (y / (self.b - 8)) ** 2, 0.05, 1))
        g = np.clip(1 - (y / (0.85 * self.b)) ** 2, 0, 1)
        h = math.exp(-(((z - 8) / 45) ** 2))
        d = self.shift * g * h * np.clip(1 - (x / W) ** 2, 0, 1)
        return x - d

    def truth_shift(self) -> float:
        """Displacement of the septum pellucidum (y=-15, z=8): the x whose source is 0."""
        # solve deform_x(x) = 0 by bisection (monotone near the midline)
        lo, hi = (0.0, self.shift) if self.shift > 0 else (self.shift, 0.0)
        for _ in range(60):
            m = (lo + hi) / 2
            v = float(self.deform_x(np.array([m]), np.array([-15.0]), 8.0)[0])
            if v > 0:
                hi = m
            else:
                lo = m
        return (lo + hi) / 2


@dataclass
class _Bleed:
    kind: BleedKind
    side: int
    hu: float
    age: str
    # intraparenchymal: centre, radii, harmonics; extra-axial: direction, angular radius, T
    centre: np.ndarray
    radii: np.ndarray
    harm: list[tuple[float, float, float, int]]
    n0: np.ndarray
    alpha: float
    thick: float
    suture_y: float | None
    suture_side: float = 0.0

    def field(
        self,
        an: _Anatomy,
        x: np.ndarray,
        y: np.ndarray,
        z: float,
        outer: tuple[np.ndarray, np.ndarray] | None = None,
        fl: np.ndarray | None = None,
    ) -> np.ndarray:
        """> 0 inside the bleed (``outer`` and ``fl``: the plane's skull depth and floor, if
        already computed for these points)."""
        if self.kind == "intraparenchymal":
            dx = (x - self.centre[0]) / self.radii[0]
            dy = (y - self.centre[1]) / self.radii[1]
            dz = (z - self.centre[2]) / self.radii[2]
            rr = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
            phi = np.arctan2(dy, dx)
            th = np.arccos(np.clip(dz / rr, -1, 1))
            w = 1.0
            for amp, p1, p2, k in self.harm:
                w = w + amp * np.cos(k * phi + p1) * np.sin(th) + amp * 0.7 * np.cos(k * th + p2)
            return np.asarray(w - rr)
        depth, t = outer if outer is not None else an.outer(x, y, z)
        delta = depth - t
        rad = np.sqrt(x * x + y * y + z * z) + 1e-6
        cosa = (x * self.n0[0] + y * self.n0[1] + z * self.n0[2]) / rad
        u = np.arccos(np.clip(cosa, -1, 1)) / self.alpha
        if self.kind == "subdural":  # flat crescent, tapering at its ends
            prof = self.thick * np.clip(1 - u**4, 0, 1) ** 0.5
        else:  # biconvex lens
            prof = self.thick * np.clip(1 - u**2, 0, 1)
        f = np.minimum(prof - delta, delta + 0.01)
        f = np.where(self.side * x > 1.2, f, -1.0)  # never across the midline
        if self.suture_y is not None:  # epidural: stopped by the coronal suture
            s = y - (self.suture_y + 0.3 * z)
            f = np.where(s * self.suture_side > 0, f, -1.0)
        fl = fl if fl is not None else an.floor(x, y)
        return np.asarray(np.where(z > fl + 1, f, -1.0))

    def bbox(self, an: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "intraparenchymal":
            r = self.radii * 1.5
            return self.centre - r, self.centre + r
        # directions on the cap, at radii from under the bleed to the outer surface
        e1 = np.cross(self.n0, [0.0, 0.0, 1.0] if abs(self.n0[2]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(self.n0, e1)
        pts = []
        for u in np.linspace(0, self.alpha * 1.05, 8):
            for psi in np.linspace(0, 2 * np.pi, 24, endpoint=False):
                n = np.cos(u) * self.n0 + np.sin(u) * (np.cos(psi) * e1 + np.sin(psi) * e2)
                cz = an.c_up if n[2] > 0 else an.c_low
                rad = 1.07 / math.sqrt((n[0] / an.a) ** 2 + (n[1] / an.b) ** 2 + (n[2] / cz) ** 2)
                pts += [n * rad, n * max(rad * 0.9 - an.t_skull - self.thick - 3, 0)]
        arr = np.array(pts)
        return arr.min(axis=0) - 2, arr.max(axis=0) + 2


def _draw_bleed(
    an: _Anatomy, spec: BleedSpec, rng: np.random.Generator, z_lo: float, z_hi: float
) -> _Bleed:
    side = spec.side if spec.side is not None else int(rng.choice([-1, 1]))
    hu = (
        spec.hu
        if spec.hu is not None
        else (rng.uniform(52, 80) if spec.age == "acute" else rng.uniform(40, 48))
    )
    none3 = np.zeros(3)
    zc_lo, zc_hi = max(z_lo + 10, -25.0), min(z_hi - 10, 45.0)
    if spec.kind == "intraparenchymal":
        r0 = (3 * spec.volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        radii = r0 * rng.uniform(0.8, 1.25, size=3)
        radii *= r0 / np.prod(radii) ** (1 / 3)
        # lobar or deep (basal ganglia / thalamus), well inside the parenchyma
        for _ in range(100):
            lo_z = max(zc_lo, -8.0 + radii[2])  # above the skull base (no temporal fossa)
            c = np.array(
                [
                    side * rng.uniform(14, 38),
                    rng.uniform(-40, 45),
                    rng.uniform(lo_z, max(lo_z, zc_hi)),
                ]
            )
            inner = np.array([an.a - 14, an.b - 14, an.c_up - 14]) - radii
            if np.sum((c / np.maximum(inner, 5)) ** 2) < 1 and abs(c[0]) - radii[0] > 6:
                break
        harm = [
            (rng.uniform(0.05, 0.15), rng.uniform(0, 6.3), rng.uniform(0, 6.3), int(k))
            for k in (2, 3)
        ]
        return _Bleed(spec.kind, side, hu, spec.age, c, radii, harm, none3, 0.0, 0.0, None)
    # extra-axial: a direction on the convexity of one hemisphere
    az = rng.uniform(-65, 65) * np.pi / 180
    el_lo = math.asin(np.clip(zc_lo / 70, -0.9, 0.9))
    el_hi = math.asin(np.clip(zc_hi / 70, -0.9, 0.9))
    el = rng.uniform(min(el_lo, el_hi), max(el_lo, el_hi))
    n0 = np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    v = spec.volume_ml
    R = (an.a + an.b) / 2 - an.t_skull
    if spec.kind == "subdural":  # thin and wide: 4 mm at 4 mL, 12 mm at 80 mL
        thick = float(np.clip(3.6 + 0.1 * v, 4, 14)) * rng.uniform(0.9, 1.1)
        form = 0.8
    else:  # thick and short
        thick = float(np.clip(6 + 0.4 * v, 7, 30)) * rng.uniform(0.9, 1.1)
        form = 0.5
    area = v * 1000 / (thick * form)
    alpha = math.acos(float(np.clip(1 - area / (2 * np.pi * R * R), -1, 1)))
    b = _Bleed(spec.kind, side, hu, spec.age, none3, none3, [], n0, alpha, thick, None)
    if spec.kind == "epidural":  # bounded by the coronal suture on the side of its centre
        b.suture_y = -15.0
        centre = n0 * R
        b.suture_side = 1.0 if centre[1] - (-15.0 + 0.3 * centre[2]) > 0 else -1.0
    return b


def _volume(an: _Anatomy, b: _Bleed, step: float = 1.25) -> float:
    lo, hi = b.bbox(an)
    xs = np.arange(lo[0], hi[0], step, dtype=F32)
    ys = np.arange(lo[1], hi[1], step, dtype=F32)
    X, Y = np.meshgrid(xs, ys)
    v = 0
    for z in np.arange(lo[2], hi[2], step):
        v += int(np.count_nonzero(b.field(an, X, Y, float(z)) > 0))
    return v * step**3 / 1000.0


def _fit_volume(an: _Anatomy, b: _Bleed, target: float) -> None:
    """Scale the bleed so that its (coarse) volume hits the target."""
    for _ in range(4):
        v = _volume(an, b)
        if v <= 0:
            if b.kind == "intraparenchymal":
                b.radii = b.radii * 1.3
            else:
                b.thick *= 1.5
            continue
        ratio = target / v
        if abs(ratio - 1) < 0.03:
            break
        if b.kind == "intraparenchymal":
            b.radii = b.radii * ratio ** (1 / 3)
        else:  # wider, not thicker
            b.alpha = min(b.alpha * ratio**0.5, 1.4)


# ---------------------------------------------------------------------------------------------
# one sub-plane of the head, in HU, with labels


def _plane(
    an: _Anatomy, x: np.ndarray, y: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU, intracranial mask, bleed label (0 = none) and calcification mask of the plane at
    height ``z`` (head frame). ``x``, ``y``: mm grids of the plane (head frame)."""
    rng_tex = x * 0.37 + y * 0.61 + z * 0.11  # cheap deterministic texture phase
    depth, tsk = an.outer(x, y, z)
    img = np.full(x.shape, -1000.0, F32)
    # scalp: skin, fat, temporalis muscle laterally
    temporal = np.clip((np.abs(x) / an.a - 0.6) * 3, 0, 1) * (abs(z + 8) < 30) * (y < 25)
    scalp_t = an.scalp + 6 * temporal
    sc = (depth > -scalp_t) & (depth < 0)
    img[sc] = 40
    fat = sc & (depth < -0.25 * scalp_t) & (depth > -0.75 * scalp_t) & (temporal < 0.3)
    img[fat] = -85
    img[sc & (temporal >= 0.3) & (depth < -1.2)] = 52
    # skull: tables and diploe, sutures, frontal sinus
    sk = (depth >= 0) & (depth < tsk)
    table = (depth < 1.6) | (depth > tsk - 1.6)
    dip = 520 + 180 * np.sin(rng_tex * 2.3) * np.cos(rng_tex * 1.1)
    img[sk] = np.where(table[sk], 1550.0, dip[sk])
    suture = ((np.abs(x) < 0.5) & (y > -70) & (z > 10)) | (np.abs(y - (-15 + 0.3 * z)) < 0.5) & (
        z > -10
    )
    img[sk & suture] = 250
    fs = _ell(x, y, z, (0, -an.b + 9, 8), (16, 7, 14)) < 1
    img[sk & fs & (depth > 1.2) & (depth < tsk + 6)] = -950
    # the cranial cavity and below it the skull base
    fl = np.full(x.shape, -300.0, F32)
    if z < -12:  # the floor is nowhere higher
        ins = np.nonzero(depth >= tsk)
        fl[ins] = an.floor(x[ins], y[ins])
    cavity = (depth >= tsk) & (z > fl)
    base_bone = (depth >= tsk) & (z <= fl) & (z > fl - 7)
    deep = (depth >= tsk) & (z <= fl - 7)
    img[base_bone] = 1150 + 250 * np.sin(rng_tex[base_bone] * 1.7)
    img[deep] = 42
    img[deep & (np.sin(x * 0.21 + 1) * np.sin(y * 0.17) > 0.55)] = -70  # fat planes
    if z < -15:
        for s in (-1, 1):  # orbits: fat, globe
            o = _ell(x, y, z, (s * 31, -an.b + 24, -34), (17, 20, 15)) < 1
            img[o & ~cavity] = -80
            img[(_ell(x, y, z, (s * 31, -an.b + 16, -34), (12, 12, 12)) < 1) & ~cavity] = 12
            mast = (_ell(x, y, z, (s * 47, 22, -44), (12, 13, 11)) < 1) & ~cavity
            cells = np.sin(x * 1.3 + s) * np.sin(y * 1.1) * np.sin(z * 0.9 + 0.5) > -0.2
            img[mast] = np.where(cells[mast], -900.0, 900.0)
        img[(_ell(x, y, z, (0, -14, -40), (14, 12, 9)) < 1) & ~cavity] = -950  # sphenoid
        img[(np.abs(x) < 11) & (y < -32) & (z < -24) & (depth > tsk) & ~cavity] = -900  # nasal
    # petrous ridges and clivus: dense bone inside the base, rising above the fossa floors
    dense = np.zeros(x.shape, bool)
    if -55 < z < -20:
        for s in (-1, 1):
            p = _capsule(x, y, z, (s * 56, 32, -41), (s * 17, 4, -33)) < 7.0
            img[p & (depth >= tsk)] = an.petrous_hu
            dense |= p
        cl = _capsule(x, y, z, (0, -8, -31), (0, 19, -64)) < 6.5
        img[cl & (depth >= tsk)] = 1100
        dense |= cl
    cavity &= ~dense
    # ---- brain (mass effect: deformed x for everything that belongs to the brain)
    xd = an.deform_x(x, y, z)
    dcav = np.minimum(depth - tsk, z - fl)
    tent = an.tentorium(xd, y)
    post_fossa = (y > np.maximum((np.abs(xd) - 18) * 0.8, 2)) & (z < tent)
    br = np.where(cavity)
    if br[0].size:
        bx, by, bd = x[br], y[br], dcav[br]
        bxd = xd[br]
        v = np.full(bx.shape, an.wm, F32)
        # sulci and cortex
        sfield = np.zeros(bx.shape, F32)
        for n, ph in an.waves:
            sfield += np.cos(an.sulc_k * (n[0] * bxd + n[1] * by + n[2] * z) + ph)
        sfield /= len(an.waves) ** 0.5
        rel = np.clip((bd - an.csf_w) / an.sulc_depth, 0, 1)
        gm = (bd < an.csf_w + 3.0) | ((np.abs(sfield) < 0.55 * (1 - rel) + 0.12) & (rel < 1))
        v[gm] = an.gm
        v[(np.abs(sfield) < 0.3 * (1 - rel)) & (rel < 1)] = an.csf
        v[(bd >= 0.6) & (bd < an.csf_w + 0.6)] = an.csf
        v[bd < 0.6] = 48  # dura
        bpost = post_fossa[br]
        v[bpost & (bd > an.csf_w + 0.6)] = np.where(
            np.sin(by[bpost & (bd > an.csf_w + 0.6)] * 2.2) > 0.3, an.gm - 2, an.gm - 5
        )
        # deep grey: caudate, lentiform, thalamus; brainstem
        for s in (-1, 1):
            for c, r in (
                ((s * 12, -14, 10), (5, 9, 8)),
                ((s * 22, -2, 0), (6, 14, 9)),
                ((s * 9, 12, 2), (8, 11, 8)),
            ):
                v[_ell(bxd, by, z, c, r) < 1] = an.gm - 2
        v[_ell(bxd, by, z, (0, 14, -38), (13, 12, 22)) < 1] = an.wm + 3
        # ventricles (the compressed side shrinks)
        for s in (-1, 1):
            k = an.vent * (1 - 0.5 * min(abs(an.shift) / 12, 0.8) * (s == an.ipsi))
            w = 1.5 + 4.5 * k
            for cv, rv in (
                ((s * (1.2 + w), -20, 12), (w, 14, 7 * k + 2)),
                ((s * (1.5 + w), 4, 17), (w * 1.05, 22, 5 * k + 2)),
                ((s * 20, 24, 8), (5 * k + 2, 10, 7 * k + 2)),
                ((s * 22, 40, 6), (3 * k + 1.5, 10, 4 * k + 1.5)),
                ((s * 29, 2, -16), (2.5 * k + 1, 12, 3 * k + 1.5)),
            ):
                v[_ell(bxd, by, z, cv, rv) < 1] = an.csf
        v[_ell(bxd, by, z, (0, -2, -4), (1.5 + 1.5 * an.vent, 11, 7)) < 1] = an.csf  # third
        v[_ell(bxd, by, z, (0, 30, -42), (6, 4.5, 7)) < 1] = an.csf  # fourth
        # interhemispheric fissure and falx above the corpus callosum, tentorium
        cc = 22 + 0.004 * by**2
        fiss = (np.abs(bxd) < 1.4 + 0.6 * an.csf_w) & (z > cc - (np.abs(by) > 45) * 25) & ~bpost
        v[fiss] = an.csf
        v[fiss & (np.abs(bxd) < 0.7)] = an.falx_hu
        v[np.abs(z - tent[br]) < 0.8] = an.falx_hu - 3
        # venous sinuses: superior sagittal (triangle on the inner table), transverse, sigmoid,
        # straight
        sss = (bd < 8.0) & (np.abs(bxd) < 0.75 * (8.0 - bd)) & (z > -5)
        trans = (
            (bd < 7.0)
            & (np.abs(z - tent[br]) < 0.6 * (7.0 - bd) + 0.5)
            & (by > 35)
            & (np.abs(bx) > 8)
        )
        sig = np.zeros(bx.shape, bool)
        for s in (-1, 1):
            sig |= _capsule(bx, by, z, (s * 44, 48, -28), (s * 40, 30, -66)) < 4.5
        straight = _capsule(bxd, by, z, (0, 28, -10), (0, 78, -27)) < 2.8
        v[sss | trans | (sig & (bd < 10)) | straight] = an.sinus_hu
        # residual cupping: brighter brain along the inner table
        v += an.cupping * np.exp(-bd / 6.0)
        # calcifications
        calc = np.zeros(bx.shape, bool)
        for cc3, rr3, hu in an.calcs:
            if hu < 0:  # dural plaque: on the convexity (az, elevation in degrees)
                az, el, rr = rr3
                e = np.deg2rad(el)
                n = np.array([np.cos(e) * np.cos(az), np.cos(e) * np.sin(az), np.sin(e)])
                rad = np.sqrt(bx * bx + by * by + z * z) + 1e-6
                ang = np.arccos(np.clip((bx * n[0] + by * n[1] + z * n[2]) / rad, -1, 1)) * 75
                m = (ang < rr) & (bd > 0.3) & (bd < 1.8)
                v[m] = -hu
                calc |= m
                continue
            m = _ell(bxd, by, z, cc3, rr3) < 1
            v[m] = hu
            calc |= m
        img[br] = v
    calc_full = np.zeros(x.shape, bool)
    if br[0].size:
        calc_full[br] = calc
    # bleeds, painted last (with an oedema rim around intraparenchymal clots)
    lab = np.zeros(x.shape, np.uint8)
    for i, b in enumerate(an.bleeds, start=1):
        lo, hi = b.bbox(an)
        if not lo[2] <= z <= hi[2]:
            continue
        sel = cavity & (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])
        pts = np.nonzero(sel)
        if not pts[0].size:
            continue
        f = np.full(x.shape, -1.0, F32)
        f[pts] = b.field(an, x[pts], y[pts], z, (depth[pts], tsk[pts]), fl[pts])
        if b.kind == "intraparenchymal":
            # oedema 2 mm + 12 % of the radius wide: ``f`` is in units of the clot's radius,
            # so the width is divided by it (in mm it reached ~5 radii: the whole hemisphere
            # lost its cortex, and blood painted before this clot vanished from the image
            # while its truth label stayed); another bleed's blood is never covered
            r_mm = float(b.radii.mean())
            rim = cavity & (f > -(2.0 + 0.12 * r_mm) / r_mm) & (f <= 0) & ~calc_full & (lab == 0)
            img[rim] = np.minimum(img[rim], an.wm - 6)
        m = cavity & (f > 0)
        lab[m] = i
        img[m] = b.hu + 3 * np.sin(rng_tex[m] * 3.1)
    return img, cavity, lab, calc_full


def _streaks(an: _Anatomy, X: np.ndarray, Y: np.ndarray, z: float) -> np.ndarray:
    """Beam hardening at the skull base: the dark band between the petrous bones, and streaks
    from them and from the internal occipital protuberance."""
    out = np.zeros(X.shape, F32)
    if not (-52 < z < -18):
        return out
    weight = math.exp(-(((z + 36) / 9) ** 2))
    t = np.clip((z + 33) / (-41 + 33), 0, 1)  # where along the petrous axis this plane cuts
    ends = [np.array([s * (17 + 39 * t), 4 + 28 * t]) for s in (-1, 1)]
    a, b = ends
    u = (b - a) / np.linalg.norm(b - a)
    px, py = X - a[0], Y - a[1]
    along = px * u[0] + py * u[1]
    perp = np.abs(-px * u[1] + py * u[0])
    L = float(np.linalg.norm(b - a))
    inside = np.clip(np.minimum(along, L - along) / 8, 0, 1)
    out -= an.bar_hu * weight * np.exp(-(((perp - 10) / 9) ** 2) * 0.5) * inside
    out += 0.4 * an.bar_hu * weight * np.exp(-(((perp - 24) / 5) ** 2) * 0.5) * inside  # overshoot
    sources = [ends[0], ends[1], np.array([0.0, an.b - 12])]
    for src, ang, amp, wid in an.streaks:
        s = sources[int(src)]
        px, py = X - s[0], Y - s[1]
        d = np.abs(px * math.sin(ang) - py * math.cos(ang))
        r = np.sqrt(px * px + py * py)
        out += amp * weight * np.exp(-0.5 * (d / wid) ** 2) * np.exp(-r / 70)
    return out


def random_bleeds(rng: np.random.Generator) -> list[BleedSpec]:
    """One bleed (70 %) or two, kinds and volumes drawn from clinical ranges."""
    out = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        kind = KINDS[int(rng.integers(0, 3))]
        lo, hi = {
            "intraparenchymal": (1.0, 60.0),
            "subdural": (4.0, 80.0),
            "epidural": (4.0, 50.0),
        }[kind]
        vol = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        out.append(BleedSpec(kind, round(vol, 2)))
    if len(out) == 2 and out[0].kind != "intraparenchymal" and out[1].kind != "intraparenchymal":
        out[1] = BleedSpec(out[1].kind, out[1].volume_ml, side=-1 if rng.random() < 0.5 else 1)
    return out


def head_case(
    seed: int,
    *,
    size: int = 512,
    slices: int | None = None,
    thickness_mm: float = 5.0,
    bleed: Literal["random", "none"] | Sequence[BleedSpec] = "random",
    fov_mm: float | None = None,
    artefacts: bool = True,
    anatomy: dict[str, Any] | None = None,
) -> HeadCase:
    """A head CT of ``size``² pixels and ``slices`` slices of ``thickness_mm`` (top-aligned at
    the vertex; default: down to the foramen magnum). Deterministic by seed. ``anatomy``
    overrides drawn properties of the head by name (e.g. ``sinus_hu``, ``falx_hu``,
    ``bar_hu``, ``streaks``, ``noise``, ``calcs``), for the traps a test wants at their
    worst."""
    rng = np.random.default_rng(seed)
    specs: list[BleedSpec]
    if bleed == "random":
        specs = random_bleeds(np.random.default_rng([seed, 1]))
    elif bleed == "none":
        specs = []
    else:
        specs = list(bleed)
    an = _Anatomy(rng, normal=not specs)
    for name, value in (anatomy or {}).items():
        if not hasattr(an, name):
            raise ValueError(f"head_case: no anatomy property {name!r}")
        setattr(an, name, value)
    fov = fov_mm or float(rng.uniform(220, 250))
    sp = fov / size
    z_top = an.c_up + an.scalp + 4.0
    n = slices if slices is not None else math.ceil((z_top + 70.0) / thickness_mm)
    zc = z_top - thickness_mm * (np.arange(n)[::-1] + 0.5)  # index 0 = lowest (superior +)
    z_lo, z_hi = float(zc[0]), float(zc[-1])
    brng = np.random.default_rng([seed, 2])
    for spec in specs:
        b = _draw_bleed(an, spec, brng, max(z_lo, -30.0), z_hi)
        _fit_volume(an, b, spec.volume_ml)
        an.bleeds.append(b)
    if an.bleeds:
        vols = [(b.side, SHIFT_PER_ML[b.kind] * _volume(an, b)) for b in an.bleeds]
        net = sum(-s * v for s, v in vols)
        an.shift = float(np.clip(net, -15, 15))
        an.ipsi = max(vols, key=lambda sv: sv[1])[0]
    # image grid (yaw and offset of the head)
    yaw = float(rng.uniform(-10, 10)) * np.pi / 180
    off = rng.uniform(-10, 10, size=2)
    idx = (np.arange(size, dtype=F32) - (size - 1) / 2) * sp
    Xi, Yi = np.meshgrid(idx, idx)
    Xh = (np.cos(yaw) * (Xi - off[0]) + np.sin(yaw) * (Yi - off[1])).astype(F32)
    Yh = (-np.sin(yaw) * (Xi - off[0]) + np.cos(yaw) * (Yi - off[1])).astype(F32)
    sub = max(1, math.ceil(thickness_mm / 1.25))
    hu = np.empty((n, size, size), F32)
    brain = np.zeros((n, size, size), bool)
    frac = np.zeros((len(an.bleeds) + 1, n, size, size), np.float32) if an.bleeds else None
    calc = np.zeros((n, size, size), bool)
    head_r = max(an.a, an.b) + an.scalp + 12
    for k in range(n):
        acc = np.zeros((size, size), F32)
        cav = np.zeros((size, size), np.int16)
        for j in range(sub):
            z = float(zc[k] + thickness_mm * ((j + 0.5) / sub - 0.5))
            if z > an.c_up + an.scalp:
                acc += -1000
                continue
            # work inside the head's bounding box only
            r = head_r / sp
            c0 = (size - 1) / 2 + np.array([off[1], off[0]]) / sp
            y0, y1 = max(0, int(c0[0] - r)), min(size, int(c0[0] + r) + 1)
            x0, x1 = max(0, int(c0[1] - r)), min(size, int(c0[1] + r) + 1)
            img = np.full((size, size), -1000.0, F32)
            p, cv, lab, cm = _plane(an, Xh[y0:y1, x0:x1], Yh[y0:y1, x0:x1], z)
            img[y0:y1, x0:x1] = p
            acc += img
            cav[y0:y1, x0:x1] += cv
            if frac is not None:
                for i in range(1, len(an.bleeds) + 1):
                    frac[i, k, y0:y1, x0:x1] += (lab == i) / sub
            if j == sub // 2:
                calc[k, y0:y1, x0:x1] = cm
        hu[k] = acc / sub
        brain[k] = cav * 2 > sub
    # scanner: point-spread blur, residual beam hardening, correlated noise
    psf = 0.45 / sp
    hu = ndi.gaussian_filter(hu, sigma=(0, psf, psf), truncate=3.0)
    nrng = np.random.default_rng([seed, 3])
    noise_sd = an.noise * math.sqrt(5.0 / thickness_mm)
    corr = max(0.6, 0.5 / sp)
    gain = math.sqrt(4 * math.pi * corr * corr)  # std of white noise after a 2D gaussian
    for k in range(n):
        if artefacts:
            hu[k] += _streaks(an, Xh, Yh, float(zc[k])) * (hu[k] > -200)
        w = nrng.standard_normal((size, size), dtype=F32)
        w = ndi.gaussian_filter(w, corr) * gain
        f = 1.0 + 0.6 * (zc[k] < -25)  # noisier through the skull base
        hu[k] += w * (noise_sd * f) * (hu[k] > -900)
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    haem = np.zeros((n, size, size), np.uint8)
    truths: list[BleedTruth] = []
    vox_ml = thickness_mm * sp * sp / 1000
    if frac is not None:
        for i, b in enumerate(an.bleeds, start=1):
            fr = frac[i]
            haem[(fr >= 0.5) & (haem == 0)] = i
            vol = float(fr.sum()) * vox_ml
            if vol <= 0:
                continue
            cz, cy, cx = ndi.center_of_mass(fr)
            truths.append(
                BleedTruth(
                    i,
                    b.kind,
                    "left" if b.side > 0 else "right",
                    round(vol, 3),
                    (float(cz), float(cy), float(cx)),
                    round(b.hu, 1),
                    b.age,
                )
            )
    brain |= haem > 0  # a voxel half blood, half cavity wall is intracranial
    shift = an.truth_shift() if an.shift else 0.0
    # the septum level must be in the scan for the shift to be measurable
    if not (zc[0] <= 8 <= zc[-1] + thickness_mm):
        shift = 0.0 if not an.shift else shift
    return HeadCase(
        hu_i16,
        (float(thickness_mm), float(sp), float(sp)),
        brain,
        haem,
        calc,
        truths,
        round(float(shift), 3),
        seed,
        {
            "yaw_deg": round(yaw * 180 / np.pi, 2),
            "offset_x_mm": float(off[0]),
            "offset_y_mm": float(off[1]),
            "z_top_mm": z_top,
        },
    )


# ---------------------------------------------------------------------------------------------
# DICOM (a minimal writer until the shared phantom helpers land)


def _uid(seed: int, what: str) -> str:
    return str(generate_uid(entropy_srcs=[f"radstream-headphantom-{seed}-{what}"]))


def write_series(case: HeadCase, out: Path, *, uid_seed: int | None = None) -> list[Path]:
    """The case as a CT series (one file per slice, stored unsigned with intercept -1024,
    real geometry). Returns the files in slice order (inferior to superior)."""
    seed = case.seed if uid_seed is None else uid_seed
    out.mkdir(parents=True, exist_ok=True)
    n, rows, cols = case.hu.shape
    dz, dy, dx = case.spacing
    study, series, frame = _uid(seed, "study"), _uid(seed, "series"), _uid(seed, "for")
    when = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(minutes=seed % 600)
    files = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop = _uid(seed, f"sop-{i}")
        meta.MediaStorageSOPInstanceUID = UID(sop)
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.PatientName = f"PHANTOM^HEAD^{seed}"
        ds.PatientID = f"RS-HEAD-{seed:06d}"
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.AccessionNumber, ds.StudyID, ds.SeriesNumber = f"H{seed:08d}", str(seed % 100000), 2
        ds.ReferringPhysicianName = ds.PositionReferenceIndicator = ""
        ds.Modality, ds.Manufacturer, ds.InstitutionName = "CT", "RadStream phantom", "RadStream"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "HEAD"
        ds.StudyDescription, ds.SeriesDescription = "CT HEAD W/O CONTRAST", f"{dz:g}mm brain"
        ds.KVP, ds.ConvolutionKernel = 120, "H30s"
        ds.SliceThickness = ds.SpacingBetweenSlices = dz
        ds.InstanceNumber = i + 1
        z = -(n - 1) * dz / 2 + i * dz
        ds.ImagePositionPatient = [-(cols - 1) * dx / 2, -(rows - 1) * dy / 2, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.PixelSpacing = [dy, dx]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = (
            (case.hu[i].astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
        )
        path = out / f"IM{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def save_truth(case: HeadCase, out: Path) -> Path:
    """Truth beside a written series: masks, spacing, bleeds and the midline shift."""
    path = out / "truth.npz"
    np.savez_compressed(
        path,
        brain=case.brain,
        haemorrhage=case.haemorrhage,
        calcification=case.calcification,
        spacing=np.array(case.spacing),
        bleed_volume_ml=np.array([b.volume_ml for b in case.bleeds]),
        bleed_kind=np.array([b.kind for b in case.bleeds]),
        midline_shift_mm=np.array(case.midline_shift_mm),
    )
    return path


# ---------------------------------------------------------------------------------------------
# evaluation against the truth


def evaluate_head(case: HeadCase, result: Any, *, min_ml: float = 2.0) -> dict[str, Any]:
    """Score an analysis result (``.masks['haemorrhage']``, ``.findings``) on a case.

    A truth bleed is found when reported blood covers >= 10 % of it; its volume error is the
    reported volume of the blood components touching it versus the truth (bleeds sharing a
    component measured together: ``shared.evaluation.metrics.score_bleeds``). A false bleed is a
    reported component with < 10 % of its voxels in any truth bleed. Midline shift error is
    signed (+ toward patient left) measured minus truth."""
    pred = np.asarray(result.masks["haemorrhage"], bool)
    findings = [f for f in result.findings if f.get("type") == "haemorrhage"]
    bleeds = [{"label": b.label, "kind": b.kind, "volume_ml": b.volume_ml} for b in case.bleeds]
    per_bleed, false_ml = score_bleeds(pred, case.haemorrhage, bleeds, case.voxel_ml)
    for b, p in zip(case.bleeds, per_bleed, strict=True):
        p["truth_ml"] = b.volume_ml
        # the subtype of the reported finding nearest the bleed's centroid
        p["subtype"] = None
        if p["coverage"] > 0 and findings:
            zc = b.centroid_zyx[0]
            p["subtype"] = min(
                findings, key=lambda f: abs(float(f.get("slice_index", 0)) - zc)
            ).get("subtype")
    big = [p for p in per_bleed if p["truth_ml"] >= min_ml]
    shift = next((f for f in result.findings if f.get("type") == "midline_shift"), None)
    measured = None
    if shift is not None:
        measured = float(shift.get("shift_mm") or 0.0) * (
            1.0 if shift.get("location") == "left" else -1.0
        )
    return {
        "bleeds": per_bleed,
        "bleeds_ge_min": len(big),
        "found_ge_min": sum(p["found"] for p in big),
        "false_bleeds": len(false_ml),
        "false_bleed_ml": round(sum(false_ml, 0.0), 3),
        "volume_errors": [p["volume_error"] for p in big if p["found"]],
        "subtype_correct": [p["subtype"] == p["kind"] for p in big if p["found"]],
        "midline_shift_mm": measured,
        "midline_shift_truth_mm": case.midline_shift_mm,
        "midline_shift_error_mm": None
        if measured is None
        else round(measured - case.midline_shift_mm, 2),
    }
