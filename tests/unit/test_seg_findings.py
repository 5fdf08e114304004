"""Every lesion finding is its own SEG segment whose label and description carry the
finding's size, confidence and the features behind it (read back with highdicom)."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from services.segmentation import tasks
from shared.dicom import phantom
from shared.dicom.seg import Algorithm, build_seg, source_headers
from shared.dicom.segments import finding_segments
from shared.imaging import ops

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_geometry_to_index_inverts_to_patient() -> None:
    geo = tasks.Geometry((2.5, 0.7, 0.8), (-120.0, -90.0, 35.0), (0, 1, 0, 0, 0, -1, -1, 0, 0))
    for zyx in ((0.0, 0.0, 0.0), (12.0, 200.5, 17.25)):
        back = geo.to_index(geo.to_patient(zyx))
        assert np.allclose(back, zyx, atol=0.02)


def test_each_finding_is_a_segment_with_its_confidence_and_features(tmp_path: Path) -> None:
    ph = phantom.head_ct(tmp_path / "h", seed=3, size=192, slices=36, bleed_ml=6.0)
    raw = [f.read_bytes() for f in ph.files]
    vol = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float32) - 1024 for f in ph.files])
    vol = np.asarray(ops.gaussian(vol, sigma=[0.0, 0.8, 0.8]))
    geo = tasks.Geometry(ph.spacing, (0.0, 0.0, 0.0), IDENTITY)
    result = tasks.head_ct(vol, geo)
    bleeds = [f for f in result.findings if f["type"] == "haemorrhage"]
    assert bleeds and all(f.get("confidence") is not None for f in bleeds)
    segments = finding_segments(result.masks, result.findings, geo)
    kinds = [s.kind for s in segments]
    assert kinds[0] == "brain" and kinds.count("haemorrhage") == len(bleeds)
    seg_bytes = build_seg(
        source_headers(raw),
        segments,
        series_instance_uid=ph.series_instance_uid,
        revision=1,
        algorithm=Algorithm("radstream-head_ct", "test"),
    )
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    described = [d for d in seg.SegmentSequence if d.SegmentLabel.startswith("haemorrhage")]
    assert len(described) == len(bleeds)
    for item, finding in zip(described, bleeds, strict=True):
        assert f"p={finding['confidence']:.2f}" in item.SegmentLabel
        text = str(item.SegmentDescription)
        assert f"confidence {finding['confidence']:.3f}" in text
        assert "features: " in text and len(text) <= 1024
        some = sorted(finding["features"])[0]
        assert f"{some}=" in text
    # the segment holds exactly its finding's voxels: its volume is the finding's
    number = int(described[0].SegmentNumber)
    pixels = seg.get_volume(segment_numbers=[number], combine_segments=True).array
    assert abs(int((pixels > 0).sum()) - bleeds[0]["voxels"]) <= 1


def test_a_segment_description_names_the_model_its_confidence_came_from() -> None:
    from shared.dicom.segments import describe

    finding = {"type": "mass", "label": "mass 2", "diameter_mm": 41.0, "confidence": 0.5}
    _, text = describe({**finding, "confidence_source": "large_candidate_model"})
    assert "confidence 0.500 (large_candidate_model)" in text
    _, plain = describe(finding)  # a task that does not say (the head's) is described as before
    assert "confidence 0.500" in plain and "(" not in plain.split("confidence 0.500")[1][:2]
