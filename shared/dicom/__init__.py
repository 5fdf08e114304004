"""DICOM at the boundary: safe reading, phantoms, SEG/SR writing.

Importing this package configures pydicom once for the process (see
:mod:`shared.dicom.config`); nothing below changes warning filters per call.
"""

from shared.dicom.config import configure_pydicom

configure_pydicom()

__all__ = ["configure_pydicom"]
