"""Attack test: ``radstream publish`` on a huge file (issue 14: every place untrusted bytes are
read). It used to read the whole file to slice its first MiB off for the series key, and the
whole file again to send it. Now a file past the message cap is never read, and the series is
read from a 4 MiB prefix: memory stays flat for a 3 GiB (sparse) file."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from shared.dicom import phantom
from shared.ingress.files import TooLarge, read_capped, series_of

MiB = 1024 * 1024


def test_a_huge_file_is_neither_read_whole_for_its_key_nor_sent(tmp_path: Path) -> None:
    ph = phantom.chest_ct(tmp_path / "ph", seed=1, size=16, slices=1, nodules_mm=())
    huge = tmp_path / "huge.dcm"
    huge.write_bytes(ph.files[0].read_bytes())
    with huge.open("r+b") as fh:
        fh.truncate(3 * 1024 * MiB)  # sparse: 3 GiB on paper, no disk used
    tracemalloc.start()
    try:
        assert series_of(huge) == ph.series_instance_uid
        with pytest.raises(TooLarge):
            read_capped(huge, 16 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB held for a 3 GiB file"
    small = ph.files[0]
    assert read_capped(small, 16 * MiB) == small.read_bytes()
