"""Declarative alert rules (YAML, validated by pydantic) and their evaluation.

A rule matches a finding by type, modality, body part, subtype, benignity and bounds on its
measurements (``min``/``max``; ``confidence`` is a measurement like any other). Rules are
evaluated in order and the first match decides the alert; a finding that matches none raises
none. The default rules (``deploy/alerts/rules.yaml``) page only above the confidence operating
point chosen on the evaluation set and send everything else to the worklist at ``low``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.schemas import Finding

Severity = Literal["critical", "high", "medium", "low"]
MEASURES = (
    "volume_ml",
    "diameter_mm",
    "area_mm2",
    "mean_value",
    "confidence",
    "long_axis_mm",
    "short_axis_mm",
    "shift_mm",
)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,47}$")
    finding: str = Field(description="finding type: nodule, mass, haemorrhage, onnx:<label>, ...")
    modality: str | None = Field(None, description="only series of this modality")
    body_part: str | None = Field(None, description="only series of this body part")
    subtypes: list[str] | None = Field(
        None, description="only findings of these subtypes (e.g. solid, part_solid)"
    )
    likely_benign: bool | None = Field(
        None, description="only findings marked (true) or not marked (false) likely benign"
    )
    min: dict[str, float] = Field(default_factory=dict, description="measurement >= value")
    max: dict[str, float] = Field(default_factory=dict, description="measurement <= value")
    severity: Severity
    routes: list[str] = Field(default_factory=lambda: ["worklist"])

    @field_validator("min", "max")
    @classmethod
    def _known(cls, bounds: dict[str, float]) -> dict[str, float]:
        unknown = set(bounds) - set(MEASURES)
        if unknown:
            raise ValueError(f"unknown measurement(s) {sorted(unknown)}; use {MEASURES}")
        return bounds

    def matches(self, finding: Finding, modality: str, body_part: str | None) -> bool:
        if finding.type != self.finding:
            return False
        if self.modality and self.modality != modality:
            return False
        if self.body_part and (body_part or "").upper() != self.body_part.upper():
            return False
        if self.subtypes is not None and finding.subtype not in self.subtypes:
            return False
        if self.likely_benign is not None and bool(finding.likely_benign) != self.likely_benign:
            return False
        for key, bound in self.min.items():
            value = getattr(finding, key)
            if value is None or value < bound:
                return False
        for key, bound in self.max.items():
            value = getattr(finding, key)
            if value is None or value > bound:
                return False
        return True


class RuleSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rules: list[Rule]

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[Rule]) -> list[Rule]:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique (alert ids use them): {dupes}")
        return rules

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def first_match(self, finding: Finding, modality: str, body_part: str | None) -> Rule | None:
        return next((r for r in self.rules if r.matches(finding, modality, body_part)), None)
