"""benchmarks/chest_misses.py: where each missed chest lesion stands (no candidate, vetoed,
scored under the operating point) and the candidate-level sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.chest_misses import false_groups, lesion_status, rescored, summarise
from services.segmentation.chest import classifier

REPO = Path(__file__).resolve().parents[2]

SPACING = (2.0, 1.0, 1.0)


def _cand(
    lesion: int | None,
    confidence: float,
    centroid: tuple[float, float, float],
    *,
    veto: str | None = None,
    diameter: float = 8.0,
) -> dict[str, Any]:
    return {
        "confidence": confidence,
        "raw": confidence,
        "veto": veto,
        "source": "blob",
        "lesion": lesion,
        "centroid_voxel": list(centroid),
        "features": {"diameter_mm": diameter},
    }


def _les(label: int, kind: str, diameter: float, attachment: str = "isolated") -> dict[str, Any]:
    return {
        "label": label,
        "kind": kind,
        "attachment": attachment,
        "diameter_mm": diameter,
        "centroid_voxel": [10.0, 10.0 * label, 10.0],
    }


def _case(cands: list[dict[str, Any]], lesions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "plan": {"seed": 1},
        "spacing": list(SPACING),
        "threshold": 0.075,
        "lesions": lesions,
        "candidates": cands,
    }


def test_each_counted_lesion_gets_the_status_of_its_best_candidate() -> None:
    lesions = [
        _les(1, "solid", 12.0),  # a candidate at the point
        _les(2, "ground_glass", 9.0),  # no candidate
        _les(3, "part_solid", 20.0, "juxtavascular"),  # only a vetoed candidate
        _les(4, "mass", 45.0, "juxtapleural"),  # best candidate under the point
        _les(5, "solid", 5.0),  # below 6 mm: not counted
        _les(6, "calcified", 7.0),  # calcified: not counted
    ]
    cands = [
        _cand(1, 0.9, (10, 10, 10)),
        _cand(1, 0.01, (10, 11, 10)),
        _cand(3, 0.95, (10, 30, 10), veto="dense_tube"),
        _cand(4, 0.048, (10, 40, 10), diameter=27.0),
        _cand(4, 0.011, (10, 41, 10)),
        _cand(4, 0.6, (10, 42, 10), veto="dense_tube"),  # vetoed: does not count as best
        _cand(5, 0.9, (10, 50, 10)),
    ]
    rows = {r["label"]: r for r in lesion_status(_case(cands, lesions), 0.075)}
    assert set(rows) == {1, 2, 3, 4}
    assert rows[1]["status"] == "at_point" and rows[1]["best_confidence"] == 0.9
    assert rows[2]["status"] == "no_candidate" and rows[2]["best_confidence"] is None
    assert rows[3]["status"] == "vetoed" and rows[3]["best_veto"] == "dense_tube"
    assert rows[4]["status"] == "below_point"
    assert rows[4]["best_confidence"] == 0.048 and rows[4]["best_diameter_mm"] == 27.0


def test_false_groups_merge_near_candidates_and_skip_vetoed_and_lesion_groups() -> None:
    lesions = [_les(1, "solid", 10.0)]
    cands = [
        _cand(1, 0.5, (10, 10, 10)),
        _cand(None, 0.3, (10, 11, 10)),  # joins the lesion's group: not false
        _cand(None, 0.4, (10, 40, 40)),  # a false group ...
        _cand(None, 0.2, (10, 40, 42)),  # ... with a member 2 mm away
        _cand(None, 0.2, (10, 55, 5)),  # a second false group
        _cand(None, 0.9, (10, 5, 55), veto="metal"),  # vetoed: never reported
        _cand(None, 0.01, (10, 25, 25)),  # under the threshold
    ]
    case = _case(cands, lesions)
    assert false_groups(case, 0.1) == 2
    assert false_groups(case, 0.25) == 1
    assert false_groups(case, 0.6) == 0


def test_summary_counts_statuses_recall_and_the_sweep() -> None:
    lesions = [_les(1, "solid", 12.0), _les(2, "ground_glass", 9.0), _les(4, "mass", 45.0)]
    cands = [
        _cand(1, 0.9, (10, 10, 10)),
        _cand(4, 0.048, (10, 40, 10)),
        _cand(None, 0.05, (10, 55, 40)),
    ]
    s = summarise([_case(cands, lesions), _case([], [])])
    assert s["lesions"] == 3
    assert s["status"] == {"no_candidate": 1, "vetoed": 0, "below_point": 1, "at_point": 1}
    assert s["candidate_recall"] == 0.667
    assert s["status_by_kind"]["mass"]["below_point"] == 1
    assert [m["label"] for m in s["missed"]] == [2, 4]
    by_t = {row["threshold"]: row for row in s["candidate_sweep"]}
    assert by_t[0.048]["sensitivity_ge6_and_masses"] == 0.667
    assert by_t[0.048]["false_groups_per_scan"] == 0.5  # one false group over two scans
    assert by_t[0.075]["sensitivity_ge6_and_masses"] == 0.333
    assert by_t[0.075]["false_groups_per_scan"] == 0.0


def test_false_groups_let_the_second_opinion_only_add_as_the_pipeline_does() -> None:
    lesions = [_les(1, "solid", 10.0)]
    nodule = {**_cand(1, 0.3, (10, 10, 10)), "own": 0.3}
    false_nodule = {**_cand(None, 0.3, (10, 10, 24)), "own": 0.3}  # 14 mm away: its own group
    # a large heart-border piece that only the second opinion lifts, between the two: in one
    # ranking it would lead one group holding both (no false group); the pipeline reports
    # both nodules as they are and drops the piece (one false group)
    piece = {**_cand(None, 0.5, (10, 10, 17), diameter=35.0), "own": 0.01}
    lone = {**_cand(None, 0.5, (10, 80, 80), diameter=40.0), "own": 0.02}  # added: false
    doubted = {**_cand(None, 0.05, (10, 120, 20), diameter=30.0), "own": 0.01}
    case = _case([nodule, false_nodule, piece, lone, doubted], lesions)
    assert false_groups(case, 0.15) == 2
    one_ranking = _case(
        [{k: v for k, v in c.items() if k != "own"} for c in case["candidates"]], lesions
    )
    assert false_groups(one_ranking, 0.15) == 1
    assert false_groups(case, 0.6) == 0


def _model_file(tmp_path: Path, threshold: float) -> Path:
    """A logistic model on one feature ``a`` (probability sigmoid(a)), no calibration."""
    d = {
        "version": "test",
        "kind": "logistic",
        "features": ["a"],
        "log": [False],
        "mean": [0.0],
        "scale": [1.0],
        "coef": [1.0],
        "intercept": 0.0,
        "threshold": threshold,
    }
    p = tmp_path / "model.json"
    p.write_text(json.dumps(d))
    return p


def test_stored_rows_are_rescored_with_another_model_file(tmp_path: Path) -> None:
    lesions = [_les(1, "solid", 12.0), _les(2, "mass", 40.0)]
    # stored by the shipped model: the nodule at the point, the mass under it
    nodule = {**_cand(1, 0.9, (10, 10, 10)), "features": {"a": -3.0, "diameter_mm": 12.0}}
    mass = {**_cand(2, 0.01, (10, 20, 10)), "features": {"a": 3.0, "diameter_mm": 40.0}}
    case = _case([nodule, mass], lesions)
    assert summarise([case])["status"]["at_point"] == 1
    path = _model_file(tmp_path, 0.4)
    (again,) = rescored([case], classifier.load(str(path)))
    assert again["threshold"] == 0.4
    conf = [c["confidence"] for c in again["candidates"]]
    assert abs(conf[0] - 0.0474) < 1e-3 and abs(conf[1] - 0.9526) < 1e-3
    status = {r["label"]: r["status"] for r in lesion_status(again, again["threshold"])}
    assert status == {1: "below_point", 2: "at_point"}
    assert case["candidates"][0]["confidence"] == 0.9  # the stored rows are left as they were
    # the command line: rows read back from a file, scored with the model file
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(case) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/chest_misses.py",
            *("--from-rows", str(rows), "--model", str(path), "--json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["operating_point"] == 0.4
    assert report["status"] == {"no_candidate": 0, "vetoed": 0, "below_point": 1, "at_point": 1}
    assert [m["label"] for m in report["missed"]] == [1]
