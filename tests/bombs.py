"""Decompression and parser bombs: valid-looking DICOM instances built to cost memory or time.

* :func:`deflate_bomb`: a small CT in the Deflated Explicit VR Little Endian transfer syntax
  whose dataset ends in ``inflated`` bytes of Data Set Trailing Padding: ~1 MiB on the wire
  inflates to 1 GiB.
* :func:`items_bomb`: ``n`` empty items in one undefined-length sequence (a million: 8 MB,
  31 KiB deflated), each a Python object for a parser that builds them all.
* :func:`j2k_bomb`: a JPEG 2000 instance whose 252-byte codestream decodes to 8192² (its SIZ
  says so); the header either says 8192² too (``honest``) or claims 64² (a mismatch).

Everything is written by hand or streamed: building a bomb never costs what it costs to open.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate

from shared.dicom import phantom

DEFLATED = b"1.2.840.10008.1.2.1.99"
# openjpeg.encode(np.zeros((8192, 8192), np.uint16)): 252 bytes, decodes to 128 MiB
J2K_8192 = base64.b64decode(
    "/0//UQApAAAAACAAAAAgAAAAAAAAAAAAAAAgAAAAIAAAAAAAAAAAAAABAAEB/1IADAAAAAEABQQEAAH/XAATQAgQEBgQ"
    "EBgQEBgQEBgQEBj/ZAAlAAFDcmVhdGVkIGJ5IE9wZW5KUEVHIHZlcnNpb24gMi41LjL/kAAKAAAAAACDAAH/k/c2bzZs"
    "2bNm82bzZs2bNmARUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv"
    "/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/38RUFSv/3+AgICAgP/Z"
)
MiB = 1024 * 1024


def base_instance(tmp: Path, seed: int = 4343) -> bytes:
    """A valid one-slice 32² CT (explicit VR little endian)."""
    ph = phantom.chest_ct(tmp / f"bomb-base-{seed}", seed=seed, size=32, slices=1, nodules_mm=())
    return ph.files[0].read_bytes()


def meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group (explicit VR little endian)."""
    pos = 132
    while data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            pos += 12 + struct.unpack("<I", data[pos + 8 : pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", data[pos + 6 : pos + 8])[0]
    return pos


def with_transfer_syntax(data: bytes, uid: bytes) -> bytes:
    """Rewrite the file meta's TransferSyntaxUID (and the meta group length)."""
    tag = b"\x02\x00\x10\x00UI"
    at = data.index(tag)
    old = struct.unpack("<H", data[at + 6 : at + 8])[0]
    if len(uid) % 2:
        uid += b"\0"
    out = data[:at] + tag + struct.pack("<H", len(uid)) + uid + data[at + 8 + old :]
    group = out.index(b"\x02\x00\x00\x00UL")
    length = struct.unpack("<I", out[group + 8 : group + 12])[0] + len(uid) - old
    return out[: group + 8] + struct.pack("<I", length) + out[group + 12 :]


def deflate(data: bytes, padding: int = 0) -> bytes:
    """``data`` re-encoded as Deflated Explicit VR Little Endian, its dataset followed by
    ``padding`` bytes of Data Set Trailing Padding (FFFC,FFFC). The padding is one compressed
    MiB of zeros repeated: each block ends in a full flush (byte-aligned, no history), so the
    same bytes stand for every MiB and a gigabyte is never compressed, let alone held."""
    end = meta_end(data)
    head = with_transfer_syntax(data[:end], DEFLATED)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [head, z.compress(data[end:])]
    if padding:
        parts.append(z.compress(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding)))
    parts.append(z.flush(zlib.Z_FULL_FLUSH))
    whole, rest = divmod(padding, MiB)
    for size, count in ((MiB, whole), (rest, 1 if rest else 0)):
        if count:
            block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            parts.append((block.compress(bytes(size)) + block.flush(zlib.Z_FULL_FLUSH)) * count)
    parts.append(zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush())  # the last block
    return b"".join(parts)


def deflate_bomb(tmp: Path, inflated: int = 1024 * MiB) -> bytes:
    return deflate(base_instance(tmp), padding=inflated)


def items_bomb(
    tmp: Path, n: int = 1_000_000, deflated: bool = True, before_uid: bool = False
) -> bytes:
    """``n`` empty items in an undefined-length sequence: the Acquisition Context Sequence
    (0040,0555) just before the pixel data (the last element of the phantom below it is in
    group 0028, so the elements still ascend), or, ``before_uid``, the Referenced Image
    Sequence (0008,1140) ahead of the SeriesInstanceUID."""
    good = base_instance(tmp)
    tag = (0x0008, 0x1140) if before_uid else (0x0040, 0x0555)
    sq = struct.pack("<HH2sHI", *tag, b"SQ", 0, 0xFFFFFFFF)
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * n
    end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    if before_uid:
        at = good.index(b"\x10\x00\x10\x00")  # PatientName (0010,0010) follows group 0008
    else:
        at = good.rfind(b"\xe0\x7f\x10\x00")
    bomb = good[:at] + sq + items + end + good[at:]
    return deflate(bomb) if deflated else bomb


def series_uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SeriesInstanceUID)


def j2k_bomb(tmp: Path, honest: bool) -> bytes:
    """A 252-byte JPEG 2000 codestream of 8192² in a CT instance whose header says 8192²
    (``honest``) or 64² (the codestream lies about its size)."""
    ds = pydicom.dcmread(io.BytesIO(base_instance(tmp, seed=4344)))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.Rows = ds.Columns = 8192 if honest else 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = encapsulate([J2K_8192])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _status(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss(pid: int | str = "self") -> int:
    """Resident set size now, bytes."""
    return _status(pid, "VmRSS")


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size since start (or the last :func:`reset_peak_rss`), bytes."""
    return _status(pid, "VmHWM")


def reset_peak_rss(pid: int | str = "self") -> None:
    """Reset the peak to the current RSS (Linux: ``5`` to ``/proc/PID/clear_refs``)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")
