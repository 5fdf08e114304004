"""The shipped classifier file, NumPy inference equal to scikit-learn's, and evaluate_chest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from services.segmentation.chest import classifier
from services.segmentation.chest.evaluate import evaluate_chest, summarise
from services.segmentation.chest.features import FEATURES

RNG = np.random.default_rng(0)


def _data() -> tuple[np.ndarray, np.ndarray]:
    x = RNG.normal(size=(400, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 - x[:, 2] + RNG.normal(0, 0.5, 400) > 0.5).astype(int)
    return x, y


def _common() -> dict[str, object]:
    return {
        "version": "t",
        "features": ["a", "b", "c", "d"],
        "log": [False] * 4,
        "mean": [0.0] * 4,
        "scale": [1.0] * 4,
        "threshold": 0.5,
    }


def _rows(x: np.ndarray) -> list[dict[str, float]]:
    return [dict(zip("abcd", map(float, r), strict=True)) for r in x]


def test_logistic_inference_matches_scikit_learn() -> None:
    x, y = _data()
    lr = LogisticRegression().fit(x, y)
    m = classifier.from_dict(
        {
            **_common(),
            "kind": "logistic",
            "coef": lr.coef_[0].tolist(),
            "intercept": float(lr.intercept_[0]),
        }
    )
    np.testing.assert_allclose(m.predict(_rows(x)), lr.predict_proba(x)[:, 1], atol=1e-9)


def test_tree_inference_matches_scikit_learn() -> None:
    x, y = _data()
    gb = GradientBoostingClassifier(n_estimators=30, max_depth=3, random_state=0).fit(x, y)
    prior = y.mean()
    trees = [
        {
            "left": e.tree_.children_left.tolist(),
            "right": e.tree_.children_right.tolist(),
            "feature": e.tree_.feature.tolist(),
            "threshold": e.tree_.threshold.tolist(),
            "value": e.tree_.value[:, 0, 0].tolist(),
        }
        for e in gb.estimators_[:, 0]
    ]
    m = classifier.from_dict(
        {
            **_common(),
            "kind": "gbt",
            "trees": trees,
            "learning_rate": gb.learning_rate,
            "init": float(np.log(prior / (1 - prior))),
        }
    )
    np.testing.assert_allclose(m.predict(_rows(x)), gb.predict_proba(x)[:, 1], atol=1e-9)


def test_the_shipped_model_is_versioned_json_with_its_provenance() -> None:
    raw = json.loads(classifier.MODEL_PATH.read_text())
    m = classifier.load()
    assert set(m.features) <= set(FEATURES) and 0 < m.threshold < 1
    meta = raw["meta"]
    assert {"seed", "train_seeds", "test_seeds", "test", "command"} <= set(meta)
    # test seeds never overlap the training seeds
    assert meta["test_seeds"][0] > meta["train_seeds"][1]
    probs = m.predict([{f: 0.0 for f in m.features}])
    assert probs.shape == (1,) and 0.0 <= probs[0] <= 1.0


def test_a_damaged_model_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(classifier.MODEL_PATH.read_text())
    d["mean"] = d["mean"][:-1]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError):
        classifier.load(str(p))


def test_evaluate_chest_counts_hits_by_size_false_positives_and_masses() -> None:
    truth = {
        "lesions": [
            {"centre_mm": [0, 0, 0], "diameter_mm": 5.0, "kind": "solid"},
            {"centre_mm": [50, 0, 0], "diameter_mm": 8.0, "kind": "juxtavascular"},
            {"centre_mm": [0, 50, 0], "diameter_mm": 20.0, "kind": "solid"},
            {"centre_mm": [0, 0, 80], "diameter_mm": 45.0, "kind": "mass"},
            {"centre_mm": [-50, 0, 0], "diameter_mm": 4.0, "kind": "calcified"},
        ],
        "lung_left": np.ones((2, 2, 2), bool),
    }
    findings = [
        {"type": "nodule", "centroid_mm": [0.5, 0.5, 0]},  # hits the 5 mm
        {"type": "nodule", "centroid_mm": [0, 58, 0]},  # within 10 mm of the 20 mm
        {"type": "mass", "centroid_mm": [10, 0, 80]},  # hits the mass
        {"type": "nodule", "centroid_mm": [-50, 0, 0.5]},  # the calcified granuloma
        {"type": "nodule", "centroid_mm": [100, 100, 100]},  # false positive
        {"type": "lung", "centroid_mm": [0, 0, 0]},  # not a lesion report
    ]
    masks = {"lung_left": np.ones((2, 2, 2), bool)}
    r = evaluate_chest(truth, {"findings": findings, "masks": masks})
    assert r["hits_4-6"] == 1 and r["nodules_4-6"] == 1
    assert r["hits_6-10"] == 0 and r["nodules_6-10"] == 1
    assert r["hits_10-30"] == 1 and r["mass_hits"] == 1 and r["masses"] == 1
    assert r["calcified_hits"] == 1 and r["false_positives"] == 1
    assert r["dice_lung_left"] == 1.0
    s = summarise([r, r])
    assert s["sensitivity_6mm_plus"] == pytest.approx(1 / 2) and s["fp_per_scan"] == 1.0


def test_calibration_table_maps_scores_monotonically_and_a_broken_one_is_refused(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    d = json.loads(classifier.MODEL_PATH.read_text())
    d["calibration"] = {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.1, 0.9]}
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(d))
    m = classifier.load(str(p))
    rows = [{f: float(v) for f in m.features} for v in np.linspace(-3, 3, 25)]
    raw, cal = m.predict_raw(rows), m.predict(rows)
    assert np.allclose(cal, np.interp(raw, [0.0, 0.5, 1.0], [0.0, 0.1, 0.9]))
    d["calibration"] = {"x": [0.0, 0.5, 1.0], "y": [0.0, 0.6, 0.2]}  # not monotone
    bad = tmp_path / "bad_cal.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError):
        classifier.load(str(bad))


def _cand(**kw: float) -> dict[str, float]:
    base = {
        "max_hu": 400.0,
        "p90_hu": 350.0,
        "calcified_frac": 0.6,
        "diameter_mm": 5.0,
        "ray_long": 0.0,
        "ray_wall": 0.0,
        "elongation": 0.8,
    }
    return {**base, **kw}


def test_veto_keeps_granulomas_and_soft_tissue_but_drops_metal_and_enhanced_vessels() -> None:
    assert classifier.veto(_cand()) is None  # small, compact, dense: a granuloma
    assert classifier.veto(_cand(p90_hu=60.0, calcified_frac=0.0, diameter_mm=20.0)) is None
    assert classifier.veto(_cand(max_hu=3000.0)) == "metal"  # wire, clip
    assert classifier.veto(_cand(diameter_mm=18.0)) == "dense_tube"  # too big for a granuloma
    assert classifier.veto(_cand(ray_long=0.3)) == "dense_tube"  # rays run on: a vessel
    assert classifier.veto(_cand(ray_wall=0.5)) == "dense_tube"  # continuous with the wall
    assert classifier.veto(_cand(elongation=0.3)) == "dense_tube"


def test_centred_plateaus_keep_the_raw_order_under_the_operating_region_only() -> None:
    from benchmarks.train_nodule_classifier import centre_plateaus

    table = {
        "x": [0.0, 0.01, 0.02, 0.03, 0.06, 0.08, 0.1, 0.3, 0.31, 0.9, 1.0],
        "y": [0.0, 0.0, 0.01, 0.05, 0.05, 0.06, 0.2, 0.2, 0.8, 0.8, 1.0],
    }
    out = centre_plateaus(table, below=0.1)
    # plateaus under 0.1 become one knot at their middle; 0.2 and 0.8 stay plateaus
    assert out["x"] == [0.005, 0.02, 0.045, 0.08, 0.1, 0.3, 0.31, 0.9, 1.0]
    assert out["y"] == [0.0, 0.01, 0.05, 0.06, 0.2, 0.2, 0.8, 0.8, 1.0]
    raw = np.array([0.032, 0.04, 0.05, 0.058])  # all 0.05 before: tied
    before, after = np.interp(raw, table["x"], table["y"]), np.interp(raw, out["x"], out["y"])
    assert np.all(before == 0.05)
    assert np.all(np.diff(after) > 0)  # the raw order survives
    high = np.array([0.1, 0.2, 0.3, 0.5, 0.95])  # from 0.1 up nothing changes
    assert np.array_equal(
        np.interp(high, table["x"], table["y"]), np.interp(high, out["x"], out["y"])
    )


def test_the_shipped_operating_point_is_recorded_with_its_reason_and_centred_below_0_1() -> None:
    m = classifier.load()
    _xs, ys = m.calibration  # type: ignore[misc]
    assert np.all(np.diff(ys[ys < 0.1]) > 0)  # centred: no ties under 0.1
    op = m.meta["operating_point"]
    assert op["threshold"] == pytest.approx(m.threshold) and len(op["why"]) > 40
    if "--threshold " not in m.meta["command"]:  # no override: the out-of-fold choice
        choice = "with_large" if m.large is not None else m.version.split("-")[0]
        chosen = m.meta["candidates"][choice]["threshold"]
        assert m.threshold == pytest.approx(chosen, abs=1e-3)


def _logistic(coef: list[float], version: str) -> dict[str, Any]:
    return {
        "version": version,
        "kind": "logistic",
        "features": ["a", "b", "diameter_mm"],
        "log": [False] * 3,
        "mean": [0.0] * 3,
        "scale": [1.0] * 3,
        "coef": coef,
        "intercept": 0.0,
        "threshold": 0.1,
    }


def test_large_candidates_get_the_large_models_capped_second_opinion(tmp_path: Path) -> None:
    d = {
        **_logistic([1.0, 0.0, 0.0], "main"),
        "large": {"from_mm": 20.0, "max_confidence": 0.5, "model": _logistic([0.0, 2.0, 0.0], "L")},
    }
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    m = classifier.load(str(p))
    assert m.large is not None and m.large.from_mm == 20.0
    rows = [
        {"a": a, "b": b, "diameter_mm": dmm}
        for a in (-3.0, 0.0, 3.0)
        for b in (-3.0, 0.0, 3.0)
        for dmm in (8.0, 19.9, 20.0, 45.0)
    ]
    own = 1 / (1 + np.exp(-np.array([r["a"] for r in rows])))
    second = 1 / (1 + np.exp(-2 * np.array([r["b"] for r in rows])))
    big = np.array([r["diameter_mm"] >= 20.0 for r in rows])
    got = m.predict(rows)
    np.testing.assert_allclose(m.predict_own(rows), own)
    np.testing.assert_allclose(got[~big], own[~big])  # small candidates: the main model only
    np.testing.assert_allclose(got[big], np.maximum(own[big], np.minimum(second[big], 0.5)))
    # the second opinion raises a large candidate the main model doubts, but only to the cap
    doubted = [i for i, r in enumerate(rows) if big[i] and r["a"] == -3.0 and r["b"] == 3.0]
    assert doubted and all(got[i] == pytest.approx(0.5) and own[i] < 0.05 for i in doubted)
    # a nested large model or a cap outside [0, 1] is refused
    for bad in (
        {**d, "large": {**d["large"], "max_confidence": 1.5}},
        {**d, "large": {**d["large"], "model": d}},
    ):
        q = tmp_path / "bad.json"
        q.write_text(json.dumps(bad))
        classifier.load.cache_clear()
        with pytest.raises(ValueError):
            classifier.load(str(q))


def test_the_shipped_large_model_never_raises_an_alert_above_low() -> None:
    from services.alert.rules import RuleSet

    m = classifier.load()
    if m.large is None:
        pytest.skip("the shipped model has no large-candidate model")
    rules = RuleSet.load(Path(__file__).parents[2] / "deploy" / "alerts" / "rules.yaml")
    # every chest rule above ``low`` (medium, high, critical) needs a confidence above the cap
    above_low = [r for r in rules.rules if r.finding in ("nodule", "mass") and r.severity != "low"]
    assert above_low and all("confidence" in r.min for r in above_low)
    assert m.large.max_confidence < min(r.min["confidence"] for r in above_low)
    assert m.large.model.calibration is not None and m.large.from_mm >= 10.0
    assert m.large.model.meta["train_positives"] >= 10


def _fake_case(seed: int, rng: np.random.Generator, n: int) -> dict[str, Any]:
    feats, hits = [], []
    for _ in range(n):
        f = {k: float(rng.normal()) for k in FEATURES}
        f["diameter_mm"] = float(rng.uniform(5, 60))
        lesion = f["diameter_mm"] >= 20 and f["p50_hu"] > 0.8
        hits.append(0 if lesion else -1)
        feats.append(f)
    return {"seed": seed, "features": feats, "hits": hits, "centroids": [[0.0] * 3] * n}


def test_the_training_script_fits_and_combines_the_large_model_as_inference_does() -> None:
    from benchmarks.train_nodule_classifier import _Fixed, fit_large, with_large

    rng = np.random.default_rng(5)
    cases = [_fake_case(s, rng, 60) for s in range(20)]
    fitted = fit_large(cases, 20.0, 0.5, seed=3)
    assert fitted is not None
    entry, oof = fitted
    m = classifier.from_dict({**_logistic([0.0, 0.0, 0.0], "main"), "large": entry})
    assert m.large is not None and m.large.max_confidence == 0.5
    # out-of-fold: a probability per large candidate of every case, calibrated to [0, 1]
    for c in cases:
        n_big = sum(f["diameter_mm"] >= 20 for f in c["features"])
        assert oof.predict_case(c).shape == (n_big,)
    # it learned the rule (the large positives are the bright ones)
    rows = [f for c in cases for f in c["features"] if f["diameter_mm"] >= 20]
    y = np.array(
        [
            h >= 0
            for c in cases
            for h, f in zip(c["hits"], c["features"], strict=True)
            if f["diameter_mm"] >= 20
        ]
    )
    p = m.large.model.predict_own(rows)
    assert p[y].mean() > 0.5 > p[~y].mean()
    # the script's combination is the file's: scored by the file's two models, with_large
    # gives what Model.predict gives
    both = classifier.from_dict({**_logistic([0.3, -0.2, -0.1], "main"), "large": entry})
    assert both.large is not None
    own = _Fixed({c["seed"]: both.predict_own(c["features"]) for c in cases})
    second = _Fixed(
        {
            c["seed"]: both.large.model.predict_own(
                [f for f in c["features"] if f["diameter_mm"] >= 20]
            )
            for c in cases
        }
    )
    combined = with_large(cases, own, second, 20.0, 0.5)
    for c in cases:
        np.testing.assert_allclose(combined.predict_case(c), both.predict(c["features"]))
        np.testing.assert_allclose(combined.own_case(c), both.predict_own(c["features"]))
    lifted = sum(int((combined.predict_case(c) > combined.own_case(c)).sum()) for c in cases)
    assert lifted > 0  # the second opinion changed some large candidates' scores
    # too few large positives: no large model
    none = [{**c, "hits": [-1] * len(c["hits"])} for c in cases]
    assert fit_large(none, 20.0, 0.5, seed=3) is None


def test_the_training_scripts_reporting_rule_lets_the_second_opinion_only_add() -> None:
    from benchmarks.train_nodule_classifier import reported

    def feats(diameter: float) -> dict[str, float]:
        volume = np.pi / 6 * diameter**3 / 1000
        return {"diameter_mm": diameter, "long_axis_mm": diameter, "volume_ml": volume}

    case = {
        "features": [feats(8.0), feats(35.0), feats(40.0)],
        "centroids": [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [100.0, 0.0, 0.0]],
    }
    own = np.array([0.6, 0.01, 0.02])
    combined = np.array([0.6, 0.7, 0.5])
    out = reported(case, own, combined, 0.15)
    # the nodule stays the finding there (the lifted piece beside it is not reported), the
    # far mass is added with its second-opinion confidence
    assert [(f["type"], f["centroid_mm"], f["confidence"]) for f in out] == [
        ("nodule", [0.0, 0.0, 0.0], 0.6),
        ("mass", [100.0, 0.0, 0.0], 0.5),
    ]
    assert [f["type"] for f in reported(case, own, own, 0.15)] == ["nodule"]
    # the pipeline's rule, not a simpler one: a group is reported by its largest member above
    # the point (a juxtapleural nodule's concavity has it whole), at its leader's confidence
    dome = {"features": [feats(8.0), feats(14.0)], "centroids": [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]}
    (found,) = reported(dome, np.array([0.6, 0.5]), np.array([0.6, 0.5]), 0.15)
    assert (found["centroid_mm"], found["confidence"]) == ([2.0, 0.0, 0.0], 0.6)
