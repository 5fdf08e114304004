"""The false-positive classifier at run time: a versioned JSON model, inference in NumPy.

The file (written by ``benchmarks/train_nodule_classifier.py``) holds the feature names, the
transform of each feature (``log``: log1p of the magnitude, with sign), the standardisation,
and either logistic-regression coefficients or gradient-boosted trees (feature index,
threshold, children, leaf values), an optional calibration (isotonic regression fitted on
out-of-fold predictions, as a monotone table: the raw score is mapped by linear interpolation),
optionally a second model of the same form for large candidates (``large``: see ``Large``),
the training seeds and the held-out metrics. No pickle is ever loaded.

``veto``: what is never a finding whatever the classifier says (metal; dense tubes, i.e.
contrast-enhanced vessels), applied before training and at run time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

MODEL_PATH = Path(__file__).with_name("nodule_classifier.json")


@dataclass(frozen=True)
class Model:
    version: str
    kind: str  # "logistic" or "gbt"
    features: tuple[str, ...]
    log: tuple[bool, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray | None
    intercept: float
    trees: tuple[dict[str, np.ndarray], ...]
    learning_rate: float
    init: float
    threshold: float  # operating point: candidates below it are not reported
    meta: dict[str, Any]
    calibration: tuple[np.ndarray, np.ndarray] | None = None  # raw -> calibrated, monotone
    large: Large | None = None  # a second opinion on large candidates (see ``predict``)

    def transform(self, rows: list[dict[str, float]]) -> np.ndarray:
        x = np.array([[r.get(f, 0.0) for f in self.features] for r in rows], dtype=np.float64)
        if x.size == 0:
            return x.reshape(0, len(self.features))
        lg = np.array(self.log)
        x[:, lg] = np.sign(x[:, lg]) * np.log1p(np.abs(x[:, lg]))
        out: np.ndarray = (x - self.mean) / self.scale
        return out

    def predict(self, rows: list[dict[str, float]]) -> np.ndarray:
        """Probability that each candidate is a real nodule or mass (calibrated when the
        file has a calibration table). With a ``large`` model, a candidate of its size or
        more gets the higher of the two, the large model's capped at its ``max_confidence``."""
        return self.scores(rows)[1]

    def scores(self, rows: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """(``predict_own``, ``predict``) in one pass: the main model runs once."""
        own = self.predict_own(rows)
        out = own.copy()
        if self.large is None or out.size == 0:
            return own, out
        big = np.array([r.get("diameter_mm", 0.0) >= self.large.from_mm for r in rows])
        if big.any():
            second = self.large.model.predict_own([r for r, b in zip(rows, big, strict=True) if b])
            out[big] = np.maximum(out[big], np.minimum(second, self.large.max_confidence))
        return own, out

    def predict_own(self, rows: list[dict[str, float]]) -> np.ndarray:
        """This model's calibrated probability, without the ``large`` model."""
        raw = self.predict_raw(rows)
        if self.calibration is None or raw.size == 0:
            return raw
        xs, ys = self.calibration
        out: np.ndarray = np.interp(raw, xs, ys)
        return out

    def predict_raw(self, rows: list[dict[str, float]]) -> np.ndarray:
        """The model's own probability (before calibration)."""
        x = self.transform(rows)
        if x.shape[0] == 0:
            return np.zeros(0)
        if self.kind == "logistic":
            assert self.coef is not None
            z = x @ self.coef + self.intercept
        else:
            z = np.full(x.shape[0], self.init)
            for t in self.trees:
                z += self.learning_rate * _tree_value(t, x)
        prob: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
        return prob


@dataclass(frozen=True)
class Large:
    """The second model for candidates of ``from_mm`` or more (diameter): trained on those
    alone, where masses are told from pieces of the heart border and chest wall. Its
    confidence is capped at ``max_confidence``, under the alert rules' 0.6: what only it finds
    reaches the worklist at ``low``, never a medium or high alert."""

    from_mm: float
    max_confidence: float
    model: Model


def _tree_value(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # scikit-learn's trees compare float32 features with float64 thresholds: do the same
    x = x.astype(np.float32).astype(np.float64)
    node = np.zeros(x.shape[0], dtype=np.int64)
    left, right, feat, thr, value = t["left"], t["right"], t["feature"], t["threshold"], t["value"]
    for _ in range(64):
        leaf = left[node] < 0
        if leaf.all():
            break
        f = feat[node]
        go_left = x[np.arange(x.shape[0]), np.maximum(f, 0)] <= thr[node]
        nxt = np.where(go_left, left[node], right[node])
        node = np.where(leaf, node, nxt)
    out: np.ndarray = value[node]
    return out


def from_dict(d: dict[str, Any]) -> Model:
    trees = tuple(
        {
            k: np.asarray(t[k], dtype=np.float64 if k in ("threshold", "value") else np.int64)
            for k in t
        }
        for t in d.get("trees", [])
    )
    return Model(
        version=str(d["version"]),
        kind=str(d["kind"]),
        features=tuple(d["features"]),
        log=tuple(bool(v) for v in d["log"]),
        mean=np.asarray(d["mean"], dtype=np.float64),
        scale=np.asarray(d["scale"], dtype=np.float64),
        coef=np.asarray(d["coef"], dtype=np.float64) if d.get("coef") is not None else None,
        intercept=float(d.get("intercept", 0.0)),
        trees=trees,
        learning_rate=float(d.get("learning_rate", 1.0)),
        init=float(d.get("init", 0.0)),
        threshold=float(d["threshold"]),
        meta=dict(d.get("meta", {})),
        calibration=(
            np.asarray(d["calibration"]["x"], dtype=np.float64),
            np.asarray(d["calibration"]["y"], dtype=np.float64),
        )
        if d.get("calibration")
        else None,
        large=Large(
            from_mm=float(d["large"]["from_mm"]),
            max_confidence=float(d["large"]["max_confidence"]),
            model=from_dict(d["large"]["model"]),
        )
        if d.get("large")
        else None,
    )


@lru_cache(maxsize=4)
def load(path: str | None = None) -> Model:
    p = Path(path) if path else MODEL_PATH
    d = json.loads(p.read_text())
    m = from_dict(d)
    _check(m)
    if m.large is not None:
        _check(m.large.model)
        if m.large.model.large is not None or not 0.0 <= m.large.max_confidence <= 1.0:
            raise ValueError("nodule classifier file is inconsistent (large model)")
    return m


def _check(m: Model) -> None:
    if len(m.log) != len(m.features) or m.mean.shape != (len(m.features),):
        raise ValueError("nodule classifier file is inconsistent (feature count)")
    if not 0.0 <= m.threshold <= 1.0 or not all(math.isfinite(v) for v in m.scale):
        raise ValueError("nodule classifier file is inconsistent (threshold or scale)")
    if m.calibration is not None:
        xs, ys = m.calibration
        if (
            xs.shape != ys.shape
            or xs.size < 2
            or (np.diff(xs) < 0).any()
            or (np.diff(ys) < 0).any()
        ):
            raise ValueError("nodule classifier file is inconsistent (calibration not monotone)")


METAL_HU = 2500.0  # steel wires, clips, ports; calcium stays below this after smoothing
DENSE_HU = 300.0  # a 90th percentile above this: calcium or contrast-enhanced blood
GRANULOMA_MM = 12.0  # calcified granulomas are small (2-10 mm)
CALCIFIED_FRAC = 0.3  # this share of a segment above the calcium threshold: it is dense


def dense(f: dict[str, float]) -> bool:
    """Calcium or contrast-enhanced blood: a 90th percentile above ``DENSE_HU`` or at least
    ``CALCIFIED_FRAC`` of the segment calcified (the veto, the subtype and ``regrow`` agree)."""
    return f["p90_hu"] > DENSE_HU or f["calcified_frac"] >= CALCIFIED_FRAC


def veto(f: dict[str, float]) -> str | None:
    """Why a candidate can never be a finding (``None``: it can). Metal is an artifact;
    a dense candidate larger than a granuloma, tubular (rays run on through it, elongated)
    or continuous with the mediastinum or chest wall is an enhanced vessel or heart chamber,
    not a calcified nodule."""
    if f["max_hu"] >= METAL_HU:
        return "metal"
    if dense(f):
        if (
            f["diameter_mm"] > GRANULOMA_MM
            or f["ray_long"] > 0.1
            or f["ray_wall"] > 0.25
            or f["elongation"] < 0.45
        ):
            return "dense_tube"
    return None
