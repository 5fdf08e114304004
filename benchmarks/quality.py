"""Analysis quality on the realistic procedural set and on real scans from the registries.

    .venv/bin/python benchmarks/quality.py [--chest 20] [--head 20] [--seed 30000] [--json]
                                           [--jobs 1]
                                           [--no-real] [--out out/quality]

Every case goes the way a scan goes through the service: the preprocess chain of its
modality/body part (``services.preprocess.core``), the int16 HU volume segmentation reads,
the segmentation task, the findings as ``Finding`` records and the alert rules of
``deploy/alerts/rules.yaml``. Scoring is ``shared.evaluation.metrics`` (independent of the
algorithms). Held-out seeds start at ``--seed`` (30000): the classifiers are trained on seeds
below 30000 (see their model files). Chest cases vary matrix (256-1024), slice thickness
(0.625-5 mm), contrast and lesions; every third chest case is the lesion-free twin of the one
before it (same anatomy and noise), which is what "normal scan" means below; head cases vary
thickness, bleed shape and size, and one in four is normal.

Printed figures (and ``--json``): lung_dice, nodule_sensitivity by size bin (4-6, 6-10,
10-30 mm), nodule_sensitivity_ge6, mass_sensitivity, sensitivity_ge6_by_attachment (nodules
>= 6 mm and masses by isolated / juxtavascular / juxtapleural / mediastinal), fp_per_scan,
fp_per_normal_scan,
high_alerts_per_normal_scan, bleed_sensitivity (>= 2 mL), bleed_fp_per_scan,
bleed_volume_error (median and max |relative error| of found bleeds >= 2 mL),
midline_shift_error_mm, seconds per series (algorithm) for chest and head, a confidence
sweep for the operating point, and per-case results for the real scans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH and the editable install

from services.alert.rules import RuleSet  # noqa: E402
from services.preprocess.core import DEFAULT_CHAINS, apply_step, chain_for  # noqa: E402
from services.segmentation import tasks  # noqa: E402
from services.segmentation.core import _clean  # noqa: E402
from shared.evaluation import realdata  # noqa: E402
from shared.evaluation.metrics import SIZE_BINS, VoxelFrame, score_chest, score_head  # noqa: E402
from shared.schemas import Finding  # noqa: E402

if TYPE_CHECKING:
    from shared.phantoms.head import HeadCase

RULES = RuleSet.load(REPO / "deploy" / "alerts" / "rules.yaml")
THICKNESS = (1.25, 0.625, 2.5, 1.0, 5.0, 2.0, 3.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def prepared(hu: np.ndarray, spacing: tuple[float, float, float], body: str) -> np.ndarray:
    """What segmentation reads: the modality's chain applied, rounded to int16 HU."""
    img: Any = hu.astype(np.float32)
    for step in chain_for("CT", body.upper(), DEFAULT_CHAINS):
        img, spacing = apply_step(img, step, spacing)
    out: np.ndarray = np.rint(np.asarray(img)).clip(-32768, 32767).astype(np.int16)
    return out.astype(np.float32)


def analyse(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    body: str,
) -> tuple[tasks.TaskResult, float, list[tuple[Finding, str | None]]]:
    vol = prepared(hu, spacing, body)
    geo = tasks.Geometry(spacing, origin, IDENTITY)
    t0, c0 = time.perf_counter(), time.process_time()
    if body == "chest":
        result = tasks.chest_ct(vol, geo, threshold=CHEST_THRESHOLD)
    else:
        result = tasks.head_ct(vol, geo)
    seconds = time.perf_counter() - t0
    # CPU time of this process: the algorithm's time on an idle core (the machine is shared)
    result.params["cpu_seconds"] = time.process_time() - c0
    alerts = []
    for f in result.findings:
        finding = Finding(**_clean(f))
        rule = RULES.first_match(finding, "CT", body.upper())
        alerts.append((finding, rule.severity if rule else None))
    return result, seconds, alerts


def high(alerts: list[tuple[Finding, str | None]]) -> int:
    return sum(1 for _f, sev in alerts if sev in ("high", "critical"))


# ---- chest ----------------------------------------------------------------------------------
def chest_cases(n: int, seed0: int) -> list[dict[str, Any]]:
    plans = []
    for i in range(n):
        size = 512
        if i % 10 == 4:
            size = 256
        elif i % 10 == 7:
            size = 768
        elif i == 9:
            size = 1024
        twin = i % 3 == 2  # the lesion-free twin of the previous case
        seed = seed0 + (i - 1 if twin else i)
        plans.append(
            {
                "seed": seed,
                "size": size,
                "thickness_mm": THICKNESS[(i - 1 if twin else i) % len(THICKNESS)],
                "contrast": (seed % 2) == 1,
                "normal": twin,
            }
        )
    return plans


CACHE: Path | None = None  # --cache: generated phantoms kept between runs
CHEST_THRESHOLD: float | None = None  # --chest-threshold: report below the model's point


@dataclass
class _Case:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    truth: dict[str, np.ndarray]
    lesions: list[dict[str, Any]]


def chest_phantom(plan: dict[str, Any]) -> _Case:
    """The plan's phantom, generated (or read back from ``CACHE``: arrays as .npz, lesion
    records as JSON; no pickle)."""
    from shared.phantoms.chest import chest_case

    key = "chest-{seed}-{size}-{thickness_mm}-{contrast:d}-{normal:d}".format(**plan)
    d = CACHE / key if CACHE else None
    if d is not None and (d / "case.json").exists():
        meta = json.loads((d / "case.json").read_text())
        arrays = np.load(d / "arrays.npz")
        return _Case(
            arrays["hu"],
            tuple(meta["spacing"]),  # type: ignore[arg-type]
            tuple(meta["origin"]),  # type: ignore[arg-type]
            {k[6:]: arrays[k] for k in arrays.files if k.startswith("truth_")},
            meta["lesions"],
        )
    c = chest_case(
        plan["seed"],
        size=plan["size"],
        thickness_mm=plan["thickness_mm"],
        contrast=plan["contrast"],
        normal=plan["normal"],
    )
    case = _Case(c.hu, c.spacing, c.origin, dict(c.truth), c.lesions)
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "arrays.npz", hu=c.hu, **{f"truth_{k}": v for k, v in c.truth.items()})
        (d / "case.json").write_text(
            json.dumps(
                {"spacing": c.spacing, "origin": c.origin, "lesions": c.lesions},
                default=lambda v: v.tolist() if hasattr(v, "tolist") else float(v),
            )
        )
    return case


def run_chest(plan: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    case = chest_phantom(plan)
    gen = time.perf_counter() - t0
    result, seconds, alerts = analyse(case.hu, case.spacing, case.origin, "chest")
    lesions = [
        {
            "label": les["label"],
            "kind": les["kind"],
            "attachment": les.get("attachment"),
            "diameter_mm": les.get("equivalent_diameter_mm") or les.get("diameter_mm"),
            "centroid_voxel": les["centroid_voxel"],
        }
        for les in case.lesions
    ]
    score = score_chest(
        result.findings,
        result.masks,
        case.truth,
        lesions,
        VoxelFrame(case.spacing, case.origin),
    )
    return {
        **plan,
        "shape": list(case.hu.shape),
        "generate_s": round(gen, 2),
        "seconds": round(seconds, 3),
        "high_alerts": high(alerts),
        "alerts": [(f.type, f.label, sev, f.confidence) for f, sev in alerts if sev],
        **score,
    }


def chest_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, list[bool]] = {name: [] for name, _lo, _hi in SIZE_BINS}
    ge6: list[bool] = []
    by_attachment: dict[str, list[bool]] = {}  # nodules >= 6 mm and masses, by attachment
    masses: list[bool] = []
    masses_typed: list[bool] = []
    calcified: list[bool] = []
    for r in rows:
        for les in r["lesions"]:
            att = les.get("attachment") or "unknown"
            if les["kind"] == "mass":
                masses.append(les["found"])
                by_attachment.setdefault(att, []).append(les["found"])
                masses_typed.append(les["reported_as"] == "mass")
                continue
            if les["kind"] == "calcified":
                calcified.append(les["found"] and les["reported_subtype"] == "calcified")
                continue
            d = les["diameter_mm"]
            for name, lo, hi in SIZE_BINS:
                if lo <= d < hi:
                    found[name].append(les["found"])
            if d >= 6.0:
                ge6.append(les["found"])
                by_attachment.setdefault(att, []).append(les["found"])
    normal = [r for r in rows if r["normal"]]

    def rate(xs: list[bool]) -> float | None:
        return round(sum(xs) / len(xs), 3) if xs else None

    return {
        "cases": len(rows),
        "normal_cases": len(normal),
        "lung_dice": round(statistics.mean(r["lung_dice"] for r in rows), 4),
        "lung_dice_min": round(min(r["lung_dice"] for r in rows), 4),
        "nodule_sensitivity": {k: rate(v) for k, v in found.items()},
        "nodule_counts": {k: len(v) for k, v in found.items()},
        "nodule_sensitivity_ge6": rate(ge6),
        # where the misses are: nodules >= 6 mm and masses together, by how the lesion sits
        # (isolated, juxtavascular, juxtapleural, mediastinal), with their counts
        "sensitivity_ge6_by_attachment": {k: rate(v) for k, v in sorted(by_attachment.items())},
        "counts_by_attachment": {k: len(v) for k, v in sorted(by_attachment.items())},
        "mass_sensitivity": rate(masses),
        "mass_reported_as_mass": rate(masses_typed),
        "masses": len(masses),
        "calcified_marked": rate(calcified),
        "fp_per_scan": round(statistics.mean(r["false_positives"] for r in rows), 3),
        "fp_per_normal_scan": round(statistics.mean(r["false_positives"] for r in normal), 3)
        if normal
        else None,
        "high_alerts_per_normal_scan": round(statistics.mean(r["high_alerts"] for r in normal), 3)
        if normal
        else None,
        "seconds_per_series": round(statistics.mean(r["seconds"] for r in rows), 2),
        "seconds_per_series_512": round(
            statistics.mean(r["seconds"] for r in rows if r["size"] == 512), 2
        )
        if any(r["size"] == 512 for r in rows)
        else None,
        "seconds_max": round(max(r["seconds"] for r in rows), 2),
    }


def sweep(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sensitivity (>= 6 mm nodules and masses) and false positives per scan by confidence."""
    out = []
    for t in (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        hits = [
            les["found"] and (les["confidence"] or 0.0) >= t
            for r in rows
            for les in r["lesions"]
            if les["kind"] not in ("calcified",) and les["diameter_mm"] >= 6.0
        ]
        fps = [
            sum(
                1
                for f in r["false_positive_findings"]
                if (f["confidence"] or 0.0) >= t and not f.get("likely_benign")
            )
            for r in rows
        ]
        out.append(
            {
                "threshold": t,
                "sensitivity_ge6": round(sum(hits) / len(hits), 3) if hits else None,
                "fp_per_scan": round(statistics.mean(fps), 3) if fps else None,
            }
        )
    return out


# ---- head -----------------------------------------------------------------------------------
def head_cases(n: int, seed0: int) -> list[dict[str, Any]]:
    thick = (5.0, 2.5, 5.0, 1.25, 3.0)
    return [
        {
            "seed": seed0 + i,
            "size": 512 if i % 5 else 256,
            "thickness_mm": thick[i % len(thick)],
            "normal": i % 4 == 3,
        }
        for i in range(n)
    ]


def head_phantom(plan: dict[str, Any]) -> HeadCase:
    """The plan's head phantom (one of :func:`head_cases`)."""
    from shared.phantoms.head import head_case

    return head_case(
        plan["seed"],
        size=plan["size"],
        thickness_mm=plan["thickness_mm"],
        bleed="none" if plan["normal"] else "random",
    )


def run_head(plan: dict[str, Any]) -> dict[str, Any]:
    from shared.phantoms.head import evaluate_head

    t0 = time.perf_counter()
    case = head_phantom(plan)
    gen = time.perf_counter() - t0
    result, seconds, alerts = analyse(case.hu, case.spacing, (0.0, 0.0, 0.0), "head")
    bleeds = [{"label": b.label, "kind": b.kind, "volume_ml": b.volume_ml} for b in case.bleeds]
    score = score_head(
        result.findings,
        result.masks,
        case.haemorrhage,
        bleeds,
        case.midline_shift_mm,
        case.voxel_ml,
    )
    # the subtype reported for each found bleed (the finding nearest it)
    for b, ev in zip(score["bleeds"], evaluate_head(case, result)["bleeds"], strict=True):
        b["subtype"] = ev["subtype"] if b["found"] else None
    return {
        **plan,
        "shape": list(case.hu.shape),
        "generate_s": round(gen, 2),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(float(result.params["cpu_seconds"]), 3),
        "high_alerts": high(alerts),
        "alerts": [(f.type, f.label, sev, f.confidence) for f, sev in alerts if sev],
        **score,
    }


def head_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    big = [b for r in rows for b in r["bleeds"] if b["truth_ml"] >= 2.0]
    errors = [abs(b["volume_error"]) for b in big if b["found"] and b["volume_error"] is not None]
    shifts = [r["shift_error_mm"] for r in rows if r["shift_error_mm"] is not None]
    normal = [r for r in rows if r["normal"]]
    return {
        "cases": len(rows),
        "normal_cases": len(normal),
        "bleeds_ge_2ml": len(big),
        "bleed_sensitivity": round(sum(b["found"] for b in big) / len(big), 3) if big else None,
        "bleed_sensitivity_by_kind": {
            k: round(
                sum(b["found"] for b in big if b["kind"] == k)
                / max(1, sum(1 for b in big if b["kind"] == k)),
                3,
            )
            for k in sorted({str(b["kind"]) for b in big})
        },
        "bleed_subtype_accuracy_by_kind": {
            k: round(
                sum(b["subtype"] == k for b in big if b["kind"] == k and b["found"])
                / max(1, sum(1 for b in big if b["kind"] == k and b["found"])),
                3,
            )
            for k in sorted({str(b["kind"]) for b in big})
        },
        "bleed_fp_per_scan": round(statistics.mean(r["false_bleeds"] for r in rows), 3),
        "bleed_fp_on_normal_scans": round(statistics.mean(r["false_bleeds"] for r in normal), 3)
        if normal
        else None,
        "bleed_volume_error_median": round(statistics.median(errors), 3) if errors else None,
        "bleed_volume_error_max": round(max(errors), 3) if errors else None,
        "bleeds_within_20pct": round(sum(e <= 0.2 for e in errors) / len(errors), 3)
        if errors
        else None,
        "midline_shift_error_mm": round(statistics.mean(shifts), 2) if shifts else None,
        "midline_shift_error_max_mm": round(max(shifts), 2) if shifts else None,
        "high_alerts_per_normal_scan": round(statistics.mean(r["high_alerts"] for r in normal), 3)
        if normal
        else None,
        "seconds_per_series": round(statistics.mean(r["seconds"] for r in rows), 2),
        "seconds_max": round(max(r["seconds"] for r in rows), 2),
        "cpu_seconds_per_series": round(statistics.mean(r["cpu_seconds"] for r in rows), 2),
        "cpu_seconds_max": round(max(r["cpu_seconds"] for r in rows), 2),
    }


# ---- real scans -----------------------------------------------------------------------------
def run_real(name: str) -> dict[str, Any]:
    case = realdata.load(name)
    origin = (0.0, 0.0, 0.0)
    result, seconds, alerts = analyse(case.hu, case.spacing, origin, case.body)
    row: dict[str, Any] = {
        "case": name,
        "shape": list(case.hu.shape),
        "spacing": [round(s, 3) for s in case.spacing],
        "seconds": round(seconds, 2),
        "cpu_seconds": round(float(result.params["cpu_seconds"]), 2),
        "high_alerts": high(alerts),
        "alerts": [(f.type, f.label, sev, f.confidence) for f, sev in alerts if sev],
    }
    vol = {k: round(float(np.count_nonzero(v)) * case.voxel_ml, 1) for k, v in result.masks.items()}
    row["mask_ml"] = vol
    if case.body == "chest":
        truth: dict[str, np.ndarray] = {
            k: v for k, v in case.truth.items() if k in ("lung_left", "lung_right")
        }
        lesions = []
        if "lesion" in case.truth:
            truth["lesions"] = case.truth["lesion"].astype(np.int16)
            lesions = [
                {
                    "label": les["label"],
                    "kind": les["kind"],
                    "diameter_mm": (6 * les["volume_ml"] * 1000 / np.pi) ** (1 / 3),
                    "centroid_voxel": les["centroid_zyx"],
                }
                for les in case.lesions
            ]
        score = score_chest(
            result.findings, result.masks, truth, lesions, VoxelFrame(case.spacing, origin)
        )
        row.update(
            {
                k: score[k]
                for k in ("dice_lung_left", "dice_lung_right", "lung_dice", "lesions")
                if k in score
            }
        )
        row["reported_lesions"] = score["reported"]
        row["unlabelled_reports"] = score["false_positives"]
    else:
        row["reported_bleeds"] = sum(1 for f in result.findings if f["type"] == "haemorrhage")
        row["bleed_ml"] = vol.get("haemorrhage")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chest", type=int, default=20)
    ap.add_argument("--head", type=int, default=20)
    ap.add_argument("--seed", type=int, default=30000)
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="head cases in parallel processes")
    ap.add_argument("--cache", type=Path, help="folder: generated chest phantoms kept between runs")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="chest cases generated and analysed in parallel (seconds per series then include "
        "the other workers' load)",
    )
    ap.add_argument(
        "--chest-threshold",
        type=float,
        help="report chest candidates from this confidence (default: the model's operating "
        "point) so that the sweep can look below it",
    )
    ap.add_argument("--out", type=Path, default=REPO / "out" / "quality")
    args = ap.parse_args()
    global CACHE, CHEST_THRESHOLD
    CACHE = args.cache
    CHEST_THRESHOLD = args.chest_threshold
    report: dict[str, Any] = {"seed": args.seed}
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    chest_rows = []
    plans = chest_cases(args.chest, args.seed)
    rows_all: Any
    if args.workers > 1 and len(plans) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            rows_all = list(pool.imap(run_chest, plans))  # in plan order
    else:
        rows_all = map(run_chest, plans)
    for row in rows_all:
        chest_rows.append(row)
        found = sum(les["found"] for les in row["lesions"])
        log(
            f"chest seed {row['seed']} {row['size']}² {row['thickness_mm']} mm"
            f"{' normal' if row['normal'] else ''}: lungs {row['lung_dice']:.3f}, "
            f"lesions {found}/{len(row['lesions'])}, fp {row['false_positives']}, "
            f"high {row['high_alerts']}, {row['seconds']:.2f} s"
        )
    head_rows = []
    plans = head_cases(args.head, args.seed)
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    for row in pool.map(run_head, plans) if pool else map(run_head, plans):
        head_rows.append(row)
        log(
            f"head seed {row['seed']} {row['size']}² {row['thickness_mm']} mm: bleeds "
            f"{sum(b['found'] for b in row['bleeds'])}/{len(row['bleeds'])}, false "
            f"{row['false_bleeds']}, shift err {row['shift_error_mm']}, {row['seconds']:.2f} s"
        )
    if pool:
        pool.shutdown()
    if chest_rows:
        report["chest"] = chest_summary(chest_rows)
        report["chest_sweep"] = sweep(chest_rows)
    if head_rows:
        report["head"] = head_summary(head_rows)
    if not args.no_real:
        real = []
        for name in realdata.CASES:
            if realdata.available(name):
                row = run_real(name)
                real.append(row)
                log(f"real {name}: {json.dumps({k: v for k, v in row.items() if k != 'alerts'})}")
        report["real"] = real
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cases.json").write_text(
        json.dumps({"chest": chest_rows, "head": head_rows}, indent=1, default=str)
    )
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        for key in ("chest", "head"):
            if key in report:
                print(f"\n{key}:")
                for k, v in report[key].items():
                    print(f"  {k:32} {v}")
        if "chest_sweep" in report:
            print("\nconfidence sweep (chest, nodules >= 6 mm and masses):")
            for s in report["chest_sweep"]:
                print(
                    f"  >= {s['threshold']:.1f}: sensitivity {s['sensitivity_ge6']}, "
                    f"fp/scan {s['fp_per_scan']}"
                )
        for row in report.get("real", []):
            print(f"\nreal {row['case']}: {json.dumps(row, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
