"""DICOM Segmentation objects (highdicom), validated when built.

The SEG references its source series, carries one segment per organ mask and one per finding
(its label and description give the finding's type, size, confidence and the features behind
the confidence) with SNOMED CT codes, and gets a deterministic SOP Instance UID derived from
(series, revision, algorithm, version): re-processing the same input makes the same object,
which is the idempotency key for PACS delivery.

Small on purpose (viewers refuse SEGs of more than a few hundred frames): BINARY (1 bit per
pixel, the smallest encoding every viewer reads), one frame per (segment, slice) that has
pixels of that segment, none for the empty ones; :func:`within_frames` keeps every finding's
segment and the organ segments only when the SEG stays within a frame budget with them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from shared.dicom import bounded
from shared.dicom.bounded import DEFAULT_BOUNDS, Bounds, InvalidInstance
from shared.imaging.frames import assemble_frames, frame_geometry, is_enhanced
from shared.runtime.errors import PoisonError

# segment kind → (category, type, default label)
SEGMENT_CODES = {
    "lung_left": (codes.SCT.Organ, codes.SCT.Lung, "Left lung"),
    "lung_right": (codes.SCT.Organ, codes.SCT.Lung, "Right lung"),
    "nodules": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule, "Nodule candidates"),
    "nodule": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule, "Nodule"),
    "mass": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Mass, "Mass"),
    "brain": (codes.SCT.Organ, codes.SCT.Brain, "Brain"),
    "haemorrhage": (
        codes.SCT.MorphologicallyAbnormalStructure,
        codes.SCT.Hemorrhage,
        "Haemorrhage",
    ),
}
MAX_DESCRIPTION = 1024  # SegmentDescription is ST


@dataclass(frozen=True)
class Segment:
    """One segment: ``kind`` picks its codes; ``key`` its stable tracking identity."""

    kind: str
    mask: np.ndarray  # bool (z, y, x), aligned with the sources
    key: str
    label: str | None = None  # SegmentLabel (LO, 64 characters)
    description: str | None = None  # SegmentDescription (ST, 1024 characters)
    findings: tuple[str, ...] = ()  # labels of the findings it holds (the SR references it)


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


def track_uid(series_instance_uid: str, revision: int, algorithm: Algorithm, key: str) -> str:
    """The Tracking UID of a finding (``key``: its label) or organ: its SEG segment's and its
    SR measurement group's, so that viewers and readers link the two."""
    return seg_uid(series_instance_uid, revision, algorithm, f"track-{key}")


def source_headers(instances: Sequence[bytes], bounds: Bounds = DEFAULT_BOUNDS) -> list[Dataset]:
    """The source instances' headers, each read within ``bounds`` (a bomb that reached the
    blob store before ingest's caps is refused with its reason, not parsed)."""
    out: list[Dataset] = []
    for data in instances:
        try:
            out.append(bounded.read(data, bounds, stop_before_pixels=True)[0])
        except InvalidInstance as exc:
            raise PoisonError(exc.reason, f"a source instance is refused: {exc.message}") from None
    return out


def frame_order(sources: Sequence[Dataset]) -> list[int] | None:
    """For one enhanced multi-frame source (the whole series in one instance): its frames
    (0-based) in volume order, as preprocess sorted them (along the normal, from the same
    functional groups); None for a series of single-frame instances."""
    if len(sources) != 1 or not is_enhanced(sources[0]):
        return None
    return assemble_frames(frame_geometry(sources[0])).order


def frames(segment: Segment) -> int:
    """Frames ``segment`` takes in a SEG: its non-empty slices."""
    return int(np.count_nonzero(segment.mask.reshape(segment.mask.shape[0], -1).any(axis=1)))


def is_organ(segment: Segment) -> bool:
    return bool(SEGMENT_CODES[segment.kind][0] == codes.SCT.Organ)


def within_frames(segments: Sequence[Segment], max_frames: int) -> list[Segment]:
    """``segments`` (their order kept), less the organ segments if together they would take
    the SEG past ``max_frames`` frames: every finding's segment stays; the organs come all
    together or not at all (a viewer showing one lung of two misleads)."""
    lesions = sum(frames(s) for s in segments if not is_organ(s))
    organs = sum(frames(s) for s in segments if is_organ(s))
    if lesions + organs <= max_frames:
        return list(segments)
    return [s for s in segments if not is_organ(s)]


def build_seg(
    sources: list[Dataset],
    masks: dict[str, np.ndarray] | Sequence[Segment],
    *,
    series_instance_uid: str,
    revision: int,
    algorithm: Algorithm,
) -> bytes:
    """:func:`seg_dataset` as Part 10 bytes."""
    seg = seg_dataset(
        sources,
        masks,
        series_instance_uid=series_instance_uid,
        revision=revision,
        algorithm=algorithm,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def seg_dataset(
    sources: list[Dataset],
    masks: dict[str, np.ndarray] | Sequence[Segment],
    *,
    series_instance_uid: str,
    revision: int,
    algorithm: Algorithm,
) -> hd.seg.Segmentation:
    """A BINARY SEG over ``sources`` (volume order) with one segment per non-empty mask, in
    the given order (segment numbers from 1); frames only where a segment has pixels.

    ``masks`` are (z, y, x) booleans in volume order, either by kind (one segment each) or as
    :class:`Segment` s: slice z is ``sources[z]``, or, for one enhanced multi-frame source, its
    frame at position z along the normal (:func:`frame_order`); the SEG's frames reference
    their source frame (Referenced Frame Number in the Derivation Image and Source Image
    Sequences).
    """
    if isinstance(masks, dict):
        segments = [Segment(n, m, n) for n, m in masks.items() if n in SEGMENT_CODES]
    else:
        segments = list(masks)
    segments = [s for s in segments if s.mask.any()]
    if not segments:
        raise ValueError("no non-empty mask to encode")
    order = frame_order(sources)
    planes = len(order) if order is not None else len(sources)
    for segment in segments:
        if segment.kind not in SEGMENT_CODES:
            raise ValueError(f"segment kind {segment.kind!r} has no codes")
        if segment.mask.shape[0] != planes:
            raise ValueError(
                f"segment {segment.key} has {segment.mask.shape[0]} slices "
                f"for {planes} source {'frames' if order is not None else 'instances'}"
            )
    ident = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.DCM.ImageProcessing
    )
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        category, prop, default = SEGMENT_CODES[segment.kind]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=(segment.label or default)[:64],
            segmented_property_category=category,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=ident,
            tracking_uid=track_uid(series_instance_uid, revision, algorithm, segment.key),
            tracking_id=f"{algorithm.name}:{segment.key}"[:64],
        )
        if segment.description:
            description.SegmentDescription = segment.description[:MAX_DESCRIPTION]
        descriptions.append(description)
    stack = np.stack([s.mask for s in segments], axis=-1).astype(bool)
    if order is not None:  # volume order -> the source's frame order (frame k of the SEG's
        # pixel array is source frame k + 1: highdicom references it by that number)
        in_source = np.zeros_like(stack)
        in_source[order] = stack
        stack = in_source
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
        omit_empty_frames=True,
    )
    return seg
