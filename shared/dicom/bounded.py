"""Bounded reading of untrusted DICOM bytes: nothing here costs more than the caps allow.

Three things stand between a hostile file and pydicom (which inflates a Deflated transfer
syntax in one ``zlib.decompress`` and builds an object for every element and item):

* :func:`inflate`: a streaming inflater with an output cap — a 1 MiB file that would inflate
  to 1 GiB stops at the cap (``inflated_too_large``) having held at most the cap;
* :func:`scan`: an iterative walk over the encoded element stream (explicit or implicit VR,
  either byte order, sequences of defined and undefined length, encapsulated fragments) that
  builds no objects: it counts elements and items, measures sequence nesting and checks every
  length against the bytes present, stopping at the first cap exceeded
  (``too_many_elements``, ``too_many_items``, ``sequence_too_deep``, ``truncated``,
  ``malformed``). It also finds the top-level pixel data (offset, length, fragments) so the
  decoded size can be judged from the codestream headers before anything is decoded
  (:mod:`shared.dicom.codestream`);
* :func:`read`: only after both, the pydicom dataset (from the inflated bytes for Deflated).

:func:`series_uid` reads just the SeriesInstanceUID (for a publisher's Kafka key) from a
bounded prefix, without pydicom.

Every rejection is an :class:`InvalidInstance` whose message never quotes a value.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, cast

import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

import shared.dicom  # noqa: F401 - configures pydicom once for the process

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
PIXEL_DATA = 0x7FE00010
SERIES_INSTANCE_UID = 0x0020000E
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# explicit VR: these have 2 reserved bytes and a 4-byte length
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
MAX_META_BYTES = 1024 * 1024


class InvalidInstance(Exception):
    """An untrusted instance is refused; ``reason`` is its dead-letter reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Bounds:
    """What one instance may cost. The defaults admit real multi-frame enhanced objects
    (thousands of frames, tens of thousands of functional-group items)."""

    max_bytes: int = 64 * 1024 * 1024  # the encoded instance as received
    max_inflated_bytes: int = 64 * 1024 * 1024  # a Deflated dataset once inflated
    max_elements: int = 200_000  # data elements, at every nesting level
    max_items: int = 100_000  # sequence items and encapsulated fragments
    max_sequence_depth: int = 12


DEFAULT_BOUNDS = Bounds()


@dataclass(frozen=True)
class PixelSpan:
    """The top-level Pixel Data element in :attr:`Layout.body`."""

    offset: int  # first byte of the value
    length: int | None  # None: undefined (encapsulated)
    fragments: tuple[tuple[int, int], ...] = ()  # (offset, length) of each item, BOT first


@dataclass(frozen=True)
class Scan:
    elements: int
    items: int
    depth: int
    pixel: PixelSpan | None
    end: int  # where the walk stopped (the buffer's end unless ``stop_at`` was given)


@dataclass(frozen=True)
class Layout:
    """An instance's encoding, checked: meta, transfer syntax and the dataset bytes (inflated
    for Deflated) with their :class:`Scan`."""

    meta_end: int
    transfer_syntax: str
    body: bytes | memoryview
    explicit: bool
    little: bool
    scan: Scan
    inflated: bool = field(default=False)


def inflated_size(data: bytes | memoryview, cap: int, chunk: int = 256 * 1024) -> int:
    """Size of a raw DEFLATE stream (RFC 1951, as PS3.5 A.5 uses) once inflated, counted
    through a ``chunk``-sized window (nothing is kept); :class:`InvalidInstance`
    ``inflated_too_large`` as soon as it passes ``cap``, ``malformed`` if it is no stream."""
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)
    size = 0
    try:
        for start in range(0, len(view), chunk):
            piece: bytes | memoryview = view[start : start + chunk]
            while True:  # until this piece is consumed and no output is pending
                out = len(z.decompress(piece, chunk))
                size += out
                if size > cap:
                    raise InvalidInstance(
                        "inflated_too_large", f"the deflated dataset inflates past {cap} bytes"
                    )
                piece = z.unconsumed_tail
                if z.eof or (not piece and out < chunk):
                    break
            if z.eof:
                break
        if not z.eof:
            raise InvalidInstance("truncated", "the deflated dataset is cut short")
    except zlib.error:
        raise InvalidInstance("malformed", "the deflated dataset is not a valid stream") from None
    if size > cap:
        raise InvalidInstance(
            "inflated_too_large", f"the deflated dataset inflates past {cap} bytes"
        )
    return size


def inflate(data: bytes | memoryview, cap: int) -> bytes:
    """A raw DEFLATE stream inflated, once :func:`inflated_size` showed it fits ``cap``: a
    bomb is refused having held nothing, an accepted dataset is held once."""
    size = inflated_size(data, cap)
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(data), size)
    except zlib.error:
        raise InvalidInstance("malformed", "the deflated dataset is not a valid stream") from None


def inflate_prefix(data: bytes | memoryview, limit: int) -> bytes:
    """At most the first ``limit`` bytes of a raw DEFLATE stream (no error past it)."""
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    view = memoryview(data)
    try:
        for start in range(0, len(view), 64 * 1024):
            piece: bytes | memoryview = view[start : start + 64 * 1024]
            while piece and len(out) < limit:
                out += z.decompress(piece, limit - len(out))
                piece = z.unconsumed_tail
            if len(out) >= limit or z.eof:
                break
    except zlib.error:
        pass  # what was inflated so far is all there is
    return bytes(out[:limit])


def read_meta(data: bytes | memoryview) -> tuple[int, str]:
    """(end of the file meta group, its TransferSyntaxUID or ''); the meta is explicit VR
    little endian by definition. ``not_dicom`` without the DICM prefix."""
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise InvalidInstance("not_dicom", "no DICOM Part 10 preamble (DICM at offset 128)")
    mv = memoryview(data)
    n = len(mv)
    pos = 132
    tsuid = ""
    while pos + 8 <= n and bytes(mv[pos : pos + 2]) == b"\x02\x00":
        elem = struct.unpack_from("<H", mv, pos + 2)[0]
        vr = bytes(mv[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > n:
                raise InvalidInstance("truncated", "the file meta is cut short")
            length = struct.unpack_from("<I", mv, pos + 8)[0]
            start = pos + 12
        elif vr in SHORT_VRS:
            length = struct.unpack_from("<H", mv, pos + 6)[0]
            start = pos + 8
        else:
            raise InvalidInstance("malformed", "the file meta has an element of unknown VR")
        if length == UNDEFINED or start + length > n:
            raise InvalidInstance("truncated", "the file meta is cut short")
        if elem == 0x0010:
            tsuid = bytes(mv[start : start + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
        if pos > MAX_META_BYTES:
            raise InvalidInstance("malformed", "the file meta is implausibly long")
    return pos, tsuid


def encoding_of(tsuid: str) -> tuple[bool, bool]:
    """(explicit VR, little endian) of a transfer syntax's dataset encoding."""
    if tsuid == IMPLICIT_LE:
        return False, True
    if tsuid == EXPLICIT_BE:
        return True, False
    return True, True


def _is_sequence_bytes(value: memoryview | bytes, little: bool) -> bool:
    head = bytes(value[:4])
    return head in (
        (b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0")
        if little
        else (b"\xff\xfe\xe0\x00", b"\xff\xfe\xe0\xdd")
    )


def _explicit_at(mv: memoryview, pos: int, assumed: bool, in_sequence: bool) -> bool:
    """Is the dataset starting at ``pos`` explicit VR? As pydicom decides (and then reads it):
    by the first element's VR bytes, whatever the transfer syntax says — some writers put
    implicit VR in an explicit transfer syntax; items never switch from implicit to explicit."""
    if in_sequence and not assumed:
        return False
    if pos + 6 > len(mv):
        return assumed
    return bool(0x40 < mv[pos + 4] < 0x5B and 0x40 < mv[pos + 5] < 0x5B)


def _dictionary_sq(tag: int) -> bool | None:
    if not dictionary_has_tag(tag):
        return None
    return dictionary_VR(tag) == "SQ"


def scan(
    body: bytes | memoryview,
    explicit: bool,
    little: bool,
    bounds: Bounds,
    stop_at: int | None = None,
) -> Scan:
    """Walk the encoded dataset ``body`` without building anything; raise
    :class:`InvalidInstance` at the first cap exceeded or length that does not fit.

    ``stop_at``: stop before the first top-level element whose tag is ``>= stop_at``.

    Sequences are entered whether their VR says SQ (explicit), the dictionary does
    (implicit), or their bytes open with an item (UN, unknown private tags): pydicom
    converts those to sequences too, so their cost counts.
    """
    mv = memoryview(body)
    n = len(mv)
    e = "<" if little else ">"
    tag_s, u16, u32 = struct.Struct(e + "HH"), struct.Struct(e + "H"), struct.Struct(e + "I")
    # frames: [kind, end (None: undefined length), explicit]; kind "ds" | "sq" | "frag"
    stack: list[tuple[str, int | None, bool]] = [("ds", n, _explicit_at(mv, 0, explicit, False))]
    pos = elements = items = depth = deepest = 0
    pixel: PixelSpan | None = None
    frags: list[tuple[int, int]] = []
    collecting = False  # the fragments being walked are the top-level pixel data's

    while stack:
        kind, end, expl = stack[-1]
        if end is not None and pos >= end:
            if pos > end:
                raise InvalidInstance(
                    "malformed", "an element overruns the item or sequence holding it"
                )
            stack.pop()
            if kind == "sq":
                depth -= 1
            continue
        if pos + 8 > n:
            raise InvalidInstance("truncated", "the dataset ends inside an element header")
        group, elem = tag_s.unpack_from(mv, pos)
        tag = group << 16 | elem
        if kind != "ds":  # a sequence or a fragment list: items and its delimiter only
            length = u32.unpack_from(mv, pos + 4)[0]
            pos += 8
            if tag == SEQ_END:
                if end is not None:
                    raise InvalidInstance(
                        "malformed", "a sequence delimiter in a defined-length sequence"
                    )
                stack.pop()
                if kind == "sq":
                    depth -= 1
                elif collecting:
                    collecting = False
                    assert pixel is not None
                    pixel = PixelSpan(pixel.offset, None, tuple(frags))
                continue
            if tag != ITEM:
                raise InvalidInstance("malformed", "a sequence holds something other than items")
            items += 1
            if items > bounds.max_items:
                raise InvalidInstance(
                    "too_many_items", f"more than {bounds.max_items} items or fragments"
                )
            if kind == "frag":
                if length == UNDEFINED or pos + length > n:
                    raise InvalidInstance("truncated", "a pixel data fragment is cut short")
                if collecting:
                    frags.append((pos, length))
                pos += length
                continue
            here = _explicit_at(mv, pos, expl, True)
            if length == UNDEFINED:
                stack.append(("ds", None, here))
            else:
                if pos + length > n:
                    raise InvalidInstance("truncated", "a sequence item is cut short")
                stack.append(("ds", pos + length, here))
            continue
        # kind == "ds": elements, or an item delimiter closing an undefined-length item
        if tag == ITEM_END:
            if len(stack) == 1:
                raise InvalidInstance("malformed", "an item delimiter outside an item")
            pos += 8
            if end is None:
                stack.pop()
            continue  # in a defined-length item: a writer's redundant delimiter, skipped
        if group == 0xFFFE:
            raise InvalidInstance("malformed", "an item tag where a data element belongs")
        if len(stack) == 1 and stop_at is not None and tag >= stop_at:
            return Scan(elements, items, deepest, pixel, pos)
        elements += 1
        if elements > bounds.max_elements:
            raise InvalidInstance(
                "too_many_elements", f"more than {bounds.max_elements} data elements"
            )
        vr = b""
        if expl:
            vr = bytes(mv[pos + 4 : pos + 6])
            if vr in LONG_VRS:
                if pos + 12 > n:
                    raise InvalidInstance("truncated", "the dataset ends inside an element header")
                length = u32.unpack_from(mv, pos + 8)[0]
                pos += 12
            elif vr in SHORT_VRS:
                length = u16.unpack_from(mv, pos + 6)[0]
                pos += 8
            else:
                raise InvalidInstance("malformed", "a data element of unknown VR")
        else:
            length = u32.unpack_from(mv, pos + 4)[0]
            pos += 8
        top = len(stack) == 1
        if length == UNDEFINED:
            if (expl and vr == b"SQ") or (not expl and tag != PIXEL_DATA):
                kind_next, expl_next = "sq", expl
            elif expl and vr == b"UN":
                kind_next, expl_next = "sq", False  # PS3.5 6.2.2: implicit VR LE inside
            elif vr in (b"OB", b"OW") or (not expl and tag == PIXEL_DATA):
                kind_next, expl_next = "frag", expl
                if top and tag == PIXEL_DATA:
                    pixel, collecting, frags = PixelSpan(pos, None), True, []
            else:
                raise InvalidInstance(
                    "malformed", "an undefined length on an element that cannot have one"
                )
            if kind_next == "sq":
                depth += 1
                deepest = max(deepest, depth)
                if deepest > bounds.max_sequence_depth:
                    raise InvalidInstance(
                        "sequence_too_deep",
                        f"sequence nesting exceeds {bounds.max_sequence_depth}",
                    )
            stack.append((kind_next, None, expl_next))
            continue
        if pos + length > n:
            if top and tag == PIXEL_DATA:
                raise InvalidInstance("truncated", "pixel data is shorter than its declared length")
            raise InvalidInstance("truncated", "an element's value is cut short")
        if top and tag == PIXEL_DATA:
            pixel = PixelSpan(pos, length)
            pos += length
            continue
        if expl and vr == b"SQ":
            enter = True
        elif not expl and _dictionary_sq(tag):
            enter = True
        elif (not expl or vr == b"UN") and length >= 8:
            enter = _is_sequence_bytes(mv[pos : pos + 4], little)
        else:
            enter = False
        if enter and length:
            depth += 1
            deepest = max(deepest, depth)
            if deepest > bounds.max_sequence_depth:
                raise InvalidInstance(
                    "sequence_too_deep", f"sequence nesting exceeds {bounds.max_sequence_depth}"
                )
            stack.append(("sq", pos + length, expl and vr != b"UN"))
            continue
        pos += length
    return Scan(elements, items, deepest, pixel, pos)


def layout(data: bytes, bounds: Bounds) -> Layout:
    """Check the encoding of a Part 10 instance within ``bounds`` (see the module)."""
    if len(data) > bounds.max_bytes:
        raise InvalidInstance(
            "too_large", f"{len(data)} bytes exceed the {bounds.max_bytes} byte cap"
        )
    meta_end, tsuid = read_meta(data)
    body: bytes | memoryview = memoryview(data)[meta_end:]
    inflated = tsuid == DEFLATED
    if inflated:
        body = inflate(body, bounds.max_inflated_bytes)
    explicit, little = encoding_of(tsuid)
    return Layout(
        meta_end, tsuid, body, explicit, little, scan(body, explicit, little, bounds), inflated
    )


def read(
    data: bytes,
    bounds: Bounds,
    *,
    defer_size: int | None = 256,
    stop_before_pixels: bool = False,
    checked: Layout | None = None,
) -> tuple[FileDataset, Layout]:
    """The pydicom dataset of ``data``, parsed only once :func:`layout` accepted it (pass
    ``checked`` to reuse one). pydicom's own errors become ``malformed``."""
    lay = checked or layout(data, bounds)
    stop = (lambda tag, vr, length: tag == PIXEL_DATA) if stop_before_pixels else None
    try:
        if not lay.inflated:
            ds = pydicom.dcmread(
                io.BytesIO(data), defer_size=defer_size, stop_before_pixels=stop_before_pixels
            )
        else:
            meta = pydicom.dcmread(io.BytesIO(data[: lay.meta_end]))
            buf = DicomBytesIO(bytes(lay.body))
            body = read_dataset(
                cast(BinaryIO, buf), False, True, stop_when=stop, defer_size=defer_size
            )
            ds = FileDataset(buf, body, meta.preamble, meta.file_meta, False, True)
            ds.set_original_encoding(False, True, body._character_set)
    except RecursionError:
        raise InvalidInstance("sequence_too_deep", "sequences nested too deep to parse") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is a rejection
        raise InvalidInstance(
            "malformed", f"cannot parse the header ({type(exc).__name__})"
        ) from None
    return ds, lay


def series_uid(data: bytes, bounds: Bounds = Bounds(), prefix: int = 4 * 1024 * 1024) -> str | None:
    """SeriesInstanceUID of a Part 10 instance read from at most ``prefix`` (inflated) bytes of
    its dataset, without pydicom; None when it is not found there or the file is unreadable."""
    try:
        meta_end, tsuid = read_meta(data)
        body: bytes | memoryview = memoryview(data)[meta_end:]
        if tsuid == DEFLATED:
            body = inflate_prefix(body, prefix)
        else:
            body = body[:prefix]
        explicit, little = encoding_of(tsuid)
        found = scan(body, explicit, little, bounds, stop_at=SERIES_INSTANCE_UID)
    except InvalidInstance:
        return None  # a truncated prefix, or a bomb: the publisher sends it for ingest to judge
    mv = memoryview(body)
    pos = found.end
    e = "<" if little else ">"
    if pos + 8 > len(mv):
        return None
    group, elem = struct.unpack_from(e + "HH", mv, pos)
    if (group << 16 | elem) != SERIES_INSTANCE_UID:
        return None
    if explicit:
        length = struct.unpack_from(e + "H", mv, pos + 6)[0]
        start = pos + 8
    else:
        length = struct.unpack_from(e + "I", mv, pos + 4)[0]
        start = pos + 8
    if length > 64 or start + length > len(mv):
        return None
    uid = bytes(mv[start : start + length]).rstrip(b"\0 ").decode("ascii", "replace").strip()
    return uid if uid and UID_RE.match(uid) else None
