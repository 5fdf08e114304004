"""DICOM Comprehensive 3D SR with a TID 1500 Measurement Report per series revision (highdicom),
in the style of IHE AI Results: the algorithm is identified (device observer, algorithm
identification on every group), each lesion finding is one measurement group (TID 1411,
volumetric ROI) that references its segment in the DICOM SEG and carries the finding's
numeric measurements with UCUM units (diameter, long/short axis, volume, mean HU, certainty:
that one names the model it came from) and its subtype and likely-benign call as qualitative
evaluations; the Tracking UID of a group is that of its SEG segment. Organs whose segment is in
the SEG (lungs, brain) get a group too (their volume): a study without lesions still has a
report that says what was measured.

Deterministic SOP Instance UID (series, revision, algorithm, "sr"): the idempotency key of its
PACS delivery, like the SEG's.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from shared.dicom.seg import Algorithm, seg_uid, track_uid

LESIONS = {
    "nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "haemorrhage": codes.SCT.Hemorrhage,
}
PROCEDURES = {
    "chest_ct": Code("24627-2", "LN", "CT Chest"),
    "head_ct": Code("24725-4", "LN", "CT Head"),
}
ORGANS = {"lung": codes.SCT.Lung, "brain": codes.SCT.Brain}
SITES = {"chest_ct": codes.SCT.Lung, "head_ct": codes.SCT.Brain}

# Local codes (the "99" prefix marks a private coding scheme, PS3.16 8.2) for what standard
# vocabularies do not name as such: the finding's subtype and the likely-benign call.
LOCAL = "99RADSTREAM"
SUBTYPE = Code("finding-subtype", LOCAL, "Finding subtype")
LIKELY_BENIGN = Code("likely-benign", LOCAL, "Likely benign")

MILLILITER = Code("mL", "UCUM", "milliliter")
# finding field → (concept name, unit, scale from the field's unit to the SR's)
MEASURES: tuple[tuple[str, Code, Code, float], ...] = (
    ("diameter_mm", codes.SCT.Diameter, codes.UCUM.Millimeter, 1.0),
    ("long_axis_mm", codes.SCT.LongAxis, codes.UCUM.Millimeter, 1.0),
    ("short_axis_mm", codes.SCT.ShortAxis, codes.UCUM.Millimeter, 1.0),
    ("volume_ml", codes.SCT.Volume, MILLILITER, 1.0),
    ("confidence", codes.DCM.CertaintyOfFinding, codes.UCUM.Percent, 100.0),
)
MEAN_HU = ("mean_value", codes.SCT.Mean, codes.UCUM.HounsfieldUnit, 1.0)


def sr_uid(series_instance_uid: str, revision: int, algorithm: Algorithm) -> str:
    return seg_uid(series_instance_uid, revision, algorithm, "sr")


def is_lesion(finding: Mapping[str, Any]) -> bool:
    return str(finding.get("type")) in LESIONS


def reported(finding: Mapping[str, Any], segment_of: Mapping[str, int]) -> bool:
    """Does the SR have a measurement group for ``finding``? Every lesion; an organ when its
    segment is in the SEG."""
    return is_lesion(finding) or (
        str(finding.get("type")) in ORGANS and str(finding.get("label")) in segment_of
    )


def _measurements(
    finding: Mapping[str, Any], modality: str, algorithm: Algorithm
) -> list[hd.sr.Measurement]:
    """The finding's numeric measurements. Its certainty names the model it came from
    (``confidence_source``) in its own algorithm identification (TID 4019 on the measurement):
    a reader tells the chest classifier's 0.5 from the capped second opinion's."""
    measures = (*MEASURES, MEAN_HU) if modality == "CT" else MEASURES
    source = finding.get("confidence_source")
    out = []
    for field, name, unit, scale in measures:
        value = finding.get(field)
        if value is None:
            continue
        algorithm_id = None
        if field == "confidence" and source:
            algorithm_id = hd.sr.AlgorithmIdentification(
                name=f"{algorithm.name} {source}"[:64], version=algorithm.version
            )
        out.append(
            hd.sr.Measurement(
                name=name, value=float(value) * scale, unit=unit, algorithm_id=algorithm_id
            )
        )
    return out


def _evaluations(finding: Mapping[str, Any]) -> list[hd.sr.QualitativeEvaluation]:
    out = []
    subtype = finding.get("subtype")
    if subtype:
        value = Code(str(subtype)[:16], LOCAL, str(subtype).replace("_", " "))
        out.append(hd.sr.QualitativeEvaluation(SUBTYPE, value))
    benign = finding.get("likely_benign")
    if benign is not None:
        out.append(
            hd.sr.QualitativeEvaluation(LIKELY_BENIGN, codes.SCT.Yes if benign else codes.SCT.No)
        )
    return out


def _sites(task: str, finding: Mapping[str, Any]) -> list[hd.sr.FindingSite]:
    site = SITES.get(task)
    if site is None:
        return []
    where = f"{finding.get('location') or ''} {finding.get('label') or ''}"
    side = codes.SCT.Right if "right" in where else codes.SCT.Left if "left" in where else None
    return [hd.sr.FindingSite(anatomic_location=site, laterality=side)]


def referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """Segment ``number`` of ``seg`` with the source images it was derived from. For a
    multi-frame source (an enhanced CT/MR) every source frame the segment lies on is named:
    highdicom's ``from_segmentation`` keeps the first frame of each source instance only."""
    sources: dict[str, tuple[str, list[int]]] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for src in derivation.get("SourceImageSequence", []):
                _, frames = sources.setdefault(
                    str(src.ReferencedSOPInstanceUID), (str(src.ReferencedSOPClassUID), [])
                )
                if "ReferencedFrameNumber" in src:
                    value = src.ReferencedFrameNumber
                    many = value if isinstance(value, MultiValue) else [value]
                    frames.extend(int(v) for v in many if int(v) not in frames)
    if not any(frames for _, frames in sources.values()):
        return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_images=[
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=cls,
                referenced_sop_instance_uid=uid,
                referenced_frame_numbers=sorted(frames) or None,
            )
            for uid, (cls, frames) in sources.items()
        ],
    )


def sr_dataset(
    sources: Sequence[Dataset],
    seg: Dataset | None,
    findings: Sequence[Mapping[str, Any]],
    segment_of: Mapping[str, int],
    *,
    task: str,
    modality: str,
    series_instance_uid: str,
    revision: int,
    algorithm: Algorithm,
) -> hd.sr.Comprehensive3DSR | None:
    """The SR of one series revision: a measurement group per finding :func:`reported`; a
    finding whose label is in ``segment_of`` references that segment of ``seg``, any other is
    a group without a region (TID 1501). None when there is nothing to report (TID 1500 needs
    a measurement group)."""
    if not sources:
        raise ValueError("an SR needs its source images")
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=seg_uid(series_instance_uid, revision, algorithm, "device"),
            name=algorithm.name[:64],
            manufacturer_name="RadStream",
            model_name=algorithm.name[:64],
        ),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for finding in findings:
        if not reported(finding, segment_of):
            continue
        label = str(finding["label"])
        kind = str(finding["type"])
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(
                uid=track_uid(series_instance_uid, revision, algorithm, label),
                identifier=label[:64],
            ),
            "finding_type": LESIONS.get(kind) or ORGANS[kind],
            "finding_category": codes.SCT.MorphologicallyAbnormalStructure
            if kind in LESIONS
            else codes.SCT.AnatomicalStructure,
            "algorithm_id": algorithm_id,
            "finding_sites": _sites(task, finding) or None,
            "measurements": _measurements(finding, modality, algorithm) or None,
            "qualitative_evaluations": _evaluations(finding) or None,
        }
        number = segment_of.get(label)
        if seg is not None and number is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=referenced_segment(seg, number),
                    **common,
                )
            )
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(**common))
    if not groups:
        return None
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURES.get(task, codes.LN.CTUnspecifiedBodyRegion),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, *((seg,) if seg is not None else ())],
        content=report,
        series_instance_uid=seg_uid(series_instance_uid, revision, algorithm, "sr-series"),
        series_number=9100 + revision % 100,
        sop_instance_uid=sr_uid(series_instance_uid, revision, algorithm),
        instance_number=1,
        manufacturer="RadStream",
        is_complete=True,
        is_final=False,  # an algorithm's result, not verified by a physician
        is_verified=False,
        series_description=f"RadStream {algorithm.name} r{revision} measurements"[:64],
    )


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()
