"""DICOM Segmentation objects (highdicom), validated when built.

The SEG references its source series (one frame per source slice that has any segment),
carries one segment per mask with SNOMED CT codes, and gets a deterministic SOP Instance UID
derived from (series, revision, algorithm, version): re-processing the same input makes the
same object, which is the idempotency key for PACS delivery.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

# mask name → (category, type)
SEGMENT_CODES = {
    "lung_left": (codes.SCT.Organ, codes.SCT.Lung, "Left lung"),
    "lung_right": (codes.SCT.Organ, codes.SCT.Lung, "Right lung"),
    "nodules": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule, "Nodule candidates"),
    "brain": (codes.SCT.Organ, codes.SCT.Brain, "Brain"),
    "haemorrhage": (
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.Hemorrhage,
        "Haemorrhage candidates",
    ),
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str


def seg_uid(
    series_instance_uid: str, revision: int, algorithm: Algorithm, what: str = "sop"
) -> str:
    return str(
        generate_uid(
            entropy_srcs=[
                series_instance_uid,
                str(revision),
                algorithm.name,
                algorithm.version,
                what,
            ]
        )
    )


def source_headers(instances: Sequence[bytes]) -> list[Dataset]:
    return [pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for data in instances]


def build_seg(
    sources: list[Dataset],
    masks: dict[str, np.ndarray],
    *,
    series_instance_uid: str,
    revision: int,
    algorithm: Algorithm,
) -> bytes:
    """A BINARY SEG over ``sources`` (volume order) with one segment per non-empty mask.

    ``masks`` are (z, y, x) booleans aligned with ``sources``. Returns Part 10 bytes.
    """
    names = [n for n in masks if n in SEGMENT_CODES and masks[n].any()]
    if not names:
        raise ValueError("no non-empty mask to encode")
    for name in names:
        if masks[name].shape[0] != len(sources):
            raise ValueError(
                f"mask {name} has {masks[name].shape[0]} slices for {len(sources)} sources"
            )
    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.DCM.ImageProcessing
    )
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, prop, label = SEGMENT_CODES[name]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=ident,
                tracking_uid=seg_uid(series_instance_uid, revision, algorithm, f"track-{name}"),
                tracking_id=f"{algorithm.name}:{name}",
            )
        )
    stack = np.stack([masks[n] for n in names], axis=-1).astype(bool)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=seg_uid(series_instance_uid, revision, algorithm, "series"),
        series_number=9000 + revision % 1000,
        sop_instance_uid=seg_uid(series_instance_uid, revision, algorithm),
        instance_number=1,
        manufacturer="RadStream",
        manufacturer_model_name="radstream-segmentation",
        software_versions=algorithm.version,
        device_serial_number="radstream",
        series_description=f"RadStream {algorithm.name} r{revision}",
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()
