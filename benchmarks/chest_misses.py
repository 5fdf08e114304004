"""Where the chest misses stand: for every nodule >= 6 mm and every mass of the realistic set,
the best candidate the pipeline made on it and what became of it.

    PYTHONPATH=. .venv/bin/python benchmarks/chest_misses.py [--chest 20] [--seed 30000]
        [--workers 2] [--cache DIR] [--rows FILE.jsonl] [--json]
        [--from-rows FILE.jsonl] [--model FILE.json]

The cases are ``benchmarks/quality.py``'s (same plans, seeds and ``--cache``). Each runs the
chest pipeline up to the candidates (``chest.pipeline.analyse``) and scores every candidate
with the shipped model (calibrated confidence and raw score) and the veto. A candidate sits on
a lesion by the quality benchmark's rule (its centroid inside the lesion's label grown by one
voxel, or within max(3 mm, the lesion's radius) of its centre:
``shared.evaluation.metrics.lesion_at``, the rule the training labels use too). Each lesion
gets a status:

- ``no_candidate``: no candidate sits on it (the candidate stage missed it);
- ``vetoed``: only vetoed candidates (metal, dense tube);
- ``below_point``: its best candidate scores under the model's operating point (the
  classifier's ranking missed it);
- ``at_point``: a candidate reaches the point.

Printed (and ``--json``): the statuses by lesion kind and attachment, candidate recall
(lesions with a candidate) and a candidate-level sweep of sensitivity against false candidate
groups per scan (candidates grouped as the pipeline groups them; no crop regrowth and no
choice of the reported member, so it reads a little above ``quality.py``'s false findings at
the same threshold). ``--rows`` writes every candidate with its features (one JSON line per
case) for offline work on the classifier. ``--from-rows FILE.jsonl`` reads such a file instead
of running the cases (``--chest``, ``--seed``, ``--cache`` and ``--workers`` then do not
apply), and ``--model FILE.json`` scores every candidate with that classifier
file (its operating point too) instead of the shipped one: a retrained model is compared with
the shipped one on the same candidates in seconds (the candidates are those of the code that
wrote the rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH and the editable install

from benchmarks import quality  # noqa: E402
from services.segmentation import tasks  # noqa: E402
from services.segmentation.chest import classifier  # noqa: E402
from services.segmentation.chest.pipeline import analyse, lesion_groups, near  # noqa: E402
from shared.evaluation.metrics import grown_labels, lesion_at  # noqa: E402

STATUSES = ("no_candidate", "vetoed", "below_point", "at_point")
SWEEP = (0.002, 0.005, 0.01, 0.02, 0.03, 0.048, 0.075, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8)


def candidate_rows(plan: dict[str, Any]) -> dict[str, Any]:
    """One case of the quality plan: its lesions and every candidate, scored and matched."""
    case = quality.chest_phantom(plan)
    vol = quality.prepared(case.hu, case.spacing, "chest")
    geo = tasks.Geometry(case.spacing, case.origin, quality.IDENTITY)
    an = analyse(vol, geo)
    model = classifier.load(None)
    feats = [c.features for c in an.candidates]
    lesions = [
        {
            "label": int(les["label"]),
            "kind": les["kind"],
            "attachment": les.get("attachment"),
            "diameter_mm": float(les.get("equivalent_diameter_mm") or les.get("diameter_mm")),
            "centroid_voxel": [float(v) for v in les["centroid_voxel"]],
        }
        for les in case.lesions
    ]
    labels = case.truth.get("lesions")
    grown = grown_labels(labels) if labels is not None else None
    cands = []
    for c, f, (p, own, raw) in zip(an.candidates, feats, scored(feats, model), strict=True):
        cen = (float(c.centroid[0]), float(c.centroid[1]), float(c.centroid[2]))
        cands.append(
            {
                "confidence": p,
                "own": own,  # the main model's (``confidence``: with the second opinion)
                "raw": raw,
                "veto": classifier.veto(f),
                "source": c.seed.source,
                "lesion": lesion_at(cen, lesions, case.spacing, grown),
                "centroid_voxel": list(cen),
                "features": {k: float(v) for k, v in f.items()},
            }
        )
    return {
        "plan": plan,
        "spacing": list(case.spacing),
        "threshold": model.threshold,
        "lesions": lesions,
        "candidates": cands,
    }


def scored(
    feats: list[dict[str, float]], model: classifier.Model
) -> list[tuple[float, float, float]]:
    """Per candidate: (confidence with the second opinion, the main model's own, raw score)."""
    if not feats:
        return []
    owns, probs = model.scores(feats)
    raws = model.predict_raw(feats)
    return [(float(p), float(o), float(r)) for p, o, r in zip(probs, owns, raws, strict=True)]


def rescored(cases: list[dict[str, Any]], model: classifier.Model) -> list[dict[str, Any]]:
    """``cases`` (``candidate_rows``' records) with every candidate scored by ``model`` and the
    operating point set to ``model``'s: what ``candidate_rows`` would have stored with it."""
    out = []
    for case in cases:
        feats = [c["features"] for c in case["candidates"]]
        cands = [
            {**c, "confidence": p, "own": own, "raw": raw}
            for c, (p, own, raw) in zip(case["candidates"], scored(feats, model), strict=True)
        ]
        out.append({**case, "threshold": model.threshold, "candidates": cands})
    return out


def counted(les: dict[str, Any]) -> bool:
    """The lesions the sensitivity targets count: nodules >= 6 mm (not calcified) and masses."""
    return bool(les["kind"] == "mass" or (les["kind"] != "calcified" and les["diameter_mm"] >= 6))


def lesion_status(case: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """Every counted lesion of a case with its status and its best candidate."""
    out = []
    for les in case["lesions"]:
        if not counted(les):
            continue
        on = [c for c in case["candidates"] if c["lesion"] == les["label"]]
        live = [c for c in on if c["veto"] is None]
        best = max(live or on, key=lambda c: (c["confidence"], c["raw"])) if on else None
        if not on:
            status = "no_candidate"
        elif not live:
            status = "vetoed"
        elif best is not None and best["confidence"] < threshold:
            status = "below_point"
        else:
            status = "at_point"
        out.append(
            {
                "seed": case["plan"]["seed"],
                "label": les["label"],
                "kind": les["kind"],
                "attachment": les.get("attachment") or "unknown",
                "diameter_mm": round(les["diameter_mm"], 1),
                "status": status,
                "best_confidence": best["confidence"] if best else None,
                "best_raw": best["raw"] if best else None,
                "best_source": best["source"] if best else None,
                "best_veto": best["veto"] if best else None,
                "best_diameter_mm": round(best["features"]["diameter_mm"], 1) if best else None,
            }
        )
    return out


def false_groups(case: dict[str, Any], threshold: float) -> int:
    """Groups of candidates at or above ``threshold`` (not vetoed) none of whose members sits on
    a lesion, grouped as the pipeline groups them (``pipeline.reported_picks``): the main
    model's candidates (``own``) first, then those only the second opinion lifts, in groups of
    their own, kept where their leader is away from every main group's. Rows without ``own``
    (no second opinion) are one ranking."""
    live = [c for c in case["candidates"] if c["veto"] is None and c["confidence"] >= threshold]
    spacing = tuple(case["spacing"])
    main = [c for c in live if c.get("own", c["confidence"]) >= threshold]
    extra = [c for c in live if c.get("own", c["confidence"]) < threshold]
    leaders: list[SimpleNamespace] = []
    false = 0
    for part, key in ((main, "own"), (extra, "confidence")):
        if not part:
            continue
        shim = [SimpleNamespace(centroid=c["centroid_voxel"], features=c["features"]) for c in part]
        probs = np.array([c.get(key, c["confidence"]) for c in part])
        for g in lesion_groups(shim, probs, spacing):  # type: ignore[arg-type]
            if part is extra and any(near(shim[g[0]], m, spacing) for m in leaders):  # type: ignore[arg-type]
                continue
            if part is main:
                leaders.append(shim[g[0]])
            false += all(part[i]["lesion"] is None for i in g)
    return false


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    threshold = float(cases[0]["threshold"]) if cases else 0.0
    rows = [s for case in cases for s in lesion_status(case, threshold)]

    def tally(key: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            name = r["kind"] if key == "kind" else r["attachment"]
            out.setdefault(name, dict.fromkeys(STATUSES, 0))[r["status"]] += 1
        return dict(sorted(out.items()))

    n = len(rows)
    sweep = []
    for t in SWEEP:
        # a lesion counts at ``t`` when its best live candidate (the status rows') reaches it
        hit = sum(
            r["status"] in ("below_point", "at_point") and r["best_confidence"] >= t for r in rows
        )
        sweep.append(
            {
                "threshold": t,
                "sensitivity_ge6_and_masses": round(hit / n, 3) if n else None,
                "false_groups_per_scan": round(
                    sum(false_groups(case, t) for case in cases) / len(cases), 2
                )
                if cases
                else None,
            }
        )
    return {
        "cases": len(cases),
        "operating_point": threshold,
        "lesions": n,
        "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
        "candidate_recall": round(sum(r["status"] != "no_candidate" for r in rows) / n, 3)
        if n
        else None,
        "status_by_kind": tally("kind"),
        "status_by_attachment": tally("attachment"),
        "missed": [r for r in rows if r["status"] != "at_point"],
        "candidate_sweep": sweep,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chest", type=int, default=20)
    ap.add_argument("--seed", type=int, default=30000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cache", type=Path, help="folder: generated chest phantoms (quality.py's)")
    ap.add_argument("--rows", type=Path, help="write every case's candidates here (JSON lines)")
    ap.add_argument(
        "--from-rows", type=Path, help="read the cases from a --rows file instead of running them"
    )
    ap.add_argument("--model", type=Path, help="score with this classifier file, not the shipped")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quality.CACHE = args.cache
    if args.from_rows:  # the rows say which cases they are: --chest/--seed/--cache/--workers unused
        cases = [json.loads(line) for line in args.from_rows.read_text().splitlines() if line]
    else:
        plans = quality.chest_cases(args.chest, args.seed)
        if args.workers > 1 and len(plans) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(args.workers) as pool:
                cases = list(pool.imap(candidate_rows, plans))
        else:
            cases = [candidate_rows(p) for p in plans]
    if args.model:
        cases = rescored(cases, classifier.load(str(args.model)))
    if args.rows:
        with args.rows.open("w") as fh:
            for case in cases:
                fh.write(json.dumps(case) + "\n")
    report = summarise(cases)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{report['cases']} cases, {report['lesions']} nodules >= 6 mm and masses, operating "
        f"point {report['operating_point']}: {report['status']}; candidate recall "
        f"{report['candidate_recall']}"
    )
    for key in ("status_by_kind", "status_by_attachment"):
        print(f"\n{key}:")
        for name, counts in report[key].items():
            print(f"  {name:14} {counts}")
    print("\nmissed at the operating point:")
    for r in report["missed"]:
        print(f"  {json.dumps(r)}")
    print("\ncandidate-level sweep (sensitivity, false candidate groups per scan):")
    for s in report["candidate_sweep"]:
        print(
            f"  >= {s['threshold']:<6} {s['sensitivity_ge6_and_masses']}  "
            f"{s['false_groups_per_scan']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
