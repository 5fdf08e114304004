"""Building blocks shared by the procedural CT phantoms (chest now, head later).

Coordinates are DICOM patient coordinates (LPS, millimetres): x towards the patient's left, y
towards the posterior, z towards the head. A :class:`Grid` maps voxels to millimetres; volumes
are indexed (z, y, x) with z ascending, the order :mod:`shared.imaging.volume` builds from a
series, so truth masks line up with what the pipeline sees.

Partial volume: every structure is rendered at sub-slice resolution (``Grid.nsub`` samples
across the slice thickness) with anti-aliased in-plane edges, then integrated over the slice
profile (a box of width ``thickness``). Structures given as surfaces ``z = f(x, y)`` use the
exact analytic slab fraction instead (:func:`slab_between`, :func:`sheet_fraction`).

Pieces:
- :class:`Grid`: output geometry (matrix, spacing, origin, sub-slices).
- :class:`Occupancy`: fractional occupancy of one material, accumulated at sub-slice
  resolution (union = maximum) from capsules (tapered tubes, batched and vectorised) and
  signed-distance functions, then integrated to output slices.
- :class:`NoiseBank`: correlated CT noise (ramp x apodisation noise power spectrum,
  optionally anisotropic), cheap per slice.
- :func:`write_ct_series` / :func:`save_truth` / :func:`load_truth`: a proper DICOM CT series
  (real geometry, rescale, storage conventions of several vendors) and its truth files.
- :func:`measure_labels`: volume, centroid and axial long-axis diameter of labelled lesions.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Vec = Sequence[float] | np.ndarray  # a point or box corner (x, y, z mm)

# bucket sizes for batching capsule boxes (pads at most ~33 % per axis)
_BUCKETS = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768,
                     1024, 1536, 2048, 4096])
_CHUNK = 1 << 21  # samples per vectorised batch (bounds temporary memory to ~100 MB)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """An independent, reproducible random stream per (seed, purpose): changing how one part
    draws numbers never changes another part (a lesion-free twin keeps its anatomy)."""
    key = [ord(c) for c in stream]
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *key]))


@dataclass(frozen=True)
class Grid:
    """Output voxel geometry. ``spacing`` is (dz, dy, dx) mm with dz the slice thickness
    (contiguous slices); ``origin`` the (x, y, z) mm of voxel (0, 0, 0)'s centre; ``nsub``
    sub-slices sample each slice's thickness for partial volume."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    nsub: int = 1

    @property
    def thickness(self) -> float:
        return self.spacing[0]

    @property
    def pixel(self) -> float:
        return max(self.spacing[1], self.spacing[2])

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0

    def xs(self) -> np.ndarray:
        return self.origin[0] + np.arange(self.shape[2]) * self.spacing[2]

    def ys(self) -> np.ndarray:
        return self.origin[1] + np.arange(self.shape[1]) * self.spacing[1]

    def zs(self) -> np.ndarray:
        return self.origin[2] + np.arange(self.shape[0]) * self.spacing[0]

    def fine_zs(self) -> np.ndarray:
        """Centres of the sub-slices, ``nz * nsub`` of them, ascending."""
        dzf = self.spacing[0] / self.nsub
        start = self.origin[2] - self.spacing[0] / 2 + dzf / 2
        return start + np.arange(self.shape[0] * self.nsub) * dzf

    def index_range(self, axis: int, lo: float, hi: float) -> tuple[int, int]:
        """Output indices along ``axis`` (0 z, 1 y, 2 x) whose voxel touches [lo, hi] mm."""
        o = self.origin[2 - axis]
        s = self.spacing[axis]
        i0 = math.floor((lo - o) / s + 0.5)
        i1 = math.ceil((hi - o) / s + 0.5)
        return max(0, i0), min(self.shape[axis], max(i1, 0))

    def to_mm(self, zyx: Sequence[float]) -> tuple[float, float, float]:
        z, y, x = zyx
        return (
            self.origin[0] + x * self.spacing[2],
            self.origin[1] + y * self.spacing[1],
            self.origin[2] + z * self.spacing[0],
        )


Box = tuple[slice, slice, slice]


def soft(sd: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased occupancy from a signed distance (mm, positive inside): a linear ramp of
    ``width`` mm across the boundary (the coverage of a pixel of that size)."""
    return np.clip(sd * (1.0 / width) + 0.5, 0.0, 1.0)


def slab_between(lo: np.ndarray | float, hi: np.ndarray | float, z: float, t: float) -> Any:
    """Fraction of the slab [z - t/2, z + t/2] that lies between the heights lo and hi: the
    exact partial volume of a region bounded by two surfaces z = lo(x, y), z = hi(x, y)."""
    top = np.minimum(hi, z + t / 2)
    bot = np.maximum(lo, z - t / 2)
    return np.clip((top - bot) * (1.0 / t), 0.0, 1.0)


def sheet_fraction(
    surface: np.ndarray, grad2: np.ndarray, z: float, t: float, pixel: float, width: float
) -> np.ndarray:
    """Fraction of a voxel (slab thickness t, pixel size ``pixel``) covered by a thin sheet of
    normal thickness ``width`` along the surface z = surface(x, y) with squared slope grad2:
    mass conserving, so oblique sheets blur into bands on thick slices as on a scanner."""
    norm = np.sqrt(1.0 + grad2)
    dn = (z - surface) / norm  # distance along the normal
    nz = 1.0 / norm
    nxy = np.sqrt(np.maximum(grad2, 0.0)) / norm
    ext = t * nz + pixel * nxy * 1.2 + 1e-3  # voxel extent along the normal
    lo = np.maximum(dn - width / 2, -ext / 2)
    hi = np.minimum(dn + width / 2, ext / 2)
    return np.asarray(np.clip((hi - lo) / ext, 0.0, 1.0))


class Occupancy:
    """Fractional occupancy (0..1) of one material over a box of the output grid, sampled at
    sub-slice resolution as bytes. Shapes are unioned by maximum; :meth:`fraction` integrates
    the sub-slices of each output slice (the slice profile)."""

    def __init__(self, grid: Grid, box: Box | None = None) -> None:
        nz, ny, nx = grid.shape
        box = box or (slice(0, nz), slice(0, ny), slice(0, nx))
        k0, k1, _ = box[0].indices(nz)
        i0, i1, _ = box[1].indices(ny)
        j0, j1, _ = box[2].indices(nx)
        self.grid = grid
        self.box: Box = (slice(k0, k1), slice(i0, i1), slice(j0, j1))
        self.f0, self.i0, self.j0 = k0 * grid.nsub, i0, j0
        self.shape = ((k1 - k0) * grid.nsub, i1 - i0, j1 - j0)
        self.fine = np.zeros(self.shape, np.uint8)
        self.zf = grid.fine_zs()[self.f0 : self.f0 + self.shape[0]]
        self.yv = grid.ys()[i0:i1]
        self.xv = grid.xs()[j0:j1]
        self.edge = grid.pixel

    @property
    def empty(self) -> bool:
        return min(self.shape) == 0

    def _ranges(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Index ranges (n, 3, 2) in this canvas (z fine, y, x) of mm boxes lo..hi (n, 3 xyz)."""
        g = self.grid
        dzf = g.spacing[0] / g.nsub
        z0 = float(self.zf[0]) if self.shape[0] else 0.0
        y0 = float(self.yv[0]) if self.shape[1] else 0.0
        x0 = float(self.xv[0]) if self.shape[2] else 0.0
        out = np.empty((lo.shape[0], 3, 2), np.int64)
        for a, (o, s, n, c) in enumerate(
            ((z0, dzf, self.shape[0], 2), (y0, g.spacing[1], self.shape[1], 1),
             (x0, g.spacing[2], self.shape[2], 0))
        ):
            out[:, a, 0] = np.clip(np.ceil((lo[:, c] - o) / s), 0, n)
            out[:, a, 1] = np.clip(np.floor((hi[:, c] - o) / s) + 1, 0, n)
        return out

    def add_capsules(
        self,
        p0: np.ndarray,
        p1: np.ndarray,
        r0: np.ndarray,
        r1: np.ndarray,
        *,
        zscale: float = 1.0,
        shrink: float = 0.0,
    ) -> None:
        """Union of tapered capsules from p0 to p1 (n, 3 mm xyz), radius r0 at p0 and r1 at p1.
        ``zscale`` < 1 stretches the cross-section along z (ribs are taller than thick);
        ``shrink`` subtracts a constant from every radius (an inner lumen or marrow)."""
        if self.empty:
            return
        p0 = np.asarray(p0, np.float64).reshape(-1, 3)
        p1 = np.asarray(p1, np.float64).reshape(-1, 3)
        r0 = np.broadcast_to(np.asarray(r0, np.float64), (p0.shape[0],)) - shrink
        r1 = np.broadcast_to(np.asarray(r1, np.float64), (p0.shape[0],)) - shrink
        keep = np.maximum(r0, r1) > 0.05
        p0, p1, r0, r1 = p0[keep], p1[keep], np.maximum(r0[keep], 0), np.maximum(r1[keep], 0)
        if p0.shape[0] == 0:
            return
        pad = np.maximum(r0, r1) + self.edge
        padv = np.stack([pad, pad, pad / zscale], axis=1)
        lo = np.minimum(p0, p1) - padv
        hi = np.maximum(p0, p1) + padv
        rng = self._ranges(lo, hi)
        size = rng[:, :, 1] - rng[:, :, 0]
        ok = (size > 0).all(axis=1)
        idx = np.nonzero(ok)[0]
        if idx.size == 0:
            return
        bucket = np.searchsorted(_BUCKETS, size[idx])  # (m, 3) bucket index per axis
        key = (bucket[:, 0] * 64 + bucket[:, 1]) * 64 + bucket[:, 2]
        order = np.argsort(key, kind="stable")
        idx, key = idx[order], key[order]
        starts = np.r_[0, np.nonzero(np.diff(key))[0] + 1, key.size]
        for a, b in itertools.pairwise(starts):
            sel = idx[a:b]
            bz, by, bx = (int(_BUCKETS[v]) for v in bucket[order[a]])
            per = max(1, _CHUNK // (bz * by * bx))
            for c in range(0, sel.size, per):
                s = sel[c : c + per]
                self._render(p0[s], p1[s], r0[s], r1[s], rng[s], (bz, by, bx), zscale)

    def _render(
        self,
        p0: np.ndarray,
        p1: np.ndarray,
        r0: np.ndarray,
        r1: np.ndarray,
        rng: np.ndarray,
        box: tuple[int, int, int],
        zscale: float,
    ) -> None:
        bz, by, bx = box
        n = p0.shape[0]
        fz = rng[:, 0, 0, None] + np.arange(bz)  # (n, bz)
        iy = rng[:, 1, 0, None] + np.arange(by)
        jx = rng[:, 2, 0, None] + np.arange(bx)
        vz = fz < rng[:, 0, 1, None]
        vy = iy < rng[:, 1, 1, None]
        vx = jx < rng[:, 2, 1, None]
        fz = np.minimum(fz, self.shape[0] - 1)
        iy = np.minimum(iy, self.shape[1] - 1)
        jx = np.minimum(jx, self.shape[2] - 1)
        f32 = np.float32
        e = (p1 - p0).astype(f32)
        e[:, 2] *= zscale
        l2 = np.maximum((e * e).sum(axis=1), 1e-9).astype(f32)
        wz = ((self.zf[fz] - p0[:, 2, None]) * zscale).astype(f32)[:, :, None, None]
        wy = (self.yv[iy] - p0[:, 1, None]).astype(f32)[:, None, :, None]
        wx = (self.xv[jx] - p0[:, 0, None]).astype(f32)[:, None, None, :]
        ex, ey, ez = (e[:, k, None, None, None] for k in range(3))
        inv = (1.0 / l2)[:, None, None, None]
        t = wx * (ex * inv) + wy * (ey * inv) + wz * (ez * inv)
        np.clip(t, 0.0, 1.0, out=t)
        dx = wx - t * ex
        d2 = dx * dx
        dy = wy - t * ey
        d2 += dy * dy
        dzv = wz - t * ez
        d2 += dzv * dzv
        r = r0.astype(f32)[:, None, None, None] + t * (r1 - r0).astype(f32)[:, None, None, None]
        occ = r - np.sqrt(d2)
        occ *= 255.0 / self.edge
        occ += 127.5
        np.clip(occ, 0.0, 255.0, out=occ)
        occ *= (vz[:, :, None, None] & vy[:, None, :, None] & vx[:, None, None, :])
        val = occ.astype(np.uint8)
        hit = val > 0
        if not hit.any():
            return
        ny, nx = self.shape[1], self.shape[2]
        flat = (fz[:, :, None, None] * ny + iy[:, None, :, None]) * nx + jx[:, None, None, :]
        flat = np.broadcast_to(flat, (n, bz, by, bx))
        np.maximum.at(self.fine.reshape(-1), flat[hit], val[hit])

    def add_sdf(self, lo: Vec, hi: Vec, sdf: Sdf, width: float = 0.0
                ) -> None:
        """Union with the region where ``sdf(x, y, z)`` (mm, positive inside; arguments
        broadcast as (nz,1,1), (1,ny,1), (1,1,nx)) is positive, within the mm box lo..hi
        (x, y, z). ``width`` (mm) widens the anti-aliasing ramp (fuzzy edges)."""
        if self.empty:
            return
        r = self._ranges(np.asarray([lo], float), np.asarray([hi], float))[0]
        if (r[:, 1] <= r[:, 0]).any():
            return
        w = max(width, self.edge)
        ys = self.yv[r[1, 0] : r[1, 1]].astype(np.float32)[None, :, None]
        xs = self.xv[r[2, 0] : r[2, 1]].astype(np.float32)[None, None, :]
        step = max(1, _CHUNK // (ys.size * xs.size))
        for f in range(r[0, 0], r[0, 1], step):
            f1 = min(f + step, r[0, 1])
            zs = self.zf[f:f1].astype(np.float32)[:, None, None]
            occ = np.asarray(sdf(xs, ys, zs), np.float32)
            occ = np.broadcast_to(occ, (f1 - f, ys.size, xs.size))
            val = (np.clip(occ * (255.0 / w) + 127.5, 0, 255)).astype(np.uint8)
            view = self.fine[f:f1, r[1, 0] : r[1, 1], r[2, 0] : r[2, 1]]
            np.maximum(view, val, out=view)

    def sparse(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices into the full output volume, occupancy there) where the occupancy is
        non-zero: painting a thin structure (ribs over the whole chest) touches only it."""
        n = self.grid.nsub
        acc = self.fine[0::n].astype(np.uint16)
        for s in range(1, n):
            acc += self.fine[s::n]
        loc = np.flatnonzero(acc)
        val = acc.reshape(-1)[loc].astype(np.float32) * np.float32(1 / (255 * n))
        k, i, j = np.unravel_index(loc, acc.shape)
        _, ny, nx = self.grid.shape
        flat = ((k + self.box[0].start) * ny + (i + self.box[1].start)) * nx + (
            j + self.box[2].start)
        return flat, val

    def fraction(self) -> np.ndarray:
        """Occupancy integrated over each output slice: float32 over :attr:`box`."""
        n = self.grid.nsub
        if n == 1:
            return self.fine.astype(np.float32) * np.float32(1 / 255)
        acc = self.fine[0::n].astype(np.uint16)
        for s in range(1, n):
            acc += self.fine[s::n]
        return acc.astype(np.float32) * np.float32(1 / (255 * n))


def add_sdf_layers(occs: Sequence[Occupancy], shifts: Sequence[float], lo: Vec,
                   hi: Vec, sdf: Sdf) -> None:
    """Several nested layers from one signed distance evaluation: layer i is the region where
    ``sdf + shifts[i]`` > 0 (e.g. pericardium, fat, myocardium). All canvases share a box."""
    # evaluate chunk by chunk: the same chunks for every layer, so each is computed once
    first = occs[0]
    r = first._ranges(np.asarray([lo], float), np.asarray([hi], float))[0]
    if (r[:, 1] <= r[:, 0]).any():
        return
    ys = first.yv[r[1, 0] : r[1, 1]].astype(np.float32)[None, :, None]
    xs = first.xv[r[2, 0] : r[2, 1]].astype(np.float32)[None, None, :]
    step = max(1, _CHUNK // (ys.size * xs.size))
    w = first.edge
    for f in range(r[0, 0], r[0, 1], step):
        f1 = min(f + step, r[0, 1])
        zs = first.zf[f:f1].astype(np.float32)[:, None, None]
        base = np.broadcast_to(np.asarray(sdf(xs, ys, zs), np.float32),
                               (f1 - f, ys.size, xs.size))
        for occ, sh in zip(occs, shifts, strict=True):
            val = np.clip((base + np.float32(sh)) * (255.0 / w) + 127.5, 0, 255).astype(np.uint8)
            view = occ.fine[f:f1, r[1, 0] : r[1, 1], r[2, 0] : r[2, 1]]
            np.maximum(view, val, out=view)


def blend(vol: np.ndarray, box: Box, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """Paint ``value`` over ``vol[box]`` with coverage ``alpha`` (in place)."""
    v = vol[box]
    v += alpha * (value - v)


class NoiseBank:
    """Correlated CT noise: a few slices of white noise shaped by a noise power spectrum
    (ramp filter times the reconstruction kernel's apodisation, ``cutoff`` in cycles/pixel,
    ``aniso`` > 1 stretches it along x as photon starvation through shoulders does),
    normalised to unit standard deviation. :meth:`draw` mixes two bank slices with random
    shifts and flips, so neighbouring slices are uncorrelated and no pattern repeats."""

    def __init__(
        self, rng: np.random.Generator, shape: tuple[int, int], *, cutoff: float = 0.3,
        aniso: float = 1.0, count: int = 6,
    ) -> None:
        ny, nx = shape
        fy = np.fft.fftfreq(ny)[:, None]
        fx = np.fft.rfftfreq(nx)[None, :]
        f = np.sqrt((fx * aniso) ** 2 + fy**2)
        nps = (f + 0.02) * np.exp(-((f / cutoff) ** 2))
        amp = np.sqrt(nps).astype(np.float32)
        white = rng.standard_normal((count, ny, nx), dtype=np.float32)
        shaped = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(ny, nx)).astype(np.float32)
        shaped /= shaped.std(axis=(1, 2), keepdims=True)
        self.bank = shaped
        self.rng = rng

    def draw(self) -> np.ndarray:
        n, ny, nx = self.bank.shape
        a, b = self.rng.choice(n, 2, replace=False)
        th = self.rng.uniform(0, 2 * np.pi)
        u = np.roll(self.bank[a], (int(self.rng.integers(ny)), int(self.rng.integers(nx))), (0, 1))
        v = np.roll(self.bank[b], (int(self.rng.integers(ny)), int(self.rng.integers(nx))), (0, 1))
        if self.rng.random() < 0.5:
            v = v[::-1]
        if self.rng.random() < 0.5:
            v = v[:, ::-1]
        out = u * np.float32(np.cos(th))
        out += v * np.float32(np.sin(th))
        return np.asarray(out)


# ----------------------------------------------------------------------------- DICOM + truth


def uid(uid_seed: int, what: str) -> str:
    """A valid, reproducible UID from ``uid_seed`` (never from patient data)."""
    return str(generate_uid(entropy_srcs=[f"radstream-phantom-{uid_seed}-{what}"]))


@dataclass(frozen=True)
class Storage:
    """How pixels are stored: unsigned with intercept -1024 (padding 0 = -1024 HU) or signed
    with intercept -1024 and a padding value (e.g. -2000 stored = -3024 HU outside the
    reconstruction circle), as different vendors do."""

    signed: bool = False
    intercept: int = -1024
    padding_hu: int | None = None  # HU outside the reconstruction circle (None: no circle)

    def stored(self, hu: np.ndarray) -> np.ndarray:
        raw = hu.astype(np.int32) - self.intercept
        if self.signed:
            return np.clip(raw, -32768, 32767).astype(np.int16)
        return np.clip(raw, 0, 65535).astype(np.uint16)

    def hu_range(self) -> tuple[int, int]:
        if self.signed:
            return -32768 + self.intercept, 32767 + self.intercept
        return self.intercept, 65535 + self.intercept


def write_ct_series(
    hu: np.ndarray,
    grid: Grid,
    out_dir: Path,
    *,
    uid_seed: int,
    kind: str,
    storage: Storage,
    header: Mapping[str, Any],
    superior_first: bool = True,
) -> list[Path]:
    """Write ``hu`` (int16 HU, (z, y, x), z ascending) as a CT series, one file per slice.
    ``header`` adds or overrides attributes (BodyPartExamined, KVP, ConvolutionKernel...).
    Instance numbers run from the head down when ``superior_first`` (as most scanners do);
    the pipeline sorts by position, never by number. UIDs derive from ``uid_seed`` only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = hu.shape
    study, series = uid(uid_seed, f"{kind}-study"), uid(uid_seed, f"{kind}-series")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CTImageStorage)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    when = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(minutes=uid_seed % 100000)
    ds.SOPClassUID = CTImageStorage
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = f"PHANTOM^{kind.upper()}"
    ds.PatientID = f"RS-PH-{uid_seed % 1000000:06d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{uid_seed % 100000000:08d}"
    ds.StudyID = str(uid_seed % 100000)
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.Modality = "CT"
    ds.Manufacturer = "RadStream phantom"
    ds.InstitutionName = "RadStream"
    ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = uid(uid_seed, f"{kind}-for")
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if storage.signed else 0
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[2]:.6g}"]
    ds.SliceThickness = f"{grid.spacing[0]:.6g}"
    ds.SpacingBetweenSlices = f"{grid.spacing[0]:.6g}"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.RescaleIntercept = storage.intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.GantryDetectorTilt = 0
    if storage.padding_hu is not None:
        pad = storage.padding_hu - storage.intercept
        ds.PixelPaddingValue = int(pad)
    for key, value in header.items():
        setattr(ds, key, value)
    files = []
    order = range(nz - 1, -1, -1) if superior_first else range(nz)
    for number, k in enumerate(order, start=1):
        z = grid.origin[2] + k * grid.spacing[0]
        sop = uid(uid_seed, f"{kind}-sop-{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{grid.origin[0]:.4f}", f"{grid.origin[1]:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        ds.PixelData = storage.stored(hu[k]).tobytes()
        path = out_dir / f"IM{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def save_truth(out_dir: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """``truth.npz`` (masks and label maps in the series' (z, y, x) order plus ``spacing`` and
    ``origin``) and ``truth.json`` (the same metadata, readable). Returns the npz path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "truth.npz"
    np.savez_compressed(path, **dict(arrays))  # type: ignore[arg-type]
    (out_dir / "truth.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def load_truth(out_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(out_dir / "truth.npz") as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads((out_dir / "truth.json").read_text())
    return arrays, meta


def measure_labels(labels: np.ndarray, grid: Grid) -> dict[int, dict[str, Any]]:
    """Per label: voxel count, volume_ml, centroid (voxel z, y, x and patient mm x, y, z),
    the longest axial diameter (mm, on the slice where the lesion is widest) and the
    equivalent-sphere diameter."""
    from scipy import ndimage as ndi  # local: scipy is heavy to import

    out: dict[int, dict[str, Any]] = {}
    objs = ndi.find_objects(labels)
    for lab, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        sub = labels[sl] == lab
        n = int(sub.sum())
        if n == 0:
            continue
        zz, yy, xx = np.nonzero(sub)
        cz = float(zz.mean() + sl[0].start)
        cy = float(yy.mean() + sl[1].start)
        cx = float(xx.mean() + sl[2].start)
        best = 0.0
        areas = sub.sum(axis=(1, 2))
        for k in np.argsort(areas)[::-1][:3]:
            plane = sub[k]
            edge = plane & ~ndi.binary_erosion(plane)
            py, px = np.nonzero(edge)
            pts = np.stack([py * grid.spacing[1], px * grid.spacing[2]], axis=1)
            if len(pts) > 1500:
                pts = pts[:: len(pts) // 1500 + 1]
            if len(pts) == 1:
                best = max(best, min(grid.spacing[1], grid.spacing[2]))
                continue
            d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d) + grid.spacing[2])
        vol = n * grid.voxel_ml
        out[lab] = {
            "voxels": n,
            "volume_ml": round(vol, 4),
            "centroid_voxel": [round(cz, 2), round(cy, 2), round(cx, 2)],
            "centroid_mm": [round(v, 2) for v in grid.to_mm((cz, cy, cx))],
            "diameter_mm": round(best, 2),
            "equivalent_diameter_mm": round((6 * vol * 1000 / math.pi) ** (1 / 3), 2),
        }
    return out
