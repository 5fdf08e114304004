"""Working grids: block means down, nearest-neighbour up, bounding boxes, host downloads.

The chest pipeline works on reduced grids (about 2 mm for the lungs, 1-1.5 mm for nodules)
and comes back to the scan's grid only for the final masks. Every function here runs on NumPy
and CuPy arrays alike; the only device -> host transfers are the explicit :func:`host` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.imaging.backend import namespace

Box = tuple[slice, slice, slice]


def host(arr: Any) -> np.ndarray:
    """Explicit, deliberate download (small arrays only: indices, crops, statistics)."""
    xp, _ = namespace(arr)
    if xp is np:
        return np.asarray(arr)
    return np.asarray(xp.asnumpy(arr))


def factors_for(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer block factors that bring ``spacing`` closest to ``target_mm`` (never below 1)."""
    return tuple(max(1, round(target_mm / s)) for s in spacing)  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    """A reduced grid over ``box`` of the full volume: voxel (i, j, k) of the grid covers the
    full-resolution block starting at box.start + (i, j, k) * factors."""

    box: Box
    factors: tuple[int, int, int]
    spacing: tuple[float, float, float]  # of the grid, mm
    shape: tuple[int, int, int]

    @staticmethod
    def over(
        box: Box, factors: tuple[int, int, int], full_spacing: tuple[float, float, float]
    ) -> Grid:
        shape = tuple(max(1, (b.stop - b.start) // f) for b, f in zip(box, factors, strict=True))
        spacing = tuple(s * f for s, f in zip(full_spacing, factors, strict=True))
        return Grid(box, factors, spacing, shape)  # type: ignore[arg-type]

    def reduce(self, vol: Any) -> Any:
        """Block means of ``vol[box]`` (float32) from up to 2 x 2 samples in-plane per block
        (the middle slice of a block in z): most of the noise reduction of a full block mean
        at a fraction of the memory traffic (strided views, no float64 temporaries)."""
        xp, _ = namespace(vol)
        fz, fy, fx = self.factors
        nz, ny, nx = self.shape
        z0, y0, x0 = (b.start for b in self.box)

        def offsets(f: int) -> list[int]:
            return [0] if f == 1 else [f // 4, (3 * f) // 4] if f >= 3 else [0, 1]

        zs = [fz // 2]
        views = [
            vol[z0 + i : z0 + nz * fz : fz, y0 + j : y0 + ny * fy : fy, x0 + k : x0 + nx * fx : fx]
            for i in zs
            for j in offsets(fy)
            for k in offsets(fx)
        ]
        out = views[0].astype(xp.float32)
        for v in views[1:]:
            out += v
        if len(views) > 1:
            out *= xp.float32(1.0 / len(views))
        return out

    def expand(self, mask: Any, full_shape: tuple[int, int, int]) -> Any:
        """Nearest-neighbour expansion of a grid mask to a full-size volume (False outside the
        box)."""
        xp, _ = namespace(mask)
        out = xp.zeros(full_shape, dtype=bool)
        crop = self.expand_crop(mask)
        z0, y0, x0 = (b.start for b in self.box)
        sz, sy, sx = crop.shape
        out[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] = crop
        return out

    def expand_crop(self, mask: Any) -> Any:
        """Nearest-neighbour expansion of a grid mask to the full-resolution box (one
        broadcast write; the remainder of a box that is not a multiple of the factors takes
        the last block's value)."""
        xp, _ = namespace(mask)
        fz, fy, fx = self.factors
        nz, ny, nx = mask.shape
        tile = xp.empty((nz, fz, ny, fy, nx, fx), dtype=mask.dtype)
        tile[...] = mask[:, None, :, None, :, None]
        tile = tile.reshape(nz * fz, ny * fy, nx * fx)
        want = tuple(b.stop - b.start for b in self.box)
        if tile.shape == want:
            return tile
        out = xp.empty(want, dtype=mask.dtype)
        sz, sy, sx = (min(w, t) for w, t in zip(want, tile.shape, strict=True))
        out[:sz, :sy, :sx] = tile[:sz, :sy, :sx]
        if sz < want[0]:
            out[sz:, :sy, :sx] = tile[sz - 1 : sz, :sy, :sx]
        if sy < want[1]:
            out[:, sy:, :sx] = out[:, sy - 1 : sy, :sx]
        if sx < want[2]:
            out[:, :, sx:] = out[:, :, sx - 1 : sx]
        return out

    def to_full(self, zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        """Continuous grid index -> continuous full-resolution index (block centres)."""
        return tuple(
            b.start + (c + 0.5) * f - 0.5
            for c, b, f in zip(zyx, self.box, self.factors, strict=True)
        )


def bbox(mask: Any, pad: tuple[int, int, int] = (0, 0, 0)) -> Box | None:
    """Bounding box of a 3D mask (projections downloaded, never the volume), padded and clipped."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        prof = host(mask.any(axis=other))
        nz = np.flatnonzero(prof)
        if nz.size == 0:
            return None
        n = mask.shape[axis]
        out.append(slice(max(0, int(nz[0]) - pad[axis]), min(n, int(nz[-1]) + 1 + pad[axis])))
    return (out[0], out[1], out[2])


def ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """An ellipsoidal structuring element of ``radius_mm`` on an anisotropic grid (host)."""
    r = [max(0, int(radius_mm / s)) for s in spacing]
    zz, yy, xx = np.mgrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    d = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2
    return np.asarray(d <= radius_mm**2 + 1e-6)


def disk(radius_vox: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius_vox : radius_vox + 1, -radius_vox : radius_vox + 1]
    return np.asarray((yy**2 + xx**2 <= radius_vox**2)[None])
