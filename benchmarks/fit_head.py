"""Fit the head-bleed models on procedural head CTs and evaluate them on seeds they never saw.
Writes ``services/segmentation/models/head_bleed.json`` (coefficients, feature
standardisation, operating threshold, training seeds, metrics) — no pickle.

    PYTHONPATH=. .venv/bin/python benchmarks/fit_head.py [--train 60] [--test 20] [--jobs 2]
                                                         [--cache out/head_fit]

Cases are built like the quality benchmark's (``benchmarks/quality.py``): 512² (every fifth
256²), slice thickness cycling 5 / 2.5 / 5 / 1.25 / 3 mm, one in four normal, and read through
the service's preprocess chain; one case in three has dense venous sinuses and falx (see
``plan``). Training seeds start at 10000, held-out seeds at 20000; the
quality benchmark's held-out seeds (30000+) are never touched here.

Two models, both logistic regression by iteratively reweighted least squares with a small L2
penalty:

* confidence: is a candidate blood? Candidates are labelled positive when >= 30 % of their
  voxels lie in a truth bleed (truth block-averaged to the analysis grid).
* subtype: for candidates along the inner table that are blood, epidural (lens) versus
  subdural (crescent), from the collection's shape: depth below the inner table against its
  extent along it, how much of its footprint is deep (lens: thick centre, thin rim;
  crescent: flat), in-plane solidity.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.segmentation import head  # noqa: E402
from services.segmentation.tasks import Geometry  # noqa: E402
from shared.phantoms.head import head_case  # noqa: E402

TRAIN_BASE, TEST_BASE = 10_000, 20_000
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
THICK = (5.0, 2.5, 5.0, 1.25, 3.0)


SIZE: int | None = None  # --size: every case at this matrix (the working grid is ~0.9 mm anyway)


def plan(seed: int) -> dict[str, Any]:
    i = seed % 20
    r = np.random.default_rng([seed, 7])
    # one case in three with the densest venous sinuses and falx seen in practice
    # (haemoconcentration: sinuses at 66-80 HU, as dense as acute blood), beyond the
    # phantom's own draw (55-70 / 44-58): the model must not learn "dense = blood"
    dense = r.random() < 1 / 3
    anatomy = (
        {"sinus_hu": float(r.uniform(66, 80)), "falx_hu": float(r.uniform(55, 66))} if dense else {}
    )
    return {
        "seed": seed,
        "size": SIZE or (512 if i % 5 else 256),
        "thickness_mm": THICK[i % len(THICK)],
        "normal": i % 4 == 3,
        "anatomy": anatomy,
    }


def analyse(seed: int, **kw: Any) -> tuple[Any, Any, dict[str, Any]]:
    from benchmarks.quality import prepared

    p = plan(seed)
    case = head_case(
        seed,
        size=p["size"],
        thickness_mm=p["thickness_mm"],
        bleed="none" if p["normal"] else "random",
        anatomy=p["anatomy"],
    )
    vol = prepared(case.hu, case.spacing, "head")
    geo = Geometry(case.spacing, (0.0, 0.0, 0.0), IDENTITY)
    return case, head.head_ct(vol, geo, **kw), p


BOOTSTRAP = Path(tempfile.gettempdir()) / f"head_bleed_bootstrap_{head.VERSION}.json"


def write_bootstrap() -> None:
    """A neutral model over the current features (every candidate scores 0.5): collecting
    candidates never depends on the shipped model, whose features may be older."""
    n = len(head.FEATURES)
    model = {
        "version": "bootstrap",
        "features": list(head.FEATURES),
        "coef": [0.0] * n,
        "intercept": 0.0,
        "mean": [0.0] * n,
        "std": [1.0] * n,
        "threshold": 0.0,
    }
    BOOTSTRAP.write_text(json.dumps(model))


def candidates(seed: int) -> list[dict[str, Any]]:
    """Every candidate of the case (threshold 0), with its truth: ``y`` (blood or not) and
    ``kind`` (the truth bleed it overlaps most)."""
    case, res, _ = analyse(seed, threshold=0.0, model_path=str(BOOTSTRAP))
    grid: head.Grid = res.params["grid"]
    labels = np.asarray(res.params["candidate_labels"])
    kinds = {b.label: b.kind for b in case.bleeds}
    rows = []
    n = int(labels.max())
    if n == 0:
        return rows
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.zeros(n + 1)
    best = np.zeros((n + 1, len(kinds) + 1))
    for lab in kinds:
        t = grid.pool((case.haemorrhage == lab).astype(np.float32)) >= 0.5
        cnt = np.bincount(labels[t].ravel(), minlength=n + 1)
        inside += cnt
        best[:, lab] = cnt
    for c in res.params["candidates"]:
        i = int(c["label_id"])
        row: dict[str, Any] = {k: float(v) for k, v in c.items()}
        row["y"] = int(inside[i] >= 0.3 * sizes[i])
        row["kind"] = kinds.get(int(np.argmax(best[i])), "") if row["y"] else ""
        row["seed"] = seed
        rows.append(row)
    return rows


def evaluate(seed: int, model_path: str) -> dict[str, Any]:
    from shared.evaluation.metrics import score_head
    from shared.phantoms.head import evaluate_head

    head.load_model.cache_clear()
    case, res, p = analyse(seed, model_path=model_path)
    bleeds = [{"label": b.label, "kind": b.kind, "volume_ml": b.volume_ml} for b in case.bleeds]
    sc = score_head(
        res.findings, res.masks, case.haemorrhage, bleeds, case.midline_shift_mm, case.voxel_ml
    )
    ev = evaluate_head(case, res)
    return {**p, "score": sc, "subtype_correct": ev["subtype_correct"]}


def fit(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """IRLS; x has a leading column of ones (not penalised)."""
    w = np.zeros(x.shape[1])
    pen = np.full(x.shape[1], l2)
    pen[0] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        g = x.T @ (p - y) + pen * w
        h = (x * (p * (1 - p))[:, None]).T @ x + np.diag(pen) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic(rows: list[dict[str, Any]], names: tuple[str, ...], y: np.ndarray) -> dict[str, Any]:
    x = np.array([[r[n] for n in names] for r in rows], float)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    w = fit(np.hstack([np.ones((len(x), 1)), (x - mu) / sd]), y)
    return {
        "features": list(names),
        "coef": [round(float(v), 6) for v in w[1:]],
        "intercept": round(float(w[0]), 6),
        "mean": [round(float(v), 6) for v in mu],
        "std": [round(float(v), 6) for v in sd],
    }


def collect(seeds: list[int], jobs: int, cache: Path | None) -> list[dict[str, Any]]:
    tag = f"_{SIZE}" if SIZE else ""
    path = cache / f"candidates_{seeds[0]}_{seeds[-1]}_{head.VERSION}{tag}.json" if cache else None
    if path is not None and path.exists():
        rows: list[dict[str, Any]] = json.loads(path.read_text())
        return rows
    write_bootstrap()
    with ProcessPoolExecutor(jobs) as ex:
        rows = [r for rs in ex.map(candidates, seeds) for r in rs]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", default=str(head.MODEL_PATH))
    ap.add_argument("--size", type=int, default=None, help="every --train case at this matrix")
    ap.add_argument(
        "--more", type=int, default=0, help="training seeds after --train, at the default matrices"
    )
    args = ap.parse_args()
    global SIZE
    SIZE = args.size
    t0 = time.perf_counter()
    train_seeds = list(range(TRAIN_BASE, TRAIN_BASE + args.train))
    rows = collect(train_seeds, args.jobs, args.cache)
    if args.more:
        SIZE = None
        more = list(range(train_seeds[-1] + 1, train_seeds[-1] + 1 + args.more))
        rows += collect(more, args.jobs, args.cache)
        train_seeds += more
        SIZE = args.size
    for r in rows:
        head.derived(r)
    y = np.array([r["y"] for r in rows], float)
    model: dict[str, Any] = {
        "version": "5",
        "kind": "logistic regression (IRLS, L2=1) over standardised candidate features",
        **logistic(rows, head.FEATURES, y),
    }
    p = np.array([head.confidence(r, model) for r in rows])
    # out-of-fold scores (5 folds by case): the operating point is chosen on cases the model
    # did not see, as the held-out cases will be
    folds = {s: k % 5 for k, s in enumerate(sorted({int(r["seed"]) for r in rows}))}
    fold = np.array([folds[int(r["seed"])] for r in rows])
    p_oof = np.zeros(len(rows))
    for k in range(5):
        tr = [r for r, f in zip(rows, fold, strict=True) if f != k]
        m_k = logistic(tr, head.FEATURES, np.array([r["y"] for r in tr], float))
        for i in np.nonzero(fold == k)[0]:
            p_oof[i] = head.confidence(rows[i], m_k)
    # operating point, out of fold: bleeds of >= 2 mL kept (a bleed is kept when its best
    # piece is) and false candidates per scan at each threshold
    p_fit = p
    p = p_oof
    best: dict[tuple[int, str], list[float]] = {}
    for pi, r in zip(p, rows, strict=True):
        if r["y"]:
            g = best.setdefault((int(r["seed"]), str(r["kind"])), [0.0, 0.0])
            g[0] = max(g[0], float(pi))
            g[1] += float(r["volume_ml"])
    bleed_best = np.array([g[0] for g in best.values() if g[1] >= 2.0])
    scans = len(train_seeds)
    curve = []
    for t in np.arange(0.05, 0.9001, 0.05):
        kept = float((bleed_best >= t).mean()) if bleed_best.size else 1.0
        curve.append(
            (round(float(t), 2), round(kept, 4), round(((p >= t) & (y == 0)).sum() / scans, 4))
        )
    # a missed bleed costs more than a false one: the most bleeds kept at <= 0.1 false
    # candidates per scan (the target), then the highest such threshold
    ok = [c for c in curve if c[2] <= 0.1] or curve[-1:]
    thr = max(ok, key=lambda c: (c[1], c[0]))[0]
    model["threshold"] = round(thr, 4)
    # subtype: extra-axial blood, lens versus crescent
    extra = [
        r
        for r in rows
        if r["y"] and r["kind"] in ("epidural", "subdural") and r["volume_ml"] >= 1.0
    ]
    ys = np.array([r["kind"] == "epidural" for r in extra], float)
    sub = logistic(extra, head.SUBTYPE_FEATURES, ys)
    sub["positive"] = "epidural"
    ps = np.array([head.confidence(r, sub) for r in extra])
    model["subtype"] = sub
    model["train"] = {
        "seeds": [train_seeds[0], train_seeds[-1]],
        "cases": f"{args.train} at {SIZE or '512 (every fifth 256)'}²"
        + (f", {args.more} more at 512² (every fifth 256²)" if args.more else "")
        + "; 5/2.5/5/1.25/3 mm, one in four normal, one in three with dense sinuses and falx, "
        "preprocessed",
        "head_version": head.VERSION,
        "candidates": len(y),
        "positives": int(y.sum()),
        "accuracy_at_threshold": round(float(((p_fit >= thr) == (y > 0)).mean()), 4),
        "out_of_fold": "bleeds kept and false candidates below: 5 folds by case",
        "bleeds_ge_2ml": int(bleed_best.size),
        "bleeds_ge_2ml_kept": int((bleed_best >= thr).sum()),
        "false_candidates_per_scan": round(float(((p >= thr) & (y == 0)).sum() / scans), 4),
        "extra_axial": len(extra),
        "epidural": int(ys.sum()),
        "subtype_accuracy": round(float(((ps >= 0.5) == (ys > 0)).mean()), 4) if extra else None,
        "curve_threshold_kept_fp_per_scan": curve,
    }
    Path(args.out).write_text(json.dumps(model, indent=1) + "\n")
    head.load_model.cache_clear()
    if not args.test:  # held out elsewhere (benchmarks/quality.py, seeds 30000+)
        print(json.dumps(model, indent=1))
        return
    # held-out evaluation with the shipped model and threshold
    test_seeds = list(range(TEST_BASE, TEST_BASE + args.test))
    with ProcessPoolExecutor(args.jobs) as ex:
        evs = list(ex.map(evaluate, test_seeds, [args.out] * len(test_seeds)))
    big = [b for e in evs for b in e["score"]["bleeds"] if b["truth_ml"] >= 2.0]
    ve = np.array([abs(b["volume_error"]) for b in big if b["found"]] or [math.nan])
    sub_ok = [s for e in evs for s in e["subtype_correct"]]
    shift = [e["score"]["shift_error_mm"] for e in evs]
    test_rows = collect(test_seeds, args.jobs, args.cache)
    pos = [head.confidence(r, model) for r in test_rows if r["y"]]
    neg = [head.confidence(r, model) for r in test_rows if not r["y"]]
    model["heldout"] = {
        "test_seeds": [test_seeds[0], test_seeds[-1]],
        "bleed_sensitivity_ge_2ml": round(sum(b["found"] for b in big) / max(len(big), 1), 4),
        "bleeds_ge_2ml": len(big),
        "false_bleeds_per_scan": round(sum(e["score"]["false_bleeds"] for e in evs) / len(evs), 4),
        "volume_abs_error_median": round(float(np.median(ve)), 4),
        "volume_abs_error_max": round(float(np.max(ve)), 4),
        "volume_within_20pct": round(float((ve <= 0.2).mean()), 4),
        "subtype_accuracy": round(float(np.mean(sub_ok)), 4) if sub_ok else None,
        "midline_shift_abs_error_mm_mean": round(float(np.mean(shift)), 2),
        "midline_shift_abs_error_mm_max": round(float(np.max(shift)), 2),
        "candidate_auc": round(_auc(pos, neg), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(model, indent=1) + "\n")
    print(json.dumps(model, indent=1))


def _auc(pos: list[float], neg: list[float]) -> float:
    if not pos or not neg:
        return math.nan
    a, b = np.array(pos), np.array(neg)
    return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())


if __name__ == "__main__":
    main()
