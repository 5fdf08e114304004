"""Centre the shipped chest model's calibration plateaus under the operating region and set its
operating point on a raw score, without refitting the trees.

    PYTHONPATH=. .venv/bin/python benchmarks/centre_calibration.py --raw-threshold 0.065 \\
        --why "..." [--model services/segmentation/chest/nodule_classifier.json]

The isotonic table maps whole ranges of raw scores to one value (raw 0.033-0.076 all read
0.048): candidates there are tied, and the operating point can only sit above or below the
whole plateau (0.075 -> 1.3 false candidate groups per dev scan, the next step down -> 4.2).
``train_nodule_classifier.centre_plateaus`` replaces each plateau under 0.1 with a knot at its
middle (what a retrain now writes too); the operating point becomes the calibrated value of
``--raw-threshold``. Raw scores past the last centred plateau's next knot (0.0975 in the
shipped table, calibrated 0.107 and up: everything the alert rules raise above ``low``) keep
their values. The previous table, point and the reason are kept in the file's ``meta``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))

from benchmarks.train_nodule_classifier import CENTRE_BELOW, centre_plateaus  # noqa: E402
from services.segmentation.chest import classifier  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=classifier.MODEL_PATH)
    ap.add_argument("--raw-threshold", type=float, required=True)
    ap.add_argument("--why", required=True, help="how the raw threshold was chosen (kept in meta)")
    args = ap.parse_args()
    d = json.loads(args.model.read_text())
    before = d["calibration"]
    cal = centre_plateaus(before)
    threshold = round(float(np.interp(args.raw_threshold, cal["x"], cal["y"])), 4)
    if cal == before and d["threshold"] == threshold:
        print("already centred at this point")
        return 0
    d["meta"].setdefault(
        "calibration_before_centring", {"table": before, "threshold": d["threshold"]}
    )
    d["meta"]["calibration_centred_below"] = CENTRE_BELOW
    d["meta"]["operating_point"] = {"raw": args.raw_threshold, "why": args.why}
    d["calibration"] = cal
    d["threshold"] = threshold
    tmp = args.model.with_suffix(".tmp.json")
    tmp.write_text(json.dumps(d, indent=None, separators=(",", ":")) + "\n")
    classifier.load(str(tmp))  # the loader's checks (monotone table, features, threshold)
    tmp.replace(args.model)
    print(f"threshold {threshold} (raw {args.raw_threshold}); {len(cal['x'])} knots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
