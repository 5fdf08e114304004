"""Ingest's pure core: validate an instance, store it, assemble series in keyed state.

State per series (key: keyed hash of the SeriesInstanceUID) is a versioned
:class:`~services.ingest.state.SeriesState`; the runtime writes it to the compacted changelog in
the same transaction as the output, so a crash at any point resumes exactly. Completion: the
end-of-series marker's count reached, or no new instance for ``inactivity_timeout_s``, or at
once for an enhanced multi-frame (Enhanced CT/MR) instance, which holds the whole series.

After completion a series is *idempotent*: the same instances sent again (same SOP Instance
UIDs, same content digests; what PACS forwards and console re-sends do) publish nothing and
are audited once per re-send (``series_duplicate`` on ``audit``); an added or changed
instance makes revision n+1 with every instance, as soon as the re-send's marker closes it,
or once quiet for ``late_quiet_s``. How long what is kept, and in what form, is
:mod:`services.ingest.state`'s docstring.

Timers read only the series that are due (:class:`~shared.runtime.timers.KeyTimers`): weeks of
fingerprints are not loaded once a second.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge

from services.ingest.state import Fingerprint, SeriesState, StoredInstance, load
from shared.config import IngestSettings
from shared.dicom.safe import InvalidInstance, Limits, inspect_instance
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context, Emit, HandlerResult
from shared.runtime.state import PartitionState
from shared.runtime.timers import KeyTimers
from shared.schemas import AuditEvent, BlobRef, EndOfSeries, InstanceData, InstanceRef, SeriesReady
from shared.storage import BlobStore
from shared.topology import AUDIT, INSTANCES, stage

log = logging.getLogger("radstream.ingest")

SERIES_TOPIC = stage("ingest").outputs[0]  # the topology's: where completed series go
ASSEMBLING = "assembling"  # timer tag of a series not yet complete (the in-assembly gauge)
DUPLICATE_ACTION = "series_duplicate"  # the audit action of an ignored re-send


@dataclass
class IngestCore:
    store: BlobStore
    settings: IngestSettings
    in_assembly: Gauge | None = None  # series not yet complete, per partition
    duplicates: Counter | None = None  # re-sends of a published series that changed nothing
    raw_deleted: Counter | None = None  # raw instance blobs deleted by retention
    _unreadable: set[bytes] = field(default_factory=set)  # state keys reported once
    timers: KeyTimers = field(init=False)

    def __post_init__(self) -> None:
        self.timers = KeyTimers(self._due_of)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(
            max_bytes=s.max_instance_bytes,
            max_inflated_bytes=s.max_inflated_bytes,
            max_elements=s.max_elements,
            max_items=s.max_items,
            max_sequence_depth=s.max_sequence_depth,
            max_frame_pixels=s.max_frame_pixels,
        )

    def sync(self) -> None:
        """Make the instances stored since the last call durable: the runtime calls it after a
        batch is handled and before the transaction that refers to them commits."""
        self.store.sync()

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
        if st.refused:
            raise PoisonError("series_too_large", "the series was refused: past its caps")
        if info.study_instance_uid != st.study_instance_uid:
            raise PoisonError("series_conflict", "instance names another study than its series")
        content = content_digest(msg.data)
        known = st.instances.get(info.sop_instance_uid)
        if known is None:
            self._within_caps(state, key, st, len(msg.data), now)
        if known is not None and _same(known, content, msg.data):
            if st.revision == 0:
                return None  # a duplicate within the assembly: idempotent, nothing to keep
            # the same instance again after completion: part of a re-send, judged at its end
            st.resend += 1
            st.last_update = now
            st.published(msg.sent_at)
            self._put(state, key, st)
            return None
        # durable at the commit (sync, StageSpec.before_commit): the batch's instances are
        # synced together, in parallel, not two fsyncs each on the handler's path
        ref = self.store.put(msg.data, INSTANCES, durable=False)
        st.instances[info.sop_instance_uid] = StoredInstance(
            digest=ref.digest,
            size=ref.size,
            key_id=ref.key_id,
            instance_number=info.instance_number,
            position=info.position,
            content=content,
        )
        if st.geometry_missing:
            st.take_geometry(info)
        st.last_update = now
        st.published(msg.sent_at)
        out: HandlerResult = None
        if st.revision > 0:
            st.resend += 1
            st.dirty = st.dirty or not st.compacted  # compacted: judged when the re-send ends
        elif st.expected_count is not None and len(st.instances) >= st.expected_count:
            out = self._emit(key, st, "marker")
        elif info.enhanced and len(st.instances) == 1:
            # an enhanced multi-frame instance holds the whole series: complete at once (a
            # marker that follows closes nothing; the same instance again is a re-send)
            out = self._emit(key, st, "instance")
        self._put(state, key, st)
        return out

    def on_marker(self, msg: EndOfSeries, ctx: Context, now: float) -> HandlerResult:
        key = self._checked_key(ctx, msg.series_instance_uid)
        state = _state(ctx)
        st = _get(state, key) or SeriesState.new(now, msg.series_instance_uid)
        if st.refused:
            return None  # nothing of it is published
        st.published(msg.sent_at)
        out: HandlerResult = None
        if st.revision == 0:
            st.expected_count = msg.expected_count
            if st.instances and len(st.instances) >= msg.expected_count:
                out = self._emit(key, st, "marker")
        elif st.resend > 0 and st.resend >= msg.expected_count:
            out = self._settle(key, st)  # the re-send this marker closes is all here
        else:
            return None  # a marker with nothing (new) to close: the timer settles what came
        self._put(state, key, st)
        return out

    def tick(self, ctx: Context, now: float) -> HandlerResult:
        """Timers of the series that are due: complete quiet series, settle re-sends (a new
        revision or a duplicate), compact published series, forget old fingerprints."""
        state = _state(ctx)
        out: list[Emit] = []
        s = self.settings
        for key in self.timers.due(state, now):
            try:
                st = _get(state, key)
            except PoisonError as exc:  # load() refuses a record it cannot read
                self._report_unreadable(key, exc)
                self.timers.forget(state, key)
                continue
            if st is None:
                self.timers.forget(state, key)
                continue
            idle = now - st.last_update
            changed = True
            if st.refused:
                if idle >= s.retention_s:
                    self._delete(state, key)
                    continue
                changed = False
            elif st.revision == 0 and idle >= s.inactivity_timeout_s:
                if not st.instances:  # a marker that never saw an instance
                    self._delete(state, key)
                    continue
                out.append(self._emit(key, st, "timeout"))
            elif st.revision > 0 and (st.resend > 0 or st.dirty):
                if idle >= s.late_quiet_s:
                    out.extend(self._settle(key, st))
                else:
                    changed = False
            elif st.revision > 0 and not st.compacted and idle >= s.retention_s:
                st.fingerprint = Fingerprint.of(st.instances)  # the last revision's set
                self._drop_raw(st)  # raw blob retention: the DICOM goes with the list
                st.instances, st.compacted, st.expected_count = {}, True, None
            elif st.revision > 0 and st.compacted and idle >= s.fingerprint_retention_s:
                self._delete(state, key)
                continue
            else:
                changed = False  # not due after all (the index is a hint): schedule again
            self._put(state, key, st, written=changed)
        if self.in_assembly is not None:
            self.in_assembly.labels(str(ctx.partition)).set(self.timers.count(state, ASSEMBLING))
        return out

    # ---- helpers ------------------------------------------------------------------------
    def _within_caps(
        self, state: PartitionState, key: bytes, st: SeriesState, size: int, now: float
    ) -> None:
        """Refuse an instance that takes its series past ``max_series_instances`` or
        ``max_series_bytes``. A series in assembly is refused as a whole (marked, its instance
        list dropped: the state stays small, nothing is ever published, later instances are
        refused at once); a published one refuses just this late instance."""
        s = self.settings
        count = len(st.instances) + 1
        total = sum(v.size for v in st.instances.values()) + size
        if count <= s.max_series_instances and total <= s.max_series_bytes:
            return
        why = f"the series passes its cap ({s.max_series_instances} instances, " + (
            f"{s.max_series_bytes} bytes)"
        )
        if st.revision > 0:
            raise PoisonError("series_too_large", why + ": a late instance refused")
        self._drop_raw(st)  # what was stored of a refused series goes at once
        st.refused, st.instances, st.expected_count = True, {}, None
        st.last_update = now
        self._put(state, key, st)
        log.warning("ingest: a series passed its caps and is refused")
        raise PoisonError("series_too_large", why + ": the series is refused", keep_state=True)

    def _settle(self, key: bytes, st: SeriesState) -> list[Emit]:
        """A re-send of a published series is over: a new revision, or a duplicate."""
        if st.compacted:
            assert st.fingerprint is not None
            same = Fingerprint.of(st.instances, st.fingerprint.basis) == st.fingerprint
            if not same:
                st.compacted, st.fingerprint = False, None  # the re-send is revision n+1
                return [self._emit(key, st, "late")]
            self._drop_raw(st)  # a duplicate re-send after compaction keeps nothing
            st.instances = {}
        elif st.dirty:
            return [self._emit(key, st, "late")]
        st.resend = 0
        if self.duplicates is not None:
            self.duplicates.inc()
        log.info("ingest: a re-sent series changed nothing (revision %d kept)", st.revision)
        audit = AuditEvent(
            actor="ingest", action=DUPLICATE_ACTION, resource=key.decode(), outcome="success"
        )
        return [Emit(AUDIT, audit, key=key)]

    def _due_of(self, key: bytes, state: PartitionState) -> tuple[float, str] | None:
        """When the timer next needs ``key`` (see :meth:`tick`); None if absent/unreadable."""
        try:
            st = _get(state, key)
        except PoisonError as exc:
            self._report_unreadable(key, exc)
            return None
        return None if st is None else self._due(st)

    def _due(self, st: SeriesState) -> tuple[float, str]:
        s = self.settings
        if st.refused:
            return st.last_update + s.retention_s, ""
        if st.revision == 0:
            return st.last_update + s.inactivity_timeout_s, ASSEMBLING
        if st.resend > 0 or st.dirty:
            return st.last_update + s.late_quiet_s, ""
        if not st.compacted:
            return st.last_update + s.retention_s, ""
        return st.last_update + s.fingerprint_retention_s, ""

    def _put(
        self, state: PartitionState, key: bytes, st: SeriesState, written: bool = True
    ) -> None:
        if written:  # a copy: the caller may go on changing ``st``
            state.put_object(key, st.clone(), SeriesState.encoded)
        self.timers.schedule(state, key, *self._due(st))

    def _drop_raw(self, st: SeriesState) -> None:
        """Delete the raw instance blobs of ``st``'s instance list (it is about to be dropped):
        raw DICOM is kept ``retention_s`` after a series' last change, not forever. Deleting is
        idempotent, so a transaction redone after a crash deletes nothing twice; a replay
        from preprocess after that finds the blobs gone (``blob_missing``)."""
        if not self.settings.delete_raw_blobs:
            return
        for v in st.instances.values():
            self.store.delete(BlobRef(digest=v.digest, size=v.size, key_id=v.key_id))
            if self.raw_deleted is not None:
                self.raw_deleted.inc()

    def _delete(self, state: PartitionState, key: bytes) -> None:
        state.delete(key)
        self.timers.forget(state, key)

    def _report_unreadable(self, key: bytes, exc: PoisonError) -> None:
        if key not in self._unreadable:  # once per key: a timer must never raise
            self._unreadable.add(key)
            log.warning("ingest: a series state is left as it is: %s", exc.message)

    @staticmethod
    def _checked_key(ctx: Context, series_uid: str) -> bytes:
        # the active key hash, or one from before the last HMAC rotation: a record sent just
        # before it keeps its series on the partition it went to (docs/keys.md)
        if ctx.key is None or ctx.key not in ctx.keyring.keyed_hashes(series_uid):
            # the sender keyed it from something else: it would break ordering and state
            raise PoisonError("key_mismatch", "message key is not the keyed hash of its series")
        return ctx.key

    def _emit(self, key: bytes, st: SeriesState, completed_by: str) -> Emit:
        st.revision += 1
        st.dirty = False
        st.resend = 0
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
    """A series' state to change: a copy of the decoded value the partition state remembers
    (decoding 300 instances at every slice made assembly O(n^2))."""
    st = state.get_object(key, load)
    return None if st is None else st.clone()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _same(known: StoredInstance, content: str, data: bytes) -> bool:
    """Is ``data`` (content digest ``content``) the instance already kept? States from before
    content digests (version 2) compare the whole bytes' digest."""
    if known.content is not None:
        return known.content == content
    return known.digest == _sha256(data)


# VRs with a 2-byte reserved field and a 4-byte length in explicit VR little endian
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def content_digest(data: bytes) -> str:
    """SHA-256 of a Part 10 instance without its preamble and file meta group (0002): what a
    modality, the SDK and the gateway's re-encoding agree on for the same dataset, whoever
    wrote the meta. Falls back to the whole bytes when the meta group cannot be walked."""
    pos = 132
    n = len(data)
    while pos + 8 <= n and data[pos : pos + 2] == b"\x02\x00":  # group 0002, explicit VR LE
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > n:
                return _sha256(data)
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    if pos > n:
        return _sha256(data)
    return hashlib.sha256(memoryview(data)[pos:]).hexdigest()


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
