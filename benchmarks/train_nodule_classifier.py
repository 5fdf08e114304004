"""Train the chest CT false-positive classifier, reproducibly, and write the versioned model.

    python benchmarks/train_nodule_classifier.py --seed 7 --cases 40 --val 12 --test 20

Cases come from a procedural generator (``--source synth``: tests/chest_synth.py; ``phantom``:
shared/phantoms/chest.py when present), seeds ``seed*1000 + i``: training ``i < cases``,
validation (reported) the next ``val``, test (reported, never used for any choice) the next
``test``. Each case runs the real pipeline up to the candidates
(``chest.pipeline.analyse``); a candidate is positive when its centroid lies inside a truth
lesion or within its radius. Logistic regression and gradient-boosted trees (scikit-learn)
are fitted on the training candidates and calibrated on out-of-fold predictions (5 folds by
case); the one with the higher out-of-fold sensitivity for nodules >= 6 mm and masses at
``--max-fp`` false positives per scan is kept (or ``--kind``), and its operating threshold is
set there. ``--large-from-mm`` adds a second model for large candidates (``fit_large``) and
sets the threshold on the two combined. The model is written as JSON (coefficients or trees,
feature names, transform, threshold, seeds, metrics): no pickle.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from services.segmentation.chest import classifier as clf_mod
from services.segmentation.chest.evaluate import evaluate_chest, summarise
from services.segmentation.chest.features import FEATURES
from services.segmentation.chest.lungs import SIDES, full_masks
from services.segmentation.chest.pipeline import (
    Analysis,
    analyse,
    finding_kind,
    reported_picks,
)
from services.segmentation.tasks import Geometry
from shared.evaluation.metrics import grown_labels, lesion_at

LOG_FEATURES = {
    "volume_ml",
    "diameter_mm",
    "long_axis_mm",
    "short_axis_mm",
    "z_extent_mm",
    "slices",
    "dot",
    "contrast_hu",
    "dist_pleura_mm",
    "dist_hilum_mm",
    "sigma_mm",
}
KINDS = (
    ("solid", 4.0, 30.0, 5),
    ("juxtavascular", 5.0, 15.0, 2),
    ("juxtapleural", 5.0, 25.0, 2),
    ("ground_glass", 6.0, 20.0, 1),
    ("part_solid", 8.0, 25.0, 1),
    ("calcified", 3.0, 8.0, 1),
)


def synth_case(seed: int, quick: bool = False) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    from tests import chest_synth as cs

    rng = np.random.default_rng(seed)
    lesions: list[tuple[str, float]] = []
    if rng.random() > 0.25:  # a quarter of the scans are normal
        weights = np.array([k[3] for k in KINDS], float)
        for _ in range(int(rng.integers(2, 6))):
            kind, lo, hi, _w = KINDS[int(rng.choice(len(KINDS), p=weights / weights.sum()))]
            lesions.append((kind, float(np.round(rng.uniform(lo, hi), 1))))
        if rng.random() < 0.3:
            lesions.append(("mass", float(np.round(rng.uniform(30, 60), 1))))
    size = 160 if quick else int(rng.choice([192, 224, 256]))
    case = cs.chest(
        seed=seed,
        size=size,
        fov_mm=float(rng.uniform(330, 380)),
        thickness=float(rng.choice([1.0, 1.25, 2.0, 2.5, 3.0, 5.0])),
        z_mm=float(rng.uniform(210, 260)),
        junction_mm=float(rng.choice([0.0, 0.3, 0.8, 1.5])),
        table=bool(rng.random() < 0.8),
        contrast=bool(rng.random() < 0.5),
        noise=float(rng.uniform(12, 45)),
        lesions=tuple(lesions),
    )
    geo = Geometry(case.spacing, case.origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    truth = {
        "lung_left": case.truth["lung_left"],
        "lung_right": case.truth["lung_right"],
        "lesion_labels": case.truth["lesions"],
        "geometry": geo,
        "lesions": [
            {
                "centre_mm": list(les.centre_mm),
                "diameter_mm": les.diameter_mm,
                "kind": les.kind,
                "label": les.label,
            }
            for les in case.lesions
        ],
    }
    return case.vol, geo, truth


def phantom_case(seed: int, quick: bool = False) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    """A case of the procedural phantom (shared/phantoms, seeds below 30000: the quality
    benchmark holds out 30000 and up): its random lesion mix, or for a fifth of the seeds the
    lesion-free twin; prepared as the service prepares a chest CT (the preprocess chain,
    int16 HU)."""
    from services.preprocess.core import DEFAULT_CHAINS, apply_step, chain_for
    from shared.phantoms import chest_case

    if seed >= 30000:
        raise ValueError("phantom seeds >= 30000 are the quality benchmark's held-out set")
    import os

    cached = os.environ.get("CHEST_VOLUMES")  # prepared volumes of earlier runs (same seeds)
    if cached and (Path(cached) / str(seed) / "meta.json").exists():
        return _cached_phantom(Path(cached) / str(seed))
    rng = np.random.default_rng(seed)
    case = chest_case(
        seed,
        size=192 if quick else int(rng.choice([256, 320, 384, 512], p=[0.3, 0.3, 0.25, 0.15])),
        thickness_mm=float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0])),
        contrast=bool(rng.random() < 0.5),
        normal=bool(rng.random() < 0.2),
        tree_points=2000 if quick else None,
    )
    img: Any = case.hu.astype(np.float32)
    spacing = tuple(case.spacing)
    for step in chain_for("CT", "CHEST", DEFAULT_CHAINS):
        img, spacing = apply_step(img, step, spacing)
    vol = np.rint(np.asarray(img)).clip(-32768, 32767).astype(np.int16).astype(np.float32)
    geo = Geometry(spacing, tuple(case.origin), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # type: ignore[arg-type]
    truth = _truth(
        case.truth["lung_left"], case.truth["lung_right"], case.truth["lesions"], geo, case.lesions
    )
    return vol, geo, truth


def _cached_phantom(d: Path) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    """A prepared phantom volume saved by an earlier run (``vol.npy`` int16 HU, ``lesions.npy``
    labels, ``lungs.npz``, ``meta.json``: spacing, origin, lesion records)."""
    meta = json.loads((d / "meta.json").read_text())
    lungs = np.load(d / "lungs.npz")
    geo = Geometry(tuple(meta["spacing"]), tuple(meta["origin"]), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    truth = _truth(lungs["left"], lungs["right"], np.load(d / "lesions.npy"), geo, meta["lesions"])
    return np.load(d / "vol.npy").astype(np.float32), geo, truth


def _truth(
    left: np.ndarray,
    right: np.ndarray,
    labels: np.ndarray,
    geo: Geometry,
    lesions: list[dict[str, Any]],
) -> dict[str, Any]:
    """The truth record the candidate matcher reads, from a fresh or a cached phantom."""
    return {
        "lung_left": left,
        "lung_right": right,
        "lesion_labels": labels,
        "geometry": geo,
        "lesions": [
            {
                "centre_mm": les.get("centroid_mm", les["center_mm"]),
                "diameter_mm": les.get("equivalent_diameter_mm") or les.get("diameter_mm"),
                "kind": les["kind"],
                "attachment": les.get("attachment"),
                "label": les["label"],
            }
            for les in lesions
        ],
    }


def cartoon_case(seed: int, quick: bool = False) -> tuple[np.ndarray, Geometry, dict[str, Any]]:
    """The demo's phantom (shared/dicom/phantom.py: ellipses, cylinders, spheres), read back
    from its DICOM files and smoothed as the service does: the demo and the end-to-end tests
    run on it, so the classifier must know it too."""
    import tempfile

    import pydicom
    import scipy.ndimage as ndi

    from shared.dicom import phantom

    rng = np.random.default_rng(seed)
    nodules = tuple(
        float(rng.choice([5.0, 6.0, 8.0, 10.0, 12.0, 15.0])) for _ in range(rng.integers(0, 5))
    )
    wall = tuple(float(rng.choice([6.0, 9.0, 12.0])) for _ in range(rng.integers(0, 3)))
    with tempfile.TemporaryDirectory() as tmp:
        ph = phantom.chest_ct(
            Path(tmp) / "c",
            seed=seed,
            size=int(rng.choice([192, 256, 384, 512])) if not quick else 160,
            slices=int(rng.integers(24, 61)),
            thickness=float(rng.choice([1.0, 2.0, 2.5, 3.0])),
            nodules_mm=nodules,
            wall_nodules_mm=wall,
        )
        vol = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float32) - 1024 for f in ph.files])
    vol = ndi.gaussian_filter(vol, sigma=(0.0, 0.7, 0.7))
    geo = Geometry(ph.spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels, n = ndi.label(ph.truth["nodules"])
    lesions = []
    for i in range(1, n + 1):
        m = labels == i
        c = np.argwhere(m).mean(axis=0)
        d = (6 * m.sum() * geo.voxel_ml * 1000 / np.pi) ** (1 / 3)
        lesions.append(
            {
                "centre_mm": list(geo.to_patient((float(c[0]), float(c[1]), float(c[2])))),
                "diameter_mm": float(d),
                "kind": "solid",
                "label": i,
            }
        )
    truth = {
        "lung_left": ph.truth["lung_left"],
        "lung_right": ph.truth["lung_right"],
        "lesion_labels": labels,
        "geometry": geo,
        "lesions": lesions,
    }
    return vol, geo, truth


def label_candidates(an: Analysis, geo: Geometry, truth: dict[str, Any]) -> list[int]:
    """Index of the truth lesion each candidate sits on (-1: none), by the quality
    benchmark's rule (``shared.evaluation.metrics.lesion_at``)."""
    grown = grown_labels(truth["lesion_labels"])
    lesions = [
        {
            "label": les["label"],
            "diameter_mm": les["diameter_mm"],
            "centroid_voxel": geo.to_index(les["centre_mm"]),
        }
        for les in truth["lesions"]
    ]
    index = {int(les["label"]): k for k, les in enumerate(truth["lesions"])}
    out = []
    for c in an.candidates:
        lab = lesion_at(c.centroid, lesions, geo.spacing, grown)
        out.append(-1 if lab is None else index[lab])
    return out


def run_case(s: int, source: str, quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    make = {"phantom": phantom_case, "cartoon": cartoon_case}.get(source, synth_case)
    vol, geo, truth = make(s, quick)
    t1 = time.perf_counter()
    an = analyse(vol, geo)
    t2 = time.perf_counter()
    full = full_masks(an.lungs, vol)
    hits = label_candidates(an, geo, truth)
    print(
        f"  seed {s}: {len(an.candidates)} candidates, {sum(h >= 0 for h in hits)} on lesions, "
        f"{len(truth['lesions'])} lesions, gen {t1 - t0:.1f}s, analyse {t2 - t1:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "seed": s,
        "features": [c.features for c in an.candidates],
        "hits": hits,
        "centroids": [list(geo.to_patient(c.centroid)) for c in an.candidates],
        "truth": {"lesions": truth["lesions"]},
        "dice": {
            side: float(
                2 * (full[side] & truth[side]).sum() / max(full[side].sum() + truth[side].sum(), 1)
            )
            for side in SIDES
        },
        "seconds": round(t2 - t1, 2),
    }


def run_cases(
    seeds: list[int], source: str, quick: bool, cache: Path | None, workers: int = 1
) -> list[dict[str, Any]]:
    """One JSON per case in ``cache`` (reused when present: restarts and parallel runs)."""

    def path(s: int) -> Path | None:
        return cache / f"{source}-{'q' if quick else 'f'}-{s}.json" if cache else None

    todo = [s for s in seeds if not ((p := path(s)) and p.exists())]
    if todo:
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                rows = pool.starmap(run_case, [(s, source, quick) for s in todo])
        else:
            rows = [run_case(s, source, quick) for s in todo]
        for r in rows:
            if (p := path(r["seed"])) is not None:
                p.write_text(json.dumps(r))
        done = {r["seed"]: r for r in rows}
    else:
        done = {}
    out = []
    for s in seeds:
        p = path(s)
        out.append(without_vetoed(done[s] if s in done else json.loads(p.read_text())))  # type: ignore[union-attr]
    return out


def without_vetoed(case: dict[str, Any]) -> dict[str, Any]:
    """The case without the candidates the pipeline never reports (``classifier.veto``: metal,
    dense tubes): the classifier neither learns from them nor is scored on them."""
    keep = [i for i, f in enumerate(case["features"]) if clf_mod.veto(f) is None]
    out = dict(case)
    for k in ("features", "hits", "centroids"):
        out[k] = [case[k][i] for i in keep]
    return out


def reported(
    case: dict[str, Any], own: np.ndarray, combined: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    """What the pipeline reports, by its own rule (``pipeline.reported_picks`` on the cached
    candidates, centroids in mm): the main model's findings (each group's largest member
    above the point, at its leader's confidence), then what only the large-candidate model's
    second opinion raises (``combined`` where ``own`` is under the threshold), away from every
    main finding. Only the pipeline's regrowth of cut candidates is not replayed here."""
    shim = [
        SimpleNamespace(centroid=c, features=f)
        for c, f in zip(case["centroids"], case["features"], strict=True)
    ]
    picks = reported_picks(shim, own, combined, threshold, (1.0, 1.0, 1.0))  # type: ignore[arg-type]
    return [
        {
            "type": finding_kind(case["features"][i]),
            "centroid_mm": case["centroids"][i],
            "confidence": conf,
        }
        for i, conf, _source in picks
    ]


class _Fixed:
    """Stands for a model whose probabilities are already known (out-of-fold); ``combined``:
    with a large-candidate model's second opinion (``with_large``)."""

    def __init__(
        self, probs: dict[int, np.ndarray], combined: dict[int, np.ndarray] | None = None
    ) -> None:
        self.probs = probs
        self.combined = combined

    def predict_case(self, case: dict[str, Any]) -> np.ndarray:
        return (self.combined or self.probs)[case["seed"]]

    def own_case(self, case: dict[str, Any]) -> np.ndarray:
        return self.probs[case["seed"]]


def evaluate(cases: list[dict[str, Any]], model: Any, threshold: float) -> dict[str, float]:
    per = []
    for c in cases:
        if isinstance(model, _Fixed):
            own, combined = model.own_case(c), model.predict_case(c)
        else:
            own, combined = model.predict_own(c["features"]), model.predict(c["features"])
        r = evaluate_chest(c["truth"], {"findings": reported(c, own, combined, threshold)})
        r["dice_lung_left"] = c["dice"]["lung_left"]
        r["dice_lung_right"] = c["dice"]["lung_right"]
        per.append(r)
    return summarise(per)


GBT: dict[str, Any] = {
    "n_estimators": 300,
    "max_depth": 3,
    "learning_rate": 0.06,
    "subsample": 0.8,
    "min_samples_leaf": 5,
}


def calibrate(cases: list[dict[str, Any]], model: _Fixed) -> dict[str, list[float]]:
    """Isotonic regression of the labels on out-of-fold probabilities, as a monotone table
    (``x`` raw, ``y`` calibrated; linear interpolation between, clamped at the ends)."""
    from sklearn.isotonic import IsotonicRegression

    p = np.concatenate([model.predict_case(c) for c in cases if c["features"]])
    yy = np.concatenate(
        [np.array([h >= 0 for h in c["hits"]], float) for c in cases if c["features"]]
    )
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, yy)
    xs = np.r_[0.0, iso.X_thresholds_, 1.0]
    ys = np.r_[iso.predict([0.0])[0], iso.y_thresholds_, iso.predict([1.0])[0]]
    xs, idx = np.unique(xs, return_index=True)
    return centre_plateaus(
        {"x": [round(float(v), 6) for v in xs], "y": [round(float(v), 6) for v in ys[idx]]}
    )


CENTRE_BELOW = 0.1  # calibrated values under which plateaus become ramps (the operating region)


def centre_plateaus(
    cal: dict[str, list[float]], below: float = CENTRE_BELOW
) -> dict[str, list[float]]:
    """The isotonic table with each plateau under ``below`` replaced by one knot at its middle
    (centred isotonic regression): between knots the table interpolates, so candidates that
    the plateau tied keep their raw order there, where the operating point is chosen. Values
    from ``below`` up (the alert rules' region) are left as they are."""
    xs, ys = cal["x"], cal["y"]
    out_x: list[float] = []
    out_y: list[float] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and ys[j + 1] == ys[i]:
            j += 1
        if ys[i] < below and j > i:
            out_x.append(round((xs[i] + xs[j]) / 2, 6))
            out_y.append(ys[i])
        else:
            out_x += xs[i : j + 1]
            out_y += ys[i : j + 1]
        i = j + 1
    return {"x": out_x, "y": out_y}


def sweep(cases: list[dict[str, Any]], model: Any) -> list[dict[str, float]]:
    out = []
    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        m = evaluate(cases, model, t)
        out.append(
            {
                "threshold": t,
                "sensitivity_6mm_plus_and_masses": m["sensitivity_6mm_plus_and_masses"],
                "fp_per_scan": m["fp_per_scan"],
            }
        )
    return out


def recall_report(
    cases: list[dict[str, Any]], model: _Fixed, threshold: float
) -> dict[str, dict[str, float]]:
    """Candidate stage against classification, per lesion kind and attachment (lesions >= 6 mm
    and masses): how many have a candidate inside them at all, how many a candidate at or
    above the operating threshold, and the median of their best (out-of-fold) probability."""
    rows: dict[str, list[tuple[bool, float]]] = {}
    for c in cases:
        probs = model.predict_case(c)
        for k, les in enumerate(c["truth"]["lesions"]):
            if les.get("kind") == "calcified" or les["diameter_mm"] < 6.0:
                continue
            kind = les.get("kind", "solid")
            att = les.get("attachment") or "-"
            key = f"{kind}/{att}" if kind in ("solid", "mass") else kind
            on = [float(probs[i]) for i, h in enumerate(c["hits"]) if h == k]
            rows.setdefault(key, []).append((bool(on), max(on, default=0.0)))
    return {
        key: {
            "lesions": len(v),
            "with_candidate": sum(h for h, _ in v),
            "at_threshold": sum(p >= threshold for _, p in v),
            "median_best_probability": round(float(np.median([p for _, p in v])), 3),
        }
        for key, v in sorted(rows.items())
    }


def choose_threshold(
    cases: list[dict[str, Any]], model: Any, max_fp: float
) -> tuple[float, dict[str, float]]:
    best = (1.0, evaluate(cases, model, 1.0))
    for t in np.linspace(0.05, 0.95, 37):
        m = evaluate(cases, model, float(t))
        if m["fp_per_scan"] <= max_fp:
            key = (np.nan_to_num(m["sensitivity_6mm_plus_and_masses"]), -t)
            bkey = (np.nan_to_num(best[1]["sensitivity_6mm_plus_and_masses"]), -best[0])
            if key > bkey:
                best = (float(t), m)
    return best


def out_of_fold(
    cases: list[dict[str, Any]],
    others: list[dict[str, Any]],
    fit: Any,
    folds: int = 5,
) -> _Fixed:
    """Probabilities for ``cases`` from models fitted without them (``folds`` folds by case;
    ``others`` always train). ``fit(x, y)`` returns a predict_proba-like callable."""
    probs: dict[int, np.ndarray] = {}
    for k in range(folds):
        held = [c for i, c in enumerate(cases) if i % folds == k]
        rest = [c for i, c in enumerate(cases) if i % folds != k] + others
        x, y = matrix(rest)
        predict = fit(x, y, lesion_weights(rest))
        for c in held:
            if c["features"]:
                xc, _ = matrix([c])
                probs[c["seed"]] = predict(xc)
            else:
                probs[c["seed"]] = np.zeros(0)
    return _Fixed(probs)


def lesion_weights(cases: list[dict[str, Any]]) -> np.ndarray:
    """Sample weights in ``matrix`` order: every lesion counts the same, however many of its
    candidates hit it (a mass draws a dozen seeds, a ground-glass nodule one or two): each
    positive weighs ``1 / (candidates on its lesion)``, rescaled so the positives keep their
    total weight (the class balance, hence the calibration, is unchanged); negatives 1."""
    w = []
    for c in cases:
        counts: dict[int, int] = {}
        for h in c["hits"]:
            if h >= 0:
                counts[h] = counts.get(h, 0) + 1
        w += [1.0 / counts[h] if h >= 0 else -1.0 for h in c["hits"]]
    out = np.array(w, dtype=np.float64)
    pos = out > 0
    if pos.any():
        out[pos] *= pos.sum() / out[pos].sum()
    out[~pos] = 1.0
    return out


def matrix(cases: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    feats = [f for c in cases for f in c["features"]]
    y = np.array([h >= 0 for c in cases for h in c["hits"]], dtype=int)
    x = np.array([[f[k] for k in FEATURES] for f in feats], dtype=np.float64)
    lg = np.array([k in LOG_FEATURES for k in FEATURES])
    x[:, lg] = np.sign(x[:, lg]) * np.log1p(np.abs(x[:, lg]))
    return x, y


def exported_trees(gb: Any, xs: np.ndarray, prior: float) -> dict[str, Any]:
    """A fitted GradientBoostingClassifier as the model file's trees; checked to reproduce
    scikit-learn's probabilities on its (standardised) training matrix ``xs``. ``prior``: the
    (weighted) share of positives its initial estimate starts from."""
    trees = []
    for est in gb.estimators_[:, 0]:
        t = est.tree_
        trees.append(
            {
                "left": t.children_left.tolist(),
                "right": t.children_right.tolist(),
                "feature": t.feature.tolist(),
                "threshold": t.threshold.tolist(),
                "value": t.value[:, 0, 0].tolist(),
            }
        )
    out = {
        "kind": "gbt",
        "trees": trees,
        "learning_rate": gb.learning_rate,
        "init": float(np.log(prior / (1 - prior))),
    }
    check = clf_mod.from_dict(
        {
            **out,
            "features": list(FEATURES),
            "log": [False] * len(FEATURES),
            "mean": [0.0] * len(FEATURES),
            "scale": [1.0] * len(FEATURES),
            "version": "check",
            "threshold": 0.5,
        }
    )
    raw = check.init + sum(check.learning_rate * clf_mod._tree_value(t, xs) for t in check.trees)
    mine = 1.0 / (1.0 + np.exp(-np.clip(raw, -50, 50)))
    ref = gb.predict_proba(xs)[:, 1]
    assert np.allclose(ref, mine, atol=1e-9), float(np.abs(ref - mine).max())
    return out


LARGE_GBT: dict[str, Any] = {
    "n_estimators": 200,
    "max_depth": 3,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "min_samples_leaf": 5,
}
LARGE_POSITIVE_SHARE = 5.0  # positives weigh (negatives / positives) / this, in all


def large_only(cases: list[dict[str, Any]], from_mm: float) -> list[dict[str, Any]]:
    """The cases with only their candidates of ``from_mm`` diameter or more."""
    out = []
    for c in cases:
        keep = [i for i, f in enumerate(c["features"]) if f["diameter_mm"] >= from_mm]
        d = dict(c)
        for k in ("features", "hits", "centroids"):
            d[k] = [c[k][i] for i in keep]
        out.append(d)
    return out


def fit_large(
    cases: list[dict[str, Any]], from_mm: float, cap: float, seed: int, folds: int = 5
) -> tuple[dict[str, Any], _Fixed] | None:
    """The second model for large candidates (``classifier.Large``): gradient-boosted trees on
    the candidates of ``from_mm`` or more of every training case, positives weighted up to a
    fifth of the negatives' total (a mass has a few large candidates among dozens of pieces of
    heart border and chest wall); calibrated by isotonic regression of its out-of-fold
    probabilities (``folds`` folds by case, every case). Returns the file's ``large`` entry and
    the calibrated out-of-fold probabilities of each case's large candidates (None when the
    training cases have too few large positives)."""
    from sklearn.ensemble import GradientBoostingClassifier

    seeds = [c["seed"] for c in cases]
    assert len(set(seeds)) == len(seeds), "out-of-fold probabilities are keyed by case seed"
    big = large_only(cases, from_mm)
    x, y = matrix(big)
    if int(y.sum()) < 10 or int((1 - y).sum()) < 10:
        return None

    def fit(xf: np.ndarray, yf: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        mu, sd = xf.mean(axis=0), xf.std(axis=0)
        sd[sd < 1e-9] = 1.0
        w = np.where(yf == 1, (len(yf) - yf.sum()) / max(1, yf.sum()) / LARGE_POSITIVE_SHARE, 1.0)
        est = GradientBoostingClassifier(**LARGE_GBT, random_state=seed)
        est.fit((xf - mu) / sd, yf, sample_weight=w)
        return est, mu, sd

    probs: dict[int, np.ndarray] = {}
    for k in range(folds):
        held = [c for i, c in enumerate(big) if i % folds == k]
        rest = [c for i, c in enumerate(big) if i % folds != k]
        est, mu, sd = fit(*matrix(rest))
        for c in held:
            probs[c["seed"]] = (
                est.predict_proba((matrix([c])[0] - mu) / sd)[:, 1]
                if c["features"]
                else np.zeros(0)
            )
    oof = _Fixed(probs)
    cal = calibrate(big, oof)
    est, mu, sd = fit(x, y)
    trees = exported_trees(est, (x - mu) / sd, float(est.init_.class_prior_[1]))
    model = {
        "version": f"large-gbt-s{seed}-from{from_mm:g}mm",
        "features": list(FEATURES),
        "log": [k in LOG_FEATURES for k in FEATURES],
        "mean": mu.tolist(),
        "scale": sd.tolist(),
        **trees,
        "threshold": 0.0,  # the main model's operating point applies
        "calibration": cal,
        "meta": {
            "gbt_params": LARGE_GBT,
            "train_candidates": len(y),
            "train_positives": int(y.sum()),
            "sample_weights": f"positives weigh (negatives / positives) / {LARGE_POSITIVE_SHARE}",
            "calibration": f"isotonic regression of the out-of-fold probabilities ({folds} folds "
            "by case, all training cases)",
        },
    }
    oof_cal = _Fixed(
        {k: np.interp(v, cal["x"], cal["y"]) if v.size else v for k, v in probs.items()}
    )
    return {"from_mm": from_mm, "max_confidence": cap, "model": model}, oof_cal


def with_large(
    cases: list[dict[str, Any]], main: _Fixed, large: _Fixed, from_mm: float, cap: float
) -> _Fixed:
    """Out-of-fold probabilities as ``classifier.Model.predict`` combines them: a large
    candidate gets the higher of the main model's and the large model's (capped at ``cap``);
    the main model's own stay ``own_case``."""
    out = {}
    for c in cases:
        p = np.array(main.own_case(c), dtype=np.float64, copy=True)
        big = np.array([f["diameter_mm"] >= from_mm for f in c["features"]], dtype=bool)
        if big.any():
            p[big] = np.maximum(p[big], np.minimum(large.predict_case(c), cap))
        out[c["seed"]] = p
    return _Fixed(main.probs, out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--val", type=int, default=12)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--source", choices=["synth", "phantom", "cartoon"], default="synth")
    ap.add_argument("--max-fp", type=float, default=1.0, help="operating point: FP per scan")
    ap.add_argument(
        "--threshold", type=float, help="override the operating threshold (reported as such)"
    )
    ap.add_argument(
        "--kind",
        choices=["auto", "logistic", "gbt"],
        default="auto",
        help="the model kind shipped (auto: the higher out-of-fold sensitivity at --max-fp)",
    )
    ap.add_argument(
        "--threshold-why",
        help="how the override was chosen (kept in the model's meta as operating_point.why)",
    )
    ap.add_argument("--cache", type=Path, help="folder: one JSON of candidate features per case")
    ap.add_argument("--workers", type=int, default=1, help="cases generated in parallel")
    ap.add_argument(
        "--extra-train",
        type=Path,
        nargs="*",
        help="folders of cached cases (other seeds or sources) added to the training split only",
    )
    ap.add_argument(
        "--large-from-mm",
        type=float,
        default=0.0,
        help="also train a second model on the candidates of this diameter or more (0: none)",
    )
    ap.add_argument(
        "--large-cap",
        type=float,
        default=0.5,
        help="the highest confidence the large-candidate model may give (below the paging "
        "rules' 0.6: what only it finds goes to the worklist)",
    )
    ap.add_argument("--out", type=Path, default=clf_mod.MODEL_PATH)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    base = args.seed * 1000
    splits = {
        "train": list(range(base, base + args.cases)),
        "val": list(range(base + args.cases, base + args.cases + args.val)),
        "test": list(range(base + args.cases + args.val, base + args.cases + args.val + args.test)),
    }
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    data: dict[str, list[dict[str, Any]]] = {}
    for name, seeds in splits.items():
        print(f"{name}: {len(seeds)} cases", file=sys.stderr)
        data[name] = run_cases(seeds, args.source, args.quick, args.cache, args.workers)
        for row in data[name]:
            row["source"] = args.source
    extra: list[dict[str, Any]] = []
    if args.extra_train:
        held = set(splits["val"]) | set(splits["test"])
        for f in sorted(p for d in args.extra_train for p in d.glob("*-f-*.json")):
            row = without_vetoed(json.loads(f.read_text()))
            row["source"] = f.name.split("-")[0]
            if row["seed"] not in held and row["seed"] < 30000:
                extra.append(row)
        print(f"extra training cases: {len(extra)}", file=sys.stderr)
    x, y = matrix(data["train"] + extra)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    xs = (x - mean) / scale
    common = {
        "features": list(FEATURES),
        "log": [k in LOG_FEATURES for k in FEATURES],
        "mean": mean.tolist(),
        "scale": scale.tolist(),
    }

    def make(kind: str) -> Any:
        if kind == "logistic":
            return LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000)
        return GradientBoostingClassifier(**GBT, random_state=args.seed)

    sw = lesion_weights(data["train"] + extra)
    lr = make("logistic")
    lr.fit(xs, y, sample_weight=sw)
    models: dict[str, dict[str, Any]] = {
        "logistic": {
            **common,
            "kind": "logistic",
            "coef": lr.coef_[0].tolist(),
            "intercept": float(lr.intercept_[0]),
        },
    }
    gb = make("gbt")
    gb.fit(xs, y, sample_weight=sw)
    models["gbt"] = {**common, **exported_trees(gb, xs, float(y.mean()))}
    # calibration and operating point: out-of-fold over the phantom training cases (the
    # validation split is small); the validation split is reported at that threshold
    target = [c for c in data["train"] + extra if c.get("source", args.source) == args.source]
    target_seeds = {c["seed"] for c in target}
    others = [c for c in data["train"] + extra if c["seed"] not in target_seeds]

    def fitter(kind: str) -> Any:
        def fit(x: np.ndarray, yy: np.ndarray, ww: np.ndarray) -> Any:
            mu, sd = x.mean(axis=0), x.std(axis=0)
            sd[sd < 1e-9] = 1.0
            est = make(kind)
            est.fit((x - mu) / sd, yy, sample_weight=ww)
            return lambda xc: est.predict_proba((xc - mu) / sd)[:, 1]

        return fit

    report: dict[str, Any] = {}
    best_name, best = None, None
    calibrations: dict[str, dict[str, list[float]]] = {}
    oofs: dict[str, _Fixed] = {}
    for name, d in models.items():
        oof = out_of_fold(target, others, fitter(name))
        cal = calibrate(target, oof)
        calibrations[name] = cal
        oof_cal = _Fixed(
            {k: np.interp(v, cal["x"], cal["y"]) if v.size else v for k, v in oof.probs.items()}
        )
        oofs[name] = oof_cal
        t, cv = choose_threshold(target, oof_cal, args.max_fp)
        m = clf_mod.from_dict({**d, "version": "tmp", "threshold": t, "calibration": cal})
        val = evaluate(data["val"], m, t) if data["val"] else {}
        report[name] = {
            "threshold": round(t, 3),
            "out_of_fold": cv,
            "out_of_fold_by_kind": recall_report(target, oof_cal, t),
            "out_of_fold_sweep": sweep(target, oof_cal),
            "validation": val,
        }
        score = (np.nan_to_num(cv["sensitivity_6mm_plus_and_masses"]), -cv["fp_per_scan"])
        if args.kind not in ("auto", name):  # reported, not a choice
            continue
        if best is None or score > best[0]:
            best_name, best = name, (score, t)
    assert best_name is not None and best is not None
    threshold = best[1]
    models[best_name]["calibration"] = calibrations[best_name]
    oof_best = oofs[best_name]
    if args.large_from_mm > 0:
        fitted = fit_large(data["train"] + extra, args.large_from_mm, args.large_cap, args.seed)
        if fitted is None:
            print("large model: too few large candidates, none trained", file=sys.stderr)
        else:
            large, large_oof = fitted
            models[best_name]["large"] = large
            oof_best = with_large(target, oof_best, large_oof, args.large_from_mm, args.large_cap)
            threshold, cv = choose_threshold(target, oof_best, args.max_fp)
            report["with_large"] = {
                "threshold": round(threshold, 3),
                "out_of_fold": cv,
                "out_of_fold_by_kind": recall_report(target, oof_best, threshold),
                "out_of_fold_sweep": sweep(target, oof_best),
            }
    if args.threshold is not None:  # a documented override, its out-of-fold figures reported
        threshold = args.threshold
        report["override"] = {
            "threshold": threshold,
            "out_of_fold": evaluate(target, oof_best, threshold),
            "validation": evaluate(
                data["val"],
                clf_mod.from_dict({**models[best_name], "version": "tmp", "threshold": threshold}),
                threshold,
            )
            if data["val"]
            else {},
        }
    final = clf_mod.from_dict({**models[best_name], "version": "tmp", "threshold": threshold})
    test = evaluate(data["test"], final, threshold)
    version = f"{best_name}-s{args.seed}-n{args.cases}" + (
        "-large" if "large" in models[best_name] else ""
    )
    out = {
        "version": version,
        **models[best_name],
        "threshold": round(threshold, 4),
        "meta": {
            "trained": time.strftime("%Y-%m-%d"),
            "source": args.source,
            "seed": args.seed,
            "train_seeds": [splits["train"][0], splits["train"][-1]],
            "validation_seeds": [splits["val"][0], splits["val"][-1]] if splits["val"] else [],
            "test_seeds": [splits["test"][0], splits["test"][-1]] if splits["test"] else [],
            "extra_train_cases": {
                src: len([r for r in extra if r["source"] == src])
                for src in sorted({r["source"] for r in extra})
            },
            "extra_train_seed_ranges": {
                src: [
                    min(r["seed"] for r in extra if r["source"] == src),
                    max(r["seed"] for r in extra if r["source"] == src),
                ]
                for src in sorted({r["source"] for r in extra})
            },
            "gbt_params": GBT,
            "calibration": "isotonic regression of the out-of-fold probabilities (5 folds by "
            "case) on the phantom training cases; threshold chosen on the calibrated ones",
            "sample_weights": "lesion-balanced: a positive weighs 1 / (candidates on its "
            "lesion), positives' total kept",
            "train_candidates": len(y),
            "train_positives": int(y.sum()),
            "max_fp_per_scan": args.max_fp,
            "candidates": report,
            "test": test,
            "command": "python benchmarks/train_nodule_classifier.py " + shlex.join(sys.argv[1:]),
            "operating_point": {
                "threshold": round(threshold, 4),
                "why": args.threshold_why
                if args.threshold is not None
                else "out of fold on the phantom training cases: the highest sensitivity for "
                f"nodules >= 6 mm and masses at <= {args.max_fp} false positives per scan",
            },
        },
    }
    args.out.write_text(json.dumps(out, indent=None, separators=(",", ":")) + "\n")
    print(
        json.dumps(
            {
                "model": version,
                "threshold": round(threshold, 3),
                "validation": report,
                "test": test,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
