"""From decoded instances to a volume with its geometry.

Slices are sorted along the slice normal (from ImageOrientationPatient and
ImagePositionPatient, never by instance number). The series must be consistent: one size,
one orientation, no two slices at the same position, even spacing (gaps are rejected, not
interpolated across). An enhanced multi-frame instance (Enhanced CT/MR: the whole series in
one instance) becomes a volume of its frames sorted and checked by their functional groups
(:mod:`shared.imaging.frames`); another multi-frame instance a volume of its frames in file
order; a single 2D image (radiograph) a volume of one slice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

import shared.dicom  # noqa: F401 - configures pydicom once for the process
from shared.dicom import bounded
from shared.dicom.bounded import DEFAULT_BOUNDS, Bounds, InvalidInstance
from shared.dicom.codestream import check_frames
from shared.dicom.safe import image_geometry
from shared.imaging.errors import ImagingError
from shared.imaging.frames import FrameGeometry, assemble_frames, frame_geometry, is_enhanced
from shared.runtime.errors import PoisonError

ORIENTATION_TOL = 1e-3
DUPLICATE_TOL_MM = 1e-3
GAP_RATIO = 1.5
MAX_FRAME_PIXELS = 32 * 1024 * 1024  # one frame: well above a 4k x 5k mammogram


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
    frames: FrameGeometry | None = None  # an enhanced multi-frame instance's per-frame geometry


@dataclass
class Volume:
    """``data`` is (z, y, x); ``spacing`` (z, y, x) mm; ``origin`` the first voxel in patient
    coordinates; ``direction`` row cosines, column cosines, normal (3 x 3, row-major)."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    modality: str


class VoxelBudget:
    """The voxels a whole series may decode to, reserved by each instance from its header
    before its pixels are decoded (thread-safe: preprocess decodes in a pool). A series of
    multi-frame instances each within ``max_voxels`` cannot together decode past it."""

    def __init__(self, max_voxels: int) -> None:
        self.max_voxels = max_voxels
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, voxels: int) -> None:
        with self._lock:
            if self.reserved + voxels > self.max_voxels:
                raise ImagingError(
                    "volume_too_large",
                    f"the series' instances declare more than {self.max_voxels} voxels",
                )
            self.reserved += voxels


def decode(
    data: bytes,
    *,
    bounds: Bounds = DEFAULT_BOUNDS,
    max_voxels: int | None = None,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
    shape: tuple[int, int] | None = None,
    budget: VoxelBudget | None = None,
) -> Slice:
    """Decode one instance's pixels (every grayscale transfer syntax pydicom's plugins read).

    Nothing is decoded before the decoded size is known and allowed: the encoding is read
    within ``bounds`` (:mod:`shared.dicom.bounded`), the declared frame (Rows x Columns) must
    be at most ``max_frame_pixels`` (``pixel_size_implausible``) and ``shape`` when given (the
    series', ``mixed_geometry``), its frames at most ``max_voxels`` (``volume_too_large``),
    and every compressed frame's codestream header must say the same size
    (``codestream_mismatch``). An enhanced multi-frame instance must give every frame's
    geometry in its functional groups (:func:`~shared.imaging.frames.frame_geometry`), judged
    before decoding too."""
    frames: FrameGeometry | None = None
    try:
        ds, lay = bounded.read(data, bounds)
        pixel = lay.scan.pixel
        if pixel is None:
            raise ImagingError("not_an_image", "instance has no pixel data")
        geometry = image_geometry(ds)
        if geometry.rows * geometry.columns > max_frame_pixels:
            raise PoisonError(
                "pixel_size_implausible",
                f"a {geometry.rows}x{geometry.columns} frame exceeds {max_frame_pixels} pixels",
            )
        if shape is not None and (geometry.rows, geometry.columns) != shape:
            raise ImagingError("mixed_geometry", "an instance's size differs from its series'")
        voxels = geometry.rows * geometry.columns * geometry.frames
        if max_voxels is not None and voxels > max_voxels:
            raise ImagingError("volume_too_large", f"{voxels} voxels exceed the configured cap")
        if budget is not None:
            budget.reserve(voxels)  # the series' sum, before any of this one is decoded
        if pixel.length is None:
            check_frames(
                lay.body,
                pixel,
                lay.transfer_syntax,
                rows=geometry.rows,
                columns=geometry.columns,
                samples=geometry.samples,
                bits_allocated=geometry.bits_allocated,
            )
        if is_enhanced(ds):
            frames = frame_geometry(ds)
    except InvalidInstance as exc:
        raise PoisonError(exc.reason, exc.message) from None
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - every decoder failure is this input's fault
        raise ImagingError(
            "undecodable", f"pixel data cannot be decoded ({type(exc).__name__})"
        ) from None
    except BaseException as exc:
        # A Rust decoder (pylibjpeg-rle) panics on some corrupt streams; pyo3 raises that as
        # PanicException, a BaseException: without this it would escape the handler's
        # ``except Exception`` and take the whole stage down on one bad scan.
        if type(exc).__name__ != "PanicException":
            raise
        raise ImagingError(
            "undecodable", "pixel data crashed the decoder (PanicException)"
        ) from None
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        # colour: luminance (ITU-R BT.601), so colour ultrasound/secondary capture still flow
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            arr = arr[..., 0]
        else:
            arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if frames is not None and arr.ndim == 2:
        arr = arr[np.newaxis]  # one frame: still a stack of frames

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
        frames=frames,
    )


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    r, c = np.array(orientation[:3]), np.array(orientation[3:6])
    n = np.cross(r, c)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise ImagingError("bad_geometry", "ImageOrientationPatient row and column are parallel")
    return n / norm


@dataclass
class Assembled:
    slices: list[Slice]  # kept, in volume order
    order: list[int]  # their indices in the input list
    excluded: list[int]  # input indices left out (off the regular grid)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    frames: list[int] | None = None  # one enhanced instance: its frames (0-based), volume order


def _longest_regular_run(dist: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of sorted positions with even spacing."""
    best = (0, 1)
    start = 0
    for i in range(1, len(dist)):
        if i >= start + 2:
            step = dist[start + 1] - dist[start]
            gap = dist[i] - dist[i - 1]
            if not (step / GAP_RATIO <= gap <= step * GAP_RATIO):
                start = i - 1
        if i + 1 - start > best[1] - best[0]:
            best = (start, i + 1)
    return best


def assemble(slices: list[Slice]) -> Assembled:
    """Sort and check a series.

    Slices are ordered along the normal. Different sizes or orientations and two slices at one
    position are rejected. Uneven spacing is handled explicitly when a clear majority (and at
    least 3) of the slices form one evenly spaced run, e.g. a localizer or stray slice far
    from the stack: that run becomes the volume and the others are listed as excluded.
    Otherwise (a gap inside the stack) the series is rejected.
    """
    if not slices:
        raise ImagingError("empty_series", "the series has no instances")
    first = slices[0]
    if first.frames is not None and len(slices) > 1:
        raise ImagingError("mixed_geometry", "an enhanced multi-frame instance among others")
    if len(slices) == 1 and first.frames is not None:
        if first.stored.ndim != 3 or first.stored.shape[0] != first.frames.count:
            raise ImagingError(
                "missing_functional_groups", "pixel data and functional groups differ in frames"
            )
        layout = assemble_frames(first.frames)
        return Assembled(
            slices, [0], [], layout.spacing, layout.origin, layout.direction, layout.order
        )
    if len(slices) == 1:
        dz = first.between or first.thickness or 1.0
        ori = first.orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        n = _normal(ori)
        return Assembled(
            slices,
            [0],
            [],
            (float(dz), first.pixel_spacing[0], first.pixel_spacing[1]),
            first.position or (0.0, 0.0, 0.0),
            (*ori, *n.tolist()),
        )
    shape = first.stored.shape
    if first.stored.ndim != 2:
        raise ImagingError("mixed_geometry", "a multi-frame instance in a multi-instance series")
    for s in slices:
        if s.stored.shape != shape:
            raise ImagingError("mixed_geometry", "slices of different sizes in one series")
    oris = [s.orientation for s in slices]
    if any(o is None or len(o) != 6 for o in oris) or any(s.position is None for s in slices):
        raise ImagingError(
            "bad_geometry", "slices lack ImagePositionPatient/ImageOrientationPatient"
        )
    base = np.array(oris[0])
    if any(np.abs(np.array(o) - base).max() > ORIENTATION_TOL for o in oris):
        raise ImagingError("mixed_geometry", "slices of different orientations in one series")
    n = _normal(tuple(base))
    dist = np.array([float(np.dot(n, s.position)) for s in slices])  # type: ignore[arg-type]
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    steps = np.diff(dist)
    if (steps < DUPLICATE_TOL_MM).any():
        raise ImagingError("duplicate_slices", "two slices share a position along the normal")
    lo, hi = 0, len(order)
    step = float(np.median(steps))
    if steps.max() > GAP_RATIO * step or steps.min() < step / GAP_RATIO:
        lo, hi = _longest_regular_run(dist)
        if hi - lo < 3 or (hi - lo) * 2 <= len(order):
            raise ImagingError(
                "inconsistent_spacing", "slice spacing is uneven (gap or missing slice)"
            )
        step = float(np.median(np.diff(dist[lo:hi])))
    kept = [int(i) for i in order[lo:hi]]
    excluded = sorted(int(i) for i in [*order[:lo].tolist(), *order[hi:].tolist()])
    ordered = [slices[i] for i in kept]
    position = ordered[0].position or (0.0, 0.0, 0.0)
    return Assembled(
        ordered,
        kept,
        excluded,
        (step, first.pixel_spacing[0], first.pixel_spacing[1]),
        position,
        (*base.tolist(), *n.tolist()),
    )
