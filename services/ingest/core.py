"""Ingest's pure core: validate an instance, store it, assemble series in keyed state.

State per series (key: keyed hash of the SeriesInstanceUID) is a small JSON document; the
runtime writes it to the compacted changelog in the same transaction as the output, so a
crash at any point resumes exactly. Completion: the end-of-series marker's count reached,
or no new instance for ``inactivity_timeout_s``. Duplicates (same SOP Instance UID) change
nothing. An instance after completion makes the series "dirty"; once quiet for
``late_quiet_s`` it is published again as the next revision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from shared.config import IngestSettings
from shared.dicom.safe import InstanceInfo, InvalidInstance, Limits, inspect_instance
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context, Emit, HandlerResult
from shared.schemas import BlobRef, EndOfSeries, InstanceData, InstanceRef, SeriesReady
from shared.storage import BlobStore
from shared.topology import stage

SERIES_TOPIC = stage("ingest").outputs[0]  # the topology's: where completed series go


@dataclass
class IngestCore:
    store: BlobStore
    settings: IngestSettings
    in_assembly: Gauge | None = None  # series not yet complete, per partition

    @property
    def limits(self) -> Limits:
        return Limits(
            max_bytes=self.settings.max_instance_bytes,
            max_sequence_depth=self.settings.max_sequence_depth,
        )

    # ---- handler ------------------------------------------------------------------------
    def handle(self, msg: InstanceData | EndOfSeries, ctx: Context) -> HandlerResult:
        if isinstance(msg, EndOfSeries):
            return self.on_marker(msg, ctx, time.time())
        return self.on_instance(msg, ctx, time.time())

    def on_instance(self, msg: InstanceData, ctx: Context, now: float) -> HandlerResult:
        try:
            info = inspect_instance(msg.data, self.limits)
        except InvalidInstance as exc:
            raise PoisonError(exc.reason, exc.message) from None
        key = self._checked_key(ctx, info.series_instance_uid)
        assert ctx.state is not None
        st = ctx.state.get(key) or _new_state(info, now)
        if info.study_instance_uid != st["study"]:
            raise PoisonError("series_conflict", "instance names another study than its series")
        if info.sop_instance_uid in st["inst"]:
            return None  # duplicate: idempotent
        ref = self.store.put(msg.data)
        st["inst"][info.sop_instance_uid] = [
            ref.digest,
            ref.size,
            ref.key_id,
            info.instance_number,
            list(info.position) if info.position else None,
        ]
        if _geometry_missing(st):
            _set_geometry(st, info)
        st["last_update"] = now
        st["last_pub"] = max(st["last_pub"] or "", msg.sent_at.isoformat())
        out: HandlerResult = None
        if st["revision"] > 0:
            st["dirty"] = True
        elif st["expected"] is not None and len(st["inst"]) >= st["expected"]:
            out = self._emit(key, st, "marker")
        ctx.state.put(key, st)
        return out

    def on_marker(self, msg: EndOfSeries, ctx: Context, now: float) -> HandlerResult:
        key = self._checked_key(ctx, msg.series_instance_uid)
        assert ctx.state is not None
        st = ctx.state.get(key)
        if st is None:
            st = _new_state(None, now)
            st["series"] = msg.series_instance_uid
        st["expected"] = msg.expected_count
        st["last_pub"] = max(st["last_pub"] or "", msg.sent_at.isoformat())
        out: HandlerResult = None
        if st["revision"] == 0 and st["inst"] and len(st["inst"]) >= msg.expected_count:
            out = self._emit(key, st, "marker")
        ctx.state.put(key, st)
        return out

    def tick(self, ctx: Context, now: float) -> HandlerResult:
        """Timers: complete quiet series, publish late revisions, forget old series."""
        assert ctx.state is not None
        out: list[Emit] = []
        open_series = 0
        for key in list(ctx.state.keys()):
            st = ctx.state.get(key)
            if st is None:
                continue
            idle = now - st["last_update"]
            open_series += st["revision"] == 0
            if st["revision"] == 0:
                if idle >= self.settings.inactivity_timeout_s:
                    if st["inst"]:
                        out.append(self._emit(key, st, "timeout"))
                        ctx.state.put(key, st)
                    else:
                        ctx.state.delete(key)  # a marker that never saw an instance
            elif st.get("dirty") and idle >= self.settings.late_quiet_s:
                out.append(self._emit(key, st, "late"))
                ctx.state.put(key, st)
            elif idle >= self.settings.retention_s:
                ctx.state.delete(key)
        if self.in_assembly is not None:
            self.in_assembly.labels(str(ctx.partition)).set(open_series)
        return out

    # ---- helpers ------------------------------------------------------------------------
    @staticmethod
    def _checked_key(ctx: Context, series_uid: str) -> bytes:
        key = ctx.key_for(series_uid)
        if ctx.key != key:
            # the sender keyed it from something else: it would break ordering and state
            raise PoisonError("key_mismatch", "message key is not the keyed hash of its series")
        return key

    def _emit(self, key: bytes, st: dict[str, Any], completed_by: str) -> Emit:
        st["revision"] += 1
        st["dirty"] = False
        refs = [
            InstanceRef(
                blob=BlobRef(digest=v[0], size=v[1], key_id=v[2]),
                sop_instance_uid=sop,
                instance_number=v[3],
                position=tuple(v[4]) if v[4] else None,
            )
            for sop, v in st["inst"].items()
        ]
        refs = order_instances(refs, st.get("orient"))
        record = SeriesReady(
            study_instance_uid=st["study"],
            series_instance_uid=st["series"],
            revision=st["revision"],
            modality=st["modality"],
            body_part=st.get("body_part"),
            instances=refs,
            instance_count=len(refs),
            expected_count=st["expected"],
            completed_by=completed_by,  # type: ignore[arg-type]
            rows=st.get("rows") or 0,
            columns=st.get("cols") or 0,
            pixel_spacing_mm=tuple(st["spacing"]) if st.get("spacing") else None,
            slice_thickness_mm=st.get("thick"),
            orientation=tuple(st["orient"]) if st.get("orient") else None,
            acquired_at=st.get("acq"),
            first_received_at=datetime.fromtimestamp(st["first_rx"], UTC),
            last_published_at=datetime.fromisoformat(st["last_pub"]),
        )
        return Emit(SERIES_TOPIC, record, key=key)


def _new_state(info: InstanceInfo | None, now: float) -> dict[str, Any]:
    st: dict[str, Any] = {
        "study": info.study_instance_uid if info else None,
        "series": info.series_instance_uid if info else None,
        "modality": info.modality if info else None,
        "inst": {},
        "expected": None,
        "revision": 0,
        "dirty": False,
        "first_rx": now,
        "last_update": now,
        "last_pub": None,
    }
    if info is not None:
        _set_geometry(st, info)
    return st


def _geometry_missing(st: dict[str, Any]) -> bool:
    return st["study"] is None or st.get("rows") is None


def _set_geometry(st: dict[str, Any], info: InstanceInfo) -> None:
    st["study"] = st["study"] or info.study_instance_uid
    st["series"] = st["series"] or info.series_instance_uid
    st["modality"] = st["modality"] or info.modality
    st["body_part"] = info.body_part
    st["rows"], st["cols"] = info.rows, info.columns
    st["spacing"] = list(info.pixel_spacing) if info.pixel_spacing else None
    st["thick"] = info.slice_thickness
    st["orient"] = list(info.orientation) if info.orientation else None
    st["acq"] = info.acquisition


def order_instances(refs: list[InstanceRef], orientation: list[float] | None) -> list[InstanceRef]:
    """Along the slice normal when every instance has a position, else by instance number."""
    if orientation and refs and all(r.position for r in refs):
        r, c = orientation[:3], orientation[3:]
        normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])

        def along(ref: InstanceRef) -> tuple[float, str]:
            p = ref.position
            assert p is not None
            return (p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2], ref.sop_instance_uid)

        return sorted(refs, key=along)
    return sorted(
        refs,
        key=lambda ref: (
            ref.instance_number is None,
            ref.instance_number or 0,
            ref.sop_instance_uid,
        ),
    )
