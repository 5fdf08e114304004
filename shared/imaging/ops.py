"""Image operations: stateless, arrays in and out, keyword-only options.

Every function works on NumPy arrays (SciPy) and on CuPy arrays (cupyx.scipy.ndimage) with
the same code; :mod:`tests.unit.test_ops` checks each against a plain SciPy / scikit-image
reference, and on the strict CuPy stand-in (and a real GPU, ``-m gpu``) against the CPU.
Sizes and sigmas are in voxels, per axis (z, y, x) or one value for all.

On the device, statistics stay 0-d device arrays (no ``float()`` round trips between kernels);
the functions that return Python numbers make one explicit download
(:func:`~shared.imaging.backend.download`) at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.imaging.backend import download, namespace

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
    img = image.astype(xp.float32)
    if offset is None:
        return xp.log1p(img - img.min())  # the minimum stays on the device (0-d)
    return xp.log1p(img + xp.float32(offset))


def normalize(image: Any, *, method: str = "zscore", mask: Any = None) -> Any:
    """Intensity normalization: ``zscore`` (mean 0, sd 1) or ``minmax`` (to [0, 1])."""
    xp, _ = namespace(image)
    img = image.astype(xp.float32)
    values = img[mask] if mask is not None else img
    one = xp.float32(1.0)
    # statistics stay 0-d arrays on the device (``float()`` of them would be a round trip,
    # ``xp.float32(a_device_scalar)`` an implicit conversion CuPy refuses)
    if method == "zscore":
        sd = values.std()
        return (img - values.mean()) / xp.where(sd > 0, sd, one)
    if method == "minmax":
        lo, hi = values.min(), values.max()
        return (img - lo) / xp.where(hi > lo, hi - lo, one)
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


def histogram_percentiles(
    image: Any, qs: Sequence[float], *, lo: float = -1024, hi: float = 3072
) -> Any:
    """Percentiles of a large volume via a 1-HU histogram (O(n), no sort), as a float64 array
    in the image's module (on the device for a device image)."""
    xp, _ = namespace(image)
    bins = int(hi - lo)
    hist, _ = xp.histogram(image, bins=bins, range=(lo, hi))
    cdf = xp.cumsum(hist)
    total = xp.maximum(cdf[-1], 1).astype(xp.float64)  # an empty histogram counts as 1
    targets = xp.stack([total * (q / 100.0) for q in qs])  # built on the device, no upload
    idx = xp.minimum(xp.searchsorted(cdf, targets), bins - 1)
    return idx.astype(xp.float64) + (lo + 0.5)


def percentiles_from_histogram(
    image: Any, qs: Sequence[float], *, lo: float = -1024, hi: float = 3072
) -> list[float]:
    """:func:`histogram_percentiles` as Python floats (one download of len(qs) values)."""
    values = histogram_percentiles(image, qs, lo=lo, hi=hi)
    return [float(v) for v in download(values, why="percentiles")]


def noise_sigma(image: Any) -> Any:
    """Robust noise sigma: median absolute deviation of the in-plane Laplacian of the middle
    slice, scaled; a 0-d float64 array in the image's module."""
    xp, ndi = namespace(image)
    sl = image[image.shape[0] // 2] if image.ndim == 3 else image
    lap = ndi.laplace(sl.astype(xp.float32), mode="nearest")
    mad = xp.median(xp.abs(lap - xp.median(lap))).astype(xp.float64)
    # for white noise the 2D Laplacian's sd is sqrt(20) * sigma; MAD → sd: * 1.4826
    return mad * 1.4826 / float(np.sqrt(20.0))


def noise_estimate(image: Any) -> float:
    """:func:`noise_sigma` as a Python float (one download)."""
    return float(download(noise_sigma(image), why="noise estimate"))
