"""A volume's geometry: voxel spacing, first-voxel position and axis cosines (DICOM patient
coordinates, LPS, mm), and the mapping between voxel indices (z, y, x) and patient positions.
Shared by segmentation (measuring findings) and the results stage (finding → SEG segment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float]  # z, y, x mm
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # row, column, normal cosines

    def to_patient(self, zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        z, y, x = zyx
        r, c, n = (
            np.array(self.direction[:3]),
            np.array(self.direction[3:6]),
            np.array(self.direction[6:9]),
        )
        p = (
            np.array(self.origin)
            + r * x * self.spacing[2]
            + c * y * self.spacing[1]
            + n * z * self.spacing[0]
        )
        return (round(float(p[0]), 2), round(float(p[1]), 2), round(float(p[2]), 2))

    def to_index(self, xyz: Sequence[float]) -> tuple[float, float, float]:
        """Patient coordinates (mm) back to (z, y, x) voxel indices (fractional)."""
        cols = np.stack(
            [
                np.array(self.direction[6:9]) * self.spacing[0],
                np.array(self.direction[3:6]) * self.spacing[1],
                np.array(self.direction[:3]) * self.spacing[2],
            ],
            axis=1,
        )
        z, y, x = np.linalg.solve(cols, np.asarray(xyz, float) - np.array(self.origin))
        return (float(z), float(y), float(x))

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0
