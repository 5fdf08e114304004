"""Clinical tasks built from the classical blocks: chest CT (lungs, nodules), head CT (brain,
haemorrhage), radiographs (edges, contours, structures). Pure functions on a volume in HU
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
    centroid = tuple(float(c) + b.start for c, b in zip(ndi.center_of_mass(mask), box, strict=True))
    volume_ml = n * geo.voxel_ml
    corners = [geo.to_patient((lo[0], lo[1], lo[2])), geo.to_patient((hi[0], hi[1], hi[2]))]
    out: dict[str, Any] = {
        "type": kind,
        "label": label,
        "volume_ml": round(volume_ml, 3),
        "diameter_mm": round((6 * volume_ml * 1000 / math.pi) ** (1 / 3), 2),
        "centroid_mm": list(geo.to_patient(centroid)),
        "bbox_mm": [min(a, b) for a, b in zip(*corners, strict=True)]
        + [max(a, b) for a, b in zip(*corners, strict=True)],
        "slice_index": round(centroid[0]),
        "voxels": n,
    }
    if image is not None:
        out["mean_value"] = round(float(image[box][mask].mean()), 1)
    return out


def _lowres_closing(mask: Any, spacing: tuple[float, float, float], radius_mm: float) -> Any:
    """What an in-plane closing with a disk of ``radius_mm`` adds to ``mask`` (its concavities),
    computed at ~3 mm pixels (fast), so nodules attached to the chest wall are searched too."""
    xp, ndi = namespace(mask)
    f = max(1, round(3.0 / spacing[1]))
    small = mask[:, ::f, ::f]
    r = max(1, round(radius_mm / (spacing[1] * f)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = xp.asarray((yy**2 + xx**2 <= r * r)[None])
    closed = ndi.binary_closing(xp.pad(small, ((0, 0), (r, r), (r, r))), structure=disk)[
        :, r:-r, r:-r
    ]
    added = closed & ~small
    # only what the closing added (concavities), not the blocky outline of the coarse mask
    up = xp.repeat(xp.repeat(added, f, axis=1), f, axis=2)[:, : mask.shape[1], : mask.shape[2]]
    return up


def self_check(
    comp: Any,
    sl: tuple[slice, ...],
    geo: Geometry,
    min_mm: float,
    plane: Any,
    erode_px: int,
    ndi: Any,
) -> bool | None:
    """Is this component a nodule candidate? (size, shape: not a vessel, not a wall rim)."""
    count = int(comp.sum())
    diam = (6 * count * geo.voxel_ml * 1000 / math.pi) ** (1 / 3)
    if diam < min_mm:
        return None
    z_extent = (sl[0].stop - sl[0].start) * geo.spacing[0]
    xy_extent = max(sl[1].stop - sl[1].start, sl[2].stop - sl[2].start) * geo.spacing[1]
    # vessels run through many slices; nodules are about as tall as they are wide
    if z_extent > 1.6 * xy_extent + 2 * geo.spacing[0]:
        return None
    # blobs, not the thin partial-volume rim along the lung wall: compact and thick
    box = (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) * (sl[2].stop - sl[2].start)
    if count / box < 0.3 or xy_extent > 3.0 * diam:
        return None
    px = min(sl[1].stop - sl[1].start, sl[2].stop - sl[2].start)
    if (
        px >= 5
        and int(ndi.binary_erosion(comp, structure=plane, iterations=erode_px).sum()) < 0.15 * count
    ):
        return None
    return True


def _padded(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown in-plane by ``pad`` voxels (clipped to the volume)."""
    z, y, x = box
    return (
        z,
        slice(max(0, y.start - pad), min(shape[1], y.stop + pad)),
        slice(max(0, x.start - pad), min(shape[2], x.stop + pad)),
    )


def chest_ct(
    vol: Any,
    geo: Geometry,
    *,
    lung_hu: float = -400.0,
    nodule_hu: float = -410.0,
    min_nodule_mm: float = 4.0,
) -> TaskResult:
    xp, ndi = namespace(vol)
    body = seg.fill_holes_2d(seg.largest_components(vol > -500.0))
    air_inside = (vol < lung_hu) & body
    labels, n = seg.label(air_inside)
    sizes = xp.bincount(labels[::2, ::2, ::2].ravel(), minlength=n + 1) * 8  # ranks only
    sizes[0] = 0
    min_vox = max(10, int(5.0 / geo.voxel_ml))  # 5 mL
    keep = [int(i) for i in xp.argsort(sizes)[::-1][:2] if int(sizes[int(i)]) >= min_vox]
    lungs: dict[str, Any] = {}
    boxes = ndi.find_objects(labels)
    pad = math.ceil(12.0 / geo.spacing[1])
    parts: list[tuple[tuple[slice, ...], Any]] = []  # (box, mask inside the box)
    for k in keep:
        box = _padded(boxes[k - 1], pad, vol.shape)
        parts.append((box, labels[box] == k))
    if len(keep) == 1:  # lungs touching: split at the body's midline
        box, whole = parts[0]
        mid = int(xp.argwhere(body[vol.shape[0] // 2]).mean(axis=0)[1]) - box[2].start
        left_half = xp.zeros_like(whole)
        left_half[:, :, max(mid, 0) :] = True
        parts = [(box, whole & left_half), (box, whole & ~left_half)]
    search = xp.zeros_like(body)
    lung_boxes: dict[str, tuple[tuple[slice, ...], Any]] = {}
    mid_x = geo.to_patient((0.0, 0.0, (vol.shape[2] - 1) / 2))[0]
    for box, part in parts:
        xs = (
            float(
                xp.argwhere(
                    part[part.shape[0] // 2] if part[part.shape[0] // 2].any() else part.any(axis=0)
                ).mean(axis=0)[1]
            )
            + box[2].start
        )
        name = (
            "lung_left" if geo.to_patient((0.0, 0.0, xs))[0] > mid_x else "lung_right"
        )  # LPS: +x = patient left
        filled = seg.fill_holes_2d(part)
        full = xp.zeros_like(body)
        full[box] = filled
        lungs[name] = full
        lung_boxes[name] = (box, filled)
        # where nodules are looked for: the lung plus its concavities (wall-attached nodules)
        search[box] |= filled | (_lowres_closing(filled, geo.spacing, 10.0) & body[box])
    sbox = ndi.find_objects(search.astype(xp.int8))
    sbox = sbox[0] if sbox and sbox[0] is not None else tuple(slice(0, d) for d in vol.shape)
    dense = (vol[sbox] > nodule_hu) & search[sbox]
    labels, n = seg.label(dense, connectivity=2)
    findings: list[dict[str, Any]] = []
    nodules = xp.zeros_like(body)
    if n:
        plane = xp.asarray(np.ones((1, 3, 3), bool))
        erode_px = max(1, round(1.0 / geo.spacing[1]))
        vessel_r = max(1, math.ceil(4.0 / geo.spacing[1]))
        yy, xx = np.mgrid[-vessel_r : vessel_r + 1, -vessel_r : vessel_r + 1]
        disk = xp.asarray((yy**2 + xx**2 <= vessel_r**2)[None])
        for i, rel in enumerate(ndi.find_objects(labels), start=1):
            if rel is None:
                continue
            comp = labels[rel] == i
            sl = tuple(
                slice(b.start + r.start, b.start + r.stop) for b, r in zip(sbox, rel, strict=True)
            )
            pieces = [(sl, comp)]
            z_extent = (sl[0].stop - sl[0].start) * geo.spacing[0]
            xy_extent = max(sl[1].stop - sl[1].start, sl[2].stop - sl[2].start) * geo.spacing[1]
            if z_extent > 1.6 * xy_extent + 2 * geo.spacing[0]:
                # vessel-like: a nodule may sit on the vessel; an in-plane opening wider than
                # vessels (4 mm) keeps it, then it regains its rim within the component
                opened = ndi.binary_opening(comp, structure=disk)
                plabels, _pn = seg.label(opened, connectivity=2)
                pieces = []
                for j, psl in enumerate(ndi.find_objects(plabels), start=1):
                    if psl is None:
                        continue
                    piece = xp.zeros_like(comp)
                    piece[psl] = plabels[psl] == j
                    piece = ndi.binary_dilation(piece, structure=disk, iterations=1) & comp
                    local = ndi.find_objects(piece.astype(xp.int32))[0]
                    abs_sl = tuple(
                        slice(a.start + b.start, a.start + b.stop)
                        for a, b in zip(sl, local, strict=True)
                    )
                    pieces.append((abs_sl, piece[local]))
            for psl, pcomp in pieces:
                finding = self_check(pcomp, psl, geo, min_nodule_mm, plane, erode_px, ndi)
                if finding is None:
                    continue
                full = xp.zeros_like(body)
                full[psl] = pcomp
                nodules |= full
                findings.append(_measure(full, geo, "nodule", f"nodule {len(findings) + 1}", vol))
    for name, (box, crop) in lung_boxes.items():
        if bool(crop.any()):
            f = _measure(crop, geo, "lung", name, box=box)
            findings.append(
                {
                    k: f[k]
                    for k in ("type", "label", "volume_ml", "centroid_mm", "bbox_mm", "voxels")
                }
            )
    masks: dict[str, Any] = {k: lungs[k] for k in ("lung_left", "lung_right") if k in lungs}
    masks["nodules"] = nodules
    return TaskResult(
        "chest_ct",
        masks,
        findings,
        {"lung_hu": lung_hu, "nodule_hu": nodule_hu, "min_nodule_mm": min_nodule_mm},
    )


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
    """``tasks.head_ct`` lives in :mod:`services.segmentation.head` (imported lazily: that
    module builds on the helpers above)."""
    if name == "head_ct":
        from services.segmentation.head import head_ct

        return head_ct
    raise AttributeError(name)
