"""Overlay pictures a person can look at: mask outlines on the windowed image, as PNG."""

from __future__ import annotations

import io

import numpy as np
import scipy.ndimage as ndi
from PIL import Image

COLOURS = {
    "lung_left": (60, 200, 90),
    "lung_right": (60, 160, 240),
    "nodules": (250, 60, 60),
    "brain": (90, 200, 200),
    "haemorrhage": (255, 70, 40),
}
DEFAULT = (250, 220, 60)


def overlay_png(
    image: np.ndarray,
    masks: dict[str, np.ndarray],
    *,
    center: float,
    width: float,
    thickness: int = 1,
) -> bytes:
    """``image`` (y, x) in HU or raw values; ``masks`` 2D booleans. Returns PNG bytes."""
    lo = center - width / 2
    gray = np.clip((image.astype(np.float32) - lo) / width, 0, 1)
    rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)
    for name, mask in masks.items():
        if not mask.any():
            continue
        edge = mask & ~ndi.binary_erosion(mask, iterations=thickness)
        rgb[edge] = COLOURS.get(name, DEFAULT)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()
