"""Synthetic studies with known ground truth, written as proper DICOM series.

Chest CT (body wall with fat, two lungs, vessels, spine, optional nodules), head CT (skull,
brain, ventricles, optional acute haemorrhage of a given volume) and a radiograph. Values are
Hounsfield units stored as unsigned 16-bit with RescaleIntercept -1024, with Gaussian noise;
headers carry real geometry (ImagePositionPatient/Orientation, PixelSpacing, SliceThickness),
so phantoms exercise exactly the path a scanner's series does. Ground truth masks are saved
as ``truth.npz`` beside the series (same geometry: z, y, x).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

HU = {
    "air": -1000,
    "lung": -850,
    "fat": -100,
    "soft": 40,
    "blood": 65,
    "brain": 35,
    "csf": 5,
    "bone": 1000,
    "nodule": 30,
    "vessel": 45,
}
DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass
class Phantom:
    """A generated study: where its files are and its ground truth."""

    out: Path
    series_instance_uid: str
    study_instance_uid: str
    files: list[Path]
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # z, y, x in mm
    nodules_mm: list[float] = field(default_factory=list)
    bleed_ml: float = 0.0


def _save_truth(out: Path, truth: dict[str, np.ndarray], spacing: np.ndarray) -> None:
    arrays: dict[str, np.ndarray] = {**truth, "spacing": spacing}
    np.savez_compressed(out / "truth.npz", **arrays)  # type: ignore[arg-type]


def _uid(seed: int, what: str) -> str:
    return str(generate_uid(entropy_srcs=[f"radstream-phantom-{seed}-{what}"]))


def _base(
    kind: str, seed: int, study_uid: str, series_uid: str, modality: str, sop_class: str
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    when = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(minutes=seed % 600)
    ds.SOPClassUID = sop_class
    ds.PatientName = f"PHANTOM^{kind.upper()}^{seed}"
    ds.PatientID = f"RS-PH-{seed:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{seed:08d}"
    ds.StudyID = str(seed % 100000)
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "RadStream phantom"
    ds.InstitutionName = "RadStream"
    ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = _uid(seed, f"{kind}-for")
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _write_ct_series(
    kind: str,
    out: Path,
    seed: int,
    slices: Iterator[np.ndarray],
    n: int,
    size: int,
    spacing_xy: float,
    thickness: float,
    body_part: str,
    window: tuple[int, int],
) -> tuple[str, str, list[Path]]:
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = _uid(seed, f"{kind}-study"), _uid(seed, f"{kind}-series")
    files = []
    z0 = -(n - 1) * thickness / 2
    for i, hu in enumerate(slices):
        ds = _base(kind, seed, study_uid, series_uid, "CT", CTImageStorage)
        sop = _uid(seed, f"{kind}-sop-{i}")
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        ds.SOPInstanceUID = sop
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = body_part
        ds.KVP = 120
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [
            -(size - 1) * spacing_xy / 2,
            -(size - 1) * spacing_xy / 2,
            z0 + i * thickness,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z0 + i * thickness
        ds.PixelSpacing = [spacing_xy, spacing_xy]
        ds.Rows = ds.Columns = size
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = window
        stored = np.clip(np.rint(hu) + 1024, 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        path = out / f"IM{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, series_uid, files


def chest_ct(
    out: Path,
    *,
    seed: int = 0,
    size: int = 256,
    slices: int = 64,
    spacing_xy: float | None = None,
    thickness: float = 2.5,
    nodules_mm: tuple[float, ...] = (8.0, 12.0),
    noise: float = 15.0,
    wall_nodules_mm: tuple[float, ...] = (),
    uid_seed: int | None = None,
) -> Phantom:
    """Chest CT: body, fat, left/right lungs, vessels, spine, spherical nodules in the lungs,
    and optionally juxtapleural nodules sitting on the lateral chest wall."""
    rng = np.random.default_rng(seed)
    sxy = spacing_xy or 350.0 / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    zc = np.arange(slices, dtype=np.float32) * thickness
    zmid = zc[-1] / 2
    half_z = max(zc[-1] / 2, thickness)
    # geometry in mm
    body_a, body_b = 160.0, 115.0
    lung_a, lung_b, lung_off = 55.0, 80.0, 70.0
    truth = {
        k: np.zeros((slices, size, size), bool)
        for k in ("body", "lung_left", "lung_right", "nodules")
    }
    nodules = []
    for i, d in enumerate(nodules_mm):
        side = 1 if i % 2 == 0 else -1
        r = d / 2
        # inside the lung, away from its border by at least the radius (+2 mm)
        for _ in range(200):
            oy = rng.uniform(-(lung_b - r - 8), lung_b - r - 8)
            ox = rng.uniform(-(lung_a - r - 8), lung_a - r - 8)
            oz = rng.uniform(-(half_z * 0.6 - r), half_z * 0.6 - r) if half_z * 0.6 > r else 0.0
            if (ox / (lung_a - r - 4)) ** 2 + (oy / (lung_b - r - 4)) ** 2 + (
                oz / half_z
            ) ** 2 < 0.8:
                break
        nodules.append((cx * sxy + side * lung_off + ox, cy * sxy + oy, zmid + oz, r))
    for i, d in enumerate(wall_nodules_mm):
        side = -1 if i % 2 == 0 else 1
        r = d / 2
        # centred a quarter of its diameter inside the lateral lung edge: it touches the wall
        edge_x = cx * sxy + side * (lung_off + lung_a - r / 2)
        nodules.append((edge_x, cy * sxy + rng.uniform(-20, 20), zmid + rng.uniform(-5, 5), r))
    vessels = [
        (
            cx * sxy + s * (lung_off + rng.uniform(-20, 20)),
            cy * sxy + rng.uniform(-40, 40),
            rng.uniform(2.0, 3.5),
        )
        for s in (1, -1)
        for _ in range(3)
    ]

    def gen() -> Iterator[np.ndarray]:
        for k in range(slices):
            zz = zc[k] - zmid
            taper = max(0.0, 1 - (zz / (half_z * 1.15)) ** 2)
            ym, xm = (y - cy) * sxy, (x - cx) * sxy
            img = np.full((size, size), HU["air"], np.float32)
            body = (xm / body_a) ** 2 + (ym / body_b) ** 2 <= 1
            img[body] = HU["fat"]
            inner = (xm / (body_a - 12)) ** 2 + (ym / (body_b - 12)) ** 2 <= 1
            img[inner] = HU["soft"]
            lungs = {}
            for name, side in (("lung_right", -1), ("lung_left", 1)):
                # patient's left is image right (+x) in the standard axial view
                a, b = lung_a * np.sqrt(taper), lung_b * np.sqrt(taper)
                m = (
                    ((xm - side * lung_off) / max(a, 1e-3)) ** 2 + (ym / max(b, 1e-3)) ** 2 <= 1
                    if taper > 0
                    else np.zeros_like(body)
                )
                img[m] = HU["lung"]
                lungs[name] = m
            spine = ((xm) / 18) ** 2 + ((ym - 85) / 18) ** 2 <= 1
            img[spine] = HU["bone"]
            for vx, vy, vr in vessels:
                v = (x * sxy - vx) ** 2 + (y * sxy - vy) ** 2 <= vr**2
                img[v & (lungs["lung_left"] | lungs["lung_right"])] = HU["vessel"]
            nod = np.zeros((size, size), bool)
            for nx, ny, nz, r in nodules:
                dz = zc[k] - nz
                if abs(dz) < r:
                    rr = np.sqrt(r**2 - dz**2)
                    nod |= (x * sxy - nx) ** 2 + (y * sxy - ny) ** 2 <= rr**2
            img[nod] = HU["nodule"]
            truth["body"][k] = body
            truth["lung_left"][k] = lungs["lung_left"] & ~nod
            truth["lung_right"][k] = lungs["lung_right"] & ~nod
            truth["nodules"][k] = nod
            yield img + rng.normal(0, noise, img.shape).astype(np.float32)

    study, series, files = _write_ct_series(
        "chest",
        out,
        seed if uid_seed is None else uid_seed,
        gen(),
        slices,
        size,
        sxy,
        thickness,
        "CHEST",
        (-600, 1500),
    )
    _save_truth(out, truth, np.array([thickness, sxy, sxy]))
    return Phantom(out, series, study, files, truth, (thickness, sxy, sxy), list(nodules_mm))


def head_ct(
    out: Path,
    *,
    seed: int = 0,
    size: int = 256,
    slices: int = 48,
    spacing_xy: float | None = None,
    thickness: float = 3.0,
    bleed_ml: float = 5.0,
    noise: float = 4.0,
    uid_seed: int | None = None,
) -> Phantom:
    """Head CT: skull, brain, ventricles and (if ``bleed_ml`` > 0) an acute haemorrhage.
    ``uid_seed`` (default: ``seed``) varies the UIDs while the pixels stay those of ``seed``."""
    rng = np.random.default_rng(seed)
    sxy = spacing_xy or 220.0 / size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2, size / 2
    zc = np.arange(slices, dtype=np.float32) * thickness
    zmid = zc[-1] / 2
    half_z = max(zc[-1] / 2 * 1.05, thickness)
    ha, hb = 75.0, 92.0
    truth = {k: np.zeros((slices, size, size), bool) for k in ("brain", "haemorrhage")}
    # an ellipsoidal bleed of the requested volume, inside the brain parenchyma
    r = (3 * bleed_ml * 1000 / (4 * np.pi * 1.5)) ** (1 / 3) if bleed_ml > 0 else 0.0
    bx = cx * sxy + rng.choice([-1, 1]) * rng.uniform(20, 30)
    by = cy * sxy + rng.uniform(-25, 25)
    bz = zmid + rng.uniform(-0.15, 0.15) * half_z

    def gen() -> Iterator[np.ndarray]:
        for k in range(slices):
            zz = (zc[k] - zmid) / half_z
            s = np.sqrt(max(0.0, 1 - zz**2))
            ym, xm = (y - cy) * sxy, (x - cx) * sxy
            img = np.full((size, size), HU["air"], np.float32)
            outer = (xm / (ha * s + 1e-3)) ** 2 + (ym / (hb * s + 1e-3)) ** 2 <= 1
            inner = (xm / max(ha * s - 7, 1e-3)) ** 2 + (ym / max(hb * s - 7, 1e-3)) ** 2 <= 1
            img[outer] = HU["bone"]
            img[inner] = HU["brain"]
            vent = ((np.abs(xm) - 9) / 5) ** 2 + (ym / 22) ** 2 <= 1
            vent &= inner & (abs(zz) < 0.3)
            img[vent] = HU["csf"]
            bleed = np.zeros((size, size), bool)
            if r > 0:
                dz = (zc[k] - bz) / (r * 1.5)
                if abs(dz) < 1:
                    rr = r * np.sqrt(1 - dz**2)
                    bleed = ((x * sxy - bx) ** 2 + (y * sxy - by) ** 2 <= rr**2) & inner & ~vent
            img[bleed] = HU["blood"]
            truth["brain"][k] = inner
            truth["haemorrhage"][k] = bleed
            yield img + rng.normal(0, noise, img.shape).astype(np.float32)

    study, series, files = _write_ct_series(
        "head",
        out,
        seed if uid_seed is None else uid_seed,
        gen(),
        slices,
        size,
        sxy,
        thickness,
        "HEAD",
        (40, 80),
    )
    vox_ml = thickness * sxy * sxy / 1000.0
    _save_truth(out, truth, np.array([thickness, sxy, sxy]))
    ph = Phantom(out, series, study, files, truth, (thickness, sxy, sxy))
    ph.bleed_ml = float(truth["haemorrhage"].sum() * vox_ml)
    return ph


def radiograph(
    out: Path, *, seed: int = 0, size: int = 512, spacing: float = 0.3, noise: float = 20.0
) -> Phantom:
    """A chest radiograph (DX): bright ribs and mediastinum, dark lungs, 12-bit values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 3000.0, np.float32)
    lungs = np.zeros((size, size), bool)
    for cx in (0.3, 0.7):
        lungs |= ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1
    img[lungs] = 900
    for k in range(8):
        rib = np.abs(y - (0.25 + k * 0.065) - 0.05 * np.sin(x * 6)) < 0.008
        img[rib & lungs] = 1800
    med = (np.abs(x - 0.5) < 0.07) & (y > 0.15) & (y < 0.9)
    img[med] = 2600
    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 4095)
    out.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = _uid(seed, "dx-study"), _uid(seed, "dx-series")
    ds = _base("radiograph", seed, study_uid, series_uid, "DX", DIGITAL_XRAY)
    sop = _uid(seed, "dx-sop")
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.SOPInstanceUID = sop
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.InstanceNumber = 1
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = ds.Columns = size
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = img.astype(np.uint16).tobytes()
    path = out / "DX00001.dcm"
    ds.save_as(path, enforce_file_format=True)
    truth = {"lungs": lungs[None]}
    _save_truth(out, truth, np.array([1.0, spacing, spacing]))
    return Phantom(out, series_uid, study_uid, [path], truth, (1.0, spacing, spacing))
