"""What a compressed frame will decode to, read from its codestream header before decoding.

A decoder allocates what the codestream's own header says (JPEG 2000's SIZ, JPEG's and
JPEG-LS's SOF), whatever the DICOM header claims: a 252-byte JPEG 2000 codestream of 8192²
in an instance that says 64² costs 128 MiB (and more in float) before pydicom notices the
mismatch. :func:`check_frames` reads every frame's header from the encapsulated fragments
and refuses (``codestream_mismatch``) a frame whose size, components or precision differ from
Rows, Columns, SamplesPerPixel and BitsAllocated, so the decoded size is what the DICOM header
says — which the caller has already capped.

RLE needs no check: its decoder's output size comes from Rows and Columns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shared.dicom.bounded import InvalidInstance, PixelSpan

JPEG_2000 = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
JPEG = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",  # JPEG-LS: SOF55
        "1.2.840.10008.1.2.4.81",
    }
)
# start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 and JPEG-LS's SOF55 (0xF7)
SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
)
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
SEARCH = 64 * 1024  # how far into a fragment a header is looked for
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass(frozen=True)
class FrameHeader:
    rows: int
    columns: int
    components: int
    precision: int  # bits per sample (the largest component's)


def j2k_header(frag: bytes) -> FrameHeader | None:
    """SIZ of a JPEG 2000 codestream (bare, or in a JP2 file); None if ``frag`` starts none."""
    if frag.startswith(b"\xff\x4f\xff\x51"):
        at = 0
    elif frag.startswith(JP2_SIGNATURE):
        at = frag.find(b"\xff\x4f\xff\x51", 0, SEARCH)
        if at < 0:
            raise InvalidInstance("codestream_mismatch", "a JP2 frame without a codestream")
    else:
        return None
    siz = at + 4
    if len(frag) < siz + 38:
        raise InvalidInstance("codestream_mismatch", "a JPEG 2000 SIZ segment is cut short")
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frag, siz + 4)
    csiz = struct.unpack_from(">H", frag, siz + 36)[0]
    if len(frag) < siz + 38 + 3 * csiz or csiz == 0:
        raise InvalidInstance("codestream_mismatch", "a JPEG 2000 SIZ segment is cut short")
    precision = max((frag[siz + 38 + 3 * i] & 0x7F) + 1 for i in range(csiz))
    if xsiz <= xo or ysiz <= yo:
        raise InvalidInstance("codestream_mismatch", "a JPEG 2000 image area is empty")
    return FrameHeader(ysiz - yo, xsiz - xo, csiz, precision)


def jpeg_header(frag: bytes) -> FrameHeader | None:
    """SOF of a JPEG / JPEG-LS stream; None if ``frag`` does not start one (SOI)."""
    if not frag.startswith(b"\xff\xd8"):
        return None
    pos, n = 2, min(len(frag), SEARCH)
    while pos + 4 <= n:
        if frag[pos] != 0xFF:
            raise InvalidInstance("codestream_mismatch", "a JPEG stream without a frame header")
        marker = frag[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        length = struct.unpack_from(">H", frag, pos + 2)[0]
        if marker in SOF:
            if pos + 10 > len(frag):
                break
            precision = frag[pos + 4]
            rows, columns = struct.unpack_from(">HH", frag, pos + 5)
            components = frag[pos + 9]
            if rows == 0:  # the height comes later, in a DNL segment: cannot be judged here
                raise InvalidInstance("codestream_mismatch", "a JPEG frame header without height")
            return FrameHeader(rows, columns, components, precision)
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            break
        pos += 2 + length
    raise InvalidInstance("codestream_mismatch", "a JPEG stream without a frame header")


def frame_header(frag: bytes, tsuid: str) -> FrameHeader | None:
    if tsuid in JPEG_2000:
        return j2k_header(frag)
    if tsuid in JPEG:
        return jpeg_header(frag)
    return None


def check_frames(
    body: bytes | memoryview,
    pixel: PixelSpan,
    tsuid: str,
    *,
    rows: int,
    columns: int,
    samples: int,
    bits_allocated: int,
) -> int:
    """Check every frame's codestream header against the DICOM header; returns the number
    of frame headers found. Transfer syntaxes without one (RLE) return 0 unchecked."""
    if tsuid not in JPEG_2000 and tsuid not in JPEG:
        return 0
    mv = memoryview(body)
    found = 0
    for offset, length in pixel.fragments[1:]:  # the first item is the Basic Offset Table
        head = bytes(mv[offset : offset + min(length, SEARCH)])
        header = frame_header(head, tsuid)
        if header is None:
            continue  # a frame's continuation fragment
        found += 1
        if (header.rows, header.columns) != (rows, columns):
            raise InvalidInstance(
                "codestream_mismatch",
                f"a frame's codestream is {header.rows}x{header.columns}, "
                f"Rows x Columns say {rows}x{columns}",
            )
        if header.components != samples or header.precision > bits_allocated:
            raise InvalidInstance(
                "codestream_mismatch",
                f"a frame's codestream has {header.components} component(s) of "
                f"{header.precision} bits, the header {samples} of {bits_allocated}",
            )
    if found == 0:
        raise InvalidInstance("codestream_mismatch", "no frame's codestream header was found")
    return found
