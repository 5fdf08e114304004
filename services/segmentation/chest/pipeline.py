"""``chest_ct``: lungs -> candidates -> segmentation and features -> classifier -> findings."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from services.segmentation.chest import classifier
from services.segmentation.chest.candidates import (
    Pyramid,
    Seed,
    blob_seeds,
    lung_box,
    merge_seeds,
    pleural_seeds,
    pyramid,
    resample_mask,
    wall_seeds,
)
from services.segmentation.chest.features import Candidate, runs_out, segment_seed
from services.segmentation.chest.grid import Grid, bbox, host
from services.segmentation.chest.lungs import SIDES, Lungs, full_masks, segment_lungs
from shared.config import default_threads
from shared.imaging.backend import namespace

if TYPE_CHECKING:  # tasks re-exports chest_ct: import it at call time, not at import time
    from services.segmentation.tasks import Geometry, TaskResult

# 2.8.2: every sort whose ties decide something is stable (group leaders among tied calibrated
# confidences, the size ranks of lung components and pleural pieces): the same order on every
# NumPy build and CPU; 2.8.1: the candidate stage keeps its strongest peaks with a stable sort
# (tied peaks kept alike on the CPU and the GPU: NumPy's default sort is not stable, CuPy's
# is); 2.8: coarse
# blob seeds from a dot score of 6 (a nodule centred on a vessel); 2.7.1: one rule for
# dense (``classifier.dense``); 2.7: a lesion that is not dense keeps its first crop when the
# grown one is a dense tube (``keeps_first_crop``); 2.6: each finding names the model its
# confidence came from (``confidence_source``), and what only the second opinion raises no longer
# joins the lung mask; 2.5: a second classifier for candidates >= 20 mm (masses against heart
# border and chest wall), capped below the paging point, that only adds findings; 2.4: candidates
# segmented on the scan in the lung closed at their own resolution (whole juxtapleural domes),
# classifier retrained on it; 2.3: the lungs take findings from 0.1 only; 2.2: air is lung only
# when deep in-plane; 2.1: regrow
VERSION = "2.8.2"
MASS_MM = 30.0
MIN_REPORT_MM = (
    4.0  # below this nothing is reported (under the 6 mm follow-up size of the guidelines)
)
# the validated acquisition range (slices up to 5 mm): thicker series are analysed, but their
# confidences are not calibrated (the classifier never saw them; partial volume turns vessels
# into blobs), so they are capped below the alert rules' operating point and flagged
MAX_SLICE_MM = 5.0
OUT_OF_SPEC_CONFIDENCE = 0.3
# a finding joins its lung's mask (a pleural lesion is lung, not chest wall) only from this
# confidence: under it a finding is reported to the worklist but is most likely false (the
# heart border, a hilar vessel), and adding it would move the lung's outline and volume
LUNG_MASK_CONFIDENCE = 0.1
# ``confidence_source`` of a finding: the main classifier, or the large-candidate model's
# second opinion (``classifier.Large``: capped at its ``max_confidence``). A finding only the
# second opinion raises is a mass the main model doubts, or a piece of the heart border or
# chest wall; it never joins the lung mask (a false one would move the lung's outline).
MAIN_MODEL = "main_model"
LARGE_CANDIDATE_MODEL = "large_candidate_model"


@dataclass
class Analysis:
    lungs: Lungs
    pyramid: Pyramid | None
    candidates: list[Candidate]
    # what ``segment_seed`` was called with (``regrow`` segments a candidate again)
    context: dict[str, Any] = field(default_factory=dict)


def _hila(lungs: Lungs) -> dict[str, tuple[float, float, float]]:
    """Per side, the hilum (full-resolution index): where the tracked main bronchus ends, or
    the medial third of the lung at mid-height when no airway was found."""
    g = lungs.grid
    out: dict[str, tuple[float, float, float]] = {}
    air = host(lungs.airway) if bool(host(lungs.airway.any())) else None
    for name in SIDES:
        m = lungs.masks[name]
        b = bbox(m)
        if b is None:
            continue
        cx = (b[2].start + b[2].stop) / 2
        if air is not None:
            pts = np.argwhere(air)
            pts = pts[(pts[:, 2] - lungs.midline_x) * (cx - lungs.midline_x) > 0]
            if len(pts):
                zlow = pts[:, 0].min() if lungs.superior > 0 else pts[:, 0].max()
                end = pts[np.abs(pts[:, 0] - zlow) <= 2].mean(axis=0)
                out[name] = g.to_full((float(end[0]), float(end[1]), float(end[2])))
                continue
        zc = (b[0].start + b[0].stop) / 2
        medial = (
            b[2].stop - 0.2 * (b[2].stop - b[2].start)
            if cx < lungs.midline_x
            else (b[2].start + 0.2 * (b[2].stop - b[2].start))
        )
        out[name] = g.to_full((zc, (b[1].start + b[1].stop) / 2, medial))
    return out


def analyse(
    vol: Any,
    geo: Geometry,
    *,
    lung_hu: float = -400.0,
    max_seeds: int = 280,
    threads: int | None = None,
) -> Analysis:
    """Lungs and every candidate with its segmentation and features (no classification).

    The candidates are segmented in ``threads`` host threads (default: the usable CPUs, at
    most 8): each is independent, most of its time is SciPy and NumPy on its crop, which
    release the GIL, and on the GPU backend it is host work after a download. Their order and
    every result are those of one thread (``pool.map``)."""
    lungs = segment_lungs(vol, spacing=geo.spacing, direction=geo.direction, lung_hu=lung_hu)
    box = lung_box(lungs, vol.shape)
    if box is None:
        return Analysis(lungs, None, [])
    pyr = pyramid(vol, lungs, box, geo.spacing)
    seeds = merge_seeds(
        blob_seeds(pyr) + pleural_seeds(lungs) + wall_seeds(lungs), geo.spacing, max_seeds=max_seeds
    )
    union = lungs.masks[SIDES[0]] | lungs.masks[SIDES[1]]
    cache: dict[int, Any] = {}
    filling = threading.Lock()  # the candidates' threads share the cache: each level once

    def lungs_at(level: int) -> Any:
        with filling:
            if level not in cache:
                cache[level] = resample_mask(union, lungs.grid, pyr.grids[level])
            return cache[level]

    hila = _hila(lungs)
    lb = bbox(lungs.masks[SIDES[0]] | lungs.masks[SIDES[1]])
    g = lungs.grid
    lung_z = (
        (g.to_full((lb[0].start, 0, 0))[0], g.to_full((lb[0].stop - 1, 0, 0))[0])
        if lb
        else (0.0, 1.0)
    )
    bb = bbox(lungs.body)
    half_width = (bb[2].stop - bb[2].start) * g.factors[2] / 2 if bb else vol.shape[2] / 2
    midline = g.to_full((0.0, 0.0, lungs.midline_x))[2]
    context: dict[str, Any] = {
        "lungs_at": lungs_at,
        "hila": hila,
        "lung_z": lung_z,
        "midline_x": midline,
        "half_width": half_width,
        "full_spacing": geo.spacing,
        "superior": lungs.superior,
        "volume": vol,
    }

    def segment(s: Seed) -> Candidate | None:
        return segment_seed(s, pyr, **context)

    n = max(1, min(threads or default_threads(), len(seeds)))
    if n > 1:
        with ThreadPoolExecutor(n, thread_name_prefix="chest-candidates") as pool:
            found = list(pool.map(segment, seeds))
    else:
        found = [segment(s) for s in seeds]
    return Analysis(lungs, pyr, [c for c in found if c is not None], context)


GROW_STEPS = 1  # crop growths (x2 along each axis the segment runs out of) before reporting


def regrow(an: Analysis, i: int, steps: int | None = None) -> Candidate | None:
    """Candidate ``i`` segmented again in a crop grown along the axes where its segment ran
    out of the first one (``None``: it did not run out, or its first crop stands,
    ``keeps_first_crop``; nothing changes). A vessel cut by a small crop looks like a compact
    blob; grown, it is the tube it is."""
    c = an.candidates[i]
    steps = GROW_STEPS if steps is None else steps
    if an.pyramid is None or steps < 1:
        return None
    runs = runs_out(c.mask, c.box, an.pyramid.images[an.pyramid.grids.index(c.grid)].shape)
    if not any(runs):
        return None
    # the first crop is the candidate's own: start from the grown one, not segment it again
    grown = (runs[0], runs[1], runs[2])
    c2 = segment_seed(c.seed, an.pyramid, **an.context, grow_steps=steps - 1, grown=grown)
    if c2 is not None and keeps_first_crop(c.features, c2.features):
        return None
    return c2


def keeps_first_crop(first: dict[str, float], grown: dict[str, float]) -> bool:
    """Whether a candidate keeps its first crop's segment: the first is not dense and passes
    the veto, the grown one is a dense tube. The grown crop joined the lesion to enhanced
    tissue beyond the first crop (an unseen phantom's 28 mm juxtapleural nodule, 10 mL, grew
    to 30 mL of it, its centroid 12 mm away, and was vetoed). A first crop that is already
    dense is the vessel a small crop cut short: its grown crop stands."""
    return (
        classifier.veto(grown) == "dense_tube"
        and classifier.veto(first) is None
        and not classifier.dense(first)
    )


def measure(mask: Any, geo: Geometry, kind: str, label: str, vol: Any = None) -> dict[str, Any]:
    """Volume, equivalent diameter, centroid and box of a mask in patient coordinates; only
    per-axis profiles and a scalar or two are downloaded (no ``find_objects``: CuPy has none)."""
    box = bbox(mask)
    if box is None:
        return {"type": kind, "label": label, "volume_ml": 0.0, "voxels": 0}
    crop = mask[box]
    cen = []
    n = 0
    for axis in range(3):
        prof = host(crop.sum(axis=tuple(a for a in range(3) if a != axis))).astype(np.float64)
        n = int(prof.sum())
        cen.append(float((prof * np.arange(prof.size)).sum() / max(n, 1)) + box[axis].start)
    lo = geo.to_patient((box[0].start, box[1].start, box[2].start))
    hi = geo.to_patient((box[0].stop - 1, box[1].stop - 1, box[2].stop - 1))
    volume_ml = n * geo.voxel_ml
    out: dict[str, Any] = {
        "type": kind,
        "label": label,
        "volume_ml": round(volume_ml, 3),
        "diameter_mm": round((6 * volume_ml * 1000 / np.pi) ** (1 / 3), 2),
        "centroid_mm": list(geo.to_patient((cen[0], cen[1], cen[2]))),
        "bbox_mm": [min(a, b) for a, b in zip(lo, hi, strict=True)]
        + [max(a, b) for a, b in zip(lo, hi, strict=True)],
        "slice_index": round(cen[0]),
        "voxels": n,
    }
    if vol is not None:
        out["mean_value"] = round(float(host(vol[box][crop].mean())), 1)
    return out


def finding_kind(f: dict[str, float]) -> str:
    """A reported candidate is a mass from ``MASS_MM`` (its long axis or its diameter), else a
    nodule (the training script types its out-of-fold findings by the same rule)."""
    return "mass" if max(f["long_axis_mm"], f["diameter_mm"]) >= MASS_MM else "nodule"


def _subtype(f: dict[str, float]) -> str:
    # dense and (past the veto) small, compact and apart from the wall: a calcified granuloma
    if classifier.dense(f) and f["diameter_mm"] <= classifier.GRANULOMA_MM:
        return "calcified"
    if f["solid_frac"] < 0.15:
        return "ground_glass"
    if f["solid_frac"] < 0.6 and f["diameter_mm"] >= 6:
        return "part_solid"
    return "solid"


def lesion_groups(
    cands: list[Candidate], probs: np.ndarray, spacing: tuple[float, ...]
) -> list[list[int]]:
    """Candidates on one lesion, highest probability first: a candidate whose centroid lies
    within a group leader's radius (or the leader's within its own) joins that group."""
    groups: list[list[int]] = []
    if not len(cands):
        return groups
    # ``near`` against every leader at once (one distance row per candidate, not one call per
    # pair: a scan has a few hundred candidates and as many groups)
    cen = np.array([c.centroid for c in cands], dtype=np.float64) * np.array(spacing)
    rad = np.array([c.features["diameter_mm"] / 2 for c in cands], dtype=np.float64)
    leaders: list[int] = []
    for i in (int(j) for j in np.argsort(-probs, kind="stable")):
        if leaders:
            lead = np.array(leaders)
            d = np.linalg.norm(cen[lead] - cen[i], axis=1)
            hit = np.flatnonzero(d < np.maximum(np.maximum(rad[lead], rad[i]), 2.0))
            if hit.size:
                groups[int(hit[0])].append(i)
                continue
        leaders.append(i)
        groups.append([i])
    return groups


def reported_picks(
    cands: list[Candidate],
    own: np.ndarray,
    probs: np.ndarray,
    op: float,
    spacing: tuple[float, ...],
) -> list[tuple[int, float, str]]:
    """(candidate, confidence, its source) of each finding: what the main model reports
    (``own``; ``MAIN_MODEL``), then what only the second opinion raises (``probs`` where
    ``own`` is under ``op``; ``LARGE_CANDIDATE_MODEL``) away from those. The second opinion
    adds findings, it never moves one: a heart-border piece it lifts would otherwise lead a
    nodule's group and lend the finding its mask."""
    picks = [(i, conf, MAIN_MODEL) for i, conf in _picks(cands, own, op, spacing)]
    for i, conf in _picks(cands, np.where(own < op, probs, 0.0), op, spacing):
        if not any(near(cands[i], cands[j], spacing) for j, _, _ in picks):
            picks.append((i, conf, LARGE_CANDIDATE_MODEL))
    return picks


def near(a: Candidate, b: Candidate, spacing: tuple[float, ...]) -> bool:
    """One lesion (``lesion_groups``' rule): a centroid within the other's radius (at least
    2 mm)."""
    sp = np.array(spacing)
    d = np.linalg.norm(np.array(a.centroid) * sp - np.array(b.centroid) * sp)
    return bool(d < max(a.features["diameter_mm"] / 2, b.features["diameter_mm"] / 2, 2.0))


def _picks(
    cands: list[Candidate], probs: np.ndarray, op: float, spacing: tuple[float, ...]
) -> list[tuple[int, float]]:
    """One finding per lesion: its confidence is the group's best; its mask and measurements
    those of the largest member above the operating point (a juxtapleural mass is often
    seeded by a small blob and by its pleural concavity: the concavity has it whole)."""
    picks = []
    for grp in lesion_groups(cands, probs, spacing):
        above = [
            i
            for i in grp
            if probs[i] >= max(op, probs[grp[0]] - 0.2)
            and cands[i].features["diameter_mm"] >= MIN_REPORT_MM
        ]
        if above:
            big = max(above, key=lambda i: cands[i].features["volume_ml"])
            picks.append((big, float(probs[grp[0]])))
    return picks


def chest_ct(
    vol: Any,
    geo: Geometry,
    *,
    lung_hu: float = -400.0,
    model_path: str | None = None,
    threshold: float | None = None,
) -> TaskResult:
    from services.segmentation.tasks import TaskResult

    xp, _ = namespace(vol)
    model = classifier.load(model_path)
    op = model.threshold if threshold is None else threshold
    an = analyse(vol, geo, lung_hu=lung_hu)
    lungs = an.lungs
    full = full_masks(lungs, vol, lung_hu=lung_hu)
    rows = [c.features for c in an.candidates]
    # host: a few hundred rows of features. ``own``: the main model; ``probs``: with the
    # large-candidate model's second opinion (``classifier.Large``; the same without one)
    own, probs = model.scores(rows)
    vetoed = [classifier.veto(r) for r in rows]
    if len(rows):
        keep = np.array([v is None for v in vetoed])
        own, probs = np.where(keep, own, 0.0), np.where(keep, probs, 0.0)
    # what would be reported and was cut by its crop is measured again in a grown crop (a few
    # candidates per scan: growing every crop costs ~40 % more time for the same ranking)
    for k in (int(j) for j in np.flatnonzero(probs >= op)):
        c2 = regrow(an, k)
        if c2 is None:
            continue
        an.candidates[k] = c2
        rows[k] = c2.features
        vetoed[k] = classifier.veto(c2.features)
        if vetoed[k] is not None:
            own[k] = probs[k] = 0.0
        else:
            o2, p2 = model.scores([c2.features])
            own[k], probs[k] = float(o2[0]), float(p2[0])
    findings: list[dict[str, Any]] = []
    nodules = xp.zeros(vol.shape, dtype=bool)
    picks = reported_picks(an.candidates, own, probs, op, geo.spacing)
    out_of_spec = abs(geo.spacing[0]) > MAX_SLICE_MM * 1.02
    for i, conf, source in picks:
        if out_of_spec:
            conf = min(conf, OUT_OF_SPEC_CONFIDENCE)
        c = an.candidates[i]
        cg = c.grid
        sub = Grid(
            tuple(  # type: ignore[arg-type]
                slice(
                    cg.box[a].start + b.start * cg.factors[a],
                    cg.box[a].start + b.stop * cg.factors[a],
                )
                for a, b in enumerate(c.box)
            ),
            cg.factors,
            cg.spacing,
            (c.mask.shape[0], c.mask.shape[1], c.mask.shape[2]),
        )
        lesion = sub.expand(xp.asarray(c.mask), vol.shape)
        f = c.features
        kind = finding_kind(f)
        subtype = _subtype(f)
        side = c.seed.side or ""
        nodules |= lesion
        if side in full and conf >= LUNG_MASK_CONFIDENCE and source == MAIN_MODEL:
            full[side] |= lesion
        m = measure(lesion, geo, kind, f"{kind} {len(findings) + 1}", vol)
        m.update(
            {
                "subtype": subtype,
                "location": side or None,
                "confidence": round(conf, 4),
                "confidence_source": source,
                "likely_benign": subtype == "calcified",
                "features": {k: float(v) for k, v in f.items()},
                "long_axis_mm": round(f["long_axis_mm"], 1),
                "short_axis_mm": round(f["short_axis_mm"], 1),
                "diameter_mm": round(f["diameter_mm"], 2),
            }
        )
        findings.append(m)
    for name in SIDES:
        if bool(host(full[name].any())):
            f2 = measure(full[name], geo, "lung", name)
            findings.append(
                {
                    k: f2[k]
                    for k in ("type", "label", "volume_ml", "centroid_mm", "bbox_mm", "voxels")
                }
            )
    masks: dict[str, Any] = {k: full[k] for k in SIDES}
    masks["nodules"] = nodules
    params: dict[str, Any] = {
        "lung_hu": lung_hu,
        "classifier": model.version,
        "operating_threshold": op,
        "candidates": float(len(an.candidates)),
        "vetoed_metal": float(sum(v == "metal" for v in vetoed)),
        "vetoed_dense_tube": float(sum(v == "dense_tube" for v in vetoed)),
        "out_of_spec_slices": float(out_of_spec),
        **{k: float(v) for k, v in lungs.notes.items()},
    }
    return TaskResult("chest_ct", masks, findings, params)
