"""Image operations: stateless, arrays in and out, keyword-only options.

Every function works on NumPy arrays (SciPy) and on CuPy arrays (cupyx.scipy.ndimage) with
the same code; :mod:`tests.unit.test_ops` checks each against a plain SciPy / scikit-image
reference. Sizes and sigmas are in voxels, per axis (z, y, x) or one value for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.imaging.backend import namespace

__all__ = ["namespace"]

WINDOWS: dict[str, tuple[float, float]] = {
    # (center, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}


def rescale(
    stored: Any, *, slope: float = 1.0, intercept: float = 0.0, dtype: Any = np.float32
) -> Any:
    """Stored values → modality values (Hounsfield units for CT): ``stored * slope + intercept``."""
    out = stored.astype(dtype, copy=True)
    if slope != 1.0:
        out *= dtype(slope)
    if intercept != 0.0:
        out += dtype(intercept)
    return out


def window(image: Any, *, center: float, width: float) -> Any:
    """Window/level to [0, 1] (DICOM linear VOI: values below/above the window clip)."""
    xp, _ = namespace(image)
    lo = center - width / 2.0
    out = (image.astype(xp.float32) - xp.float32(lo)) / xp.float32(width)
    return xp.clip(out, 0.0, 1.0)


def gaussian(image: Any, *, sigma: float | Sequence[float], truncate: float = 4.0) -> Any:
    """Gaussian smoothing (sigma in voxels per axis; 0 leaves an axis alone)."""
    _, ndi = namespace(image)
    return ndi.gaussian_filter(image, sigma=sigma, truncate=truncate, mode="nearest")


def median(image: Any, *, size: int | Sequence[int]) -> Any:
    """Median filter over a box of ``size`` voxels."""
    _, ndi = namespace(image)
    return ndi.median_filter(image, size=size, mode="nearest")


def mean(image: Any, *, size: int | Sequence[int]) -> Any:
    """Mean (box) filter over ``size`` voxels."""
    _, ndi = namespace(image)
    return ndi.uniform_filter(image, size=size, mode="nearest")


def equalize_histogram(image: Any, *, bins: int = 256, mask: Any = None) -> Any:
    """Histogram equalization to [0, 1] (scikit-image's ``exposure.equalize_hist``)."""
    xp, _ = namespace(image)
    values = image[mask] if mask is not None else image.ravel()
    hist, edges = xp.histogram(values, bins=bins)
    cdf = xp.cumsum(hist).astype(xp.float64)
    cdf /= cdf[-1]
    centers = (edges[:-1] + edges[1:]) / 2
    return xp.interp(image.ravel(), centers, cdf).reshape(image.shape).astype(xp.float32)


def log_transform(image: Any, *, offset: float | None = None) -> Any:
    """``log1p(image - min)`` (or ``log1p(image + offset)``): compresses a wide dynamic range."""
    xp, _ = namespace(image)
    shift = -float(image.min()) if offset is None else offset
    return xp.log1p(image.astype(xp.float32) + xp.float32(shift))


def normalize(image: Any, *, method: str = "zscore", mask: Any = None) -> Any:
    """Intensity normalization: ``zscore`` (mean 0, sd 1) or ``minmax`` (to [0, 1])."""
    xp, _ = namespace(image)
    values = image[mask] if mask is not None else image
    img = image.astype(xp.float32)
    if method == "zscore":
        sd = float(values.std())
        return (img - xp.float32(values.mean())) / xp.float32(sd if sd > 0 else 1.0)
    if method == "minmax":
        lo, hi = float(values.min()), float(values.max())
        return (img - xp.float32(lo)) / xp.float32(hi - lo if hi > lo else 1.0)
    raise ValueError(f"unknown normalization {method!r}")


def resample(
    image: Any, *, spacing: Sequence[float], target: Sequence[float] | float, order: int = 1
) -> tuple[Any, tuple[float, float, float]]:
    """Resample to ``target`` spacing (mm; one value = isotropic). Returns (image, spacing)."""
    _, ndi = namespace(image)
    tgt = (
        [float(target)] * image.ndim
        if isinstance(target, int | float)
        else [float(t) for t in target]
    )
    out_shape = [
        max(1, round(n * s / t)) for n, s, t in zip(image.shape, spacing, tgt, strict=True)
    ]
    factors = [o / n for o, n in zip(out_shape, image.shape, strict=True)]
    out = ndi.zoom(image, factors, order=order, mode="nearest", grid_mode=False)
    new_spacing = tuple(n * s / o for n, s, o in zip(image.shape, spacing, out.shape, strict=True))
    return out, new_spacing


def percentiles_from_histogram(
    image: Any, qs: Sequence[float], *, lo: float = -1024, hi: float = 3072
) -> list[float]:
    """Percentiles of a large volume via a 1-HU histogram (O(n), no sort)."""
    xp, _ = namespace(image)
    hist, _ = xp.histogram(image, bins=int(hi - lo), range=(lo, hi))
    cdf = xp.cumsum(hist)
    total = float(cdf[-1]) or 1.0
    out = []
    for q in qs:
        idx = int(xp.searchsorted(cdf, q / 100.0 * total))
        out.append(lo + min(idx, int(hi - lo) - 1) + 0.5)
    return out


def noise_estimate(image: Any) -> float:
    """Robust noise sigma: median absolute deviation of the in-plane Laplacian, scaled."""
    xp, ndi = namespace(image)
    sl = image[image.shape[0] // 2] if image.ndim == 3 else image
    lap = ndi.laplace(sl.astype(xp.float32), mode="nearest")
    mad = float(xp.median(xp.abs(lap - xp.median(lap))))
    # for white noise the 2D Laplacian's sd is sqrt(20) * sigma; MAD → sd: * 1.4826
    return mad * 1.4826 / float(np.sqrt(20.0))
