"""Head CT on held-out procedural cases (seeds the model never saw) and the time of a
300-slice 512² head on this CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/eval_head.py [--n 20] [--size 512] [--timing]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from services.segmentation import head
from services.segmentation.tasks import Geometry
from shared.phantoms.head import evaluate_head, head_case

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
HELDOUT = 30_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--thickness", type=float, default=5.0)
    ap.add_argument("--timing", action="store_true", help="also time a 300 x 512² head")
    args = ap.parse_args()
    found = total = false = 0
    vol_err: list[float] = []
    sub_ok: list[bool] = []
    shift_err: list[float] = []
    secs: list[float] = []
    normals = normal_false = 0
    for s in range(HELDOUT, HELDOUT + args.n):
        kind = "none" if s % 4 == 3 else "random"
        case = head_case(s, size=args.size, thickness_mm=args.thickness, bleed=kind)  # type: ignore[arg-type]
        geo = Geometry(case.spacing, (0.0, 0.0, 0.0), IDENTITY)
        t = time.perf_counter()
        res = head.head_ct(case.hu.astype(np.float32), geo)
        secs.append(time.perf_counter() - t)
        ev = evaluate_head(case, res)
        found += ev["found_ge_min"]
        total += ev["bleeds_ge_min"]
        false += ev["false_bleeds"]
        if kind == "none":
            normals += 1
            normal_false += ev["false_bleeds"]
        vol_err += ev["volume_errors"]
        sub_ok += ev["subtype_correct"]
        if ev["midline_shift_error_mm"] is not None:
            shift_err.append(abs(ev["midline_shift_error_mm"]))
    ve = np.abs(vol_err)
    out: dict[str, object] = {}
    if args.n:
        out = {
            "seeds": [HELDOUT, HELDOUT + args.n - 1],
            "size": args.size,
            "thickness_mm": args.thickness,
            "bleed_sensitivity_ge_2ml": round(found / max(total, 1), 4),
            "bleeds_ge_2ml": total,
            "bleed_fp_per_scan": round(false / args.n, 4),
            "normal_scans": normals,
            "false_bleeds_on_normal_scans": normal_false,
            "bleed_volume_abs_error_median": round(float(np.median(ve)), 4) if len(ve) else None,
            "bleed_volume_within_20pct": round(float((ve <= 0.2).mean()), 4) if len(ve) else None,
            "subtype_accuracy": round(float(np.mean(sub_ok)), 4) if sub_ok else None,
            "midline_shift_error_mm_median": round(float(np.median(shift_err)), 2),
            "midline_shift_error_mm_max": round(float(np.max(shift_err)), 2),
            "seconds_per_series_median": round(float(np.median(secs)), 2),
        }
    if args.timing:
        case = head_case(HELDOUT - 1, size=512, thickness_mm=0.5, slices=300)
        geo = Geometry(case.spacing, (0.0, 0.0, 0.0), IDENTITY)
        vol = case.hu.astype(np.float32)
        runs = []
        for _ in range(3):  # the machine is shared: the best of three is the algorithm's time
            t = time.perf_counter()
            head.head_ct(vol, geo)
            runs.append(time.perf_counter() - t)
        out["seconds_300x512"] = round(min(runs), 2)
        out["seconds_300x512_runs"] = [round(r, 2) for r in runs]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
