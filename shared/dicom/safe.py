"""Judge an untrusted DICOM instance before anything trusts it.

Headers are parsed first (pixel data deferred, never decoded here); sizes, nesting, required
attributes, UIDs and the transfer syntax are checked; the declared pixel data length is
checked against what the image geometry implies and against the bytes actually present.
Every rejection is an :class:`InvalidInstance` with a documented reason code (the dead-letter
reason) and a message that never quotes a value from the file (values may be PHI).

Reason codes: ``empty``, ``too_large``, ``not_dicom``, ``malformed``, ``sequence_too_deep``,
``missing_attribute``, ``invalid_uid``, ``unsupported_transfer_syntax``, ``truncated``,
``pixel_size_mismatch``, ``pixel_size_implausible``.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF

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


class InvalidInstance(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixel_bytes: int = 1024 * 1024 * 1024  # decoded size; guards decompression bombs
    max_sequence_depth: int = 12


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


def _depth(ds: Dataset, limit: int) -> int:
    """Deepest sequence nesting, iteratively (never recursion on untrusted structure).

    Only elements that can hold a sequence are converted: text elements are left raw, so
    pydicom never decodes (and never warns about) values this check does not need.
    """
    deepest = 0
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        for tag in list(current.keys()):
            raw = current.get_item(tag, keep_deferred=True)
            if raw is None or tag == PIXEL_DATA or not _may_be_sequence(raw):
                continue
            elem = current[tag]  # converts this element only; pixel data stays deferred
            if elem.VR == "SQ" and isinstance(elem.value, Sequence):
                stack.extend((item, depth + 1) for item in elem.value)
    return deepest


ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000), little / big endian


def _may_be_sequence(elem: Any) -> bool:
    """Could converting ``elem`` yield a sequence? Explicit SQ, or an implicit / UN element
    whose bytes open with an item tag (deferred ones: when the dictionary says SQ or does not
    know the tag)."""
    if isinstance(elem, DataElement):
        return isinstance(elem.value, Sequence)
    if elem.VR == "SQ":
        return True
    if elem.VR not in (None, "UN"):
        return False
    if elem.value is None:  # deferred: its bytes are not at hand
        try:
            return bool(dictionary_VR(elem.tag) == "SQ")
        except KeyError:
            return True
    return bytes(elem.value[:4]) in ITEM_TAGS


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
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InvalidInstance("not_dicom", "no DICOM Part 10 preamble (DICM at offset 128)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=256)
    except RecursionError:
        raise InvalidInstance("sequence_too_deep", "sequences nested too deep to parse") from None
    except (InvalidDicomError, EOFError) as exc:
        raise InvalidInstance(
            "malformed", f"cannot parse the header ({type(exc).__name__})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is a rejection
        raise InvalidInstance(
            "malformed", f"cannot parse the header ({type(exc).__name__})"
        ) from None

    try:
        depth = _depth(ds, limits.max_sequence_depth)
    except RecursionError:
        raise InvalidInstance("sequence_too_deep", "sequences nested too deep") from None
    except Exception as exc:  # noqa: BLE001
        raise InvalidInstance(
            "malformed", f"cannot walk the dataset ({type(exc).__name__})"
        ) from None
    if depth > limits.max_sequence_depth:
        raise InvalidInstance(
            "sequence_too_deep", f"sequence nesting exceeds {limits.max_sequence_depth}"
        )

    meta = ds.file_meta
    tsuid = str(meta.get("TransferSyntaxUID", "") or "")
    if not tsuid:
        raise InvalidInstance("missing_attribute", "file meta lacks TransferSyntaxUID")
    if tsuid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise InvalidInstance(
            "unsupported_transfer_syntax", f"transfer syntax {tsuid} is not supported"
        )

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

    pixel = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    is_image = pixel is not None
    rows = columns = frames = 0
    if is_image:
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
        if (
            rows <= 0
            or columns <= 0
            or frames <= 0
            or bits not in (1, 8, 16, 32, 64)
            or spp not in (1, 3, 4)
        ):
            raise InvalidInstance("malformed", "image geometry is invalid")
        expected = (rows * columns * frames * spp * bits + 7) // 8
        if str(_get(ds, "PhotometricInterpretation") or "").strip() == "YBR_FULL_422":
            expected = expected * 2 // 3  # chroma subsampled 4:2:2 in native encoding
        if expected > limits.max_pixel_bytes:
            raise InvalidInstance(
                "pixel_size_implausible", f"declared geometry implies {expected} bytes of pixels"
            )
        assert pixel is not None
        length, tell = _length_and_offset(pixel)
        if length != UNDEFINED_LENGTH:
            deflated = tsuid == "1.2.840.10008.1.2.1.99"  # offsets are in the inflated stream
            if tell is not None and not deflated and tell + length > len(data):
                raise InvalidInstance("truncated", "pixel data is shorter than its declared length")
            if tsuid in NATIVE and length < expected:
                raise InvalidInstance(
                    "pixel_size_mismatch",
                    f"pixel data holds {length} bytes, geometry implies {expected}",
                )
        elif tsuid in NATIVE:
            raise InvalidInstance("malformed", "native pixel data with undefined length")

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
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    thickness = _get(ds, "SliceThickness")
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
    )


def _length_and_offset(elem: Any) -> tuple[int, int | None]:
    if isinstance(elem, RawDataElement):
        return int(elem.length), int(elem.value_tell)
    value = elem.value
    if value is None:
        return 0, None
    return len(value), None


def series_uid_or_none(data: bytes) -> str | None:
    """Best-effort SeriesInstanceUID of a file (for keying by a publisher); None if unreadable."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
        )
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - the publisher sends unreadable files anyway
        return None
    return uid if uid and UID_RE.match(uid) and len(uid) <= 64 else None
