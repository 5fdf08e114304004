"""Realistic procedural CT phantoms with exact truth (chest; head to come).

    from shared.phantoms import chest_case, write_series, LesionSpec
    case = chest_case(7, size=512, thickness_mm=1.25, contrast=True)
    write_series(case, Path("out/case7"), uid_seed=7)     # DICOM series + truth.npz/json
    twin = chest_case(7, normal=True)                      # same patient, no lesions

See :mod:`shared.phantoms.chest` and docs/phantoms.md for what is modelled.
"""

from shared.phantoms.chest import KINDS, ChestCase, LesionSpec, chest_case, write_series
from shared.phantoms.common import Grid, Storage, load_truth

__all__ = [
    "KINDS",
    "ChestCase",
    "Grid",
    "LesionSpec",
    "Storage",
    "chest_case",
    "load_truth",
    "write_series",
]
