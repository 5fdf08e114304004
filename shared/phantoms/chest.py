"""Procedural chest CT with exact truth, built to break classical CAD the way real scans do.

``chest_case(seed, ...)`` returns a :class:`ChestCase` (HU volume, geometry, truth masks, the
lesion list); ``write_series(case, out_dir, uid_seed=...)`` writes it as a DICOM CT series
plus ``truth.npz`` / ``truth.json``. Everything is deterministic from the seed; anatomy,
lesions and noise draw from separate random streams, so ``normal=True`` (or
``lesions="none"``) gives the lesion-free twin of the same patient, pixel for pixel outside
the lesions.

What is modelled (see docs/phantoms.md for the list and what is not):
body outline (super-ellipse, flat back, anterior/posterior asymmetry, random harmonics,
shoulders), skin, subcutaneous fat, muscles (pectorals, paraspinal), ribs (curved, descending
anteriorly, cortical shell, costal cartilage), vertebrae (bodies, discs, pedicles, laminae,
spinous and transverse processes, canal), sternum, scapulae, clavicles, arms beside the body or
raised, a curved table with a mattress and dense rails; mediastinum (fat band whose outline
follows its organs, junction lines where the lungs touch), heart (pericardium, epicardial fat,
myocardium, chambers that show with contrast), aorta (ascending, arch, descending), arch
branches, pulmonary trunk and arteries, SVC, brachiocephalic veins, azygos, IVC, esophagus with
air; diaphragm domes (liver with hepatic veins under the right dome, stomach with an air cap
and spleen under the left), lungs from apex to costophrenic recesses with a ventral-dorsal
density gradient, fissures (oblique both sides, horizontal right) as thin oblique sheets;
trachea, main bronchi and a bronchial tree with walls that follows the arteries; pulmonary
arteries and veins as space-filling, tapering, curved trees per lobe (tens of thousands of
segments, ~15 mm at the hilum to sub-millimetre at the periphery); lesions; correlated noise
whose level varies by case, slice and body size; beam-hardening bands and streaks from
shoulders and arms; partial volume over 0.5-5 mm slices; vendor pixel storage variants and a
reconstruction circle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage as ndi

from shared.phantoms.common import (
    Grid,
    NoiseBank,
    Occupancy,
    Sdf,
    Storage,
    Vec,
    add_sdf_layers,
    blend,
    measure_labels,
    rng_for,
    save_truth,
    sheet_fraction,
    soft,
    write_ct_series,
)

LesionKind = Literal["solid", "part_solid", "ground_glass", "calcified", "mass"]
Attachment = Literal["isolated", "juxtavascular", "juxtapleural", "mediastinal"]
KINDS: tuple[str, ...] = ("solid", "part_solid", "ground_glass", "calcified", "mass")
NT = 720  # angular bins of the body profiles
MURRAY = 2.6  # radius exponent of the vessel trees (r^k conserved at branchings; 3 = Murray)
F32 = np.float32


@dataclass(frozen=True)
class LesionSpec:
    """A requested lesion. ``attachment`` None picks one that suits the kind; ``side``
    None picks a lung; ``invades`` (masses) lets it grow a few mm into the chest wall."""

    kind: str = "solid"
    diameter_mm: float = 8.0
    attachment: str | None = None
    side: str | None = None  # "left" | "right"
    invades: bool | None = None
    spiculated: bool | None = None


@dataclass
class ChestCase:
    """``hu`` int16 (z, y, x), z ascending; ``truth``: ``lung_left``, ``lung_right``,
    ``airways`` (bool) and ``lesions`` (int16 labels, 0 background, i for ``lesions[i-1]``)."""

    seed: int
    hu: np.ndarray
    grid: Grid
    truth: dict[str, np.ndarray]
    lesions: list[dict[str, Any]]
    meta: dict[str, Any]
    storage: Storage = field(default_factory=Storage)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.grid.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.grid.origin


# ----------------------------------------------------------------------------------- helpers


def _sstep(x: Any, a: float, b: float) -> Any:
    t = np.clip((np.asarray(x, np.float64) - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.asarray(v / np.maximum(n, 1e-9))


def _spline(ctrl: Sequence[Sequence[float]], step: float = 3.0) -> np.ndarray:
    """Catmull-Rom through control points, sampled about every ``step`` mm."""
    p = np.asarray(ctrl, np.float64)
    if len(p) < 2:
        return p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = [p[0]]
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        n = max(2, int(np.linalg.norm(p2 - p1) / step) + 1)
        t = np.linspace(0, 1, n)[1:, None]
        seg = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        out.extend(seg)
    return np.asarray(out)


@dataclass
class Tube:
    """A smooth tube through control points (x, y, z mm) with radii per control point."""

    ctrl: list[list[float]]
    radius: list[float] | float
    zscale: float = 1.0

    def capsules(self, step: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        pts = _spline(self.ctrl, step)
        c = np.asarray(self.ctrl, np.float64)
        rad = np.broadcast_to(np.asarray(self.radius, np.float64), (len(c),))
        # radius along the polyline by arc length of the control points
        arc_c = np.r_[0, np.cumsum(np.linalg.norm(np.diff(c, axis=0), axis=1))]
        arc_p = np.r_[0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
        arc_p *= arc_c[-1] / max(arc_p[-1], 1e-9)
        r = np.asarray(np.interp(arc_p, arc_c, rad))
        return pts[:-1], pts[1:], r[:-1], r[1:]

    def draw(self, occ: Occupancy, shrink: float = 0.0) -> None:
        p0, p1, r0, r1 = self.capsules()
        occ.add_capsules(p0, p1, r0, r1, zscale=self.zscale, shrink=shrink)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.ctrl)
        r = float(np.max(self.radius)) / min(self.zscale, 1.0) + 3
        return c.min(0) - r, c.max(0) + r


@dataclass
class Ellipsoid:
    center: np.ndarray
    axes: np.ndarray  # semi-axes (mm)
    rot: np.ndarray  # 3x3, columns = axis directions

    def sdf(self, grow: float = 0.0) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        c = self.center.astype(np.float32)
        m = (self.rot / (self.axes + grow)[None, :]).T.astype(np.float32)  # rows: dir / axis
        s = float(np.min(self.axes + grow))

        def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            dx, dy, dz = x - c[0], y - c[1], z - c[2]
            q = (m[0, 0] * dx + m[0, 1] * dy + m[0, 2] * dz) ** 2
            q = q + (m[1, 0] * dx + m[1, 1] * dy + m[1, 2] * dz) ** 2
            q = q + (m[2, 0] * dx + m[2, 1] * dy + m[2, 2] * dz) ** 2
            return np.asarray((1.0 - np.sqrt(q)) * s)

        return f

    def bounds(self, grow: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        ext = np.sqrt(((self.rot * (self.axes + grow)[None, :]) ** 2).sum(axis=1)) + 2
        return self.center - ext, self.center + ext


def _rot(u: np.ndarray, hint: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    a = _unit(np.asarray(u, float))
    b = _unit(np.cross(a, np.asarray(hint, float)))
    if not np.isfinite(b).all() or np.linalg.norm(b) < 0.5:
        b = _unit(np.cross(a, [1.0, 0, 0]))
    c = np.cross(a, b)
    return np.stack([a, b, c], axis=1)


# ---------------------------------------------------------------------------------- anatomy


class Anatomy:
    """One patient's geometry: parameters, angular body profiles, organ primitives and the
    point functions (lung cavity signed distance, lobes) the trees and lesions use."""

    def __init__(self, seed: int, contrast: bool) -> None:
        rng = rng_for(seed, "anatomy")
        self.rng = rng
        self.seed = seed
        u = rng.uniform
        self.contrast = contrast
        self.bcx = u(-12, 12)
        self.bcy = u(-10, 15)
        self.A0 = u(135, 182)
        self.Bant0 = u(92, 120) * (self.A0 / 160) ** 0.4
        self.Bpost0 = u(102, 124) * (self.A0 / 160) ** 0.4
        self.pant = u(2.0, 2.6)
        self.ppost = u(3.0, 4.6)
        self.fat0 = u(3, 22)
        self.H = u(245, 292)
        self.zdr = u(58, 92)
        self.zdl = self.zdr - u(8, 25)
        self.zc = self.H - u(88, 108)
        self.arms = "down" if rng.random() < 0.35 else "up"
        self.touch = rng.random() < 0.45  # lungs meet at the anterior junction line
        self.emphysema = float(u(0.3, 1.0)) if rng.random() < 0.25 else 0.0
        self.z_lo = -u(15, 35)
        self.z_hi = self.H + u(8, 22)
        self.harm = rng.normal(0, 0.008, (6, 2))  # random outline harmonics k = 2..7
        self.marg = u(1.5, 5.0)  # mediastinal fat margin around organs
        self.wmin = u(0.6, 1.2) if self.touch else u(4, 14)  # anterior junction half width
        self.lung_base = u(-885, -835)
        self.lung_grad = u(50, 110)
        # densities on their own streams: contrast never moves the anatomy
        u = rng_for(seed, "hu-contrast" if contrast else "hu-plain").uniform
        if contrast:
            self.hu_aorta = u(170, 360)
            self.hu_pa = self.hu_aorta * u(0.75, 1.15)
            self.hu_vein = u(120, 200)
            self.hu_myo = u(90, 130)
            self.hu_liver = u(95, 125)
            self.hu_spleen = u(110, 140)
        else:
            self.hu_aorta = self.hu_pa = u(35, 50)
            self.hu_vein = self.hu_aorta
            self.hu_myo = u(38, 50)
            self.hu_liver = u(50, 68)
            self.hu_spleen = u(42, 52)
        self.hu_lungvessel = 0.5 * (self.hu_pa + self.hu_aorta) * (0.92 if contrast else 1.0)
        u = rng_for(seed, "hu-tissue").uniform
        self.hu_fat = u(-115, -85)
        self.hu_muscle = u(40, 60)
        self.hu_cortex = u(650, 1000)
        self.hu_marrow = u(140, 260)
        u = rng.uniform
        self._profiles_table()
        self._landmarks()
        # extras on their own stream (adding one never moves the anatomy above)
        ex = rng_for(seed, "extras")
        self.dependent = float(ex.uniform(80, 320)) if ex.random() < 0.4 else 0.0
        self.dep_len = float(ex.uniform(2.0, 7.0))
        dense = (ex.random() < 0.5) and contrast
        self.dense_side = ("right" if ex.random() < 0.7 else "left") if dense else ""
        self.hu_dense = float(ex.uniform(900, 2400))

    # ---- body profiles -------------------------------------------------------------------

    def profiles(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """Radius of the skin and depths (from the skin) of the fat/muscle, muscle/rib-layer and
        cavity boundaries, per angle bin: arrays (len(z), NT)."""
        z = np.asarray(z, np.float64)[:, None]
        th = -np.pi + (np.arange(NT) + 0.5) * (2 * np.pi / NT)
        c, s = np.cos(th)[None, :], np.sin(th)[None, :]
        top = _sstep(z, self.H - 70, self.H + 15)
        low = _sstep(z, self.zdr, self.zdr - 90)
        a = self.A0 * (1 + 0.09 * top + 0.02 * low)
        ba = self.Bant0 * (1 - 0.16 * top) * (1 + (0.05 + self.fat0 / 180) * low)
        bp = self.Bpost0 * (1 - 0.06 * top)
        post = s > 0
        b = np.where(post, bp, ba)
        p = np.where(post, self.ppost, self.pant)
        r = (np.abs(c / a) ** p + np.abs(s / b) ** p) ** (-1 / p)
        wig = np.ones_like(th)
        for k in range(2, 8):
            h = self.harm[k - 2]
            wig = wig + h[0] * np.cos(k * th) + h[1] * np.sin(k * th)
        dpost = np.angle(np.exp(1j * (th - np.pi / 2)))  # angle from the posterior midline
        dant = np.angle(np.exp(1j * (th + np.pi / 2)))
        wig = wig * (1 - 0.025 * np.exp(-((dpost / 0.12) ** 2)) + 0.012 * np.exp(
            -(((np.abs(dpost) - 0.3) / 0.15) ** 2)))
        rb = r * wig[None, :]
        fat = self.fat0 * (1.0 - 0.55 * np.exp(-((dant / 0.35) ** 2)) + 0.35 * c**2) + 2.0
        fat = fat * (1 + 0.5 * low * (s < 0))  # belly
        pec = (6 + 16 * _sstep(z, self.zc - 70, self.zc - 15)) * (
            np.exp(-(((np.abs(dant) - 0.75) / 0.45) ** 2))
        )
        para = 46 * np.exp(-((dpost / 0.36) ** 2)) * (1 - 0.25 * top)
        mus = 3 + 0.8 * pec + para + 2 * np.abs(c)
        dskin = 1.5
        dfat = dskin + fat
        dmus = dfat + mus
        dcav = dmus + 7.5
        return {"rb": rb, "dfat": dfat, "dmus": dmus, "dcav": dcav}

    def _profiles_table(self) -> None:
        self.zt0 = self.z_lo - 40.0
        self.zt = np.arange(self.zt0, self.z_hi + 40.0, 1.0)
        pr = self.profiles(self.zt)
        self.rcav_t = (pr["rb"] - pr["dcav"]).astype(np.float32)
        self.pr_t = pr

    def _lookup(self, table: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray
                ) -> np.ndarray:
        th = np.arctan2(y - self.bcy, x - self.bcx)
        ti = ((th + np.pi) * (NT / (2 * np.pi))).astype(np.int64) % NT
        zi = np.clip(np.rint(z - self.zt0).astype(np.int64), 0, len(self.zt) - 1)
        return np.asarray(table[zi, ti])

    def rcav_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self._lookup(self.rcav_t, x, y, z)

    def body_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, what: str) -> np.ndarray:
        """Radius at which depth ``what`` (rb, dfat, dmus, dcav) lies, at (x, y, z)."""
        rb = self._lookup(self.pr_t["rb"], x, y, z)
        if what == "rb":
            return rb
        return np.asarray(rb - self._lookup(self.pr_t[what], x, y, z))

    def point_at(self, theta: np.ndarray, z: np.ndarray, what: str, inset: float = 0.0
                 ) -> np.ndarray:
        """Points (n, 3) at angle theta (0 = patient left, +pi/2 posterior) on a boundary."""
        ti = ((np.asarray(theta) + np.pi) * (NT / (2 * np.pi))).astype(np.int64) % NT
        zi = np.clip(np.rint(np.asarray(z) - self.zt0).astype(np.int64), 0, len(self.zt) - 1)
        rb = self.pr_t["rb"][zi, ti]
        r = rb if what == "rb" else rb - self.pr_t[what][zi, ti]
        r = r - inset
        return np.stack(
            [self.bcx + r * np.cos(theta), self.bcy + r * np.sin(theta),
             np.broadcast_to(z, np.shape(r))], axis=-1
        )

    # ---- surfaces ------------------------------------------------------------------------

    def z_dia(self, x: Any, y: Any) -> Any:
        """Diaphragm height (two domes, steep posterior and lateral recesses)."""
        rc_lat = self.A0 - 30
        yd = self.bcy - 12
        out = []
        for side, zd in ((-1, self.zdr), (1, self.zdl)):
            xd = self.bcx + side * rc_lat * 0.38
            q = np.where(np.asarray(y) > yd, 1.9, 0.9)
            d2 = (np.asarray(x) - xd) ** 2 + q * (np.asarray(y) - yd) ** 2
            out.append(zd - d2 * (zd - 8) / (rc_lat * 0.72) ** 2)
        w = 1 / (1 + np.exp(-(np.asarray(x) - self.bcx - 8) / 12))
        base = out[0] * (1 - w) + out[1] * w
        # the central tendon rises to carry the heart: no lung under it
        zf, hx, hy, rx, ry = self.heart_floor
        d2h = ((np.asarray(x) - hx) / rx) ** 2 + ((np.asarray(y) - hy) / ry) ** 2
        return np.maximum(base, zf - 30 * d2h)

    def z_top(self, x: Any, y: Any) -> Any:
        """Lung apices: rounded caps, the left a little lower."""
        out = []
        for side, za in ((-1, self.H), (1, self.H - 6)):
            xa = self.bcx + side * (self.A0 - 30) * 0.42
            d2 = (np.asarray(x) - xa) ** 2 + (0.8 * (np.asarray(y) - self.bcy - 10)) ** 2
            out.append(za - d2 * 0.021)
        w = 1 / (1 + np.exp(-(np.asarray(x) - self.bcx) / 6))
        return out[0] * (1 - w) + out[1] * w

    def fissures(self, x: Any, y: Any) -> dict[str, Any]:
        """Heights of the oblique (both) and horizontal (right) fissures."""
        ya, yp = self.yant, self.ypost
        t = (np.asarray(y) - ya) / (yp - ya)
        xr = (np.asarray(x) - (self.bcx - 0.5 * self.A0)) / self.A0
        xl = (np.asarray(x) - (self.bcx + 0.5 * self.A0)) / self.A0
        lat_r = np.clip((self.bcx - np.asarray(x)) / self.A0, 0, 1.2)
        lat_l = np.clip((np.asarray(x) - self.bcx) / self.A0, 0, 1.2)
        wob = self.fis_wobble
        und = (wob[0] * np.sin(np.asarray(x) / 37.0 + wob[1])
               + wob[2] * np.sin(np.asarray(y) / 29.0 + wob[3]))
        # curved surfaces: bowed towards the hilum, gently undulating
        maj_r = (self.fis[0] + (self.fis[1] - self.fis[0]) * (t + 0.45 * lat_r)
                 + 22 * (xr**2 - 0.1) + 18 * (t - 0.5) ** 2 + und)
        maj_l = (self.fis[2] + (self.fis[3] - self.fis[2]) * (t + 0.45 * lat_l)
                 + 22 * (xl**2 - 0.1) + 18 * (t - 0.5) ** 2 - und)
        minor = self.fis[4] + 6 * t + 5 * xr + 0.5 * und
        return {"major_right": maj_r, "major_left": maj_l, "minor": minor}

    # ---- landmarks and organs -------------------------------------------------------------

    def _landmarks(self) -> None:
        rng, u = self.rng, self.rng.uniform
        zc = self.zc
        rc = self.rcav_t[int(zc - self.zt0)]
        th = -np.pi + (np.arange(NT) + 0.5) * (2 * np.pi / NT)
        self.yant = self.bcy - float(rc[np.argmin(np.abs(th + np.pi / 2))])
        self.ypost = self.bcy + float(rc[np.argmin(np.abs(th - np.pi / 2))])
        self.acav = float(rc[np.argmin(np.abs(th))])
        xs = self.bcx + u(-3, 3)
        self.ax_vb, self.ay_vb = u(16, 19), u(13, 15.5)
        # the lungs reach behind the vertebral bodies in the paravertebral gutters
        pv = [self.bcy + float(rc[np.argmin(np.abs(th - a))]) * math.sin(a)
              for a in (np.pi / 2 - 0.5, np.pi / 2 + 0.5)]
        yvb = float(np.mean(pv)) - self.ay_vb - u(2, 8)
        self.xs, self.yvb = xs, yvb
        ye = yvb - self.ay_vb - 9
        xe = xs + u(2, 6)
        yt = ye - 20
        xt = xs + u(-2, 2)
        self.xt, self.yt = xt, yt
        self.r_tr = u(7.5, 10)
        zt_top, zb = self.z_hi + 10, self.z_lo - 10
        self.fis = [
            self.zdr - u(25, 45), zc + u(-15, 10),  # right major: anterior, posterior height
            self.zdl - u(25, 45), zc + u(-10, 15),
            zc - u(22, 40),
        ]
        self.fis_wobble = [u(2, 5), u(0, 6.3), u(2, 5), u(0, 6.3)]
        ra, rd = u(13.5, 17.5), u(10.5, 13.5)
        heart = Ellipsoid(
            np.array([xs + u(14, 30), 0.0, self.zdr + u(28, 42)]),
            np.array([u(55, 66), u(40, 48), u(37, 44)]),
            _rot(_unit(np.array([u(0.5, 0.7), -u(0.45, 0.65), -u(0.35, 0.55)])), (0, 0, 1)),
        )
        # fit between the back of the sternum and the structures in front of the spine
        a_lim, p_lim = self.yant + 2, yvb - self.ay_vb - 24
        lo_b, hi_b = heart.bounds()
        ext = float(hi_b[1] - lo_b[1]) - 4
        f = min(1.0, (p_lim - a_lim) / ext)
        heart.axes = heart.axes * f
        heart.center[1] = 0.5 * (a_lim + p_lim) + u(-3, 3)
        self.heart = heart
        hc = self.heart.center
        ztop_heart = hc[2] + 40
        h_lo, h_hi = self.heart.bounds(0)
        self.heart_floor = (float(h_lo[2]) + 4, float(hc[0]), float(hc[1]),
                            0.45 * float(h_hi[0] - h_lo[0]), 0.45 * float(h_hi[1] - h_lo[1]))
        hu1, hu2 = self.heart.rot[:, 0], self.heart.rot[:, 1]
        ra_c = hc - 0.55 * self.heart.axes[0] * hu1 + 0.1 * self.heart.axes[1] * hu2
        y_asc = max(yt - 36, self.yant + ra + 6)
        self.tubes: dict[str, Tube] = {}
        t = self.tubes
        t["aorta"] = Tube(
            [[hc[0] - 8, hc[1] - 5, ztop_heart - 22], [xs - 8, y_asc, zc - 25],
             [xs - 6, y_asc + 2, zc + 16], [xt + 3, yt - 22, zc + 32], [xt + 24, yt - 4, zc + 34],
             [xt + 28, yt + 14, zc + 24], [xs + 29, yvb - 9, zc + 2], [xs + 27, yvb - 12, zc - 60],
             [xs + 14, yvb - 22, self.zdl - 25], [xs + 6, yvb - 24, zb]],
            [ra, ra, ra, ra * 0.9, rd * 1.05, rd, rd, rd, rd * 0.95, rd * 0.9],
        )
        pa = u(12, 15)
        bif = [xs + 10, yt - 18, zc - 12]
        t["pa_trunk"] = Tube([[hc[0] + 6, hc[1] - 25, ztop_heart - 30],
                              [xs + 20, max(yt - 38, self.yant + pa + 4), zc - 30], bif],
                             [pa, pa, pa * 0.9])
        self.hilum_art = {"left": np.array([xt + 52, yt + 8, zc - 15.0]),
                          "right": np.array([xt - 44, yt - 4, zc - 22.0])}
        rpa = u(9, 11.5)
        t["lpa"] = Tube([bif, [xt + 34, yt - 6, zc - 6], self.hilum_art["left"].tolist()],
                        [pa * 0.8, rpa, rpa * 0.95])
        t["rpa"] = Tube([bif, [xt - 8, yt - 14, zc - 16], [xt - 30, yt - 8, zc - 20],
                         self.hilum_art["right"].tolist()], [pa * 0.8, rpa, rpa, rpa * 0.95])
        svc = u(8.5, 11)
        xsvc = xs - ra - svc + u(-2, 3)
        t["svc"] = Tube([[xsvc, yt - 30, zc + 48], [xsvc - 1, yt - 28, zc + 5],
                         [xsvc + 2, yt - 30, hc[2] + 15]], svc)
        t["bcv_r"] = Tube([[xsvc - 10, yt - 22, zt_top], [xsvc - 6, yt - 26, zc + 70],
                           [xsvc, yt - 30, zc + 48]], svc * 0.7)
        t["bcv_l"] = Tube([[xs + 70, yt - 28, zt_top], [xs + 45, yt - 40, zc + 62],
                           [xs + 5, yt - 40, zc + 55], [xsvc + 3, yt - 31, zc + 48]], svc * 0.62)
        t["bct"] = Tube([[xt + 4, yt - 26, zc + 30], [xt - 12, yt - 20, zc + 60],
                         [xt - 22, yt - 12, zt_top]], u(5.5, 7))
        t["lcca"] = Tube([[xt + 13, yt - 18, zc + 33], [xt + 17, yt - 14, zc + 60],
                          [xt + 22, yt - 10, zt_top]], u(3.5, 4.5))
        t["lsca"] = Tube([[xt + 22, yt - 8, zc + 33], [xt + 28, yt - 2, zc + 65],
                          [xt + 55, yt + 2, self.H + 5], [xt + 95, yt, zt_top]], u(4, 5.5))
        t["azygos"] = Tube([[xs - 13, yvb - 8, zb], [xs - 14, yvb - 9, zc - 10],
                            [xs - 15, yvb - 14, zc + 8], [xsvc + 4, yt - 22, zc + 12],
                            [xsvc + 2, yt - 28, zc + 10]], u(3.5, 5))
        t["ivc"] = Tube([[xs - 22, yvb - 28, zb], [ra_c[0] - 6, ra_c[1] + 14, self.zdr - 30],
                         [ra_c[0] - 10, ra_c[1] + 10, ra_c[2] - 8]], u(10, 13))
        self.esophagus = Tube(
            [[xe, ye, zt_top], [xe + 2, ye, zc], [xe + 6, ye - 2, self.zdl + 10],
             [xs + 28, ye - 14, self.zdl - 18], [xs + 45, ye - 25, self.zdl - 40]], u(7, 9))
        self.eso_air = [z for z in np.arange(self.zdl, zt_top, 20) if rng.random() < 0.45]
        self.trachea = Tube([[xt, yt, zt_top], [xt, yt + 2, zc + 20], [xt - 1, yt + 4, zc]],
                            self.r_tr)
        self.carina = np.array([xt - 1, yt + 4, zc])
        self.hilum_aw = {"right": np.array([xt - 28, yt + 10, zc - 20.0]),
                         "left": np.array([xt + 44, yt + 14, zc - 32.0])}
        self.r_mb = {"right": u(6, 7.5), "left": u(5.2, 6.5)}
        self.main_bronchi = {
            "right": Tube([self.carina.tolist(), [xt - 14, yt + 6, zc - 8],
                           self.hilum_aw["right"].tolist()], self.r_mb["right"]),
            "left": Tube([self.carina.tolist(), [xt + 20, yt + 10, zc - 14],
                          self.hilum_aw["left"].tolist()], self.r_mb["left"]),
        }
        self.pv_root = {
            "right_sup": np.array([xs - 28, yt + 2, zc - 40.0]),
            "right_inf": np.array([xs - 26, yt + 14, zc - 62.0]),
            "left_sup": np.array([xs + 42, yt + 10, zc - 36.0]),
            "left_inf": np.array([xs + 38, yt + 22, zc - 58.0]),
        }
        la = np.array([xs + 8, yt + 18, zc - 50.0])
        for k, p in self.pv_root.items():
            t["pv_" + k] = Tube([la.tolist(), p.tolist()], u(6, 8))
        self.stomach = Ellipsoid(np.array([xs + 58, self.yant + 60, self.zdl - 42]),
                                 np.array([u(40, 55), u(35, 45), u(32, 42)]), np.eye(3))
        self.stomach_air_y = self.stomach.center[1] - self.stomach.axes[1] * u(0.2, 0.6)
        self.spleen = Ellipsoid(np.array([xs + 82, yvb + 5, self.zdl - 45]),
                                np.array([u(22, 28), u(45, 55), u(45, 55)]),
                                _rot(_unit(np.array([0.6, 0.8, 0.0])), (0, 0, 1)))
        self.content_tubes = ["aorta", "pa_trunk", "svc", "bcv_r", "bcv_l", "bct", "lcca",
                              "azygos", "ivc"]


# ------------------------------------------------------------------------ mediastinal band


class Band:
    """The mediastinum between the lungs: at each (z, y) an interval [right, left] in x that
    holds the mediastinal organs plus a fat margin, smoothed, at least ``wmin`` wide (the
    junction lines where the lungs touch)."""

    def __init__(self, an: Anatomy) -> None:
        s = 2.0
        x0, x1 = an.bcx - an.A0, an.bcx + an.A0
        y0, y1 = an.yant - 20, an.ypost + 30
        z0, z1 = an.z_lo - 10, an.z_hi + 10
        shape = (int((z1 - z0) / s) + 1, int((y1 - y0) / s) + 1, int((x1 - x0) / s) + 1)
        g = Grid(shape, (s, s, s), (x0, y0, z0), 1)
        occ = Occupancy(g)
        for name in an.content_tubes:
            an.tubes[name].draw(occ)
        for name in ("rpa", "lpa"):  # the mediastinal part only: the hilum belongs to the lung
            p0, p1, r0, r1 = an.tubes[name].capsules()
            keep = max(1, int(len(p0) * 0.55))
            occ.add_capsules(p0[:keep], p1[:keep], r0[:keep], r1[:keep])
        for key in an.pv_root:
            p0, p1, r0, r1 = an.tubes["pv_" + key].capsules()
            keep = max(1, int(len(p0) * 0.5))
            occ.add_capsules(p0[:keep], p1[:keep], r0[:keep], r1[:keep])
        an.esophagus.draw(occ)
        an.trachea.draw(occ)
        for side in ("left", "right"):
            p0, p1, r0, r1 = an.main_bronchi[side].capsules()
            keep = max(1, int(len(p0) * 0.6))
            occ.add_capsules(p0[:keep], p1[:keep], r0[:keep] + 1.5, r1[:keep] + 1.5)
        lo, hi = an.heart.bounds(3)
        occ.add_sdf(lo, hi, an.heart.sdf(3))
        occ.add_capsules(np.array([[an.xs, an.yvb, z0]]), np.array([[an.xs, an.yvb, z1]]),
                         np.array([an.ax_vb + 4.0]), np.array([an.ax_vb + 4.0]))
        c = occ.fraction() > 0.3
        xs = g.xs()
        anyc: np.ndarray = np.asarray(c.any(axis=2))
        right = np.where(anyc, xs[np.argmax(c, axis=2)], np.nan)
        left = np.where(anyc, xs[c.shape[2] - 1 - np.argmax(c[:, :, ::-1], axis=2)], np.nan)
        ys = g.ys()
        mid = np.empty_like(right)
        for k in range(c.shape[0]):
            ok = anyc[k]
            if ok.any():
                mid[k] = np.interp(ys, ys[ok], 0.5 * (left[k, ok] + right[k, ok]))
            else:
                mid[k] = an.bcx
        marg = an.marg
        wmin = an.wmin
        # anterior fat (thymus remnant, pericardial fat) unless the lungs touch
        L = np.where(anyc, left + marg, mid + wmin)
        R = np.where(anyc, right - marg, mid - wmin)
        L = np.maximum(L, mid + wmin)
        R = np.minimum(R, mid - wmin)
        L = ndi.maximum_filter1d(L, 5, axis=1)
        R = ndi.minimum_filter1d(R, 5, axis=1)
        L = ndi.gaussian_filter(L, (1.0, 1.5))
        R = ndi.gaussian_filter(R, (1.0, 1.5))
        self.grid = g
        self.L = L.astype(np.float32)
        self.R = R.astype(np.float32)
        self.M = (0.5 * (L + R)).astype(np.float32)

    def _coords(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        g = self.grid
        return np.stack([(np.asarray(z) - g.origin[2]) / g.spacing[0],
                         (np.asarray(y) - g.origin[1]) / g.spacing[1]])

    def at(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self._coords(z, y)
        r, l_, m = (np.asarray(ndi.map_coordinates(a, c, order=1, mode="nearest"))
                    for a in (self.R, self.L, self.M))
        return r, l_, m

    def slices(self, zs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zz, yy = np.meshgrid(zs, ys, indexing="ij")
        r, l_, m = self.at(zz.ravel(), yy.ravel())
        shp = zz.shape
        return r.reshape(shp), l_.reshape(shp), m.reshape(shp)


class Cavity:
    """Point functions on the pleural cavity: signed distance (mm, positive inside a lung),
    side and lobe."""

    def __init__(self, an: Anatomy, band: Band) -> None:
        self.an, self.band = an, band

    def sd(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(signed distance, side) for points (n, 3); side 0 right, 1 left."""
        an = self.an
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        r = np.hypot(x - an.bcx, y - an.bcy)
        d_rad = an.rcav_at(x, y, z) - r
        br, bl, bm = self.band.at(z, y)
        side = (x > bm).astype(np.int8)
        d_band = np.where(side == 1, x - bl, br - x)
        d_z = np.minimum(z - an.z_dia(x, y), an.z_top(x, y) - z) * 0.7
        return np.minimum(np.minimum(d_rad, d_band), d_z), side

    def lobe(self, p: np.ndarray, side: np.ndarray) -> np.ndarray:
        """0 upper, 1 middle (right), 2 lower."""
        f = self.an.fissures(p[:, 0], p[:, 1])
        z = p[:, 2]
        right = np.where(z < f["major_right"], 2, np.where(z < f["minor"], 1, 0))
        left = np.where(z < f["major_left"], 2, 0)
        return np.where(side == 1, left, right).astype(np.int8)

    def sample(self, rng: np.random.Generator, n: int, side: int, margin: float) -> np.ndarray:
        an = self.an
        lo = np.array([an.bcx - an.A0 if side == 0 else an.bcx - 20, an.yant - 5, 0.0])
        hi = np.array([an.bcx + 20 if side == 0 else an.bcx + an.A0, an.ypost + 40, an.H + 2])
        out: list[np.ndarray] = []
        got = 0
        while got < n:
            q = rng.uniform(lo, hi, (n * 3, 3))
            d, s = self.sd(q)
            q = q[(d > margin) & (s == side)]
            out.append(q)
            got += len(q)
        return np.concatenate(out)[:n]

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Outward normal (towards the pleura) by finite differences of the distance."""
        e = 1.0
        g = np.zeros_like(p)
        for k in range(3):
            dp = np.zeros(3)
            dp[k] = e
            g[:, k] = self.sd(p + dp)[0] - self.sd(p - dp)[0]
        return -_unit(g)


# ------------------------------------------------------------------------------ vessel trees


@dataclass
class Tree:
    start: np.ndarray  # (n, 3)
    end: np.ndarray
    radius: np.ndarray
    parent: np.ndarray
    level: np.ndarray
    terminal: np.ndarray
    count: np.ndarray

    @staticmethod
    def empty() -> Tree:
        z3 = np.zeros((0, 3))
        zi = np.zeros(0, np.int64)
        return Tree(z3, z3, np.zeros(0), zi, zi, np.zeros(0, bool), zi)

    def extend(self, other: Tree) -> Tree:
        off = len(self.start)
        par = np.where(other.parent >= 0, other.parent + off, other.parent)
        return Tree(
            np.vstack([self.start, other.start]), np.vstack([self.end, other.end]),
            np.r_[self.radius, other.radius], np.r_[self.parent, par],
            np.r_[self.level, other.level], np.r_[self.terminal, other.terminal],
            np.r_[self.count, other.count],
        )


def _grow(
    cav: Cavity,
    rng: np.random.Generator,
    pts: np.ndarray,
    start: np.ndarray,
    r_root: float,
    n_total: int,
    parent: int,
    level0: int,
    n_term: int,
) -> Tree:
    """Space-filling tree (after Kitaoka's territory splitting), level by level, vectorised:
    every branch heads for the centroid of the points it supplies, stops part-way, and its
    territory splits unequally (20-50 %) across its principal axis; radius from the share of
    points by a Murray-type law (exponent ``MURRAY``). Terminal branches run on past their
    territory's centroid (close to the pleura at the periphery)."""
    starts = start[None, :]
    lab = np.zeros(len(pts), np.int64)
    parents = np.array([parent])
    rec_s, rec_e, rec_r, rec_p, rec_l, rec_t, rec_c = [], [], [], [], [], [], []
    base = 0
    level = level0
    while len(starts):
        m = len(starts)
        cnt = np.bincount(lab, minlength=m).astype(np.float64)
        cen = np.stack([np.bincount(lab, pts[:, k], m) for k in range(3)], 1) / np.maximum(
            cnt, 1)[:, None]
        term = cnt <= n_term
        d = cen - starts
        f = rng.uniform(0.32, 0.5, m)
        ends = np.where(term[:, None], cen + 0.45 * d, starts + f[:, None] * d)
        if term.any():
            ti = np.nonzero(term)[0]
            sd, _ = cav.sd(ends[ti])
            bad = sd < 1.0
            ends[ti[bad]] = cen[ti[bad]]
        rad = r_root * (cnt / n_total) ** (1 / MURRAY)
        ids = base + np.arange(m)
        rec_s.append(starts)
        rec_e.append(ends)
        rec_r.append(rad)
        rec_p.append(parents)
        rec_l.append(np.full(m, level))
        rec_t.append(term)
        rec_c.append(cnt.astype(np.int64))
        base += m
        level += 1
        keep = ~term[lab]
        if not keep.any():
            break
        pts, lab = pts[keep], lab[keep]
        q = pts - cen[lab]
        cov = np.empty((m, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.bincount(lab, q[:, i] * q[:, j], m)
        _, vec = np.linalg.eigh(cov + np.eye(3) * 1e-6)
        v = vec[:, :, 2] + rng.normal(0, 0.18, (m, 3))
        proj = (q * v[lab]).sum(1)
        # unequal division (flow ratio 0.2-0.5): the major daughter carries on almost straight,
        # the minor one leaves at a wide angle, as pulmonary vessels branch
        order = np.lexsort((proj, lab))
        first = np.searchsorted(lab[order], np.arange(m))
        rank = np.empty(len(lab), np.int64)
        rank[order] = np.arange(len(lab)) - first[lab[order]]
        cut = np.floor(cnt * rng.uniform(0.2, 0.5, m)).astype(np.int64)
        cut = np.clip(cut, 1, np.maximum(cnt.astype(np.int64) - 1, 1))
        side = (rank >= cut[lab]).astype(np.int64)
        nonterm = np.nonzero(~term)[0]
        remap = np.full(m, -1)
        remap[nonterm] = np.arange(len(nonterm))
        lab = remap[lab] * 2 + side
        starts = np.repeat(ends[nonterm], 2, axis=0)
        parents = np.repeat(ids[nonterm], 2)
        # drop empty children
        cnt2 = np.bincount(lab, minlength=len(starts))
        alive = np.nonzero(cnt2 > 0)[0]
        remap2 = np.full(len(starts), -1)
        remap2[alive] = np.arange(len(alive))
        lab = remap2[lab]
        starts, parents = starts[alive], parents[alive]
    return Tree(np.vstack(rec_s), np.vstack(rec_e), np.concatenate(rec_r),
                np.concatenate(rec_p), np.concatenate(rec_l), np.concatenate(rec_t),
                np.concatenate(rec_c))


def _stem(tree: Tree, s: np.ndarray, pts: np.ndarray, r: float, parent: int, level: int,
          frac: float) -> tuple[Tree, np.ndarray]:
    c = pts.mean(0)
    e = s + frac * (c - s)
    t = Tree(s[None], e[None], np.array([r]), np.array([parent]), np.array([level]),
             np.array([False]), np.array([len(pts)]))
    return tree.extend(t), e


def build_lung_trees(cav: Cavity, seed: int, n_points: int) -> dict[str, Any]:
    """Arteries (with the bronchi that run beside them) and veins, per lung and lobe."""
    an = cav.an
    out: dict[str, Any] = {}
    art_all, vein_all, aw_all = Tree.empty(), Tree.empty(), Tree.empty()
    for side_i, side in enumerate(("right", "left")):
        rng = rng_for(seed, f"tree-{side}")
        pts = cav.sample(rng, n_points, side_i, 1.2)
        lobes = cav.lobe(pts, np.full(len(pts), side_i))
        n_tot = len(pts)
        # bronchovascular tree, grown from the airway hilum; arteries sit beside the bronchi
        q0 = an.hilum_aw[side].copy()
        # push the roots out of the mediastinal band into the lung
        for _ in range(40):
            sd, _s = cav.sd(q0[None])
            if sd[0] > 1.0:
                break
            q0[0] += -1.5 if side == "right" else 1.5
        r_aw = an.r_mb[side] * 0.92
        tr = Tree.empty()
        groups = [[2], [0, 1]] if side == "right" else [[2], [0]]
        tr, e0 = _stem(tr, q0, pts, r_aw, -1, 0, 0.22)
        for grp in groups:
            sel = pts[np.isin(lobes, grp)]
            if len(sel) < 4:
                continue
            rg = r_aw * (len(sel) / n_tot) ** (1 / MURRAY)
            if len(grp) == 2:
                tr, e1 = _stem(tr, e0, sel, rg, 0, 1, 0.3)
                par = len(tr.start) - 1
                for sub in grp:
                    s2 = pts[lobes == sub]
                    if len(s2) < 4:
                        continue
                    tr = tr.extend(_grow(cav, rng, s2, e1, r_aw, n_tot, -2, 2, 2))
                    _fix_parent(tr, par)
            else:
                tr = tr.extend(_grow(cav, rng, sel, e0, r_aw, n_tot, -2, 1, 2))
                _fix_parent(tr, 0)
        # arteries: offset beside the bronchi, radius scaled to the hilar artery
        r_art = an.tubes["rpa" if side == "right" else "lpa"].radius
        r_art0 = float(np.asarray(r_art).ravel()[-1])
        art = _offset_tree(tr, an.hilum_art[side], q0, rng, 0.85 * r_art0 / r_aw, cav)
        art_all = art_all.extend(art)
        aw_all = aw_all.extend(tr)
        # veins: independent territories per lobe group, roots at the left atrium
        rngv = rng_for(seed, f"vein-{side}")
        ptsv = cav.sample(rngv, n_points, side_i, 1.2)
        lobv = cav.lobe(ptsv, np.full(len(ptsv), side_i))
        vt = Tree.empty()
        for key, grp in ((f"{side}_sup", [0, 1]), (f"{side}_inf", [2])):
            sel = ptsv[np.isin(lobv, grp)]
            if len(sel) < 4:
                continue
            root = an.pv_root[key].copy()
            for _ in range(40):
                sd, _s = cav.sd(root[None])
                if sd[0] > 1.0:
                    break
                root[0] += -1.5 if side == "right" else 1.5
            rv = float(np.asarray(an.tubes["pv_" + key].radius).ravel()[-1]) * 0.95
            r_root = rv * (n_tot / len(sel)) ** (1 / MURRAY)
            vt = vt.extend(_grow(cav, rngv, sel, root, r_root, n_tot, -1, 0, 2))
        vein_all = vein_all.extend(vt)
        out[f"root_aw_{side}"] = q0
    out["arteries"], out["veins"], out["airways"] = art_all, vein_all, aw_all
    return out


def _fix_parent(tr: Tree, par: int) -> None:
    tr.parent[tr.parent == -2] = par


def _offset_tree(tr: Tree, p_root: np.ndarray, q_root: np.ndarray, rng: np.random.Generator,
                 rscale: float, cav: Cavity) -> Tree:
    """Arteries beside the bronchi: every node shifted sideways by the sum of the radii."""
    n = len(tr.start)
    rad = tr.radius * rscale
    off_end = np.zeros((n, 3))
    off_start = np.zeros((n, 3))
    d = _unit(tr.end - tr.start)
    order = np.argsort(tr.level, kind="stable")
    first = p_root - q_root
    for i in order:
        p = tr.parent[i]
        prev = first if p < 0 else off_end[p]
        off_start[i] = first if p < 0 else off_end[p]
        v = prev - (prev @ d[i]) * d[i]
        if np.linalg.norm(v) < 1e-6:
            v = np.cross(d[i], rng.normal(size=3))
        sep = rad[i] + tr.radius[i] * 1.2 + 0.6
        off_end[i] = _unit(v) * sep
    return Tree(tr.start + off_start, tr.end + off_end, rad, tr.parent.copy(), tr.level.copy(),
                tr.terminal.copy(), tr.count.copy())


def tree_capsules(tr: Tree, rng: np.random.Generator, min_r: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each branch as a gentle arc of three capsules (long branches curve, short ones barely),
    tapering along its length; terminal branches taper to a thread."""
    keep = tr.radius >= min_r
    s, e, r, term = tr.start[keep], tr.end[keep], tr.radius[keep], tr.terminal[keep]
    d = e - s
    ln = np.linalg.norm(d, axis=1, keepdims=True)
    perp = _unit(np.cross(d, rng.normal(size=d.shape)))
    bow = perp * ln * rng.uniform(-0.09, 0.09, (len(s), 1))
    q1 = s + d / 3 + bow * (8 / 9)
    q2 = s + 2 * d / 3 + bow * (8 / 9)
    r_end = np.where(term, r * 0.4, r * 0.94)
    ra = r * 1.03
    r_1 = ra + (r_end - ra) / 3
    r_2 = ra + 2 * (r_end - ra) / 3
    p0 = np.vstack([s, q1, q2])
    p1 = np.vstack([q1, q2, e])
    r0 = np.r_[ra, r_1, r_2]
    r1 = np.r_[r_1, r_2, r_end]
    return p0, p1, r0, r1


# --------------------------------------------------------------------------------- lesions


@dataclass
class PlacedLesion:
    spec: LesionSpec
    kind: str
    attachment: str
    side: str
    center: np.ndarray
    radius: float
    hu: float
    core: float  # part-solid: solid core radius (mm)
    invade: float  # mm beyond the pleura
    axes: np.ndarray
    rot: np.ndarray
    bumps: np.ndarray  # (k, 4): direction xyz + amplitude
    spikes: np.ndarray  # (k, 4): direction + length
    lobe: int


_LOBES = {0: "upper", 1: "middle", 2: "lower"}


def _random_specs(rng: np.random.Generator) -> list[LesionSpec]:
    n = int(rng.choice([1, 2, 2, 3, 3, 4, 5]))
    out: list[LesionSpec] = []
    for _ in range(n):
        kind = str(rng.choice(KINDS, p=[0.46, 0.12, 0.12, 0.14, 0.16]))
        if kind == "mass" and any(sp.kind == "mass" for sp in out):
            kind = "solid"  # one mass per patient; the draw below keeps the stream aligned
        if kind == "solid":
            d = float(np.exp(rng.uniform(np.log(4), np.log(30))))
        elif kind == "part_solid":
            d = rng.uniform(8, 28)
        elif kind == "ground_glass":
            d = rng.uniform(6, 25)
        elif kind == "calcified":
            d = rng.uniform(2, 8)
        else:
            d = rng.uniform(30, 60)
        out.append(LesionSpec(kind=kind, diameter_mm=round(float(d), 1)))
    return out


def _place(specs: Sequence[LesionSpec], cav: Cavity, trees: dict[str, Any], seed: int,
           contrast: bool) -> tuple[list[PlacedLesion], list[LesionSpec]]:
    an = cav.an
    art: Tree = trees["arteries"]
    vein: Tree = trees["veins"]
    vs = np.vstack([art.start, vein.start])
    ve = np.vstack([art.end, vein.end])
    vr = np.r_[art.radius, vein.radius]
    placed: list[PlacedLesion] = []
    unplaced: list[LesionSpec] = []
    for i_spec, spec in enumerate(specs):
        # attributes from one stream, position from another: the same lesion whatever the grid
        rng = rng_for(seed, f"lesion-attr-{i_spec}")
        rpos = rng_for(seed, f"lesion-pos-{i_spec}")
        kind = spec.kind
        if kind not in KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}")
        r = spec.diameter_mm / 2
        att = spec.attachment
        if att is None:
            if kind == "mass":
                att = "juxtapleural" if rng.random() < 0.8 else "mediastinal"
            elif kind == "solid":
                att = str(rng.choice(["isolated", "juxtavascular", "juxtapleural"],
                                     p=[0.4, 0.3, 0.3]))
            elif kind == "calcified":
                att = "isolated"
            else:
                att = str(rng.choice(["isolated", "juxtavascular", "juxtapleural"],
                                     p=[0.6, 0.25, 0.15]))
        center = None
        side_i = 0
        for _attempt in range(300):
            side_i = (int(rpos.integers(2)) if spec.side is None
                      else (1 if spec.side == "left" else 0))
            if att == "juxtavascular":
                want = (vr > 0.25 * r) & (vr < 0.75 * r + 0.3)
                cand = np.nonzero(want)[0]
                if cand.size == 0:
                    att = "isolated"
                    continue
                i = int(rpos.choice(cand))
                t = rpos.uniform(0.2, 0.8)
                p = vs[i] + t * (ve[i] - vs[i])
                dirv = _unit(ve[i] - vs[i])
                perp = _unit(np.cross(dirv, rpos.normal(size=3)))
                c = p + perp * rpos.uniform(0.2 * r, r + 0.5 * vr[i])
                sd, s = cav.sd(c[None])
                if s[0] != side_i and spec.side is not None:
                    continue
                side_i = int(s[0])
                if sd[0] < r + 2:
                    continue
            elif att in ("juxtapleural", "mediastinal"):
                q = cav.sample(rpos, 200, side_i, 0.2)
                sd, _ = cav.sd(q)
                q = q[sd < 3.0]
                if len(q) == 0:
                    continue
                if att == "mediastinal":
                    br, bl, _bm = cav.band.at(q[:, 2], q[:, 1])
                    dband = np.where(side_i == 1, q[:, 0] - bl, br - q[:, 0])
                    q = q[dband < 3.0]
                    q = q[(q[:, 2] > an.zdr + 10) & (q[:, 2] < an.zc + 20)] if len(q) else q
                    if len(q) == 0:
                        continue
                b = q[int(rpos.integers(len(q)))]
                nrm = cav.normal(b[None])[0]
                depth = r * (rpos.uniform(0.35, 0.6) if kind == "mass" else rpos.uniform(0.3, 0.7))
                c = b - nrm * depth
                sd, s = cav.sd(c[None])
                if sd[0] < 0.5 or s[0] != side_i:
                    continue
                if kind != "mass" and sd[0] > r:
                    continue
            else:
                q = cav.sample(rpos, 64, side_i, r + 3.0)
                c = q[int(rpos.integers(len(q)))]
                # keep clear of vessels thicker than ~1 mm
                t = np.clip(((c - vs) * (ve - vs)).sum(1) / np.maximum(
                    ((ve - vs) ** 2).sum(1), 1e-9), 0, 1)
                dist = np.linalg.norm(vs + t[:, None] * (ve - vs) - c, axis=1) - vr
                big = vr > max(0.6, 0.3 * r) * (1 + _attempt / 100)
                if (dist[big] < r + 0.8).any():
                    continue
            if any(np.linalg.norm(c - o.center) < r + o.radius + 6 for o in placed):
                continue
            center = c
            break
        if center is None:
            unplaced.append(spec)
            continue
        lobe = int(cav.lobe(center[None], np.array([side_i]))[0])
        lobu = 0.0 if kind == "calcified" else (0.18 if kind in ("solid", "mass") else 0.1)
        k = int(rng.integers(3, 8))
        bumps = np.hstack([_unit(rng.normal(size=(k, 3))), rng.uniform(-lobu, lobu, (k, 1))])
        spic = spec.spiculated
        if spic is None:
            spic = kind in ("solid", "mass", "part_solid") and r >= 4 and rng.random() < 0.35
        if spic:
            ns = int(rng.integers(6, 16))
            spikes = np.hstack([_unit(rng.normal(size=(ns, 3))),
                                rng.uniform(0.3, 0.8, (ns, 1)) * min(r, 12) + 2])
        else:
            spikes = np.zeros((0, 4))
        elong = rng.uniform(0.85, 1.15, 3) if kind != "calcified" else np.ones(3)
        elong /= np.cbrt(np.prod(elong))
        if kind == "calcified":
            hu = rng.uniform(350, 1100)
        elif kind == "ground_glass":
            hu = rng.uniform(-750, -450)
        elif kind == "part_solid":
            hu = rng.uniform(-700, -450)
        else:
            hu = rng.uniform(20, 55) + (rng.uniform(15, 40) if contrast else 0)
        inv = 0.0
        if kind == "mass" and att == "juxtapleural":
            want_inv = spec.invades if spec.invades is not None else rng.random() < 0.35
            inv = float(rng.uniform(3, 10)) if want_inv else 0.0
        placed.append(PlacedLesion(
            spec=spec, kind=kind, attachment=att, side="left" if side_i == 1 else "right",
            center=center, radius=r, hu=float(hu),
            core=float(r * rng.uniform(0.3, 0.6)) if kind == "part_solid" else 0.0,
            invade=inv, axes=elong, rot=_rot(_unit(rng.normal(size=3))), bumps=bumps,
            spikes=spikes, lobe=lobe,
        ))
    return placed, unplaced


def _lesion_sdf(les: PlacedLesion, radius: float, cav: Cavity | None, with_spikes: bool
                ) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    c = les.center.astype(np.float32)
    m = (les.rot / les.axes[None, :]).T.astype(np.float32)
    bumps = les.bumps.astype(np.float32)
    spikes = les.spikes.astype(np.float32) if with_spikes else np.zeros((0, 4), np.float32)

    def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = np.broadcast_arrays(x - c[0], y - c[1], z - c[2])
        qx = m[0, 0] * dx + m[0, 1] * dy + m[0, 2] * dz
        qy = m[1, 0] * dx + m[1, 1] * dy + m[1, 2] * dz
        qz = m[2, 0] * dx + m[2, 1] * dy + m[2, 2] * dz
        rr = np.sqrt(qx * qx + qy * qy + qz * qz) + 1e-6
        rad = np.full_like(rr, radius)
        for b in bumps:
            cos = (qx * b[0] + qy * b[1] + qz * b[2]) / rr
            rad += radius * b[3] * np.exp((cos - 1) * 4.0)
        sd = rad - rr
        for s in spikes:
            # thin tapering cone from inside the surface outwards
            t = np.clip((dx * s[0] + dy * s[1] + dz * s[2] - 0.6 * radius) / (0.4 * radius + s[3]),
                        0, 1)
            px = dx - (0.6 * radius + t * (0.4 * radius + s[3])) * s[0]
            py = dy - (0.6 * radius + t * (0.4 * radius + s[3])) * s[1]
            pz = dz - (0.6 * radius + t * (0.4 * radius + s[3])) * s[2]
            rs = 1.5 - 1.2 * t
            sd = np.maximum(sd, rs - np.sqrt(px * px + py * py + pz * pz))
        if cav is not None:
            pts = np.stack([dx.ravel() + c[0], dy.ravel() + c[1], dz.ravel() + c[2]], 1)
            lim = cav.sd(pts.astype(np.float64))[0].reshape(sd.shape) + les.invade
            sd = np.minimum(sd, lim)
        return np.asarray(sd)

    return f


# ---------------------------------------------------------------------------------- render


def _table(an: Anatomy, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Table (curved carbon shell with foam core, dense rails) and mattress: HU and mask."""
    xs = grid.xs()[None, :].astype(F32)
    ys = grid.ys()[:, None].astype(F32)
    y_back = an.bcy + an.Bpost0 * 1.0
    pad = rng.uniform(4, 40)
    yt = y_back + pad
    rt = rng.uniform(380, 700)
    cy = yt - rt
    d = np.sqrt((xs - 0) ** 2 + (ys - cy) ** 2) - rt  # >0 below the top surface
    half = rng.uniform(210, 250)
    inside_x = soft(half - np.abs(xs), grid.pixel)
    hu = np.full((grid.shape[1], grid.shape[2]), -1000.0, F32)
    thick = rng.uniform(10, 18)
    shell = rng.uniform(1.2, 2.5)
    hu_shell = rng.uniform(150, 450)
    core = rng.uniform(-930, -850)
    a_tab = soft(d, grid.pixel) * soft(thick - d, grid.pixel) * inside_x
    hu += a_tab * (hu_shell - hu)
    a_core = soft(d - shell, grid.pixel) * soft(thick - shell - d, grid.pixel) * inside_x
    hu += a_core * (core - hu)
    # mattress between back and table
    a_mat = soft(-d, grid.pixel) * soft(d + pad + 6, grid.pixel) * inside_x
    hu += a_mat * (rng.uniform(-960, -880) - hu)
    for side in (-1, 1):
        rx = side * (half - rng.uniform(8, 20))
        ry = yt + thick + rng.uniform(4, 14)
        w, h = rng.uniform(5, 9), rng.uniform(8, 16)
        a = soft(w - np.abs(xs - rx), grid.pixel) * soft(h - np.abs(ys - ry), grid.pixel)
        hu += a * (rng.uniform(1400, 2500) - hu)
    return hu, a_tab


def _arms(an: Anatomy, rng: np.random.Generator) -> list[dict[str, float]]:
    if an.arms != "down":
        return []
    out = []
    for side in (-1, 1):
        ra, rb = rng.uniform(38, 52), rng.uniform(42, 58)
        gap = rng.uniform(-4, 25)
        out.append({
            "x": an.bcx + side * (an.A0 * 1.02 + gap + ra), "y": an.bcy + rng.uniform(-15, 25),
            "ra": ra, "rb": rb, "fat": rng.uniform(4, 16), "hr": rng.uniform(10, 13),
            "hx": rng.uniform(-8, 8), "hy": rng.uniform(-8, 8),
        })
    return out


def chest_case(
    seed: int,
    *,
    size: int = 512,
    slices: int | None = None,
    thickness_mm: float = 1.25,
    fov_mm: float | None = None,
    contrast: bool = False,
    lesions: str | Sequence[LesionSpec] = "random",
    normal: bool = False,
    noise: float = 1.0,
    tree_points: int | None = None,
) -> ChestCase:
    """Generate one chest CT case (see the module docstring).

    ``slices`` None covers the lungs from above the apices to the upper abdomen; a number
    centres that many slices on it. ``fov_mm`` None picks a field of view for the body (now
    and then one that clips it). ``lesions``: "random" (a seeded mix), "none", or a list of
    :class:`LesionSpec`. ``normal=True`` is the lesion-free twin of the same seed (identical
    anatomy and noise). ``noise`` scales noise and streaks (0: noise-free, for tests and
    truth rendering). ``tree_points`` sets the vessel tree density (default 7000 territory
    points per lung; fewer for quick tests)."""
    t_start = time.perf_counter()
    c_start = time.process_time()
    timing: dict[str, float] = {}

    def lap(name: str) -> None:  # CPU seconds per step (wall time varies with machine load)
        timing[name] = round(time.process_time() - c_start - sum(timing.values()), 3)

    if not 0.4 <= thickness_mm <= 10:
        raise ValueError("thickness_mm must be within 0.4..10")
    if not 32 <= size <= 2048:
        raise ValueError("size must be within 32..2048")
    an = Anatomy(seed, contrast)
    rng_case = rng_for(seed, "case")
    arms = _arms(an, rng_case)
    # field of view: usually the body with a margin, sometimes clipping it
    body_w = 2 * (an.A0 * 1.1 + abs(an.bcx))
    if fov_mm is None:
        if rng_case.random() < 0.15:
            fov_mm = body_w * rng_case.uniform(0.86, 0.97)
        else:
            fov_mm = body_w + rng_case.uniform(12, 80)
        fov_mm = float(np.clip(round(fov_mm), 280, 500))
    px = fov_mm / size
    t = float(thickness_mm)
    if slices is None:
        nz = math.ceil((an.z_hi - an.z_lo) / t)
        z0 = an.z_lo
    else:
        nz = int(slices)
        z0 = 0.5 * (an.z_lo + an.z_hi) - (nz - 1) * t / 2
    nsub = max(1, math.ceil(t / 0.85 - 1e-6))
    origin = (-fov_mm / 2 + px / 2, -fov_mm / 2 + px / 2, z0)
    grid = Grid((nz, size, size), (t, px, px), origin, nsub)
    band = Band(an)
    cav = Cavity(an, band)
    lap("anatomy")
    n_pts = tree_points or 10000
    trees = build_lung_trees(cav, seed, n_pts)
    lap("trees")

    hu = np.empty(grid.shape, F32)
    lf = np.zeros(grid.shape, np.float16)  # lung fraction: what is left of the cavity
    zs = grid.zs()
    xs = grid.xs().astype(F32)
    ys = grid.ys().astype(F32)
    pr = an.profiles(zs)
    table_hu, _ = _table(an, grid, rng_case)
    b_r, b_l, b_m = band.slices(zs, ys)
    hu_fat, hu_mus = F32(an.hu_fat), F32(an.hu_muscle)
    # static crop: the body at its widest (arms are painted separately)
    rmax = float(pr["rb"].max()) + 3
    i0, i1 = grid.index_range(1, an.bcy - rmax, an.bcy + rmax)
    j0, j1 = grid.index_range(2, an.bcx - rmax, an.bcx + rmax)
    X = np.broadcast_to(xs[None, j0:j1], (i1 - i0, j1 - j0))
    Y = np.broadcast_to(ys[i0:i1, None], (i1 - i0, j1 - j0))
    r = np.hypot(X - F32(an.bcx), Y - F32(an.bcy)).astype(F32)
    th = np.arctan2(Y - F32(an.bcy), X - F32(an.bcx))
    tidx = (((th + np.pi) * (NT / (2 * np.pi))).astype(np.int64) % NT).astype(np.intp)
    posterior = (np.clip(np.sin(th), 0, 1) ** 2).astype(F32)
    del th
    # cavity crop inside the body crop
    rc_max = float((pr["rb"] - pr["dcav"]).max()) + 3
    ci0, ci1 = grid.index_range(1, an.bcy - rc_max, an.bcy + rc_max)
    cj0, cj1 = grid.index_range(2, an.bcx - rc_max, an.bcx + rc_max)
    cs = (slice(ci0 - i0, ci1 - i0), slice(cj0 - j0, cj1 - j0))
    Xc, Yc = X[cs], Y[cs]
    zd = an.z_dia(Xc, Yc).astype(F32)
    ztop = an.z_top(Xc, Yc).astype(F32)
    zd_hi = float(zd.max())
    zt_lo = float(ztop.min())
    # fissures: per sheet the pixels sorted by height, so each slice touches only its band
    fis = {k: np.asarray(v, F32) for k, v in an.fissures(Xc, Yc).items()}
    minor_ok = fis["minor"] > fis["major_right"]
    fsheets = []
    for key, side_right in (("major_right", True), ("minor", True), ("major_left", False)):
        v = fis[key]
        gy, gx = np.gradient(v, px)
        g2 = np.minimum(gx * gx + gy * gy, 6.0).astype(F32)
        ok = (Xc < an.bcx + 40) if side_right else (Xc > an.bcx - 40)
        if key == "minor":
            ok = ok & minor_ok
        flat = np.flatnonzero(ok)
        order = flat[np.argsort(v.ravel()[flat], kind="stable")]
        fsheets.append((v.ravel()[order], order, g2.ravel()[order], side_right))
    ya, yp = an.yant, an.ypost
    lung_hu = (an.lung_base + an.lung_grad * np.clip((Yc - ya) / (yp - ya), 0, 1)).astype(F32)
    rt = rng_for(seed, "texture")
    tex = []
    for _ in range(2):
        tt = ndi.gaussian_filter(rt.standard_normal(Xc.shape).astype(F32), 6.0 / px)
        tex.append((tt / (tt.std() + 1e-6) * 8.0).astype(F32))
    liver_edge = an.bcx + 25 + 55 * np.clip((an.yant + 70 - Yc) / 60, 0, 1)
    abd_hu = np.where(Xc < liver_edge, F32(an.hu_liver), F32(-40.0)).astype(F32)
    arm_a: np.ndarray | None = None
    arm_hu = np.zeros((size, size), F32)
    if arms:
        XA = np.broadcast_to(xs[None, :], (size, size))
        YA = np.broadcast_to(ys[:, None], (size, size))
        arm_a = np.zeros((size, size), F32)
        for arm in arms:
            ra, rb_ = arm["ra"], arm["rb"]
            q = np.sqrt(((XA - arm["x"]) / ra) ** 2 + ((YA - arm["y"]) / rb_) ** 2)
            dd = (1 - q) * min(ra, rb_)
            a_sk = soft(dd, px)
            v = np.full((size, size), F32(20.0))
            v += soft(dd - 1.5, px) * (hu_fat - v)
            v += soft(dd - arm["fat"], px) * (hu_mus - v)
            hd = arm["hr"] - np.hypot(XA - arm["x"] - arm["hx"], YA - arm["y"] - arm["hy"])
            v += soft(hd, px) * (F32(an.hu_cortex) - v)
            v += soft(hd - 3.0, px) * (F32(-60.0) - v)
            arm_hu += a_sk * (v - arm_hu)
            arm_a = np.maximum(arm_a, a_sk)
        arm_hu = np.where(arm_a > 0, arm_hu / np.maximum(arm_a, 1e-6), 0).astype(F32)
    lap("setup")
    half = t / 2

    def below(h: np.ndarray, z: float) -> np.ndarray:
        """Fraction of the slab under the surface z = h (exact partial volume)."""
        return np.asarray(np.clip((h - F32(z - half)) * F32(1 / t), 0.0, 1.0))

    for k in range(nz):
        z = float(zs[k])
        sl = table_hu.copy()
        sub = sl[i0:i1, j0:j1]
        d = pr["rb"][k][tidx]
        d = np.subtract(d, r, out=d)
        sub += soft(d, px) * (F32(20.0) - sub)
        sub += soft(d - F32(1.5), px) * (hu_fat - F32(20.0))
        dfat = pr["dfat"][k][tidx]
        sub += soft(d - dfat, px) * (hu_mus - hu_fat)
        # a thin fat plane between muscle groups where the muscle layer is thick
        dmus = pr["dmus"][k][tidx]
        mid = dfat + F32(0.55) * (dmus - dfat)
        plane = np.clip(F32(1.0) - np.abs(d - mid) * F32(1 / 1.4), 0, 1)
        plane *= (dmus - dfat) > 14
        sub += plane * F32(0.6) * (hu_fat - hu_mus)
        dc = d[cs] - pr["dcav"][k][tidx[cs]]
        a_cav = soft(dc, px)
        # along z: abdomen under the diaphragm (5 mm of muscle), lung, neck above the apices
        if z - half >= zd_hi:
            b_d = b_a = None
        else:
            b_d = below(zd, z)
            b_a = below(zd - F32(5.0), z)
        b_t = below(ztop, z) if z + half > zt_lo else None
        f_lung = (F32(1.0) if b_t is None else b_t) - (F32(0.0) if b_d is None else b_d)
        f_lung = np.maximum(f_lung, F32(0.0))
        dband = np.minimum(Xc - b_r[k][ci0:ci1, None], b_l[k][ci0:ci1, None] - Xc)
        a_band = soft(dband, px)
        c, s_ = F32(math.cos(z / 37.0)), F32(math.sin(z / 37.0))
        lung_k = lung_hu + tex[0] * c + tex[1] * s_
        # dependent density (subsegmental atelectasis) along the posterior lung bases
        w_dep = an.dependent * float(_sstep(z, an.zdr + 80, an.zdr - 10))
        if w_dep > 1:
            lung_k += F32(w_dep) * np.exp(-np.maximum(dc, 0) * F32(1 / an.dep_len)) * posterior[cs]
        # fissures: thin oblique sheets, denser than lung
        sheet = np.zeros(Xc.shape, F32)
        sh = sheet.reshape(-1)
        reach = half + px * 1.5 + 2.0
        for zsorted, order, g2, side_right in fsheets:
            a, b = np.searchsorted(zsorted, [z - reach, z + reach])
            if b <= a:
                continue
            idx = order[a:b]
            frac = sheet_fraction(zsorted[a:b], g2[a:b], z, t, px, 0.45)
            rows = idx // Xc.shape[1]
            on_side = (Xc.reshape(-1)[idx] < b_m[k][ci0 + rows]) == side_right
            sh[idx] = np.maximum(sh[idx], frac * on_side)
        lung_k += sheet * (F32(0.0) - lung_k)
        not_band = F32(1.0) - a_band
        cav_hu = f_lung * (not_band * lung_k + a_band * hu_fat)
        if b_t is not None:
            f_neck = F32(1.0) - b_t
            cav_hu += f_neck * hu_mus
        if b_d is not None and b_a is not None:
            cav_hu += (b_d - b_a) * hu_mus + b_a * abd_hu
        csub = sub[cs]
        csub += a_cav * (cav_hu - csub)
        if arm_a is not None:
            sl += arm_a * (arm_hu - sl)
        hu[k] = sl
        lf[k, ci0:ci1, cj0:cj1] = a_cav * f_lung * not_band
    del X, Y, r, tidx
    lap("slices")

    hu_flat = hu.reshape(-1)
    lf_flat = lf.reshape(-1)

    rng_tex = rng_for(seed, "tissue-texture")

    def paint(occ: Occupancy, value: Any, lung: bool = False, clip_lung: bool = False,
              texture: tuple[float, float] | None = None) -> None:
        """Paint a material; ``lung`` materials stay part of the lung truth, ``clip_lung``
        ones show only inside the lung; ``texture`` (HU amplitude, grain mm) adds a
        trabecular or parenchymal pattern."""
        idx, fr = occ.sparse()
        if clip_lung:
            fr *= np.minimum(lf_flat[idx] * 1.6, 1.0)
        v = hu_flat[idx]
        val = F32(value)
        if texture is not None:
            amp, grain = texture
            tex = rng_tex.standard_normal(occ.fraction().shape).astype(F32)
            tex = ndi.gaussian_filter(tex, (grain / grid.spacing[0], grain / px, grain / px))
            tex *= F32(amp / (tex.std() + 1e-6))
            k_, i_, j_ = np.unravel_index(idx, grid.shape)
            val = val + tex[k_ - occ.box[0].start, i_ - occ.box[1].start, j_ - occ.box[2].start]
        hu_flat[idx] = v + fr * (val - v)
        if not lung:
            lf_flat[idx] *= 1 - fr

    def canvas(lo: Vec, hi: Vec) -> Occupancy:
        k0, k1 = grid.index_range(0, lo[2], hi[2])
        i0, i1 = grid.index_range(1, lo[1], hi[1])
        j0, j1 = grid.index_range(2, lo[0], hi[0])
        return Occupancy(grid, (slice(k0, k1), slice(i0, i1), slice(j0, j1)))

    def canvases(lo: Vec, hi: Vec, n: int) -> Iterator[list[Occupancy]]:
        """``n`` canvases over the box, a slab of slices at a time (bounded memory for
        structures spread over the whole chest; chunks do not overlap, so painting chunk by
        chunk gives the same image)."""
        k0, k1 = grid.index_range(0, lo[2], hi[2])
        i0, i1 = grid.index_range(1, lo[1], hi[1])
        j0, j1 = grid.index_range(2, lo[0], hi[0])
        per = max(1, (i1 - i0) * (j1 - j0) * grid.nsub * n)
        step = max(1, int(96e6 // per))
        for a in range(k0, k1, step):
            box = (slice(a, min(a + step, k1)), slice(i0, i1), slice(j0, j1))
            yield [Occupancy(grid, box) for _ in range(n)]

    # --- heart: pericardium, epicardial fat, myocardium, chambers
    h = an.heart
    lo, hi = h.bounds(5)
    layers = [canvas(lo, hi) for _ in range(3)]
    add_sdf_layers(layers, [4.0, 2.5, 0.0], lo, hi, h.sdf())
    for oc, val in zip(layers, (25.0, float(an.hu_fat), an.hu_myo), strict=True):
        paint(oc, val)
    u1, u2 = h.rot[:, 0], h.rot[:, 1]
    ax = h.axes
    chambers = [
        (h.center + 0.2 * ax[0] * u1 + 0.25 * ax[1] * u2, ax * [0.55, 0.42, 0.45], an.hu_aorta),
        (h.center - 0.1 * ax[0] * u1 - 0.45 * ax[1] * u2, ax * [0.5, 0.33, 0.5],
         an.hu_pa),
        (h.center - 0.55 * ax[0] * u1 + 0.1 * ax[1] * u2 + np.array([-10, 5, 0]),
         ax * [0.35, 0.4, 0.45], an.hu_vein * 1.1),
        (h.center - 0.45 * ax[0] * u1 + 0.5 * ax[1] * u2 + np.array([5, 15, 10]),
         ax * [0.32, 0.35, 0.4], an.hu_aorta),
    ]
    for cen, axes, val in chambers:
        e = Ellipsoid(cen, axes, h.rot)
        lo2, hi2 = e.bounds()
        oc = canvas(lo2, hi2)
        oc.add_sdf(lo2, hi2, e.sdf())
        paint(oc, val if contrast else an.hu_myo - 4)
    # --- great vessels
    vessel_hu: dict[str, float] = {"aorta": an.hu_aorta, "bct": an.hu_aorta, "lcca": an.hu_aorta,
                 "lsca": an.hu_aorta, "pa_trunk": an.hu_pa, "lpa": an.hu_pa, "rpa": an.hu_pa,
                 "svc": an.hu_vein, "bcv_r": an.hu_vein, "bcv_l": an.hu_vein,
                 "azygos": an.hu_vein, "ivc": an.hu_vein}
    for key in an.pv_root:
        vessel_hu["pv_" + key] = an.hu_aorta * 0.95
    if an.dense_side:  # undiluted contrast arriving through one arm
        vessel_hu["svc"] = an.hu_dense
        vessel_hu["bcv_r" if an.dense_side == "right" else "bcv_l"] = an.hu_dense
    for name, val in vessel_hu.items():
        tb = an.tubes[name]
        lo, hi = tb.bounds()
        oc = canvas(lo, hi)
        tb.draw(oc)
        paint(oc, val)
    # --- stomach (air cap anterior: the patient is supine), spleen, esophagus
    st = an.stomach
    lo, hi = st.bounds()
    zdf = an.z_dia
    sdf_st = st.sdf()

    def stomach_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.asarray(np.minimum(sdf_st(x, y, z), zdf(x, y) - 6 - z))

    oc = canvas(lo, hi)
    oc.add_sdf(lo, hi, stomach_sdf)
    paint(oc, 25.0)

    def air_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.asarray(np.minimum(stomach_sdf(x, y, z) - 3, an.stomach_air_y - y))

    oc = canvas(lo, hi)
    oc.add_sdf(lo, hi, air_sdf)
    paint(oc, -1000.0)
    sp = an.spleen
    lo, hi = sp.bounds()
    sdf_sp = sp.sdf()
    oc = canvas(lo, hi)
    oc.add_sdf(lo, hi, lambda x, y, z: np.minimum(sdf_sp(x, y, z), zdf(x, y) - 6 - z))
    paint(oc, an.hu_spleen)
    lo, hi = an.esophagus.bounds()
    oc = canvas(lo, hi)
    an.esophagus.draw(oc)
    paint(oc, 35.0)
    oc = canvas(lo, hi)
    p0, p1, r0, r1 = an.esophagus.capsules()
    mids = 0.5 * (p0[:, 2] + p1[:, 2])
    air = np.zeros(len(p0), bool)
    for za in an.eso_air:
        air |= np.abs(mids - za) < 6
    if air.any():
        oc.add_capsules(p0[air], p1[air], r0[air] * 0.3, r1[air] * 0.3)
        paint(oc, -1000.0)
    # --- trachea and main bronchi: wall then lumen (not lung; airway truth)
    aw_tr = canvas(*_bounds_of([an.trachea, *an.main_bronchi.values()]))
    wall = canvas(*_bounds_of([an.trachea, *an.main_bronchi.values()]))
    for tb in (an.trachea, *an.main_bronchi.values()):
        p0, p1, r0, r1 = tb.capsules()
        wall.add_capsules(p0, p1, r0 + 1.8, r1 + 1.8)
        aw_tr.add_capsules(p0, p1, r0, r1)
    paint(wall, 45.0)
    paint(aw_tr, -1000.0)
    airway_truth = np.zeros(grid.shape, bool)
    airway_truth[aw_tr.box] |= aw_tr.fraction() >= 0.5
    lap("organs")

    # --- bones
    _bones(an, paint, canvas, canvases)
    lap("bones")

    # --- emphysema: low-attenuation holes, centrilobular in the upper lobes, some subpleural
    lo = np.array([an.bcx - an.A0, an.yant - 10, -5.0])
    hi = np.array([an.bcx + an.A0, an.ypost + 40, an.H + 5])
    if an.emphysema > 0:
        rng_e = rng_for(seed, "emphysema")
        pts = np.vstack([cav.sample(rng_e, int(an.emphysema * 900), side, 1.0) for side in (0, 1)])
        upper = _sstep(pts[:, 2], an.zc - 60, an.zc + 20)
        pts = pts[rng_e.random(len(pts)) < 0.15 + 0.85 * upper]
        rad = np.exp(rng_e.uniform(np.log(1.0), np.log(5.0), len(pts)))
        pts2 = pts + rng_e.normal(0, 0.8, pts.shape)
        for (em,) in canvases(lo, hi, 1):
            em.add_capsules(pts, pts2, rad, rad)
            paint(em, -995.0, lung=True, clip_lung=True)
    # --- lung vessels (inside the lung only), then the bronchial tree with walls
    rng_v = rng_for(seed, "vessel-shape")
    caps = [tree_capsules(trees[name], rng_v) for name in ("arteries", "veins")]
    for (oc,) in canvases(lo, hi, 1):
        for p0, p1, r0, r1 in caps:
            oc.add_capsules(p0, p1, r0, r1)
        paint(oc, an.hu_lungvessel, lung=True, clip_lung=True)
    aw: Tree = trees["airways"]
    big = aw.radius >= 0.9
    if big.any():
        p0, p1, r0, r1 = tree_capsules(Tree(aw.start[big], aw.end[big], aw.radius[big],
                                            aw.parent[big], aw.level[big],
                                            np.zeros(big.sum(), bool), aw.count[big]), rng_v)
        for wall, lum in canvases(lo, hi, 2):
            wall.add_capsules(p0, p1, r0 * 1.22 + 0.3, r1 * 1.22 + 0.3)
            paint(wall, 30.0, lung=True, clip_lung=True)
            lum.add_capsules(p0, p1, r0, r1)
            paint(lum, -1000.0, lung=True, clip_lung=True)
            airway_truth[lum.box] |= (lum.fraction() >= 0.5) & (lf[lum.box] >= 0.5)
    lap("vessels")

    # --- lesions
    if normal or (isinstance(lesions, str) and lesions == "none"):
        specs: list[LesionSpec] = []
    elif isinstance(lesions, str):
        if lesions != "random":
            raise ValueError("lesions must be 'random', 'none' or a list of LesionSpec")
        specs = _random_specs(rng_for(seed, "lesion-mix"))
    else:
        specs = list(lesions)
    placed, unplaced = _place(specs, cav, trees, seed, contrast)
    dropped = [asdict(sp) for sp in unplaced]
    labels = np.zeros(grid.shape, np.int16)
    in_cav: list[tuple[Any, np.ndarray]] = []  # (box, mask): lesion voxels inside the cavity
    records: list[dict[str, Any]] = []
    lab = 0
    for les in placed:
        ext = les.radius * 1.25 + (les.spikes[:, 3].max() + 2 if len(les.spikes) else 2)
        lo = les.center - ext - 2
        hi = les.center + ext + 2
        fuzzy = les.kind in ("ground_glass", "part_solid")
        oc = canvas(lo, hi)
        oc.add_sdf(lo, hi, _lesion_sdf(les, les.radius, cav, True),
                   width=2.2 if fuzzy else 0.0)
        fr = oc.fraction()
        if fr.max() < 0.5:  # below the resolution of this grid
            dropped.append(asdict(les.spec))
            continue
        lab += 1
        box = oc.box
        if fuzzy:
            v = hu[box]
            base = F32(an.lung_base + an.lung_grad * 0.5)
            v += fr * F32(les.hu - base) * np.clip((F32(-150) - v) / F32(600), 0.35, 1.0)
        else:
            blend(hu, box, fr, les.hu)
        if les.core > 0:
            oc2 = canvas(lo, hi)
            oc2.add_sdf(lo, hi, _lesion_sdf(les, les.core, cav, False))
            blend(hu, box, oc2.fraction(), 35.0 + (25.0 if contrast else 0.0))
        m = fr >= 0.5
        sub = labels[box]
        sub[m] = lab
        # the part inside the pleural cavity counts as lung
        if les.invade > 0:
            oc3 = canvas(lo, hi)
            inner = _lesion_sdf(les, les.radius, cav, True)
            inv = les.invade

            def in_cavity(x: np.ndarray, y: np.ndarray, z: np.ndarray,
                          f: Sdf = inner, d: float = inv) -> np.ndarray:
                return f(x, y, z) - d

            oc3.add_sdf(lo, hi, in_cavity)
            in_cav.append((box, m & (oc3.fraction() >= 0.5)))
        else:
            in_cav.append((box, m))
        records.append({
            "label": lab, "kind": les.kind, "attachment": les.attachment, "side": les.side,
            "lobe": _LOBES[les.lobe], "nominal_diameter_mm": round(2 * les.radius, 2),
            "center_mm": [round(float(v), 2) for v in les.center], "hu": round(les.hu, 1),
            "solid_core_mm": round(2 * les.core, 2), "invades_chest_wall_mm": round(les.invade, 1),
            "spiculated": bool(len(les.spikes)),
        })
    meas = measure_labels(labels, grid)
    for rec in records:
        rec.update(meas.get(rec["label"], {}))
    lap("lesions")

    # --- truth (before noise)
    lung_l = np.empty(grid.shape, bool)
    lung_r = np.empty(grid.shape, bool)
    xg = xs[None, :]
    for k in range(nz):
        lk = lf[k] >= 0.5
        for box, m in in_cav:
            if box[0].start <= k < box[0].stop:
                lk[box[1], box[2]] |= m[k - box[0].start]
        left = xg > b_m[k][:, None]
        np.logical_and(lk, left, out=lung_l[k])
        np.logical_and(lk, ~left, out=lung_r[k])
    truth = {"lung_left": lung_l, "lung_right": lung_r, "airways": airway_truth,
             "lesions": labels}
    del lf
    lf_flat = np.empty(0, np.float16)  # release the buffer (paint is done)
    lap("truth")

    # --- artifacts, noise, storage convention and reconstruction circle, to int16
    rng_n = rng_for(seed, "noise")
    sharp = rng_n.random() < 0.5
    sigma0 = float(rng_n.uniform(9, 26) * (an.A0 / 160) ** 1.3 * (1.7 if sharp else 1.0))
    bank = NoiseBank(rng_n, (size, size), cutoff=(0.42 if sharp else 0.22) * min(1.0, px / 0.6))
    bank_aniso = NoiseBank(rng_n, (size, size), cutoff=(0.42 if sharp else 0.22), aniso=3.0,
                           count=3)
    body_w_z = pr["rb"][:, [NT // 2, 0]].sum(axis=1)  # lateral width per slice
    shoulder = _sstep(zs, an.H - 45, an.H + 15)
    arm_fac = 1.35 if arms else 1.0
    XA = np.broadcast_to(xs[None, :], (size, size))
    YA = np.broadcast_to(ys[:, None], (size, size))
    outside = np.hypot(XA, YA) >= 0.5 * fov_mm
    streak_src = _streak_sources(an, arms)
    dense_src = _dense_sources(an)
    rs = rng_for(seed, "storage")
    style = int(rs.integers(3))
    if style == 0:
        storage = Storage(signed=False, intercept=-1024, padding_hu=None)
    elif style == 1:
        storage = Storage(signed=False, intercept=-1024, padding_hu=-1024)
    else:
        storage = Storage(signed=True, intercept=-1024, padding_hu=-3024)
    out = np.empty(grid.shape, np.int16)
    for k in range(nz):
        width = float(body_w_z[k])
        s = sigma0 * (width / (2 * an.A0)) ** 1.5 * arm_fac * (1 + 0.6 * float(shoulder[k]))
        wa = min(1.0, float(shoulder[k]) * 0.8 + (0.35 if arms else 0.0))
        sl = hu[k]
        n_sl = bank.draw() * F32(math.sqrt(max(0.0, 1 - wa * wa)))
        if wa > 0:
            n_sl += bank_aniso.draw() * F32(wa)
        sl += n_sl * F32(s * noise)
        srcs = streak_src(float(zs[k]))
        if len(srcs) >= 2 and noise > 0:
            _beam_hardening(sl, XA, YA, srcs, rng_n, float(shoulder[k]) + (0.6 if arms else 0))
        if noise > 0:
            for sx, sy in dense_src(float(zs[k])):
                _dense_streaks(sl, grid, sx, sy, an.hu_dense, rng_n)
        np.clip(sl, -1024, 3071, out=sl)
        o = out[k]
        np.rint(sl, out=sl)
        o[...] = sl
        if storage.padding_hu is not None:
            o[outside] = storage.padding_hu
    del hu
    lap("noise")
    meta = {
        "seed": seed, "size": size, "slices": nz, "thickness_mm": t, "fov_mm": fov_mm,
        "pixel_mm": px, "contrast": contrast, "normal": bool(normal or not records),
        "arms": an.arms, "junction_lines": an.touch, "emphysema": an.emphysema,
        "dependent_density_hu": round(an.dependent, 1), "dense_contrast": an.dense_side,
        "noise_sigma_hu": round(sigma0 * noise, 1), "kernel": "sharp" if sharp else "soft",
        "storage": asdict(storage), "lesions_not_rendered": dropped, "origin_mm": list(grid.origin),
        "spacing_mm": list(grid.spacing), "nsub": nsub,
        "vessel_segments": int(2 * (len(trees["arteries"].start) + len(trees["veins"].start))),
        "cpu_seconds_by_step": timing, "seconds": round(time.perf_counter() - t_start, 2),
        "cpu_seconds": round(time.process_time() - c_start, 2),
    }
    return ChestCase(seed, out, grid, truth, records, meta, storage)


def _bounds_of(tubes: Sequence[Tube]) -> tuple[np.ndarray, np.ndarray]:
    b = [tb.bounds() for tb in tubes]
    return np.min([x[0] for x in b], axis=0) - 3, np.max([x[1] for x in b], axis=0) + 3


def _dense_sources(an: Anatomy) -> Callable[[float], list[tuple[float, float]]]:
    """Centres of the vessels filled with undiluted contrast at height z."""
    if not an.dense_side:
        return lambda z: []
    names = ["svc", "bcv_r" if an.dense_side == "right" else "bcv_l"]
    pts = np.vstack([_spline(an.tubes[n].ctrl, 2.0) for n in names])

    def f(z: float) -> list[tuple[float, float]]:
        near = pts[np.abs(pts[:, 2] - z) < 1.5]
        if len(near) == 0:
            return []
        p = near.mean(axis=0)
        return [(float(p[0]), float(p[1]))]

    return f


def _dense_streaks(sl: np.ndarray, grid: Grid, sx: float, sy: float, hu_dense: float,
                   rng: np.random.Generator) -> None:
    """Bright and dark streaks radiating from a vessel full of contrast (photon starvation
    and beam hardening along the rays through it)."""
    i0, i1 = grid.index_range(1, sy - 130, sy + 130)
    j0, j1 = grid.index_range(2, sx - 130, sx + 130)
    if i1 <= i0 or j1 <= j0:
        return
    xs = grid.xs()[j0:j1].astype(F32)[None, :] - F32(sx)
    ys = grid.ys()[i0:i1].astype(F32)[:, None] - F32(sy)
    dist = np.sqrt(xs * xs + ys * ys)
    decay = F32(1.0) / (F32(1.0) + dist * F32(1 / 35.0))
    sub = sl[i0:i1, j0:j1]
    scale = hu_dense / 2000.0
    for _ in range(int(rng.integers(5, 11))):
        ang = rng.uniform(0, np.pi)
        dperp = xs * F32(-math.sin(ang)) + ys * F32(math.cos(ang))
        amp = F32(rng.choice([-1.0, 1.0]) * rng.uniform(40, 160) * scale)
        sub += amp * np.exp(-((dperp * F32(1 / 0.8)) ** 2)) * decay


def _streak_sources(an: Anatomy, arms: list[dict[str, float]]
                    ) -> Callable[[float], list[tuple[float, float, float]]]:
    def f(z: float) -> list[tuple[float, float, float]]:
        out = [(a["x"] + a["hx"], a["y"] + a["hy"], a["hr"]) for a in arms]
        if not arms and z > an.H - 40:
            for side in (-1, 1):
                out.append((an.bcx + side * (an.A0 - 25), an.bcy + 20, 14.0))
        return out

    return f


def _beam_hardening(sl: np.ndarray, X: np.ndarray, Y: np.ndarray,
                    srcs: list[tuple[float, float, float]], rng: np.random.Generator,
                    strength: float) -> None:
    """Dark band between two dense structures and thin streaks through them."""
    (x1, y1, r1), (x2, y2, r2) = srcs[0], srcs[-1]
    dxl, dyl = x2 - x1, y2 - y1
    ln = math.hypot(dxl, dyl) + 1e-6
    nx_, ny_ = -dyl / ln, dxl / ln
    dist = (X - x1) * F32(nx_) + (Y - y1) * F32(ny_)
    along = ((X - x1) * F32(dxl / ln) + (Y - y1) * F32(dyl / ln)) / F32(ln)
    inside = np.clip(np.minimum(along, 1 - along) * 8, 0, 1)
    amp = F32(rng.uniform(18, 45) * min(strength, 1.5))
    sl -= amp * np.exp(-((dist / F32(0.9 * (r1 + r2))) ** 2)) * inside
    for _ in range(int(rng.integers(3, 7))):
        (sx, sy, _r) = srcs[int(rng.integers(len(srcs)))]
        ang = math.atan2(dyl, dxl) + rng.normal(0, 0.08)
        d2 = (X - sx) * F32(-math.sin(ang)) + (Y - sy) * F32(math.cos(ang))
        sl += F32(rng.choice([-1, 1]) * rng.uniform(10, 35) * min(strength, 1.5)) * np.exp(
            -((d2 / F32(0.8)) ** 2))


def _bones(an: Anatomy, paint: Callable[..., None], canvas: Callable[..., Occupancy],
           canvases: Callable[..., Iterator[list[Occupancy]]]) -> None:
    """Spine, ribs with cartilage, sternum, scapulae, clavicles, humeral heads."""
    rng = rng_for(an.seed, "bones")
    cortex, marrow = an.hu_cortex, an.hu_marrow
    z_lo, z_hi = an.z_lo - 15, an.z_hi + 15
    # --- vertebral column: discs (soft) then bodies (cortex + marrow), canal, posterior elements
    xs, yv = an.xs, an.yvb
    period = rng.uniform(23, 27)
    phase = rng.uniform(0, period)
    tops = np.arange(z_hi + phase, z_lo - period, -period)
    col_lo = np.array([xs - 30, yv - 25, z_lo])
    col_hi = np.array([xs + 30, yv + 25, z_hi])
    disc = canvas(col_lo, col_hi)

    def disc_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        grow = (an.H - z) * 0.02
        q = np.sqrt(((x - xs) / (an.ax_vb + grow)) ** 2 + ((y - yv) / (an.ay_vb + grow * 0.7))
                    ** 2)
        return (1 - q) * an.ay_vb

    disc.add_sdf(col_lo, col_hi, disc_sdf)
    paint(disc, 85.0)
    body_o = canvas(col_lo, col_hi)
    body_i = canvas(col_lo, col_hi)
    for ztop in tops:
        zbot = ztop - period + rng.uniform(4.5, 7)

        def vb(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: float = ztop, b: float = zbot,
               shrink: float = 0.0) -> np.ndarray:
            grow = (an.H - 0.5 * (a + b)) * 0.02
            q = np.sqrt(((x - xs) / (an.ax_vb + grow - shrink)) ** 2
                        + ((y - yv) / (an.ay_vb + grow * 0.7 - shrink)) ** 2)
            return np.minimum((1 - q) * (an.ay_vb - shrink), np.minimum(z - b, a - z) - shrink)

        lo = np.array([xs - 30, yv - 25, zbot - 2])
        hi = np.array([xs + 30, yv + 25, ztop + 2])
        body_o.add_sdf(lo, hi, vb)
        body_i.add_sdf(lo, hi, partial(vb, shrink=1.3))
    paint(body_o, cortex * 0.8)
    paint(body_i, marrow, texture=(45.0, 0.8))
    # canal + cord, then posterior elements per vertebra
    canal_y = yv + an.ay_vb + 9
    can = canvas(np.array([xs - 12, canal_y - 12, z_lo]), np.array([xs + 12, canal_y + 12, z_hi]))
    can.add_capsules(np.array([[xs, canal_y, z_lo]]), np.array([[xs, canal_y, z_hi]]),
                     np.array([8.5]), np.array([8.5]))
    paint(can, 25.0)
    p0s, p1s, rs = [], [], []
    for ztop in tops:
        zm = ztop - period * 0.45
        ped_y0 = yv + an.ay_vb * 0.6
        for side in (-1, 1):
            a = [xs + side * 9, ped_y0, zm]
            b = [xs + side * 10, canal_y + 3, zm]
            c = [xs + side * 4, canal_y + 12, zm - 3]
            tp = [xs + side * 30, canal_y + 4, zm + 2]
            p0s += [a, b, b, c]
            p1s += [b, c, tp, [xs, canal_y + 14, zm - 4]]
            rs += [4.0, 3.2, 3.5, 3.0]
        sp0 = [xs, canal_y + 13, zm - 4]
        z_tip = zm - rng.uniform(12, 22)
        y_lim = float(an.point_at(np.array([np.pi / 2]), np.array([z_tip]), "dfat", 6.0)[0, 1])
        sp1 = [xs, min(canal_y + rng.uniform(30, 40), y_lim), z_tip]
        p0s.append(sp0)
        p1s.append(sp1)
        rs.append(3.3)
    pe_lo = np.array([xs - 45, yv, z_lo])
    pe_hi = np.array([xs + 45, canal_y + 50, z_hi])
    po = canvas(pe_lo, pe_hi)
    po.add_capsules(np.array(p0s), np.array(p1s), np.array(rs), np.array(rs) * 0.85,
                    zscale=0.8)
    pi = canvas(pe_lo, pe_hi)
    pi.add_capsules(np.array(p0s), np.array(p1s), np.array(rs), np.array(rs) * 0.85,
                    zscale=0.8, shrink=1.2)
    paint(po, cortex)
    paint(pi, marrow)
    # --- ribs: from the transverse processes round the cavity, descending anteriorly
    P0, P1, R0, R1 = [], [], [], []
    C0, C1, CR = [], [], []
    for i in range(12):
        z_post = an.H - 12 - i * period * rng.uniform(0.95, 1.05)
        if z_post < an.z_lo - 40:
            break
        drop = (45 + 60 * min(i, 5) / 5) if i < 10 else 45.0
        end = 0.92 if i < 7 else (0.75 if i < 10 else 0.5)
        n = 40
        s = np.linspace(0, end, n)
        for side in (-1, 1):
            # angle: posterior near the spine (pi/2 -/+ 0.35) round to anterior near the sternum
            a_post = np.pi / 2 - side * 0.32
            a_ant = -np.pi / 2 + side * 0.22
            if side == 1:  # patient left: through theta = 0
                theta = a_post + (a_ant - a_post) * s
            else:  # patient right: through theta = pi
                theta = a_post + ((a_ant + 2 * np.pi) - a_post) * s
            # steep behind, flattening in front; costal cartilages climb back a little
            zz = z_post - drop * (0.2 * s / end + 0.8 * _sstep(s, 0.06, 0.7))
            zz = np.where(s > 0.72, zz + (s - 0.72) * 40 * (i < 7), zz)
            pts = an.point_at(theta, zz, "dcav", inset=-3.4)
            if i == 0:
                pts = an.point_at(theta, zz, "dcav", inset=-2.0)
            r = np.full(n, 2.7 + 0.1 * min(i, 6))
            bone = s < end * (0.78 if i < 10 else 1.0)
            P0.append(pts[:-1][bone[:-1]])
            P1.append(pts[1:][bone[:-1]])
            R0.append(r[:-1][bone[:-1]])
            R1.append(r[1:][bone[:-1]])
            if (~bone).any():
                cb = ~bone[:-1]
                C0.append(pts[:-1][cb])
                C1.append(pts[1:][cb])
                CR.append(r[:-1][cb] * 1.1)
    P0a, P1a, R0a, R1a = (np.vstack(P0), np.vstack(P1), np.concatenate(R0), np.concatenate(R1))
    hu_cart = rng.uniform(90, 160)
    for rib_o, rib_i, cart in canvases(np.array([an.bcx - 260, an.bcy - 200, z_lo]),
                                       np.array([an.bcx + 260, an.bcy + 200, z_hi]), 3):
        rib_o.add_capsules(P0a, P1a, R0a, R1a, zscale=0.55)
        rib_i.add_capsules(P0a, P1a, R0a, R1a, zscale=0.55, shrink=0.8)
        if C0:
            cr = np.concatenate(CR)
            cart.add_capsules(np.vstack(C0), np.vstack(C1), cr, cr, zscale=0.7)
            paint(cart, hu_cart)
        paint(rib_o, cortex)
        paint(rib_i, marrow)
    # --- sternum (manubrium wide at the top, body, xiphoid)
    z_st_top = an.zc + rng.uniform(40, 55)
    z_st_bot = an.zdr - rng.uniform(0, 15)
    zq = np.linspace(z_st_bot - 5, z_st_top + 5, 24)
    front = an.point_at(np.full(24, -np.pi / 2), zq, "dcav", inset=-7)
    sx = an.bcx
    sy_z = front[:, 1]

    def sternum(x: np.ndarray, y: np.ndarray, z: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        hw = 14 + 12 * _sstep(z, z_st_top - 45, z_st_top - 25) - shrink
        hw = np.where(z < z_st_bot + 25, hw * (0.5 + 0.5 * _sstep(z, z_st_bot, z_st_bot + 25)),
                      hw)
        yc = np.interp(z, zq, sy_z).astype(np.float32)
        q = np.sqrt(((x - sx) / hw) ** 2 + ((y - yc) / (5.5 - shrink)) ** 2)
        return np.asarray(np.minimum((1 - q) * (5.5 - shrink),
                                     np.minimum(z - z_st_bot, z_st_top - z) - shrink))

    lo = np.array([sx - 32, sy_z.min() - 10, z_st_bot - 2])
    hi = np.array([sx + 32, sy_z.max() + 10, z_st_top + 2])
    so = canvas(lo, hi)
    so.add_sdf(lo, hi, sternum)
    si = canvas(lo, hi)
    si.add_sdf(lo, hi, lambda x, y, z: sternum(x, y, z, 1.2))
    paint(so, cortex * 0.9)
    paint(si, marrow)
    # --- scapulae: thin curved plates behind the ribs, spine of the scapula, glenoid
    z_inf = an.zc - rng.uniform(70, 95)
    z_sup = an.H + rng.uniform(0, 15)
    S0, S1, SR = [], [], []
    for side in (-1, 1):
        for zz in np.arange(z_inf, z_sup, 2.0):
            f = (zz - z_inf) / (z_sup - z_inf)
            a_med = np.pi / 2 - side * (0.55 + 0.1 * f)
            a_lat = np.pi / 2 - side * (0.6 + 0.75 * min(1.0, f * 1.6 + 0.05))
            th = np.linspace(a_med, a_lat, 5)
            pts = an.point_at(th, np.full(5, zz), "dmus", inset=-3)
            if an.arms == "up":
                pts[:, 0] += side * 12 * f
            S0.append(pts[:-1])
            S1.append(pts[1:])
            SR.append(np.full(4, 1.6 + 2.2 * (th[1:] == th[-1])))
        # spine of the scapula: a ridge up and out to the acromion
        a = an.point_at(np.array([np.pi / 2 - side * 0.6]), np.array([z_sup - 45]), "dmus", -8)[0]
        b = an.point_at(np.array([np.pi / 2 - side * 1.25]), np.array([z_sup - 5]), "dmus", -12)[0]
        c = an.point_at(np.array([0.0 if side == 1 else np.pi]),
                        np.array([z_sup + 5]), "dmus", -5)[0]
        S0 += [a[None], b[None]]
        S1 += [b[None], c[None]]
        SR += [np.array([3.5]), np.array([3.5])]
    S0a, S1a, SRa = np.vstack(S0), np.vstack(S1), np.concatenate(SR)
    for sc_o, sc_i in canvases(np.array([an.bcx - 260, an.bcy - 50, an.zc - 120]),
                               np.array([an.bcx + 260, an.bcy + 220, z_hi]), 2):
        sc_o.add_capsules(S0a, S1a, SRa, SRa)
        sc_i.add_capsules(S0a, S1a, SRa, SRa, shrink=1.0)
        paint(sc_o, cortex * 0.9)
        paint(sc_i, marrow)
    # --- clavicles from the manubrium out to the acromion
    tubes = []
    for side in (-1, 1):
        # sternal end at the manubrium, under the fat across the front, out to the acromion
        ang = -np.pi / 2 + side * np.array([0.18, 0.55, 0.95, 1.3])
        zz = np.array([z_st_top + 3, z_st_top + 10, z_st_top + 16, z_sup + 6])
        pts = an.point_at(ang, zz, "dfat", inset=6.0)
        tubes.append(Tube(pts.tolist(), [7.0, 6.0, 5.5, 6.5]))
    for cl_o, cl_i in canvases(np.array([an.bcx - 260, an.bcy - 220, an.zc]),
                               np.array([an.bcx + 260, an.bcy + 100, z_hi]), 2):
        for tb in tubes:
            tb.draw(cl_o)
            tb.draw(cl_i, shrink=1.4)
        paint(cl_o, cortex)
        paint(cl_i, marrow)


# --------------------------------------------------------------------------------- writing


def write_series(case: ChestCase, out_dir: Path, *, uid_seed: int | None = None) -> list[Path]:
    """The case as a DICOM CT series plus ``truth.npz`` (``lung_left``, ``lung_right``,
    ``airways``, ``lesions``, ``spacing`` (z, y, x), ``origin`` (x, y, z)) and
    ``truth.json`` (case metadata and the lesion list)."""
    out_dir = Path(out_dir)
    us = case.seed if uid_seed is None else uid_seed
    m = case.meta
    kern = "B70f" if m["kernel"] == "sharp" else "B30f"
    header: dict[str, Any] = {
        "BodyPartExamined": "CHEST",
        "StudyDescription": "CT CHEST" + (" WITH CONTRAST" if m["contrast"] else ""),
        "SeriesDescription": f"Thorax {m['thickness_mm']:.2g}mm {m['kernel']}",
        "ProtocolName": "Chest",
        "KVP": "120",
        "XRayTubeCurrent": 180,
        "ExposureTime": 500,
        "ConvolutionKernel": kern,
        "ReconstructionDiameter": f"{m['fov_mm']:.1f}",
        "DataCollectionDiameter": "500",
        "TableHeight": "160",
        "WindowCenter": ["-600", "40"],
        "WindowWidth": ["1500", "400"],
    }
    if m["contrast"]:
        header["ContrastBolusAgent"] = "IODINATED"
    files = write_ct_series(case.hu, case.grid, out_dir, uid_seed=us, kind="chest",
                            storage=case.storage, header=header)
    arrays = dict(case.truth)
    arrays["spacing"] = np.asarray(case.grid.spacing, np.float64)
    arrays["origin"] = np.asarray(case.grid.origin, np.float64)
    save_truth(out_dir, arrays, {"case": case.meta, "lesions": case.lesions})
    return files
