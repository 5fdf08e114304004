"""DICOM at the boundary: safe reading, phantoms, SEG/SR writing."""
