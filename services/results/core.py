"""Results' core: SegmentationDone → the paperwork of a series revision, after its alerts.

From the findings record (masks, volume, geometry, source instances by claim check) it builds
the DICOM SEG (BINARY, no empty frames, one segment per finding, organs only within the frame
budget), a Comprehensive 3D SR with a TID 1500 measurement group per lesion finding that
references its segment, and the overlay PNGs; it delivers SEG and SR to the PACS (C-FIND, then
C-STORE, or QIDO-RS, then STOW-RS, as configured: their deterministic SOP Instance UIDs are the
idempotency keys), records each delivery
on ``audit`` and publishes one :class:`ResultsReady` under the series key. No Kafka here.

A PACS that cannot be reached is retried by the runtime (the handler raises RetriableError);
on the last attempt the record is published with the delivery ``failed`` instead of being
dead-lettered, so the SEG, SR and pictures stay findable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.dicom import pacs as dimse
from shared.dicom.pacs import Delivered, Pacs
from shared.dicom.seg import (
    Algorithm,
    Segment,
    frame_order,
    frames,
    is_organ,
    seg_dataset,
    source_headers,
    track_uid,
    within_frames,
)
from shared.dicom.segments import finding_segments
from shared.dicom.sr import reported, sr_dataset, to_bytes
from shared.dicomweb import client as dicomweb
from shared.dicomweb.client import DicomWebPacs
from shared.imaging.errors import ImagingError
from shared.imaging.geometry import Geometry
from shared.imaging.masks import unpack_masks
from shared.imaging.overlay import LESIONS as PICTURED
from shared.imaging.overlay import key_slices
from shared.imaging.packed import unpack_volume
from shared.runtime.errors import PoisonError, RetriableError
from shared.runtime.stage import Context, Emit
from shared.schemas import (
    AuditEvent,
    BlobRef,
    Delivery,
    NamedBlob,
    ResultsReady,
    SegmentationDone,
    SegmentRef,
)
from shared.storage import BlobError, BlobStore
from shared.topology import AUDIT, FINDINGS

log = logging.getLogger("radstream.results")

DICOM_TASKS = ("chest_ct", "head_ct")  # tasks whose results are DICOM SEG + SR
BUILD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class ResultsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "radstream_pacs_deliveries",
            "DICOM objects offered to the PACS, by object and outcome",
            ["object", "outcome"],
            registry=registry,
        )
        self.build = Histogram(
            "radstream_results_build_seconds",
            "Time to build a series' results, by part",
            ["part"],
            buckets=BUILD_BUCKETS,
            registry=registry,
        )


@dataclass
class Built:
    """What a findings record becomes before delivery."""

    seg: bytes | None = None
    seg_ref: BlobRef | None = None
    seg_uid: str | None = None
    seg_frames: int = 0
    sr: bytes | None = None
    sr_ref: BlobRef | None = None
    sr_uid: str | None = None
    segments: list[SegmentRef] = field(default_factory=list)
    organs_left_out: list[str] = field(default_factory=list)
    not_built: str | None = None
    overlays: list[NamedBlob] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ResultsCore:
    store: BlobStore
    pacs: Pacs | DicomWebPacs | None = None  # C-STORE or STOW-RS, as configured
    seg_max_frames: int = 400
    metrics: ResultsMetrics | None = None

    def handle(self, msg: SegmentationDone, ctx: Context) -> list[Emit | ResultsReady]:
        t0 = time.perf_counter()
        built = self.build(msg)
        t1 = time.perf_counter()
        deliveries = self.deliver(built, ctx)
        built.timings["deliver"] = time.perf_counter() - t1
        built.timings["total"] = time.perf_counter() - t0
        audits: list[Emit | ResultsReady] = [
            Emit(
                AUDIT,
                AuditEvent(
                    actor="results",
                    action=f"pacs_{d.outcome}",
                    resource=ctx.keyring.keyed_hash(d.sop_instance_uid).decode(),
                    outcome="error" if d.outcome == "failed" else "success",
                ),
            )
            for d in deliveries
            if d.outcome != "not_configured"
        ]
        return [*audits, self.record(msg, built, deliveries, ctx)]

    # ---- build --------------------------------------------------------------------------
    def _get(self, ref: BlobRef, what: str) -> bytes:
        try:
            return self.store.get(ref)
        except BlobError as exc:
            message = f"the {what} is missing or corrupt in the blob store"
            raise PoisonError(exc.reason, message) from None

    def build(self, msg: SegmentationDone) -> Built:
        built = Built()
        if msg.masks is None:
            return built  # nothing was segmented (task none): nothing to show or deliver
        t = time.perf_counter()
        masks = unpack_masks(self._get(msg.masks, "masks"))  # ImagingError: undecodable
        findings = [f.model_dump() for f in msg.findings]
        built.timings["masks"] = time.perf_counter() - t
        geo = _geometry(msg)
        if not masks:
            return built
        if msg.volume is not None and (
            msg.task in PICTURED or msg.task == "radiograph" or msg.task.startswith("onnx:")
        ):
            t = time.perf_counter()
            vol = unpack_volume(self._get(msg.volume, "volume"))
            built.overlays = [
                NamedBlob(name=name, blob=self.store.put(png, FINDINGS))
                for name, png in key_slices(msg.task, vol, masks, findings)
            ]
            built.timings["overlays"] = self._timed("overlays", t)
        if msg.task not in DICOM_TASKS:
            return built
        if geo is None or not msg.source_instances:
            built.not_built = "the findings record carries no geometry or source instances"
            return built
        single = len(msg.source_instances) > 1
        if single and any(m.shape[0] != len(msg.source_instances) for m in masks.values()):
            built.not_built = "the masks and the source instances differ in slice count"
            return built
        t = time.perf_counter()
        instances = [self._get(r.blob, "source instance") for r in msg.source_instances]
        sources = source_headers(instances)
        built.timings["sources"] = time.perf_counter() - t
        try:
            order = frame_order(sources)  # one enhanced instance: its frames, volume order
        except ImagingError as exc:  # preprocess built a volume from it: not expected
            built.not_built = f"the source's frames do not make a volume ({exc.reason})"
            return built
        planes = len(order) if order is not None else len(sources)
        if any(m.shape[0] != planes for m in masks.values()):
            built.not_built = "the masks and the source instances differ in slice count"
            return built
        algorithm = Algorithm(msg.algorithm, msg.algorithm_version)
        try:
            self._dicom(built, msg, sources, masks, findings, geo, algorithm)
        except ValueError as exc:  # highdicom refuses what it cannot encode: no SEG, no SR
            log.warning("results: no DICOM SEG/SR for this series (%s)", type(exc).__name__)
            built.seg = built.sr = built.seg_uid = built.sr_uid = None
            built.seg_ref = built.sr_ref = None
            built.seg_frames = 0
            built.not_built = f"DICOM encoding refused the series ({type(exc).__name__})"
        return built

    def _dicom(
        self,
        built: Built,
        msg: SegmentationDone,
        sources: list[Any],
        masks: dict[str, np.ndarray],
        findings: list[dict[str, Any]],
        geo: Geometry,
        algorithm: Algorithm,
    ) -> None:
        t = time.perf_counter()
        every = [s for s in finding_segments(masks, findings, geo) if s.mask.any()]
        kept = within_frames(every, self.seg_max_frames)
        built.organs_left_out = [s.key for s in every if is_organ(s) and not _has(kept, s)]
        seg = None
        if kept:
            seg = seg_dataset(
                sources,
                kept,
                series_instance_uid=msg.series_instance_uid,
                revision=msg.revision,
                algorithm=algorithm,
            )
            built.seg, built.seg_uid = to_bytes(seg), str(seg.SOPInstanceUID)
            built.seg_ref = self.store.put(built.seg, FINDINGS)
            built.seg_frames = sum(frames(s) for s in kept)
        built.timings["seg"] = self._timed("seg", t)
        segment_of = {
            label: n for n, s in enumerate(kept, start=1) for label in (s.findings or (s.key,))
        }
        t = time.perf_counter()
        sr = sr_dataset(
            sources,
            seg,
            findings,
            segment_of,
            task=msg.task,
            modality=msg.modality,
            series_instance_uid=msg.series_instance_uid,
            revision=msg.revision,
            algorithm=algorithm,
        )
        if sr is not None:
            built.sr, built.sr_uid = to_bytes(sr), str(sr.SOPInstanceUID)
            built.sr_ref = self.store.put(built.sr, FINDINGS)
        built.timings["sr"] = self._timed("sr", t)
        built.segments = [
            SegmentRef(
                finding_label=f["label"],
                type=f["type"],
                segment_number=segment_of.get(f["label"]),
                tracking_uid=track_uid(
                    msg.series_instance_uid, msg.revision, algorithm, f["label"]
                ),
                in_sr=sr is not None and reported(f, segment_of),
            )
            for f in findings
            if f["label"] in segment_of or reported(f, segment_of)
        ]

    def _timed(self, part: str, since: float) -> float:
        took = time.perf_counter() - since
        if self.metrics is not None:
            self.metrics.build.labels(part).observe(took)
        return took

    # ---- deliver ------------------------------------------------------------------------
    def deliver(self, built: Built, ctx: Context) -> list[Delivery]:
        """SEG first, then SR (the SR references the SEG). RetriableError while the runtime
        has attempts left; on the last one a failure is recorded instead."""
        out = []
        for kind, data, uid in (("SEG", built.seg, built.seg_uid), ("SR", built.sr, built.sr_uid)):
            if data is None or uid is None:
                continue
            obj: Literal["SEG", "SR"] = "SEG" if kind == "SEG" else "SR"
            if self.pacs is None:
                out.append(Delivery(object=obj, sop_instance_uid=uid, outcome="not_configured"))
                continue
            try:
                outcome = _deliver(self.pacs, data)
                out.append(Delivery(object=obj, sop_instance_uid=uid, outcome=outcome))
            except RetriableError as exc:
                if not ctx.last_attempt:
                    raise
                log.warning("results: %s not delivered after %d attempts", kind, ctx.attempt)
                out.append(
                    Delivery(
                        object=obj,
                        sop_instance_uid=uid,
                        outcome="failed",
                        message=str(exc)[:200],
                    )
                )
        if self.metrics is not None:
            for d in out:
                self.metrics.deliveries.labels(d.object, d.outcome).inc()
        return out

    @staticmethod
    def record(
        msg: SegmentationDone, built: Built, deliveries: Sequence[Delivery], ctx: Context
    ) -> ResultsReady:
        outcomes = {d.outcome for d in deliveries}
        overall: Literal["delivered", "failed", "not_configured", "nothing_to_deliver"]
        if not deliveries:
            overall = "nothing_to_deliver"
        elif "failed" in outcomes:
            overall = "failed"
        elif outcomes == {"not_configured"}:
            overall = "not_configured"
        else:
            overall = "delivered"
        return ResultsReady(
            study_instance_uid=msg.study_instance_uid,
            series_instance_uid=msg.series_instance_uid,
            revision=msg.revision,
            modality=msg.modality,
            body_part=msg.body_part,
            task=msg.task,
            algorithm=msg.algorithm,
            algorithm_version=msg.algorithm_version,
            seg=built.seg_ref,
            seg_sop_instance_uid=built.seg_uid,
            seg_frames=built.seg_frames,
            sr=built.sr_ref,
            sr_sop_instance_uid=built.sr_uid,
            segments=built.segments,
            organs_left_out=built.organs_left_out,
            not_built=built.not_built,
            overlays=built.overlays,
            deliveries=list(deliveries),
            delivery=overall,
            source_partition=ctx.partition,
            source_offset=ctx.offset,
            timings_s={k: round(v, 4) for k, v in built.timings.items()},
        )


def _deliver(pacs: Pacs | DicomWebPacs, data: bytes) -> Delivered:
    """Check, then store: C-FIND + C-STORE or QIDO-RS + STOW-RS (same idempotency key)."""
    if isinstance(pacs, DicomWebPacs):
        return dicomweb.deliver(pacs, data)
    return dimse.deliver(pacs, data)


def _has(segments: Sequence[Segment], segment: Segment) -> bool:
    return any(s is segment for s in segments)


def _geometry(msg: SegmentationDone) -> Geometry | None:
    if msg.spacing_mm is None or msg.origin_mm is None or msg.direction is None:
        return None
    return Geometry(msg.spacing_mm, msg.origin_mm, msg.direction)
