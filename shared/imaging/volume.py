"""From decoded instances to a volume with its geometry.

Slices are sorted along the slice normal (from ImageOrientationPatient and
ImagePositionPatient, never by instance number). The series must be consistent: one size,
one orientation, no two slices at the same position, even spacing (gaps are rejected, not
interpolated across). A single multi-frame instance becomes a volume of its frames; a single
2D image (radiograph) a volume of one slice.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom

from shared.runtime.errors import PoisonError

ORIENTATION_TOL = 1e-3
DUPLICATE_TOL_MM = 1e-3
GAP_RATIO = 1.5


@dataclass
class Slice:
    stored: np.ndarray  # (rows, cols) or (frames, rows, cols), stored values
    slope: float
    intercept: float
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float]
    thickness: float | None
    between: float | None  # SpacingBetweenSlices
    modality: str


@dataclass
class Volume:
    """``data`` is (z, y, x); ``spacing`` (z, y, x) mm; ``origin`` the first voxel in patient
    coordinates; ``direction`` row cosines, column cosines, normal (3 x 3, row-major)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    modality: str


def decode(data: bytes) -> Slice:
    """Decode one instance's pixels (every grayscale transfer syntax pydicom's plugins read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            if "PixelData" not in ds:
                raise PoisonError("not_an_image", "instance has no pixel data")
            arr = ds.pixel_array
    except PoisonError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is this input's fault
        raise PoisonError(
            "undecodable", f"pixel data cannot be decoded ({type(exc).__name__})"
        ) from None
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        # colour: luminance (ITU-R BT.601), so colour ultrasound/secondary capture still flow
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            arr = arr[..., 0]
        else:
            arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))

    def floats(name: str) -> tuple[float, ...] | None:
        v = ds.get(name)
        return tuple(float(x) for x in v) if v not in (None, "") else None

    spacing = floats("PixelSpacing") or floats("ImagerPixelSpacing") or (1.0, 1.0)
    pos = floats("ImagePositionPatient")
    return Slice(
        stored=arr,
        slope=float(ds.get("RescaleSlope", 1) or 1),
        intercept=float(ds.get("RescaleIntercept", 0) or 0),
        position=pos if pos and len(pos) == 3 else None,
        orientation=floats("ImageOrientationPatient"),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        between=float(ds.SpacingBetweenSlices)
        if ds.get("SpacingBetweenSlices") not in (None, "")
        else None,
        modality=str(ds.get("Modality", "OT")),
    )


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    r, c = np.array(orientation[:3]), np.array(orientation[3:6])
    n = np.cross(r, c)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise PoisonError("bad_geometry", "ImageOrientationPatient row and column are parallel")
    return n / norm


def assemble(
    slices: list[Slice],
) -> tuple[list[Slice], tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]:
    """Sort and check a series. Returns (sorted slices, spacing zyx, origin, direction)."""
    if not slices:
        raise PoisonError("empty_series", "the series has no instances")
    first = slices[0]
    if len(slices) == 1:
        s = first
        dz = s.between or s.thickness or 1.0
        ori = s.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        n = _normal(ori)
        return (
            slices,
            (float(dz), s.pixel_spacing[0], s.pixel_spacing[1]),
            s.position or (0.0, 0.0, 0.0),
            (*ori, *n.tolist()),
        )
    shape = first.stored.shape
    if first.stored.ndim != 2:
        raise PoisonError("mixed_geometry", "a multi-frame instance in a multi-instance series")
    for s in slices:
        if s.stored.shape != shape:
            raise PoisonError("mixed_geometry", "slices of different sizes in one series")
    oris = [s.orientation for s in slices]
    if any(o is None or len(o) != 6 for o in oris) or any(s.position is None for s in slices):
        raise PoisonError(
            "bad_geometry", "slices lack ImagePositionPatient/ImageOrientationPatient"
        )
    base = np.array(oris[0])
    if any(np.abs(np.array(o) - base).max() > ORIENTATION_TOL for o in oris):
        raise PoisonError("mixed_geometry", "slices of different orientations in one series")
    n = _normal(tuple(base))
    dist = np.array([float(np.dot(n, s.position)) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    steps = np.diff(dist)
    if (steps < DUPLICATE_TOL_MM).any():
        raise PoisonError("duplicate_slices", "two slices share a position along the normal")
    step = float(np.median(steps))
    if steps.max() > GAP_RATIO * step or steps.min() < step / GAP_RATIO:
        raise PoisonError("inconsistent_spacing", "slice spacing is uneven (gap or missing slice)")
    ordered = [slices[i] for i in order]
    return (
        ordered,
        (step, first.pixel_spacing[0], first.pixel_spacing[1]),
        ordered[0].position,
        (*base.tolist(), *n.tolist()),
    )
