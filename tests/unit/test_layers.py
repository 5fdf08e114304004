"""Layering: services stand on shared/, never on each other; shared/ never on services;
what two services need (the packed volume format, imaging errors) lives in shared/."""

from __future__ import annotations

import ast

import numpy as np
import pytest

from shared.imaging.errors import REASONS, ImagingError
from shared.imaging.packed import pack_volume, unpack_volume
from shared.runtime.errors import PoisonError
from tests.helpers import REPO


def _imports(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_services_import_no_other_service_and_shared_imports_no_service() -> None:
    offenders = []
    for path in sorted(REPO.glob("services/*/*.py")):
        own = path.parent.name
        rel = str(path.relative_to(REPO))
        for module in _imports(rel):
            parts = module.split(".")
            if parts[0] == "services" and len(parts) > 1 and parts[1] != own:
                offenders.append(f"{rel} imports {module}")
    for path in sorted(REPO.glob("shared/**/*.py")):
        rel = str(path.relative_to(REPO))
        offenders.extend(
            f"{rel} imports {m}" for m in _imports(rel) if m.split(".")[0] == "services"
        )
    assert offenders == []


def test_packed_volume_round_trips_and_corrupt_bytes_are_a_reasoned_poison() -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    back = unpack_volume(pack_volume(vol))
    assert back.dtype == vol.dtype and np.array_equal(back, vol)
    for bad in (b"", b"not zstd at all", pack_volume(vol)[:20]):
        with pytest.raises(PoisonError) as info:
            unpack_volume(bad)
        assert isinstance(info.value, ImagingError) and info.value.reason == "undecodable"
    raw = pack_volume(vol, level=0)  # a transient volume stored as it is: .npy bytes
    assert raw.startswith(b"\x93NUMPY") and len(raw) < vol.nbytes + 200
    back = unpack_volume(raw)
    assert back.dtype == vol.dtype and np.array_equal(back, vol)
    assert np.array_equal(unpack_volume(pack_volume(vol, level=-5)), vol)  # zstd fast level
    for bad in (raw[:-10], raw[:8]):
        with pytest.raises(PoisonError) as info:
            unpack_volume(bad)
        assert isinstance(info.value, ImagingError) and info.value.reason == "undecodable"
    with pytest.raises(ValueError, match="unknown imaging reason"):
        ImagingError("free text", "x")
    assert "undecodable" in REASONS
