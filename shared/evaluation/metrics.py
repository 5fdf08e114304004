"""Scoring an analysis against ground truth, independently of the algorithms it scores.

Chest: lung Dice per side; a truth lesion is *found* when a reported nodule or mass has its
centroid inside the lesion (dilated by one voxel) or within the lesion's radius (at least
3 mm) of its centroid; every reported nodule/mass that matches no truth lesion is a false
positive. Head: a truth bleed is found when reported blood covers at least 10 % of it; a
reported blood component with less than 10 % of its voxels in any truth bleed is a false
bleed; volume error compares the reported components touching a bleed with its true volume.
Bleeds that share a reported component (two collections that touch, which one segmentation of
same-density blood cannot split) are measured together: the components touching any of them
against the sum of their true volumes, the volume a reader would measure for that collection.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

LESION_TYPES = ("nodule", "mass")
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("4-6", 4.0, 6.0),
    ("6-10", 6.0, 10.0),
    ("10-30", 10.0, 30.0),
)
MASS_MM = 30.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class VoxelFrame:
    """Patient mm (x, y, z) ↔ voxel (z, y, x) for an axial volume with identity direction."""

    spacing: tuple[float, float, float]  # z, y, x
    origin: tuple[float, float, float]  # x, y, z of voxel (0, 0, 0)

    def to_voxel(self, xyz: Sequence[float]) -> tuple[float, float, float]:
        x, y, z = (float(v) for v in xyz)
        ox, oy, oz = self.origin
        sz, sy, sx = self.spacing
        return ((z - oz) / sz, (y - oy) / sy, (x - ox) / sx)


def _bin(diameter: float) -> str | None:
    for name, lo, hi in SIZE_BINS:
        if lo <= diameter < hi:
            return name
    return None


def grown_labels(labels: np.ndarray) -> np.ndarray:
    """Truth lesion labels dilated by one voxel: a centroid on a lesion's rim is on it."""
    grown: np.ndarray = ndi.grey_dilation(labels, size=(3, 3, 3))
    return grown


def lesion_at(
    voxel: Sequence[float],
    lesions: Sequence[dict[str, Any]],
    spacing: Sequence[float],
    grown: np.ndarray | None = None,
) -> int | None:
    """The label of the truth lesion a centroid (continuous voxel index z, y, x) sits on, or
    ``None``: inside the lesion's label grown by one voxel (``grown``, from
    :func:`grown_labels`), or within max(3 mm, its radius) of its centre; the nearest such
    lesion wins. ``lesions``: ``label``, ``diameter_mm`` (equivalent sphere) and
    ``centroid_voxel``. The one rule the quality benchmark, the miss analysis and the
    classifier's training labels share."""
    inside = 0
    if grown is not None:
        idx = tuple(round(float(v)) for v in voxel)
        if all(0 <= i < n for i, n in zip(idx, grown.shape, strict=True)):
            inside = int(grown[idx])
    best: tuple[float, int] | None = None
    for les in lesions:
        dist = math.sqrt(
            sum(
                ((float(a) - float(b)) * float(s)) ** 2
                for a, b, s in zip(voxel, les["centroid_voxel"], spacing, strict=True)
            )
        )
        lab = int(les["label"])
        if (inside == lab or dist <= max(3.0, float(les.get("diameter_mm") or 0.0) / 2)) and (
            best is None or dist < best[0]
        ):
            best = (dist, lab)
    return best[1] if best else None


def score_chest(
    findings: list[dict[str, Any]],
    masks: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    lesions: list[dict[str, Any]],
    frame: VoxelFrame,
) -> dict[str, Any]:
    """``truth``: ``lung_left``/``lung_right`` (bool, optional) and ``lesions`` (int labels,
    optional); ``lesions``: one dict per label with ``label``, ``kind`` and
    ``diameter_mm`` (equivalent-sphere)."""
    out: dict[str, Any] = {}
    for side in ("lung_left", "lung_right"):
        if side in truth and side in masks:
            out[f"dice_{side}"] = round(dice(masks[side], truth[side]), 4)
        elif side in truth:
            out[f"dice_{side}"] = 0.0
    if "dice_lung_left" in out and "dice_lung_right" in out:
        out["lung_dice"] = round((out["dice_lung_left"] + out["dice_lung_right"]) / 2, 4)
    reported = [f for f in findings if f.get("type") in LESION_TYPES]
    labels = truth.get("lesions")
    grown = grown_labels(labels) if labels is not None else None
    on = [
        lesion_at(frame.to_voxel(f["centroid_mm"]), lesions, frame.spacing, grown)
        if f.get("centroid_mm") is not None
        else None
        for f in reported
    ]
    matched_findings: set[int] = set()
    per_lesion = []
    for les in lesions:
        lab = int(les["label"])
        diameter = float(les.get("diameter_mm") or 0.0)
        hits = [i for i, o in enumerate(on) if o == lab]
        matched_findings.update(hits)
        best = reported[hits[0]] if hits else None
        lesion_dice = None
        if labels is not None and hits:
            union = np.zeros(labels.shape, bool)
            for name, m in masks.items():
                if not name.startswith(("lung", "airway", "brain", "body")):
                    union |= np.asarray(m, bool)
            lesion_dice = round(dice(union & (grown == lab), labels == lab), 3)
        per_lesion.append(
            {
                "label": lab,
                "kind": les.get("kind"),
                "attachment": les.get("attachment"),
                "diameter_mm": round(diameter, 1),
                "found": bool(hits),
                "reported_as": best.get("type") if best else None,
                "reported_subtype": best.get("subtype") if best else None,
                "confidence": best.get("confidence") if best else None,
                "reported_diameter_mm": best.get("diameter_mm") if best else None,
                "dice": lesion_dice,
            }
        )
    false_pos = [f for i, f in enumerate(reported) if i not in matched_findings]
    out["lesions"] = per_lesion
    out["false_positives"] = len(false_pos)
    out["false_positive_findings"] = [
        {k: f.get(k) for k in ("type", "subtype", "diameter_mm", "confidence", "centroid_mm")}
        | {"likely_benign": f.get("likely_benign")}
        for f in false_pos
    ]
    out["reported"] = len(reported)
    return out


def score_bleeds(
    pred: np.ndarray,
    bleed_labels: np.ndarray,
    bleeds: Sequence[dict[str, Any]],
    voxel_ml: float,
) -> tuple[list[dict[str, Any]], list[float]]:
    """The head scoring both scorers share (``score_head`` here, ``evaluate_head`` in the
    phantom): the reported blood ``pred`` as connected components against the truth labels.

    Returns, per truth bleed: found (reported blood covers >= 10 % of it), coverage, and the
    volume of the reported components touching it. Bleeds linked through a shared component
    form one group, whose reported volume is set against the group's summed truth
    (``merged_with``: the others in it). And the volumes (mL) of the false bleeds: reported
    components with < 10 % of their voxels in any truth bleed."""
    comp, n = ndi.label(pred)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    in_truth = np.bincount(comp[bleed_labels > 0].ravel(), minlength=n + 1)
    false_ml = [float(sizes[i]) * voxel_ml for i in range(1, n + 1) if in_truth[i] < 0.1 * sizes[i]]
    touching: list[set[int]] = []
    cover: list[float] = []
    for b in bleeds:
        t = bleed_labels == int(b["label"])
        ids = np.unique(comp[t & pred])
        touching.append({int(i) for i in ids if i > 0})
        cover.append(float((pred & t).sum()) / max(int(t.sum()), 1))
    group = list(range(len(bleeds)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    owner: dict[int, int] = {}
    for i, comps_i in enumerate(touching):
        for c in comps_i:
            if c in owner:
                group[root(i)] = root(owner[c])
            else:
                owner[c] = i
    members: dict[int, list[int]] = {}
    for i in range(len(bleeds)):
        members.setdefault(root(i), []).append(i)
    out: list[dict[str, Any]] = []
    for i, b in enumerate(bleeds):
        grp = members[root(i)]
        comps = sorted(set().union(*(touching[j] for j in grp)))
        volume = float(sizes[comps].sum()) * voxel_ml
        truth_ml = sum(float(bleeds[j]["volume_ml"]) for j in grp)
        out.append(
            {
                "kind": b.get("kind"),
                "truth_ml": round(float(b["volume_ml"]), 2),
                "found": cover[i] >= 0.1,
                "coverage": round(cover[i], 3),
                "volume_ml": round(volume, 2),
                "volume_error": round((volume - truth_ml) / truth_ml, 3) if truth_ml else None,
                "merged_with": len(grp) - 1,
            }
        )
    return out, false_ml


def score_head(
    findings: list[dict[str, Any]],
    masks: dict[str, np.ndarray],
    bleed_labels: np.ndarray,
    bleeds: list[dict[str, Any]],
    truth_shift_mm: float | None,
    voxel_ml: float,
    *,
    min_ml: float = 2.0,
) -> dict[str, Any]:
    """``bleeds``: one dict per label with ``label``, ``kind``, ``volume_ml``."""
    pred = np.asarray(masks.get("haemorrhage", np.zeros(bleed_labels.shape, bool)), bool)
    per_bleed, false = score_bleeds(pred, bleed_labels, bleeds, voxel_ml)
    shift = next((f for f in findings if f.get("type") == "midline_shift"), None)
    measured = None
    if shift is not None and shift.get("shift_mm") is not None:
        sign = 1.0 if shift.get("location") in ("left", None) else -1.0
        measured = sign * float(shift["shift_mm"])
    return {
        "bleeds": per_bleed,
        "bleeds_ge_min": sum(1 for p in per_bleed if float(p["truth_ml"]) >= min_ml),
        "found_ge_min": sum(
            1 for p in per_bleed if float(p["truth_ml"]) >= min_ml and bool(p["found"])
        ),
        "false_bleeds": len(false),
        "reported_bleeds": sum(1 for f in findings if f.get("type") == "haemorrhage"),
        "shift_mm": measured,
        "truth_shift_mm": truth_shift_mm,
        "shift_error_mm": None
        if truth_shift_mm is None
        else round(abs((measured or 0.0) - truth_shift_mm), 2),
    }


def size_bin(diameter: float) -> str | None:
    return _bin(diameter)


def finding_differences(
    got: Sequence[dict[str, Any]],
    want: Sequence[dict[str, Any]],
    *,
    rel: float = 1e-3,
    abs_tol: float = 1e-2,
    list_atol: float = 0.05,
) -> list[str]:
    """How two analyses' findings differ (empty: the same), as the CPU/GPU parity judges them:
    the same types and labels in the same order; every field equal, numbers within ``rel``
    (or ``abs_tol``), coordinate lists within ``list_atol``, nested records (the classifier's
    ``features``) field by field the same way. Float rounding in the last printed digit is not
    a difference; a finding more or less, another label or subtype is."""
    g = [(f.get("type"), f.get("label")) for f in got]
    w = [(f.get("type"), f.get("label")) for f in want]
    if g != w:
        return [f"findings {g} != {w}"]
    out: list[str] = []

    def compare(path: str, a: Any, b: Any) -> None:
        if isinstance(b, bool) or b is None or isinstance(b, str):
            if a != b:
                out.append(f"{path}: {a!r} != {b!r}")
        elif isinstance(b, numbers.Real):  # NumPy scalars too
            if not isinstance(a, numbers.Real) or not math.isclose(
                float(a), float(b), rel_tol=rel, abs_tol=abs_tol
            ):
                out.append(f"{path}: {a!r} != {b!r}")
        elif isinstance(b, dict):
            if not isinstance(a, dict) or set(a) != set(b):
                out.append(f"{path}: keys {sorted(a) if isinstance(a, dict) else a!r}")
                return
            for k in b:
                compare(f"{path}.{k}", a[k], b[k])
        elif isinstance(b, list | tuple):
            x, y = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
            numeric = all(isinstance(v, numbers.Real) for v in np.ravel(y))
            if numeric and x.shape == y.shape and np.ravel(x).size:
                if not np.allclose(x.astype(float), y.astype(float), atol=list_atol):
                    out.append(f"{path}: {list(a)!r} != {list(b)!r}")
            elif list(a) != list(b):
                out.append(f"{path}: {a!r} != {b!r}")
        elif a != b:
            out.append(f"{path}: {a!r} != {b!r}")

    for f, r in zip(got, want, strict=True):
        for key in sorted(set(f) | set(r)):
            if key not in f or key not in r:
                out.append(f"{r.get('label')}.{key}: present on one side only")
            else:
                compare(f"{r.get('label')}.{key}", f[key], r[key])
    return out
