"""Overlay pictures a person can look at: mask outlines on the windowed image, as PNG."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

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


WINDOWS = {"chest_ct": (-600.0, 1500.0), "head_ct": (40.0, 80.0)}  # task → (centre, width)
LESIONS = {"chest_ct": ("nodule", "mass"), "head_ct": ("haemorrhage",)}


def key_slices(
    task: str,
    vol: np.ndarray,
    masks: Mapping[str, np.ndarray],
    findings: Sequence[Mapping[str, Any]],
) -> list[tuple[str, bytes]]:
    """The pictures of a task's result a person looks at, as (file name, PNG): the slices of
    up to three lesion findings (else the middle slice of the first organ) for CT tasks, the
    middle slice for an ONNX model's result, the image for a radiograph."""
    if task.startswith("onnx:"):
        z = vol.shape[0] // 2
        shown = {k: v[z] for k, v in masks.items()}
        center, width = float(vol.mean()), float(4 * vol.std() or 1.0)
        return [(f"slice-{z:04d}.png", overlay_png(vol[z], shown, center=center, width=width))]
    if task == "radiograph":
        img = vol[0]
        shown = {k: v[0] for k, v in masks.items() if k != "edges"}
        center, width = float(img.mean()), float(4 * img.std() or 1.0)
        return [("radiograph.png", overlay_png(img, shown, center=center, width=width))]
    center, width = WINDOWS[task]
    lesions = LESIONS[task]
    keys = [f.get("slice_index") for f in findings if f.get("type") in lesions][:3]
    if not keys:
        organ = next(iter(masks.values()))
        zs = np.argwhere(organ.any(axis=(1, 2)))
        keys = [int(zs[len(zs) // 2][0])] if len(zs) else [vol.shape[0] // 2]
    out = []
    for z in dict.fromkeys(int(k) for k in keys if k is not None):
        png = overlay_png(vol[z], {k: v[z] for k, v in masks.items()}, center=center, width=width)
        out.append((f"slice-{z:04d}.png", png))
    return out
