"""Volumes at rest: ``.npy`` bytes (self-describing dtype and shape), zstd-compressed or, at
level 0, as they are (a transient volume read back within seconds: compressing 64 slices of
noisy CT costs more CPU on the alert's path than writing the extra bytes; the reader tells the
two apart by their magic).

Written by preprocess, read by segmentation (and the tools); one format, one place.
"""

from __future__ import annotations

import io

import numpy as np
import zstandard

from shared.imaging.errors import ImagingError

NPY_MAGIC = b"\x93NUMPY"


def pack_volume(volume: np.ndarray, level: int = 1, threads: int = 2) -> bytes:
    """``volume`` as ``.npy`` bytes, zstd-compressed at ``level`` (negative: zstd's fast
    levels) or, at level 0, uncompressed; without a full copy (header, then the array's own
    buffer)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(volume))
    if level == 0:
        return b"".join((header.getvalue(), np.ascontiguousarray(volume).data))
    cobj = zstandard.ZstdCompressor(level=level, threads=threads).compressobj()
    parts = [
        cobj.compress(header.getvalue()),
        cobj.compress(np.ascontiguousarray(volume).data),
        cobj.flush(),
    ]
    return b"".join(parts)


def unpack_volume(packed: bytes) -> np.ndarray:
    """The array :func:`pack_volume` packed; :class:`ImagingError` ``undecodable`` if the
    bytes are not such a volume (never a pickle: ``allow_pickle=False``)."""
    try:
        raw = (
            packed
            if packed[: len(NPY_MAGIC)] == NPY_MAGIC
            else zstandard.ZstdDecompressor().decompressobj().decompress(packed)
        )
        arr: np.ndarray = np.load(io.BytesIO(raw), allow_pickle=False)
    except (zstandard.ZstdError, ValueError, EOFError, OSError) as exc:
        raise ImagingError(
            "undecodable", f"the stored volume cannot be unpacked ({type(exc).__name__})"
        ) from None
    return arr
