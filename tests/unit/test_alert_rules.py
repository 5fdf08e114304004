"""The declarative alert rules: confidence and size thresholds, subtypes, benignity, order."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.alert.rules import Rule, RuleSet
from shared.schemas import Finding

RULES = Path(__file__).resolve().parents[2] / "deploy" / "alerts" / "rules.yaml"


def nodule(diameter: float, confidence: float | None, **kw: object) -> Finding:
    return Finding(
        type="nodule", label="nodule 1", diameter_mm=diameter, confidence=confidence, **kw
    )


def test_default_rules_page_only_above_the_operating_point() -> None:
    rules = RuleSet.load(RULES)
    high = rules.first_match(nodule(12.0, 0.95, likely_benign=False), "CT", "CHEST")
    assert high is not None and high.severity == "high"
    medium = rules.first_match(nodule(7.0, 0.95, likely_benign=False), "CT", "CHEST")
    assert medium is not None and medium.severity == "medium"
    # a confident-looking size but a low confidence: worklist at low, never high
    low = rules.first_match(nodule(12.0, 0.05, likely_benign=False), "CT", "CHEST")
    assert low is not None and low.severity == "low" and low.routes == ["worklist"]
    # no confidence at all (e.g. a plug-in that gives none) is not enough to page
    unknown = rules.first_match(nodule(12.0, None, likely_benign=False), "CT", "CHEST")
    assert unknown is not None and unknown.severity == "low"


def test_calcified_nodules_raise_nothing_and_masses_are_their_own_rule() -> None:
    rules = RuleSet.load(RULES)
    calcified = nodule(6.0, 0.99, subtype="calcified", likely_benign=True)
    assert rules.first_match(calcified, "CT", "CHEST") is None
    mass = Finding(type="mass", label="mass 1", diameter_mm=45.0, confidence=0.9)
    rule = rules.first_match(mass, "CT", "CHEST")
    assert rule is not None and rule.name == "lung-mass" and rule.severity == "high"


def test_haemorrhage_and_midline_shift_page() -> None:
    rules = RuleSet.load(RULES)
    bleed = Finding(type="haemorrhage", label="h 1", volume_ml=4.0, confidence=0.9)
    rule = rules.first_match(bleed, "CT", "HEAD")
    assert rule is not None and rule.severity == "critical" and "pager" in rule.routes
    doubtful = Finding(type="haemorrhage", label="h 2", volume_ml=4.0, confidence=0.1)
    rule = rules.first_match(doubtful, "CT", "HEAD")
    assert rule is not None and rule.severity == "low" and "pager" not in rule.routes
    shift = Finding(type="midline_shift", label="midline", shift_mm=7.5)
    rule = rules.first_match(shift, "CT", "HEAD")
    assert rule is not None and rule.severity == "critical"
    small = Finding(type="midline_shift", label="midline", shift_mm=1.0)
    assert rules.first_match(small, "CT", "HEAD") is None
    # rules are CT rules: the same finding on another modality raises nothing
    assert rules.first_match(bleed, "MR", "HEAD") is None


def test_subtype_filter_and_bounds() -> None:
    rule = Rule(
        name="solid-only",
        finding="nodule",
        subtypes=["solid", "part_solid"],
        min={"confidence": 0.7},
        max={"diameter_mm": 30.0},
        severity="medium",
    )
    assert rule.matches(nodule(10.0, 0.8, subtype="solid"), "CT", None)
    assert not rule.matches(nodule(10.0, 0.8, subtype="ground_glass"), "CT", None)
    assert not rule.matches(nodule(10.0, 0.69, subtype="solid"), "CT", None)
    assert not rule.matches(nodule(31.0, 0.9, subtype="solid"), "CT", None)


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="unknown measurement"):
        Rule(name="x", finding="nodule", min={"sharpness": 1.0}, severity="low")
    with pytest.raises(ValidationError, match="unique"):
        RuleSet(
            rules=[
                Rule(name="a", finding="nodule", severity="low"),
                Rule(name="a", finding="mass", severity="low"),
            ]
        )
