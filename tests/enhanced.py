"""Enhanced CT / MR Image Storage instances built with pydicom for the tests: one instance holding
a whole series, its geometry and rescale in functional groups (shared or per frame), as recent
scanners send. :func:`from_series` turns a single-frame phantom series into its enhanced twin
(same patient, study, pixels and geometry; a new series and SOP Instance UID)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from shared.schemas import SegmentationDone

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "InstitutionName",
    "BodyPartExamined",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
)


def _item(**values: object) -> DicomSequence:
    ds = Dataset()
    for name, value in values.items():
        setattr(ds, name, value)
    return DicomSequence([ds])


def enhanced(
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float],
    origin: Sequence[float],
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    frame_order: Sequence[int] | None = None,
    rescale: Sequence[tuple[float, float]] | None = None,
    per_frame_orientation: bool = False,
    positions: np.ndarray | None = None,
    template: Dataset | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> bytes:
    """An Enhanced CT (or MR) instance of the volume ``hu`` (z, y, x; z along the normal from
    ``origin``, ``spacing`` (z, y, x) mm). Frame ``k`` of the file is volume slice
    ``frame_order[k]`` (default: in order); ``rescale`` gives each *file* frame its own
    (slope, intercept) (default: one shared -1024 / 1 group); ``per_frame_orientation`` puts
    the orientation in every frame's groups instead of the shared ones; ``positions``
    ((z, 3), volume order) overrides the computed ones (to make bad inputs)."""
    z = hu.shape[0]
    order = list(frame_order) if frame_order is not None else list(range(z))
    ori = np.asarray(orientation, float)
    normal = np.cross(ori[:3], ori[3:])
    if positions is None:
        positions = np.asarray(origin, float) + np.outer(np.arange(z) * spacing[0], normal)
    sop_class = ENHANCED_CT if modality == "CT" else ENHANCED_MR
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    sop = sop_uid or str(generate_uid())
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    if template is not None:
        for name in COPIED:
            if name in template:
                setattr(ds, name, template.data_element(name).value)  # type: ignore[union-attr]
    else:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "MF^TEST", "MF1", "", "O"
        ds.StudyInstanceUID = str(generate_uid())
        ds.StudyDate, ds.StudyTime = "20260101", "080000"
        ds.ContentDate, ds.ContentTime = "20260101", "080000"
        ds.AcquisitionDate, ds.AcquisitionTime = "20260101", "080000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.FrameOfReferenceUID = str(generate_uid())
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "RadStream phantom"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.SeriesInstanceUID = series_uid or str(generate_uid())
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.AcquisitionDateTime = f"{ds.get('AcquisitionDate', '20260101')}080000"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
    ds.NumberOfFrames = len(order)
    ds.PresentationLUTShape = "IDENTITY"
    ds.VolumetricProperties = "VOLUME"
    dim_org = str(generate_uid())
    ds.DimensionOrganizationSequence = _item(DimensionOrganizationUID=dim_org)
    ds.DimensionIndexSequence = _item(
        DimensionOrganizationUID=dim_org,
        DimensionIndexPointer=0x00200032,
        FunctionalGroupPointer=0x00209113,
        DimensionDescriptionLabel="Image Position",
    )
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(
        PixelSpacing=[spacing[1], spacing[2]],
        SliceThickness=spacing[0],
        SpacingBetweenSlices=spacing[0],
    )
    if not per_frame_orientation:
        shared.PlaneOrientationSequence = _item(ImageOrientationPatient=list(ori))
    if rescale is None:
        shared.PixelValueTransformationSequence = _item(
            RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU" if modality == "CT" else "US"
        )
    if modality == "CT":
        shared.CTImageFrameTypeSequence = _item(
            FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    stored = np.empty((len(order), *hu.shape[1:]), np.uint16)
    for k, zi in enumerate(order):
        item = Dataset()
        item.FrameContentSequence = _item(DimensionIndexValues=[zi + 1], StackID="1")
        item.FrameContentSequence[0].InStackPositionNumber = zi + 1
        item.PlanePositionSequence = _item(
            ImagePositionPatient=[round(float(v), 4) for v in positions[zi]]
        )
        if per_frame_orientation:
            item.PlaneOrientationSequence = _item(ImageOrientationPatient=list(ori))
        slope, intercept = rescale[k] if rescale is not None else (1.0, -1024.0)
        if rescale is not None:
            item.PixelValueTransformationSequence = _item(
                RescaleIntercept=intercept,
                RescaleSlope=slope,
                RescaleType="HU" if modality == "CT" else "US",
            )
        stored[k] = np.clip(np.rint((hu[zi] - intercept) / slope), 0, 65535)
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def from_series(paths: Sequence[Path], **options: object) -> bytes:
    """The enhanced twin of a single-frame series (``options`` as for :func:`enhanced`)."""
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    ori = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(ori[:3], ori[3:])
    slices.sort(key=lambda s: float(np.dot(normal, [float(v) for v in s.ImagePositionPatient])))
    hu = np.stack(
        [
            s.pixel_array.astype(np.float64) * float(s.RescaleSlope) + float(s.RescaleIntercept)
            for s in slices
        ]
    )
    pos = [np.asarray([float(v) for v in s.ImagePositionPatient]) for s in slices]
    dz = float(np.dot(normal, pos[1] - pos[0])) if len(pos) > 1 else float(first.SliceThickness)
    px = [float(v) for v in first.PixelSpacing]
    kwargs: dict[str, object] = {
        "spacing": (dz, px[0], px[1]),
        "origin": pos[0],
        "orientation": ori,
        "template": first,
        "modality": str(first.Modality),
    }
    kwargs.update(options)
    return enhanced(hu, **kwargs)  # type: ignore[arg-type]


def assert_same_findings(single: SegmentationDone, multi: SegmentationDone) -> None:
    """The enhanced twin's findings are its single-frame series': the same volume geometry,
    the same findings (type, label, subtype, side) in the same order, sizes within 2 %."""
    assert len(multi.source_instances) == 1 and multi.shape == single.shape
    assert multi.spacing_mm == pytest.approx(single.spacing_mm, abs=1e-3)
    assert multi.origin_mm == pytest.approx(single.origin_mm, abs=1e-3)
    key = [(f.type, f.label, f.subtype, f.location) for f in single.findings]
    assert [(f.type, f.label, f.subtype, f.location) for f in multi.findings] == key
    for a, b in zip(single.findings, multi.findings, strict=True):
        for name in ("diameter_mm", "volume_ml"):
            va, vb = getattr(a, name), getattr(b, name)
            assert (va is None) == (vb is None), (a.label, name)
            if va is not None:
                assert vb == pytest.approx(va, rel=0.02, abs=0.05), (a.label, name)
