"""Clinical tasks built from the classical blocks: radiographs (edges, contours, structures);
chest CT lives in :mod:`services.segmentation.chest`, head CT in
:mod:`services.segmentation.head` (both re-exported here). Pure functions on a volume in HU
(z, y, x) with its geometry; array code runs on NumPy or CuPy alike."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.imaging import segment as seg
from shared.imaging.backend import download, namespace
from shared.imaging.geometry import Geometry as Geometry  # re-exported (head, onnx plug-in)

VERSION = "1.0.0"


@dataclass
class TaskResult:
    task: str
    masks: dict[str, Any]  # name -> bool array (z, y, x), in segment order
    findings: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)


def finding_record(
    geo: Geometry,
    kind: str,
    label: str,
    volume_ml: float,
    centroid: tuple[float, float, float],
    lo: tuple[float, float, float],
    hi: tuple[float, float, float],
    voxels: int,
) -> dict[str, Any]:
    """A finding's record (the schema every task reports): size, centroid and box in patient
    millimetres from voxel-frame centroid and box corners."""
    corners = [geo.to_patient(lo), geo.to_patient(hi)]
    return {
        "type": kind,
        "label": label,
        "volume_ml": round(volume_ml, 3),
        "diameter_mm": round((6 * volume_ml * 1000 / math.pi) ** (1 / 3), 2),
        "centroid_mm": list(geo.to_patient(centroid)),
        "bbox_mm": [min(a, b) for a, b in zip(*corners, strict=True)]
        + [max(a, b) for a, b in zip(*corners, strict=True)],
        "slice_index": round(centroid[0]),
        "voxels": voxels,
    }


def _measure(
    mask: Any,
    geo: Geometry,
    kind: str,
    label: str,
    image: Any = None,
    box: tuple[slice, ...] | None = None,
) -> dict[str, Any]:
    """Measurements of a mask; with ``box``, ``mask`` is the crop of the volume at ``box``."""
    xp, ndi = namespace(mask)
    if box is None:
        (box,) = ndi.find_objects(mask.astype(xp.int8))  # work inside the bounding box only
        mask = mask[box]
    n = int(xp.count_nonzero(mask))
    (tight,) = ndi.find_objects(mask.astype(xp.int8))
    lo = [b.start + t.start for b, t in zip(box, tight, strict=True)]
    hi = [b.start + t.stop - 1 for b, t in zip(box, tight, strict=True)]
    cz, cy, cx = (float(c) + b.start for c, b in zip(ndi.center_of_mass(mask), box, strict=True))
    volume_ml = n * geo.voxel_ml
    centroid = (cz, cy, cx)
    out = finding_record(
        geo, kind, label, volume_ml, centroid, (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]), n
    )
    if image is not None:
        out["mean_value"] = round(float(image[box][mask].mean()), 1)
    return out


def radiograph(img: Any, geo: Geometry, *, sigma: float = 2.0, structures: int = 2) -> TaskResult:
    """Edges (Canny), external contours and the largest dark structures (e.g. lung fields).

    The structures are found where the image lives (device or host); Canny and the contours
    run on the host (scikit-image). Device → host copies, all explicit: the plane (for Canny),
    the structure ranking, one per structure mask. The result's masks are host arrays.
    """
    xp, ndi = namespace(img)
    plane = (img[0] if img.ndim == 3 else img).astype(xp.float32)
    edges = seg.canny(plane, sigma=sigma)
    t = seg.otsu(plane)
    dark = plane < t
    labels, n = seg.label(dark)
    border = seg.touches_border(labels, n)
    sizes = seg.component_sizes(labels, n)
    sizes[0] = 0
    sizes[border] = 0
    top = xp.argsort(sizes, kind="stable")[::-1][:structures]  # CuPy sorts only stably
    ranked = download(xp.stack([top, sizes[top]]), why="structure ranking")
    keep = [int(lab) for lab, size in zip(ranked[0], ranked[1], strict=True) if size > 0]
    masks: dict[str, Any] = {}
    findings = []
    pixel_mm2 = geo.spacing[1] * geo.spacing[2]
    for k, lab in enumerate(keep, start=1):
        m = download(ndi.binary_fill_holes(labels == lab), why="structure mask")
        contours = seg.external_contours(m)
        masks[f"structure_{k}"] = m[None]
        idx = np.argwhere(m)
        cy, cx = idx.mean(axis=0)
        findings.append(
            {
                "type": "structure",
                "label": f"structure {k}",
                "area_mm2": round(float(m.sum()) * pixel_mm2, 1),
                "centroid_mm": list(geo.to_patient((0.0, float(cy), float(cx)))),
                "contour_points": int(sum(len(c) for c in contours)),
                "slice_index": 0,
            }
        )
    masks["edges"] = edges[None]
    findings.append(
        {"type": "edges", "label": "canny edges", "edge_pixels": int(edges.sum()), "slice_index": 0}
    )
    return TaskResult("radiograph", masks, findings, {"sigma": sigma, "otsu": round(float(t), 2)})


def __getattr__(name: str) -> Any:
    """``tasks.head_ct`` lives in :mod:`services.segmentation.head`, ``tasks.chest_ct`` in
    :mod:`services.segmentation.chest` (imported lazily: they build on the helpers above)."""
    if name == "head_ct":
        from services.segmentation.head import head_ct

        return head_ct
    if name == "chest_ct":
        from services.segmentation.chest.pipeline import chest_ct

        return chest_ct
    raise AttributeError(name)
