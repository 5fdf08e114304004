"""Which segments a DICOM SEG of a task's result carries: each organ mask, then one segment per
lesion finding (the connected piece of its task's lesion mask that holds the finding), labelled
and described by the finding (what, how big, how sure, and the features behind it).

Pure: masks (z, y, x) by name, findings as mappings (``Finding.model_dump()`` or the tasks'
dicts) and the volume's geometry in; :class:`~shared.dicom.seg.Segment` s out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from shared.dicom.seg import Segment
from shared.imaging.geometry import Geometry

ORGANS = ("lung_left", "lung_right", "brain")
LESION_MASKS = {"nodule": "nodules", "mass": "nodules", "haemorrhage": "haemorrhage"}


def describe(f: Mapping[str, Any]) -> tuple[str, str]:
    """SegmentLabel and SegmentDescription of a finding: what, how big, how sure, and why."""
    size = f.get("diameter_mm")
    conf = f.get("confidence")
    source = f.get("confidence_source")  # the model the confidence came from, if said
    head = " ".join(
        p
        for p in (
            f["label"] + ":",
            f.get("subtype") or "",
            f"{size:.1f} mm" if size is not None else "",
            f"p={conf:.2f}" if conf is not None else "",
        )
        if p
    )
    parts = [
        f"{f['label']}: {f.get('subtype') or ''} {f['type']}".replace("  ", " "),
        f"diameter {size:.1f} mm" if size is not None else "",
        f"long/short axis {f['long_axis_mm']:.1f}/{f['short_axis_mm']:.1f} mm"
        if f.get("long_axis_mm") is not None and f.get("short_axis_mm") is not None
        else "",
        f"volume {f['volume_ml']:.2f} mL" if f.get("volume_ml") is not None else "",
        f"mean {f['mean_value']:.0f} HU" if f.get("mean_value") is not None else "",
        f"location {f['location']}" if f.get("location") else "",
        "likely benign" if f.get("likely_benign") else "",
        (f"confidence {conf:.3f}" if conf is not None else "confidence not computed")
        + (f" ({source})" if conf is not None and source else ""),
    ]
    text = ", ".join(p for p in parts if p)
    features = f.get("features") or {}
    if features:
        text += "; features: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(features.items()))
    return head[:64], text


def finding_segments(
    masks: Mapping[str, np.ndarray], findings: Sequence[Mapping[str, Any]], geo: Geometry
) -> list[Segment]:
    """The SEG's segments: each organ mask, then one segment per lesion finding (the connected
    piece of its task's lesion mask that holds the finding), described by the finding."""
    segments = [Segment(n, np.asarray(masks[n], bool), n) for n in ORGANS if n in masks]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for f in findings:
        union = LESION_MASKS.get(str(f.get("type")))
        if union is not None and union in masks and f.get("centroid_mm") is not None:
            groups.setdefault(union, []).append(f)
    for union, members in groups.items():
        full = np.asarray(masks[union], bool)
        box = _bounding_box(full)
        if box is None:
            continue
        # label inside the lesions' bounding box only: the volume is mostly empty
        labels, n = ndimage.label(full[box], structure=np.ones((3, 3, 3), bool))
        offset = np.array([sl.start for sl in box], float)
        centres: np.ndarray | None = None  # only needed for a centroid outside its mask
        owners: dict[int, list[Mapping[str, Any]]] = {}
        for f in members:
            z, y, x = geo.to_index(f["centroid_mm"])
            idx = tuple(round(v) - int(o) for v, o in zip((z, y, x), offset, strict=True))
            inside = all(0 <= i < s for i, s in zip(idx, labels.shape, strict=True))
            cid = int(labels[idx]) if inside else 0
            if cid == 0:  # a centroid outside its own (concave) mask: the nearest piece
                if centres is None:
                    centres = (
                        np.array(
                            ndimage.center_of_mass(labels > 0, labels, range(1, n + 1))
                        ).reshape(n, 3)
                        + offset
                    )
                d = (centres - np.array([z, y, x])) * np.array(geo.spacing)
                cid = int(np.argmin((d**2).sum(axis=1))) + 1
            owners.setdefault(cid, []).append(f)
        for cid, fs in sorted(owners.items()):
            main = max(fs, key=lambda f: (f.get("confidence") or 0.0, f.get("volume_ml") or 0.0))
            label, text = describe(main)
            if len(fs) > 1:
                text = "; ".join([text, *(describe(f)[1] for f in fs if f is not main)])
            piece = np.zeros(full.shape, bool)
            piece[box] = labels == cid
            segments.append(
                Segment(
                    str(main["type"]),
                    piece,
                    str(main["label"]),
                    label,
                    text,
                    findings=tuple(str(f["label"]) for f in fs),
                )
            )
    return segments


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
