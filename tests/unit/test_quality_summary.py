"""The chest summary of the quality benchmark: where the misses are, by attachment."""

from __future__ import annotations

from typing import Any

from benchmarks.quality import chest_summary


def _lesion(kind: str, attachment: str | None, diameter: float, found: bool) -> dict[str, Any]:
    return {
        "kind": kind,
        "attachment": attachment,
        "diameter_mm": diameter,
        "found": found,
        "reported_as": ("mass" if kind == "mass" else "nodule") if found else None,
        "reported_subtype": None,
    }


def _row(lesions: list[dict[str, Any]], normal: bool = False) -> dict[str, Any]:
    return {
        "lesions": lesions,
        "normal": normal,
        "lung_dice": 0.98,
        "false_positives": 1,
        "high_alerts": 0,
        "seconds": 2.0,
        "size": 512,
    }


def test_misses_are_counted_by_attachment_nodules_from_6_mm_and_masses_together() -> None:
    rows = [
        _row(
            [
                _lesion("solid", "juxtapleural", 12.0, False),
                _lesion("solid", "juxtapleural", 8.0, True),
                _lesion("solid", "juxtapleural", 5.0, False),  # below 6 mm: not counted
                _lesion("mass", "juxtapleural", 40.0, False),
                _lesion("solid", "isolated", 9.0, True),
                _lesion("calcified", "isolated", 7.0, True),  # scored as calcified, apart
            ]
        ),
        _row([_lesion("mass", "mediastinal", 45.0, True)]),
        _row([_lesion("solid", None, 13.0, True)]),  # a real scan's lesion: no attachment
        _row([], normal=True),
    ]
    s = chest_summary(rows)
    assert s["counts_by_attachment"] == {
        "isolated": 1,
        "juxtapleural": 3,
        "mediastinal": 1,
        "unknown": 1,
    }
    assert s["sensitivity_ge6_by_attachment"] == {
        "isolated": 1.0,
        "juxtapleural": 0.333,
        "mediastinal": 1.0,
        "unknown": 1.0,
    }
    # the headline figures are unchanged by the breakdown
    assert s["nodule_sensitivity_ge6"] == 0.75
    assert s["mass_sensitivity"] == 0.5
