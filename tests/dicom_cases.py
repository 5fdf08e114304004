"""Hostile and broken DICOM inputs, each with the dead-letter reason ingest must give."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from shared.dicom import phantom


def _valid(tmp: Path) -> bytes:
    ph = phantom.chest_ct(tmp / "bad-base", seed=4242, size=32, slices=1, nodules_mm=())
    return ph.files[0].read_bytes()


def _edit(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # we write invalid values on purpose
        ds = pydicom.dcmread(io.BytesIO(data))
        edit(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _nested(good: bytes, depth: int) -> bytes:
    """``depth`` undefined-length sequences nested in one another, spliced in before the pixel
    data (written by hand: pydicom's own writer recurses and cannot produce this)."""
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    inner = struct.pack("<HH", 0x0008, 0x0100) + b"SH" + struct.pack("<H", 2) + b"X "
    for _ in range(depth):
        inner = sq + item + inner + item_end + seq_end
    at = good.rfind(b"\xe0\x7f\x10\x00")
    return good[:at] + inner + good[at:]


def _with_transfer_syntax(good: bytes, uid: bytes) -> bytes:
    """Rewrite the file meta's TransferSyntaxUID in place (and the meta group length)."""
    tag = b"\x02\x00\x10\x00UI"
    at = good.index(tag)
    old_len = struct.unpack("<H", good[at + 6 : at + 8])[0]
    out = good[:at] + tag + struct.pack("<H", len(uid)) + uid + good[at + 8 + old_len :]
    group = out.index(b"\x02\x00\x00\x00UL")
    length = struct.unpack("<I", out[group + 8 : group + 12])[0] + len(uid) - old_len
    return out[: group + 8] + struct.pack("<I", length) + out[group + 12 :]


def bad_inputs(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """name → (bytes, expected reason code)."""
    good = _valid(tmp)
    pixel_at = good.rfind(b"\xe0\x7f\x10\x00")
    huge_len = bytearray(good)
    # explicit VR OW: tag(4) VR(2) reserved(2) length(4) — claim 100 MB of pixels
    huge_len[pixel_at + 8 : pixel_at + 12] = (100 * 1024 * 1024).to_bytes(4, "little")

    def giga(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 1000

    def bad_uid(ds: Dataset) -> None:
        ds.SeriesInstanceUID = "../../../etc/passwd"

    return {
        "empty": (b"", "empty"),
        "not_dicom": (b"this is a plain text file, certainly not DICOM\n" * 10, "not_dicom"),
        "truncated": (good[: len(good) // 2], "truncated"),
        "declared_pixel_length_too_large": (bytes(huge_len), "truncated"),
        "geometry_claims_gigabytes": (_edit(good, giga), "pixel_size_implausible"),
        "sequences_300_deep": (_nested(good, 300), "sequence_too_deep"),
        # InstanceNumber (IS) holding letters, patched in the bytes as a broken writer would
        "malformed_value": (
            good.replace(b" \x00\x13\x00IS\x02\x001 ", b" \x00\x13\x00IS\x02\x00AB"),
            "malformed",
        ),
        "missing_series_uid": (
            _edit(good, lambda ds: delattr(ds, "SeriesInstanceUID")),
            "missing_attribute",
        ),
        "missing_sop_instance_uid": (
            _edit(good, lambda ds: delattr(ds, "SOPInstanceUID")),
            "missing_attribute",
        ),
        "uid_with_path_characters": (_edit(good, bad_uid), "invalid_uid"),
        "unsupported_transfer_syntax": (
            _with_transfer_syntax(good, b"1.2.840.10008.1.2.4.100\0"),
            "unsupported_transfer_syntax",
        ),
        "oversized": (good + b"\0" * (2 * 1024 * 1024), "too_large"),
    }


# Real files pydicom ships, one per transfer syntax / kind, all valid Part 10 instances.
REAL_FILES = [
    "CT_small.dcm",  # explicit VR little endian CT
    "693_J2KI.dcm",  # JPEG 2000 CT 512²
    "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 lossless CT 512²
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPGExtended.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG baseline
    "SC_rgb_rle_2frame.dcm",  # multi-frame RLE
    "image_dfl.dcm",  # deflated
    "examples_ybr_color.dcm",  # 30-frame JPEG
]


def real_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path)).read_bytes()


def dicomdir_ct_series() -> list[bytes]:
    """The multi-slice CT series under pydicom's dicomdirtests."""
    root = Path(str(get_testdata_file("CT_small.dcm", download=False))).parent / "dicomdirtests"
    return [p.read_bytes() for p in sorted((root / "77654033" / "CT2").rglob("*")) if p.is_file()]
