"""Segmentation's core: VolumePrepared → task (by modality/body part) → findings, masks,
DICOM SEG, overlay PNGs → SegmentationDone. No Kafka here."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from services.segmentation import tasks
from services.segmentation.onnx_plugin import OnnxSegmenter
from shared.dicom.seg import Algorithm, Segment, build_seg, seg_uid, source_headers
from shared.imaging.backend import Backend, DeviceRunner
from shared.imaging.overlay import overlay_png
from shared.imaging.packed import unpack_volume
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context
from shared.schemas import Finding, NamedBlob, SegmentationDone, VolumePrepared
from shared.storage import BlobError, BlobStore

log = logging.getLogger("radstream.segmentation")

WINDOWS = {"chest_ct": (-600.0, 1500.0), "head_ct": (40.0, 80.0)}


def task_for(modality: str, body_part: str | None, depth: int) -> str:
    part = (body_part or "").upper()
    if modality == "CT" and part in ("CHEST", "THORAX", "LUNG"):
        return "chest_ct"
    if modality == "CT" and part in ("HEAD", "BRAIN", "SKULL"):
        return "head_ct"
    if modality in ("DX", "CR", "MG", "XA", "RF") or (depth == 1 and modality != "CT"):
        return "radiograph"
    return "none"


@dataclass
class SegmentationCore:
    store: BlobStore
    backend: Backend
    plugin: OnnxSegmenter | None = None
    runner: DeviceRunner | None = None  # main.py passes one on the service's registry

    def __post_init__(self) -> None:
        self._runner = self.runner or DeviceRunner(self.backend, stage="segmentation")

    def handle(self, msg: VolumePrepared, ctx: Context) -> SegmentationDone:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            vol = unpack_volume(self.store.get(msg.volume)).astype(np.float32)
        except BlobError as exc:
            raise PoisonError(
                exc.reason, "the volume is missing or corrupt in the blob store"
            ) from None
        task = task_for(msg.modality, msg.body_part, vol.shape[0])
        geo = tasks.Geometry(msg.spacing_mm, msg.origin_mm, msg.direction)
        algorithm = Algorithm(f"radstream-{task}", tasks.VERSION)
        result: tasks.TaskResult | None = None
        t1 = time.perf_counter()
        if task != "none":
            fn: Any = {
                "chest_ct": tasks.chest_ct,
                "head_ct": tasks.head_ct,
                "radiograph": tasks.radiograph,
            }[task]
            # on the device, or redone on the cpu when the device fails (never a dead letter)
            result = self._runner.run(lambda be: _on_backend(fn, vol, geo, be))
        if self.plugin is not None and self.plugin.applies_to(msg.modality, msg.body_part):
            extra = self.plugin.run(vol, geo)
            if result is None:
                result, task = extra, extra.task
                algorithm = Algorithm(f"radstream-{extra.task.replace(':', '-')}", tasks.VERSION)
            else:
                result.masks.update(extra.masks)
                result.findings.extend(extra.findings)
                result.params.update({f"onnx_{k}": v for k, v in extra.params.items()})
        timings["segment"] = time.perf_counter() - t1
        findings = [Finding(**_clean(f)) for f in (result.findings if result else [])]

        t2 = time.perf_counter()
        masks_ref = seg_ref = None
        seg_sop = None
        overlays: list[NamedBlob] = []
        if result is not None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **result.masks)
            masks_ref = self.store.put(buf.getvalue())
            overlays = self._overlays(task, vol, result)
            if task in ("chest_ct", "head_ct") and len(msg.source_instances) == vol.shape[0]:
                try:
                    sources = source_headers(
                        [self.store.get(ref.blob) for ref in msg.source_instances]
                    )
                    seg_bytes = build_seg(
                        sources,
                        finding_segments(result, geo),
                        series_instance_uid=msg.series_instance_uid,
                        revision=msg.revision,
                        algorithm=algorithm,
                    )
                    seg_ref = self.store.put(seg_bytes)
                    seg_sop = seg_uid(msg.series_instance_uid, msg.revision, algorithm)
                except (ValueError, BlobError) as exc:
                    log.warning(
                        "segmentation: no DICOM SEG for this series (%s)", type(exc).__name__
                    )
        timings["outputs"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return SegmentationDone(
            study_instance_uid=msg.study_instance_uid,
            series_instance_uid=msg.series_instance_uid,
            revision=msg.revision,
            modality=msg.modality,
            body_part=msg.body_part,
            task=task,
            findings=findings,
            masks=masks_ref,
            seg=seg_ref,
            seg_sop_instance_uid=seg_sop,
            overlays=overlays,
            algorithm=algorithm.name,
            algorithm_version=algorithm.version,
            parameters={
                k: v
                for k, v in (result.params if result else {}).items()
                if isinstance(v, float | str)
            },
            source_offset=ctx.offset,
            source_partition=ctx.partition,
            timings_s={k: round(v, 4) for k, v in timings.items()},
            acquired_at=msg.acquired_at,
            last_published_at=msg.last_published_at,
        )

    def _overlays(self, task: str, vol: np.ndarray, result: tasks.TaskResult) -> list[NamedBlob]:
        if task == "radiograph" or task.startswith("onnx:"):
            if task.startswith("onnx:"):
                z = vol.shape[0] // 2
                masks2 = {k: v[z] for k, v in result.masks.items()}
                png = overlay_png(
                    vol[z], masks2, center=float(vol.mean()), width=float(4 * vol.std() or 1.0)
                )
                return [NamedBlob(name=f"slice-{z:04d}.png", blob=self.store.put(png))]
            img = vol[0]
            center, width = float(img.mean()), float(4 * img.std() or 1.0)
            masks = {k: v[0] for k, v in result.masks.items() if k != "edges"}
            return [
                NamedBlob(
                    name="radiograph.png",
                    blob=self.store.put(overlay_png(img, masks, center=center, width=width)),
                )
            ]
        center, width = WINDOWS[task]
        lesion = "nodule" if task == "chest_ct" else "haemorrhage"
        keys = [f.get("slice_index") for f in result.findings if f["type"] == lesion][:3]
        if not keys:
            organ = next(iter(result.masks.values()))
            zs = np.argwhere(organ.any(axis=(1, 2)))
            keys = [int(zs[len(zs) // 2][0])] if len(zs) else [vol.shape[0] // 2]
        out = []
        for z in dict.fromkeys(int(k) for k in keys if k is not None):
            png = overlay_png(
                vol[z], {k: v[z] for k, v in result.masks.items()}, center=center, width=width
            )
            out.append(NamedBlob(name=f"slice-{z:04d}.png", blob=self.store.put(png)))
        return out


def _on_backend(fn: Any, vol: np.ndarray, geo: tasks.Geometry, be: Backend) -> tasks.TaskResult:
    """Upload, run the task, download each mask once (host masks pass through), free."""
    try:
        result: tasks.TaskResult = fn(be.upload(vol), geo)
        result.masks = {
            k: be.download(v, why="mask").astype(bool, copy=False) for k, v in result.masks.items()
        }
        return result
    finally:
        be.free()


ORGANS = ("lung_left", "lung_right", "brain")
LESION_MASKS = {"nodule": "nodules", "mass": "nodules", "haemorrhage": "haemorrhage"}


def _describe(f: dict[str, Any]) -> tuple[str, str]:
    """SegmentLabel and SegmentDescription of a finding: what, how big, how sure, and why."""
    size = f.get("diameter_mm")
    conf = f.get("confidence")
    head = " ".join(
        p
        for p in (
            f["label"] + ":",
            f.get("subtype") or "",
            f"{size:.1f} mm" if size is not None else "",
            f"p={conf:.2f}" if conf is not None else "",
        )
        if p
    )
    parts = [
        f"{f['label']}: {f.get('subtype') or ''} {f['type']}".replace("  ", " "),
        f"diameter {size:.1f} mm" if size is not None else "",
        f"long/short axis {f['long_axis_mm']:.1f}/{f['short_axis_mm']:.1f} mm"
        if f.get("long_axis_mm") is not None and f.get("short_axis_mm") is not None
        else "",
        f"volume {f['volume_ml']:.2f} mL" if f.get("volume_ml") is not None else "",
        f"mean {f['mean_value']:.0f} HU" if f.get("mean_value") is not None else "",
        f"location {f['location']}" if f.get("location") else "",
        "likely benign" if f.get("likely_benign") else "",
        f"confidence {conf:.3f}" if conf is not None else "confidence not computed",
    ]
    text = ", ".join(p for p in parts if p)
    features = f.get("features") or {}
    if features:
        text += "; features: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(features.items()))
    return head[:64], text


def finding_segments(result: tasks.TaskResult, geo: tasks.Geometry) -> list[Segment]:
    """The SEG's segments: each organ mask, then one segment per lesion finding (the connected
    piece of its task's lesion mask that holds the finding), described by the finding."""
    segments = [
        Segment(n, np.asarray(result.masks[n], bool), n) for n in ORGANS if n in result.masks
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for f in result.findings:
        union = LESION_MASKS.get(str(f.get("type")))
        if union in result.masks and f.get("centroid_mm") is not None:
            groups.setdefault(union, []).append(f)
    for union, members in groups.items():
        labels, n = ndimage.label(
            np.asarray(result.masks[union], bool), structure=np.ones((3, 3, 3), bool)
        )
        if n == 0:
            continue
        centres = np.array(
            ndimage.center_of_mass(np.ones(labels.shape, np.int8), labels, range(1, n + 1))
        ).reshape(n, 3)
        owners: dict[int, list[dict[str, Any]]] = {}
        for f in members:
            z, y, x = geo.to_index(f["centroid_mm"])
            idx = tuple(
                min(max(round(v), 0), s - 1) for v, s in zip((z, y, x), labels.shape, strict=True)
            )
            cid = int(labels[idx])
            if cid == 0:  # a centroid outside its own (concave) mask: the nearest piece
                d = (centres - np.array([z, y, x])) * np.array(geo.spacing)
                cid = int(np.argmin((d**2).sum(axis=1))) + 1
            owners.setdefault(cid, []).append(f)
        for cid, fs in sorted(owners.items()):
            main = max(fs, key=lambda f: (f.get("confidence") or 0.0, f.get("volume_ml") or 0.0))
            label, text = _describe(main)
            if len(fs) > 1:
                text = "; ".join([text, *(_describe(f)[1] for f in fs if f is not main)])
            segments.append(
                Segment(str(main["type"]), labels == cid, str(main["label"]), label, text)
            )
    return segments


def _clean(f: dict[str, Any]) -> dict[str, Any]:
    allowed = set(Finding.model_fields)
    out = {k: v for k, v in f.items() if k in allowed}
    for k in ("volume_ml", "diameter_mm", "area_mm2", "mean_value"):
        if k in out and out[k] is not None:
            out[k] = float(out[k])
    for k in ("centroid_mm", "bbox_mm"):
        if k in out and out[k] is not None:
            out[k] = [float(v) for v in out[k]]
    return out
