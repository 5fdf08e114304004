"""Segmentation's core: VolumePrepared → task (by modality/body part) → findings and masks →
SegmentationDone, as soon as the task is done. The DICOM SEG, SR and overlay pictures are built
after the alert by the results stage, from the masks, volume and sources the record names.
No Kafka here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.segmentation import tasks
from services.segmentation.onnx_plugin import OnnxSegmenter
from shared.dicom.seg import Algorithm
from shared.imaging.backend import Backend, DeviceRunner, device_failure_cause
from shared.imaging.masks import pack_masks
from shared.imaging.packed import unpack_volume
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context
from shared.schemas import Finding, SegmentationDone, VolumePrepared
from shared.storage import BlobError, BlobStore
from shared.topology import FINDINGS

log = logging.getLogger("radstream.segmentation")


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

    # ---- GPU warm-up ----------------------------------------------------------------------
    def warm_up(self) -> list[str]:
        """On the GPU, run the chest and head tasks once on small realistic phantoms before the
        first series: CuPy compiles each kernel on first use (on a fresh H200 the first case of
        a process took 17-78 s, the next 12-17 s, the rest 0.3-6 s). Most of the tasks'
        kernels do not depend on the volume's size, and the chest's work runs on fixed-mm
        grids; a kernel that depends on a series' own spacing still compiles on its first use.
        A device failure here is logged, not fatal (records that need the kernel are redone on
        the CPU as usual); anything else is a bug and stops the service, as in preprocess's
        warm-up."""
        warmed: list[str] = []
        if self.backend.name != "gpu":
            return warmed
        from shared.phantoms.chest import chest_case
        from shared.phantoms.head import head_case

        chest = chest_case(1, size=128, thickness_mm=5.0, tree_points=600)
        head = head_case(1, size=128, thickness_mm=5.0)
        cases = (("chest_ct", tasks.chest_ct, chest), ("head_ct", tasks.head_ct, head))
        for name, fn, case in cases:
            vol = case.hu.astype(np.float32)
            geo = tasks.Geometry(case.spacing, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

            def run(fn: Any = fn, vol: np.ndarray = vol, geo: tasks.Geometry = geo) -> None:
                _on_backend(fn, vol, geo, self.backend)

            try:
                if self.backend.warm_up((name,), run):
                    warmed.append(name)
            except Exception as exc:
                cause = device_failure_cause(exc)
                if cause is None:
                    raise
                log.warning("segmentation: warm-up of %s failed on the device (%s)", name, cause)
        self.backend.free()
        return warmed

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
        # the masks, compactly; the SEG, SR and pictures are the results stage's, after the alert
        masks_ref = (
            self.store.put(pack_masks(result.masks), FINDINGS) if result is not None else None
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
            volume=msg.volume,
            shape=msg.shape,
            spacing_mm=msg.spacing_mm,
            origin_mm=msg.origin_mm,
            direction=msg.direction,
            source_instances=msg.source_instances,
        )


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
