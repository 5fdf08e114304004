"""Attack tests (issue 14, medium/low): names inside records are data. A ``ResultsReady`` whose
overlay is called ``../x.png``, ``/abs/x.png`` or that meets a planted symbolic link never makes
``radstream results --out DIR`` (or the demo report) write outside DIR; a task or overlay name
carrying markup is escaped in the demo report."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.cli.demo import Study, study_html
from shared.cli.main import write_results
from shared.schemas import BlobRef, Finding, NamedBlob, ResultsReady, SegmentationDone
from shared.security.paths import UnsafeName, child

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
COMMON: dict[str, Any] = {
    "study_instance_uid": "1.2.3",
    "series_instance_uid": "1.2.3.4",
    "revision": 1,
    "modality": "CT",
    "algorithm": "chest",
    "algorithm_version": "2",
    "source_offset": 5,
    "source_partition": 1,
}


def ref(data: bytes) -> BlobRef:
    return BlobRef(digest=hashlib.sha256(data).hexdigest(), size=len(data), key_id="k1")


def fetch(_: BlobRef) -> bytes:
    return PNG


def done(task: str = "chest_ct") -> SegmentationDone:
    return SegmentationDone(
        task=task,
        findings=[Finding(type="nodule", label="nodule-1", diameter_mm=9.5)],
        last_published_at=datetime(2026, 1, 2, tzinfo=UTC),
        **COMMON,
    )


def results(*names: str, task: str = "chest_ct") -> ResultsReady:
    return ResultsReady(
        task=task,
        overlays=[NamedBlob(name=n, blob=ref(PNG)) for n in names],
        delivery="not_configured",
        **COMMON,
    )


ATTACKS = ["../escaped.png", "../../escaped.png", "/tmp/escaped.png", "sub/x.png", ".hidden", ".."]


@pytest.mark.parametrize("name", ATTACKS)
def test_results_out_refuses_a_crafted_overlay_name_and_writes_nothing(
    tmp_path: Path, name: str
) -> None:
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    with pytest.raises(UnsafeName) as info:
        write_results(out, done(), results("ok.png", name), fetch)
    assert name not in str(info.value)  # a record's value is never quoted
    assert list(out.iterdir()) == []  # refused before a byte was written
    assert not (tmp_path / "deep" / "escaped.png").exists()
    assert not (tmp_path / "escaped.png").exists()


def test_results_out_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (out / "key.png").symlink_to(victim)
    with pytest.raises(UnsafeName):
        write_results(out, done(), results("key.png"), fetch)
    assert victim.read_text() == "keep"


def test_results_out_refuses_names_that_shadow_its_own_files(tmp_path: Path) -> None:
    with pytest.raises(UnsafeName):
        write_results(tmp_path, done(), results("seg.dcm"), fetch)


def test_results_out_writes_what_a_good_record_names(tmp_path: Path) -> None:
    written = write_results(tmp_path, done(), results("nodule-1-axial.png"), fetch)
    assert written == ["findings.json", "results.json", "nodule-1-axial.png"]
    assert (tmp_path / "nodule-1-axial.png").read_bytes() == PNG


def test_child_resolves_inside_the_folder_only(tmp_path: Path) -> None:
    assert child(tmp_path, "a.png") == tmp_path / "a.png"
    for name in [*ATTACKS, "a\\..\\b", "a\0b", "x" * 200, ""]:
        with pytest.raises(UnsafeName):
            child(tmp_path, name)


def test_demo_report_escapes_task_and_overlay_names_and_keeps_files_inside(
    tmp_path: Path,
) -> None:
    evil_task = "<script>alert(1)</script>"
    evil_overlay = "x.png'><script>alert(2)</script>"
    study = Study("chest", "Chest CT", "1.2.3.4", 0)
    rec = {"done": done(evil_task), "results": results(evil_overlay, "../../up.png", task="t")}
    out = tmp_path / "report"
    out.mkdir()
    page = "\n".join(study_html(study, rec, out, fetch))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "unsafe name was left out" in page
    assert not (tmp_path / "up.png").exists()
    assert all(p.parent == out for p in out.rglob("*"))
