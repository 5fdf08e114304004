"""Enhanced multi-frame images: one instance holding a whole series (Enhanced CT / MR Image
Storage, and their Legacy Converted twins), as recent scanners send.

Their geometry is not in top-level attributes but in functional groups (PS3.3 C.7.6.16), each
either shared by every frame (Shared Functional Groups Sequence) or given per frame (Per-frame
Functional Groups Sequence, one item per frame, the per-frame value winning):

* Plane Position (Patient): ImagePositionPatient of each frame;
* Plane Orientation (Patient): ImageOrientationPatient;
* Pixel Measures: PixelSpacing, SliceThickness, SpacingBetweenSlices;
* Pixel Value Transformation: RescaleSlope / RescaleIntercept of each frame.

:func:`frame_geometry` reads them from a dataset (header only: call it before decoding, so that
a bad instance never costs a decode); :func:`assemble_frames` sorts the frames along the normal
and checks them as a single-frame series is checked (one orientation, one pixel spacing, no two
frames at one position, even spacing, frames stacked along their normal). Frame order in the
file means nothing: the volume's order is the positions'. Every rejection is an
:class:`~shared.imaging.errors.ImagingError` whose message quotes no value from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from shared.imaging.errors import ImagingError

ENHANCED_IMAGE_STORAGE = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
ORIENTATION_TOL = 1e-3
DUPLICATE_TOL_MM = 1e-3
SPACING_TOL = 0.05  # relative: the spacing between frames may vary by 5 % (or 0.01 mm)
STACK_TOL = 0.25  # in-plane offset between frames, in pixels: beyond it, not one stack


@dataclass(frozen=True)
class FrameGeometry:
    """Per-frame geometry of one multi-frame instance, in the file's frame order."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient, mm
    orientations: np.ndarray  # (n, 6) ImageOrientationPatient
    pixel_spacing: np.ndarray  # (n, 2) row, column spacing, mm
    slopes: np.ndarray  # (n,) RescaleSlope
    intercepts: np.ndarray  # (n,) RescaleIntercept
    thickness: float | None  # SliceThickness (shared or of the first frame)
    between: float | None  # SpacingBetweenSlices

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])


@dataclass(frozen=True)
class FrameLayout:
    """How the frames make a volume: ``order`` the 0-based frame indices in volume order
    (along the normal), spacing (z, y, x) mm, the first voxel and the direction cosines."""

    order: list[int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row, column, normal (9 values)


def is_enhanced(ds: Dataset) -> bool:
    """Is ``ds`` a volume whose frames are placed by functional groups? An Enhanced CT/MR
    image (they owe them, so one without is refused), or another multi-frame image whose
    groups give plane positions (a projection series such as an XA run gives none: its
    frames stay in file order)."""
    if str(ds.get("SOPClassUID", "")) in ENHANCED_IMAGE_STORAGE:
        return True
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return False
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))
    return "PlanePositionSequence" in per_frame[0] or (
        shared is not None and "PlanePositionSequence" in shared
    )


def _item(group: Any) -> Dataset | None:
    """The one item of a functional group macro's sequence, or None."""
    if group is None or len(group) == 0:
        return None
    first = group[0]
    return first if isinstance(first, Dataset) else None


def _values(item: Dataset | None, name: str, n: int, what: str) -> tuple[float, ...] | None:
    if item is None or name not in item:
        return None
    try:
        raw = item.get(name)
    except (TypeError, ValueError, OverflowError):  # pydicom converts the value on access
        raise ImagingError("bad_geometry", f"{what} cannot be read") from None
    if raw is None or raw == "":
        return None
    seq = list(raw) if n > 1 and not isinstance(raw, str | bytes) else [raw]
    try:
        out = tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        raise ImagingError("bad_geometry", f"{what} is not numeric") from None
    if len(out) != n or not all(np.isfinite(out)):
        raise ImagingError("bad_geometry", f"{what} has {len(out)} values, expected {n} finite")
    return out


def frame_geometry(ds: Dataset) -> FrameGeometry:
    """The per-frame geometry of an enhanced multi-frame ``ds`` (pixels untouched).

    Reasons: ``missing_functional_groups`` (no per-frame functional groups, or not one item per
    frame), ``bad_geometry`` (a frame without position, orientation or pixel spacing, or with
    values that are not numbers)."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImagingError("missing_functional_groups", "NumberOfFrames is not a number") from None
    if frames < 1:
        raise ImagingError("missing_functional_groups", "NumberOfFrames is not positive")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) == 0:
        raise ImagingError(
            "missing_functional_groups",
            "an enhanced multi-frame instance without per-frame functional groups",
        )
    if len(per_frame) != frames:
        raise ImagingError(
            "missing_functional_groups",
            f"{len(per_frame)} per-frame functional group items for {frames} frames",
        )
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))

    def macro(frame: Dataset, name: str) -> Dataset | None:
        # the per-frame item wins over the shared one (PS3.3 C.7.6.16)
        return _item(frame.get(name)) or (_item(shared.get(name)) if shared is not None else None)

    positions = np.empty((frames, 3))
    orientations = np.empty((frames, 6))
    spacing = np.empty((frames, 2))
    slopes = np.ones(frames)
    intercepts = np.zeros(frames)
    thickness = between = None
    for i, frame in enumerate(per_frame):
        pos = _values(macro(frame, "PlanePositionSequence"), "ImagePositionPatient", 3, "position")
        ori = _values(
            macro(frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, "orientation"
        )
        measures = macro(frame, "PixelMeasuresSequence")
        px = _values(measures, "PixelSpacing", 2, "pixel spacing")
        if pos is None or ori is None or px is None:
            missing = [
                n
                for n, v in (("position", pos), ("orientation", ori), ("pixel spacing", px))
                if v is None
            ]
            raise ImagingError(
                "bad_geometry", f"frame {i + 1} has no {', no '.join(missing)} in its groups"
            )
        positions[i], orientations[i], spacing[i] = pos, ori, px
        if i == 0:
            t = _values(measures, "SliceThickness", 1, "slice thickness")
            b = _values(measures, "SpacingBetweenSlices", 1, "spacing between slices")
            thickness = t[0] if t else None
            between = b[0] if b else None
        transform = macro(frame, "PixelValueTransformationSequence")
        slope = _values(transform, "RescaleSlope", 1, "rescale slope")
        intercept = _values(transform, "RescaleIntercept", 1, "rescale intercept")
        slopes[i] = slope[0] if slope else 1.0
        intercepts[i] = intercept[0] if intercept else 0.0
    if (slopes == 0).any():
        raise ImagingError("bad_geometry", "a frame's rescale slope is zero")
    return FrameGeometry(positions, orientations, spacing, slopes, intercepts, thickness, between)


def _normal(orientation: np.ndarray) -> np.ndarray:
    r, c = orientation[:3], orientation[3:6]
    n = np.cross(r, c)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6 or abs(float(np.linalg.norm(r)) - 1) > 0.01:
        raise ImagingError("bad_geometry", "frame orientation is degenerate (not unit, parallel)")
    if abs(float(np.linalg.norm(c)) - 1) > 0.01 or abs(float(np.dot(r, c))) > 0.01:
        raise ImagingError("bad_geometry", "frame orientation is degenerate (not orthonormal)")
    return n / norm


def assemble_frames(geo: FrameGeometry) -> FrameLayout:
    """Sort the frames along the normal and check they make one evenly spaced volume.

    Reasons: ``mixed_geometry`` (frames of different orientations or pixel spacings),
    ``bad_geometry`` (degenerate orientation; frames not stacked along their normal),
    ``duplicate_slices`` (two frames at one position: a multi-phase or multi-echo
    acquisition is not one volume), ``inconsistent_spacing`` (uneven spacing)."""
    n = geo.count
    if n == 0:
        raise ImagingError("empty_series", "the instance has no frames")
    base = geo.orientations[0]
    if np.abs(geo.orientations - base).max() > ORIENTATION_TOL:
        raise ImagingError("mixed_geometry", "frames of different orientations in one instance")
    px = geo.pixel_spacing[0]
    if np.abs(geo.pixel_spacing - px).max() > ORIENTATION_TOL * max(1.0, float(px.max())):
        raise ImagingError("mixed_geometry", "frames of different pixel spacings in one instance")
    normal = _normal(base)
    direction = (*base.tolist(), *normal.tolist())
    dist = geo.positions @ normal
    order = np.argsort(dist, kind="stable")
    if n == 1:
        dz = geo.between or geo.thickness or 1.0
        return FrameLayout(
            [0], (float(dz), float(px[0]), float(px[1])), _point(geo.positions[0]), direction
        )
    dist = dist[order]
    steps = np.diff(dist)
    if (steps < DUPLICATE_TOL_MM).any():
        raise ImagingError(
            "duplicate_slices",
            "two frames share a position along the normal (several stacks or phases)",
        )
    step = float(np.median(steps))
    if float(steps.max() - steps.min()) > max(SPACING_TOL * step, 0.01):
        raise ImagingError("inconsistent_spacing", "frame spacing is uneven (gap or missing frame)")
    pos = geo.positions[order]
    lateral = (pos - pos[0]) - np.outer(dist - dist[0], normal)
    if float(np.abs(lateral).max()) > STACK_TOL * float(px.min()):
        raise ImagingError(
            "bad_geometry", "frames are not stacked along their normal (tilt or shear)"
        )
    return FrameLayout(
        [int(i) for i in order], (step, float(px[0]), float(px[1])), _point(pos[0]), direction
    )


def _point(p: np.ndarray) -> tuple[float, float, float]:
    return (float(p[0]), float(p[1]), float(p[2]))
