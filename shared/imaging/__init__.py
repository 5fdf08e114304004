"""Array code written once for NumPy/SciPy and CuPy/cupyx (cuCIM style)."""
