"""``evaluate_chest``: one case's figures, for the quality benchmark and the classifier's
held-out report.

``case_truth``: ``lung_left``/``lung_right`` (bool arrays, optional), ``lesions``: a list of
``{"centre_mm": [x, y, z] (patient), "diameter_mm": d, "kind": str}`` (the procedural
phantom's records work as they are: ``center_mm``, ``nominal_diameter_mm``) and optionally
``lesion_labels`` (int array, value ``label`` of each lesion) with ``geometry`` (``Geometry``),
so a centroid *inside* the truth lesion counts as a hit even when it is off centre.

A truth lesion is hit by a reported nodule or mass whose centroid lies inside it or within its
radius (+ ``tolerance_mm``) of its centre; each report hits at most one lesion; reports that hit
none are false positives. Calcified lesions are scored apart (``calcified_*``): a calcified
granuloma reported as such is no false positive, and a missed one is no missed cancer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BINS: tuple[tuple[str, float, float], ...] = (
    ("4-6", 4.0, 6.0),
    ("6-10", 6.0, 10.0),
    ("10-30", 10.0, 30.0),
)
ALERT = ("high", "critical")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2 * int((a & b).sum()) / s)


def evaluate_chest(
    case_truth: Mapping[str, Any],
    result: Any,
    *,
    tolerance_mm: float = 1.5,
    severities: list[str] | None = None,
) -> dict[str, Any]:
    """Figures for one case. ``result``: a ``TaskResult`` (masks as host arrays) or a mapping
    with ``findings`` (and optionally ``masks``). ``severities``: the alert severities raised
    for this case's findings, when the caller ran the alert rules."""
    findings = result.findings if hasattr(result, "findings") else result["findings"]
    masks = result.masks if hasattr(result, "masks") else result.get("masks", {})
    out: dict[str, Any] = {}
    for side in ("lung_left", "lung_right"):
        if side in case_truth and side in masks:
            out[f"dice_{side}"] = round(
                _dice(np.asarray(masks[side], bool), np.asarray(case_truth[side], bool)), 4
            )
    lesions = list(case_truth.get("lesions", []))
    labels = case_truth.get("lesion_labels")
    geo = case_truth.get("geometry")
    reports = [f for f in findings if f.get("type") in ("nodule", "mass")]
    used: set[int] = set()
    hits: list[bool] = []
    for les in lesions:
        c = np.asarray(_centre(les), float)
        r = _diameter(les) / 2
        hit = False
        for k, f in enumerate(reports):
            if k in used:
                continue
            p = np.asarray(f["centroid_mm"], float)
            inside = False
            if labels is not None and geo is not None and "label" in les:
                idx = _index(geo, p, np.asarray(labels).shape)
                inside = idx is not None and int(np.asarray(labels)[idx]) == int(les["label"])
            if inside or np.linalg.norm(p - c) <= r + tolerance_mm:
                used.add(k)
                hit = True
                break
        hits.append(hit)
    nod = [(les, h) for les, h in zip(lesions, hits, strict=True) if les.get("kind") != "calcified"]
    calc = [
        (les, h) for les, h in zip(lesions, hits, strict=True) if les.get("kind") == "calcified"
    ]
    for name, lo, hi in BINS:
        sel = [h for les, h in nod if lo <= _diameter(les) < hi and les.get("kind") != "mass"]
        out[f"nodules_{name}"] = len(sel)
        out[f"hits_{name}"] = int(sum(sel))
    masses = [h for les, h in nod if les.get("kind") == "mass" or _diameter(les) >= 30.0]
    out["masses"] = len(masses)
    out["mass_hits"] = int(sum(masses))
    big = [h for les, h in nod if 6.0 <= _diameter(les) < 30.0 and les.get("kind") != "mass"]
    out["nodules_6mm_plus"] = len(big)
    out["hits_6mm_plus"] = int(sum(big))
    out["calcified"] = len(calc)
    out["calcified_hits"] = int(sum(h for _, h in calc))
    out["false_positives"] = len(reports) - len(used)
    out["reports"] = len(reports)
    if severities is not None:
        out["high_alerts"] = sum(1 for s in severities if s in ALERT)
    return out


def _centre(les: Mapping[str, Any]) -> list[float]:
    """The lesion's centre (patient mm): ``centre_mm``, ``center_mm`` or ``centroid_mm``."""
    for k in ("centre_mm", "center_mm", "centroid_mm"):
        if k in les:
            return [float(v) for v in les[k]]
    raise KeyError("lesion without a centre (centre_mm/center_mm/centroid_mm)")


def _diameter(les: Mapping[str, Any]) -> float:
    """Nominal diameter when the truth has one (``nominal_diameter_mm``), else ``diameter_mm``."""
    return float(les.get("nominal_diameter_mm", les.get("diameter_mm", 0.0)))


def _index(geo: Any, p: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """Patient mm -> voxel index (z, y, x) for ``Geometry``."""
    d = np.asarray(geo.direction, float)
    r, c, n = d[:3], d[3:6], d[6:9]
    m = np.stack([n * geo.spacing[0], c * geo.spacing[1], r * geo.spacing[2]], axis=1)
    zyx = np.linalg.solve(m, p - np.asarray(geo.origin, float))
    idx = tuple(round(float(v)) for v in zyx)
    if any(not 0 <= i < s for i, s in zip(idx, shape, strict=True)):
        return None
    return idx  # type: ignore[return-value]


def summarise(cases: list[dict[str, Any]]) -> dict[str, float]:
    """Pooled figures over cases (sensitivities per bin, FP per scan, mean Dice)."""
    out: dict[str, float] = {}
    n = max(len(cases), 1)
    for name, _, _ in BINS:
        tot = sum(c[f"nodules_{name}"] for c in cases)
        out[f"sensitivity_{name}"] = (
            round(sum(c[f"hits_{name}"] for c in cases) / tot, 3) if tot else float("nan")
        )
        out[f"count_{name}"] = float(tot)
    tot = sum(c["nodules_6mm_plus"] for c in cases)
    out["sensitivity_6mm_plus"] = (
        round(sum(c["hits_6mm_plus"] for c in cases) / tot, 3) if tot else float("nan")
    )
    tot = sum(c["nodules_6mm_plus"] + c["masses"] for c in cases)
    out["sensitivity_6mm_plus_and_masses"] = (
        round(sum(c["hits_6mm_plus"] + c["mass_hits"] for c in cases) / tot, 3)
        if tot
        else float("nan")
    )
    tot = sum(c["masses"] for c in cases)
    out["mass_sensitivity"] = (
        round(sum(c["mass_hits"] for c in cases) / tot, 3) if tot else float("nan")
    )
    out["fp_per_scan"] = round(sum(c["false_positives"] for c in cases) / n, 3)
    dices = [c[k] for c in cases for k in ("dice_lung_left", "dice_lung_right") if k in c]
    if dices:
        out["lung_dice_mean"] = round(float(np.mean(dices)), 4)
        out["lung_dice_min"] = round(float(np.min(dices)), 4)
    return out
