"""Ingest's pure core: validate an instance, store it, assemble series in keyed state.

State per series (key: keyed hash of the SeriesInstanceUID) is a versioned
:class:`~services.ingest.state.SeriesState`; the runtime writes it to the compacted changelog in
the same transaction as the output, so a crash at any point resumes exactly. Completion: the
end-of-series marker's count reached, or no new instance for ``inactivity_timeout_s``.
Duplicates (same SOP Instance UID) change nothing. An instance after completion makes the
series "dirty"; once quiet for ``late_quiet_s`` it is published again as the next revision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Gauge

from services.ingest.state import SeriesState, StoredInstance, load
from shared.config import IngestSettings
from shared.dicom.safe import InvalidInstance, Limits, inspect_instance
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context, Emit, HandlerResult
from shared.runtime.state import PartitionState
from shared.schemas import BlobRef, EndOfSeries, InstanceData, InstanceRef, SeriesReady
from shared.storage import BlobStore
from shared.topology import stage

log = logging.getLogger("radstream.ingest")

SERIES_TOPIC = stage("ingest").outputs[0]  # the topology's: where completed series go


@dataclass
class IngestCore:
    store: BlobStore
    settings: IngestSettings
    in_assembly: Gauge | None = None  # series not yet complete, per partition
    _unreadable: set[bytes] = field(default_factory=set)  # state keys reported once

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
        state = _state(ctx)
        st = _get(state, key)
        if st is None:
            st = SeriesState.new(now)
            st.take_geometry(info)
        if info.study_instance_uid != st.study_instance_uid:
            raise PoisonError("series_conflict", "instance names another study than its series")
        if info.sop_instance_uid in st.instances:
            return None  # duplicate: idempotent
        ref = self.store.put(msg.data)
        st.instances[info.sop_instance_uid] = StoredInstance(
            digest=ref.digest,
            size=ref.size,
            key_id=ref.key_id,
            instance_number=info.instance_number,
            position=info.position,
        )
        if st.geometry_missing:
            st.take_geometry(info)
        st.last_update = now
        st.published(msg.sent_at)
        out: HandlerResult = None
        if st.revision > 0:
            st.dirty = True
        elif st.expected_count is not None and len(st.instances) >= st.expected_count:
            out = self._emit(key, st, "marker")
        state.put(key, st.dump())
        return out

    def on_marker(self, msg: EndOfSeries, ctx: Context, now: float) -> HandlerResult:
        key = self._checked_key(ctx, msg.series_instance_uid)
        state = _state(ctx)
        st = _get(state, key) or SeriesState.new(now, msg.series_instance_uid)
        st.expected_count = msg.expected_count
        st.published(msg.sent_at)
        out: HandlerResult = None
        if st.revision == 0 and st.instances and len(st.instances) >= msg.expected_count:
            out = self._emit(key, st, "marker")
        state.put(key, st.dump())
        return out

    def tick(self, ctx: Context, now: float) -> HandlerResult:
        """Timers: complete quiet series, publish late revisions, forget old series."""
        state = _state(ctx)
        out: list[Emit] = []
        open_series = 0
        for key in list(state.keys()):
            try:
                st = _get(state, key)
            except PoisonError as exc:  # load() refuses a record it cannot read
                if key not in self._unreadable:  # once per key: a timer must never raise
                    self._unreadable.add(key)
                    log.warning("ingest: a series state is left as it is: %s", exc.message)
                continue
            if st is None:
                continue
            idle = now - st.last_update
            open_series += st.revision == 0
            if st.revision == 0:
                if idle >= self.settings.inactivity_timeout_s:
                    if st.instances:
                        out.append(self._emit(key, st, "timeout"))
                        state.put(key, st.dump())
                    else:
                        state.delete(key)  # a marker that never saw an instance
            elif st.dirty and idle >= self.settings.late_quiet_s:
                out.append(self._emit(key, st, "late"))
                state.put(key, st.dump())
            elif idle >= self.settings.retention_s:
                state.delete(key)
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

    def _emit(self, key: bytes, st: SeriesState, completed_by: str) -> Emit:
        st.revision += 1
        st.dirty = False
        refs = [
            InstanceRef(
                blob=BlobRef(digest=v.digest, size=v.size, key_id=v.key_id),
                sop_instance_uid=sop,
                instance_number=v.instance_number,
                position=v.position,
            )
            for sop, v in st.instances.items()
        ]
        refs = order_instances(refs, list(st.orientation) if st.orientation else None)
        assert st.study_instance_uid is not None and st.series_instance_uid is not None
        assert st.modality is not None and st.last_published_at is not None
        record = SeriesReady(
            study_instance_uid=st.study_instance_uid,
            series_instance_uid=st.series_instance_uid,
            revision=st.revision,
            modality=st.modality,
            body_part=st.body_part,
            instances=refs,
            instance_count=len(refs),
            expected_count=st.expected_count,
            completed_by=completed_by,  # type: ignore[arg-type]
            rows=st.rows or 0,
            columns=st.columns or 0,
            pixel_spacing_mm=st.pixel_spacing_mm,
            slice_thickness_mm=st.slice_thickness_mm,
            orientation=st.orientation,
            acquired_at=st.acquired_at,
            first_received_at=datetime.fromtimestamp(st.first_received, UTC),
            last_published_at=st.last_published_at,
        )
        return Emit(SERIES_TOPIC, record, key=key)


def _state(ctx: Context) -> PartitionState:
    assert ctx.state is not None, "ingest is a stateful stage"
    return ctx.state


def _get(state: PartitionState, key: bytes) -> SeriesState | None:
    raw = state.get(key)
    return None if raw is None else load(raw)


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
