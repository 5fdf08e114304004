"""Masks at rest (shared/imaging/masks.py): bit-packed + zstd with a version marker, the old
``np.savez_compressed`` blobs still read, bad bytes a clear ``undecodable``, and far cheaper
to write than the old format."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from shared.imaging import masks as fmt
from shared.imaging.errors import ImagingError
from shared.schemas import Reason


def _masks(shape: tuple[int, int, int] = (40, 96, 80)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ball = (z - 20) ** 2 + (y - 40) ** 2 + (x - 30) ** 2 < 15**2
    return {
        "lung_left": ball,
        "nodules": rng.random(shape) > 0.995,  # scattered voxels: nothing to compress away
        "empty": np.zeros(shape, bool),
        "odd": np.ones((3, 5, 7), bool),  # 105 bits: padding at the end of a mask
    }


def test_round_trip_keeps_names_order_shapes_and_every_voxel() -> None:
    masks = _masks()
    blob = fmt.pack_masks(masks)
    assert blob[:7] == b"RSMASK\x01"  # magic and format version
    back = fmt.unpack_masks(blob)
    assert list(back) == list(masks)
    for name, mask in masks.items():
        assert back[name].dtype == bool and back[name].shape == mask.shape
        np.testing.assert_array_equal(back[name], mask)


def test_blobs_of_the_old_format_are_still_read() -> None:
    masks = _masks()
    buf = io.BytesIO()
    np.savez_compressed(buf, **masks)  # what segmentation wrote before the format
    back = fmt.unpack_masks(buf.getvalue())
    assert list(back) == list(masks)
    for name, mask in masks.items():
        np.testing.assert_array_equal(back[name], mask)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not masks at all",
        b"RSMASK\x02" + b"\x00" * 16,  # a version this reader does not know
        b"RSMASK\x01\xff\xff\xff\x7f{",  # a header longer than the blob
        fmt.pack_masks(_masks())[:-20],  # truncated payload
        b"PK\x03\x04" + b"\x00" * 30,  # a broken zip
    ],
)
def test_bad_bytes_are_undecodable_never_a_crash(blob: bytes) -> None:
    with pytest.raises(ImagingError) as info:
        fmt.unpack_masks(blob)
    assert info.value.reason == Reason.UNDECODABLE


def test_a_header_cannot_make_the_reader_allocate_without_bound() -> None:
    head = b'{"masks":[{"name":"x","shape":[100000,100000,100000]}]}'
    blob = b"RSMASK\x01" + len(head).to_bytes(4, "little") + head
    with pytest.raises(ImagingError):
        fmt.unpack_masks(blob)


def test_much_cheaper_than_savez_compressed_and_smaller() -> None:
    shape = (120, 256, 256)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    masks = {
        "lung_left": ((y - 128) ** 2 / 90**2 + (x - 80) ** 2 / 50**2 < 1) & (z > 5),
        "lung_right": ((y - 128) ** 2 / 90**2 + (x - 176) ** 2 / 50**2 < 1) & (z > 5),
        "nodules": (z - 60) ** 2 + (y - 100) ** 2 + (x - 80) ** 2 < 36,
    }

    def best(fn: object) -> float:
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            out.append(time.perf_counter() - t0)
        return min(out)

    new = best(lambda: fmt.pack_masks(masks))
    old = best(lambda: np.savez_compressed(io.BytesIO(), **masks))
    assert new * 10 < old, (new, old)  # measured ~50-100x on the dev box
    buf = io.BytesIO()
    np.savez_compressed(buf, **masks)
    assert len(fmt.pack_masks(masks)) < len(buf.getvalue())
