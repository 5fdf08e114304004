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
        """Block means of ``vol[box]`` (float32): less noise, no aliasing of thin structures."""
        xp, _ = namespace(vol)
        fz, fy, fx = self.factors
        nz, ny, nx = self.shape
        z0, y0, x0 = (b.start for b in self.box)
        crop = vol[z0 : z0 + nz * fz, y0 : y0 + ny * fy, x0 : x0 + nx * fx]
        if self.factors == (1, 1, 1):
            return crop.astype(xp.float32)
        out = crop.reshape(nz, fz, ny * fy, nx * fx).astype(xp.float32).mean(axis=1)
        out = out.reshape(nz, ny, fy, nx * fx).mean(axis=2)
        return out.reshape(nz, ny, nx, fx).mean(axis=3)

    def expand(self, mask: Any, full_shape: tuple[int, int, int]) -> Any:
        """Nearest-neighbour expansion of a grid mask to a full-size volume (False outside the
        box; the remainder of a box that is not a multiple of the factors takes the last
        block's value)."""
        xp, _ = namespace(mask)
        out = xp.zeros(full_shape, dtype=bool)
        idx = [
            xp.minimum(xp.arange(b.stop - b.start) // f, n - 1)
            for b, f, n in zip(self.box, self.factors, self.shape, strict=True)
        ]
        out[self.box] = mask[idx[0]][:, idx[1]][:, :, idx[2]]
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
