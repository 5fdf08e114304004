"""Judge an untrusted DICOM instance before anything trusts it.

The encoding is checked first without pydicom (:mod:`shared.dicom.bounded`: a Deflated
dataset inflated as a stream with an output cap; element and item counts, sequence nesting and
every length checked by a walk that builds nothing), then the header is parsed (pixel data
deferred, never decoded here); required attributes, UIDs and the transfer syntax are checked;
the declared pixel data length is checked against what the image geometry implies and against
the bytes actually present, and a compressed frame's codestream header against Rows and
Columns (:mod:`shared.dicom.codestream`), so that the decoded size is known before any decode.
Every rejection is an :class:`InvalidInstance` with a documented reason code (the dead-letter
reason) and a message that never quotes a value from the file (values may be PHI).

Reason codes: ``empty``, ``too_large``, ``not_dicom``, ``malformed``, ``sequence_too_deep``,
``inflated_too_large``, ``too_many_elements``, ``too_many_items``, ``missing_attribute``,
``invalid_uid``, ``unsupported_transfer_syntax``, ``truncated``, ``pixel_size_mismatch``,
``pixel_size_implausible``, ``codestream_mismatch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from shared.dicom import bounded
from shared.dicom.bounded import Bounds, InvalidInstance

__all__ = [
    "InstanceInfo",
    "InvalidInstance",
    "Limits",
    "image_geometry",
    "inspect_instance",
    "series_uid_or_none",
]
from shared.dicom.codestream import check_frames
from shared.imaging.frames import ENHANCED_IMAGE_STORAGE

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

SUPPORTED_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still seen)
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
NATIVE = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
)
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
REQUIRED_IMAGE = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelRepresentation",
    "PhotometricInterpretation",
)


@dataclass(frozen=True)
class Limits(Bounds):
    """:class:`~shared.dicom.bounded.Bounds` and the largest decoded pixel size accepted."""

    max_pixel_bytes: int = 1024 * 1024 * 1024  # decoded size; guards decompression bombs
    max_frame_pixels: int = 32 * 1024 * 1024  # Rows x Columns of one frame


@dataclass(frozen=True)
class InstanceInfo:
    """What later stages need to know, read from a validated instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    is_image: bool
    rows: int
    columns: int
    frames: int
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    acquisition: str | None  # DICOM DA+TM of acquisition (or content / series) if given
    body_part: str | None
    enhanced: bool = False  # an Enhanced CT/MR image: one instance holding the whole series


def _get(ds: Dataset, name: str) -> Any:
    try:
        return ds.get(name)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad values
        raise InvalidInstance(
            "malformed", f"{name} has a malformed value ({type(exc).__name__})"
        ) from None


def _int(ds: Dataset, name: str, default: int | None = None) -> int | None:
    value = _get(ds, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInstance("malformed", f"{name} is not a number") from None


def _floats(ds: Dataset, name: str, n: int) -> tuple[float, ...] | None:
    value = _get(ds, name)
    if value is None or value == "":
        return None
    try:
        seq = [
            float(v)
            for v in (
                value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
            )
        ]
    except (TypeError, ValueError):
        raise InvalidInstance("malformed", f"{name} is not numeric") from None
    if len(seq) != n:
        raise InvalidInstance("malformed", f"{name} has {len(seq)} values, expected {n}")
    return tuple(seq)


@dataclass(frozen=True)
class Geometry:
    """The image size a header declares (what a decoder of its pixel data will produce)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    native_bytes: int  # the decoded pixel data's size


def image_geometry(ds: Dataset) -> Geometry:
    """The declared geometry of an image, checked for presence and sanity."""
    for name in REQUIRED_IMAGE:
        if _get(ds, name) in (None, ""):
            raise InvalidInstance(
                "missing_attribute", f"required image attribute {name} is missing"
            )
    rows = _int(ds, "Rows") or 0
    columns = _int(ds, "Columns") or 0
    frames = _int(ds, "NumberOfFrames", 1) or 1
    spp = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated") or 0
    if rows <= 0 or columns <= 0 or frames <= 0 or bits not in (1, 8, 16, 32, 64):
        raise InvalidInstance("malformed", "image geometry is invalid")
    if spp not in (1, 3, 4):
        raise InvalidInstance("malformed", "image geometry is invalid")
    expected = (rows * columns * frames * spp * bits + 7) // 8
    if str(_get(ds, "PhotometricInterpretation") or "").strip() == "YBR_FULL_422":
        expected = expected * 2 // 3  # chroma subsampled 4:2:2 in native encoding
    return Geometry(rows, columns, frames, spp, bits, expected)


def inspect_instance(data: bytes, limits: Limits = Limits()) -> InstanceInfo:
    """Validate ``data`` as a DICOM Part 10 instance; raise :class:`InvalidInstance` if not."""
    return _inspect(data, limits)


def _inspect(data: bytes, limits: Limits) -> InstanceInfo:
    if not data:
        raise InvalidInstance("empty", "the message carries no bytes")
    if len(data) > limits.max_bytes:
        raise InvalidInstance(
            "too_large", f"{len(data)} bytes exceed the {limits.max_bytes} byte cap"
        )
    _, tsuid = bounded.read_meta(data)
    if not tsuid:
        raise InvalidInstance("missing_attribute", "file meta lacks TransferSyntaxUID")
    if tsuid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise InvalidInstance(
            "unsupported_transfer_syntax", f"transfer syntax {tsuid} is not supported"
        )
    lay = bounded.layout(data, limits)
    ds, _ = bounded.read(data, limits, checked=lay)

    values: dict[str, str] = {}
    for name in REQUIRED:
        value = _get(ds, name)
        if value is None or str(value).strip() == "":
            raise InvalidInstance("missing_attribute", f"required attribute {name} is missing")
        values[name] = str(value).strip()
    for name in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        uid = values[name]
        if len(uid) > 64 or not UID_RE.match(uid):
            raise InvalidInstance("invalid_uid", f"{name} is not a valid UID")
    modality = values["Modality"]
    if len(modality) > 16 or not re.match(r"^[A-Z0-9_ ]+$", modality):
        raise InvalidInstance("malformed", "Modality is not a valid code string")

    pixel = lay.scan.pixel
    is_image = pixel is not None
    rows = columns = frames = 0
    if pixel is not None:
        geometry = image_geometry(ds)
        rows, columns, frames = geometry.rows, geometry.columns, geometry.frames
        expected = geometry.native_bytes
        if expected > limits.max_pixel_bytes or rows * columns > limits.max_frame_pixels:
            raise InvalidInstance(
                "pixel_size_implausible", f"declared geometry implies {expected} bytes of pixels"
            )
        if pixel.length is not None:
            if tsuid in NATIVE and pixel.length < expected:
                raise InvalidInstance(
                    "pixel_size_mismatch",
                    f"pixel data holds {pixel.length} bytes, geometry implies {expected}",
                )
        elif tsuid in NATIVE:
            raise InvalidInstance("malformed", "native pixel data with undefined length")
        else:
            check_frames(
                lay.body,
                pixel,
                tsuid,
                rows=rows,
                columns=columns,
                samples=geometry.samples,
                bits_allocated=geometry.bits_allocated,
            )

    acq = None
    for date_name, time_name in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
    ):
        d, t = _get(ds, date_name), _get(ds, time_name)
        if d:
            acq = f"{d}{t or ''}"
            break
    enhanced = is_image and values["SOPClassUID"] in ENHANCED_IMAGE_STORAGE
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    thickness = _get(ds, "SliceThickness")
    if enhanced:  # geometry lives in the shared functional groups (frames: preprocess's job)
        plane = _shared_group(ds, "PlaneOrientationSequence")
        measures = _shared_group(ds, "PixelMeasuresSequence")
        if orientation is None and plane is not None:
            orientation = _floats(plane, "ImageOrientationPatient", 6)
        if measures is not None:
            spacing = spacing or _floats(measures, "PixelSpacing", 2)
            thickness = thickness or _get(measures, "SliceThickness")
    try:
        thickness_f = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        raise InvalidInstance("malformed", "SliceThickness is not numeric") from None
    body_part = _get(ds, "BodyPartExamined")
    return InstanceInfo(
        sop_class_uid=values["SOPClassUID"],
        sop_instance_uid=values["SOPInstanceUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        modality=modality.strip(),
        transfer_syntax_uid=tsuid,
        is_image=is_image,
        rows=rows,
        columns=columns,
        frames=frames,
        instance_number=_int(ds, "InstanceNumber"),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=thickness_f,
        acquisition=acq,
        body_part=str(body_part)[:16] if body_part else None,
        enhanced=enhanced,
    )


def _shared_group(ds: Dataset, name: str) -> Dataset | None:
    """The item of functional group ``name`` shared by every frame, else the first frame's
    (what the series record describes; preprocess reads every frame's)."""
    for container in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = _get(ds, container)
        group = _get(items[0], name) if items else None
        if group:
            item: Dataset = group[0]
            return item
    return None


def series_uid_or_none(data: bytes) -> str | None:
    """SeriesInstanceUID of a file (for keying by a publisher) read from a bounded prefix
    without pydicom; None if not found there or unreadable (the publisher sends it anyway)."""
    return bounded.series_uid(data)
