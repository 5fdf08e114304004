"""The runtime's dispatch in memory (StageHarness): retries and backoff on a fake clock, state
rollback, dead letters, Emit routing, ticks, and two real services built by their own
``build(settings, keyring, registry)``. No broker; each test runs in milliseconds."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shared.config import Settings
from shared.runtime.codec import Codec
from shared.runtime.errors import RetriableError
from shared.runtime.harness import FakeClock, StageHarness
from shared.runtime.passthrough import make_spec
from shared.runtime.stage import Context, Emit, HandlerResult, StageSpec
from shared.schemas import (
    Alert,
    AuditEvent,
    EndOfSeries,
    Finding,
    InstanceData,
    Probe,
    Reason,
    SegmentationDone,
    SeriesReady,
)
from shared.security.envelope import Keyring

PHI = "Doe^John"
TOPIC_KEY = ("radstream.series", b"k")  # the input topic under default settings, a key


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        retry_attempts=4,
        retry_backoff_s=0.2,
        retry_backoff_max_s=0.5,
    )


def probe_spec(
    handler, *, stateful: bool = False, output: str | None = "volumes"
) -> StageSpec[Probe]:  # type: ignore[no-untyped-def]
    return StageSpec(
        name="preprocess",
        input_topic="series",
        input_type=Probe,
        output_topic=output,
        handler=handler,
        stateful=stateful,
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"stage": "preprocess", **labels}) or 0.0


# ---- retries -----------------------------------------------------------------------------
def test_retries_back_off_on_the_clock_then_dead_letter_retries_exhausted(
    settings: Settings,
) -> None:
    calls: list[int] = []

    def flaky(p: Probe, ctx: Context) -> Probe:
        calls.append(ctx.offset)
        raise RetriableError("dependency down")

    harness = StageHarness(probe_spec(flaky), settings)
    t0 = time.perf_counter()
    result = harness.send(Probe(id="a", seq=0), key=b"k")
    elapsed = time.perf_counter() - t0
    # 4 attempts, 3 waits doubling from 0.2 s and capped at 0.5 s, none of them slept
    assert len(calls) == 4
    assert harness.clock.waits == [0.2, 0.4, 0.5]
    assert elapsed < sum(harness.clock.waits)
    (letter,) = result.dead_letters
    assert letter.reason == Reason.RETRIES_EXHAUSTED and letter.attempts == 4
    assert "gave up after 4 attempts" in letter.message
    assert result.outputs == {}
    assert sample(harness.registry, "radstream_retries_total") == 3
    assert sample(harness.registry, "radstream_deadletters_total", reason="retries_exhausted") == 1


def test_a_retry_that_succeeds_produces_the_output_once(settings: Settings) -> None:
    attempts: list[int] = []

    def twice_down(p: Probe, ctx: Context) -> Probe:
        attempts.append(1)
        if len(attempts) < 3:
            raise RetriableError("timeout")
        return p

    harness = StageHarness(probe_spec(twice_down), settings)
    result = harness.send(Probe(id="a", seq=7), key=b"k")
    assert [p.seq for p in result.outputs["volumes"]] == [7]  # type: ignore[attr-defined]
    assert result.dead_letters == [] and result.outcomes[0].attempts == 3
    assert harness.clock.waits == [0.2, 0.4]


def test_state_writes_of_a_failed_attempt_are_rolled_back(settings: Settings) -> None:
    attempt = {"n": 0}

    def handler(p: Probe, ctx: Context) -> None:
        assert ctx.state is not None
        attempt["n"] += 1
        ctx.state.put(b"last-attempt", attempt["n"])
        if attempt["n"] == 1:
            ctx.state.put(b"only-in-attempt-1", True)
        if p.id == "always-fails" or attempt["n"] == 1:
            raise RetriableError("try again")

    harness = StageHarness(probe_spec(handler, stateful=True), settings)
    result = harness.send(Probe(id="a", seq=0), key=b"k")
    # the second attempt's writes, nothing of the first
    assert [(c.key, c.value) for c in result.state_changes] == [(b"last-attempt", 2)]
    assert harness.state().get(b"only-in-attempt-1") is None
    assert harness.state().get(b"last-attempt") == 2
    # a record that exhausts its retries leaves no state change at all
    result = harness.send(Probe(id="always-fails", seq=1), key=b"k")
    assert result.state_changes == [] and result.dead_letters[0].reason == "retries_exhausted"
    assert harness.state().get(b"last-attempt") == 2


# ---- dead letters ------------------------------------------------------------------------
def test_poison_is_dead_lettered_with_its_coordinates_and_the_stage_moves_on(
    settings: Settings,
) -> None:
    harness = StageHarness(make_spec("preprocess"), settings)
    for i in range(3):
        harness.send(Probe(id=f"p{i}", seq=i, poison=i == 1), key=b"series-key", partition=2)
    assert [p.seq for p in harness.outputs("volumes")] == [0, 2]  # type: ignore[attr-defined]
    (letter,) = harness.dead_letters
    assert letter.stage == "preprocess" and letter.reason == Reason.POISON
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        settings.topic("series"),
        2,
        1,
    )
    assert letter.attempts == 1
    dlq = [p for p in harness.history.produced if p.topic == "deadletter"]
    assert dlq[0].key == b"series-key"  # same key: the dead letter sits with its series
    assert sample(harness.registry, "radstream_messages_total", outcome="ok") == 2
    assert sample(harness.registry, "radstream_deadletters_total", reason="poison") == 1


def test_handler_error_names_type_and_line_but_no_phi(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    def buggy(p: Probe, ctx: Context) -> Probe:
        raise ValueError(f"patient {PHI} has no {p.id}")

    harness = StageHarness(probe_spec(buggy), settings)
    with caplog.at_level(logging.DEBUG):
        result = harness.send(Probe(id="1.2.840.99", seq=0), key=b"k")
    (letter,) = result.dead_letters
    assert letter.reason == Reason.HANDLER_ERROR
    assert "ValueError" in letter.message and "test_harness.py" in letter.message
    assert "buggy" in letter.message
    for text in [letter.message, caplog.text]:
        assert PHI not in text and "1.2.840.99" not in text


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda v, h: (v[:-1] + bytes([v[-1] ^ 1]), h), Reason.INTEGRITY),
        (lambda v, h: (v, [("rs-schema", b"radstream.alert"), ("rs-version", b"1")]), "integrity"),
        (lambda v, h: (v, []), Reason.MISSING_HEADER),
        (lambda v, h: (b"", h), Reason.EMPTY),
        (
            lambda v, h: Codec(Keyring.generate()).encode(*TOPIC_KEY, Probe(id="x", seq=0)),
            "unknown_key",
        ),
    ],
)
def test_undecodable_inputs_are_dead_lettered_by_reason(settings: Settings, mangle, reason) -> None:  # type: ignore[no-untyped-def]
    harness = StageHarness(make_spec("preprocess"), settings)
    good, headers = harness.codec.encode(settings.topic("series"), b"k", Probe(id="p", seq=0))
    value, headers = mangle(good, headers)
    result = harness.send_raw(value, headers, key=b"k")
    assert [d.reason for d in result.dead_letters] == [reason]
    assert result.outputs == {}


# ---- routing -----------------------------------------------------------------------------
def test_emit_routes_to_other_topics_and_keys(settings: Settings) -> None:
    audit = AuditEvent(actor="t", action="a", resource="r", outcome="success")

    def fan_out(p: Probe, ctx: Context) -> HandlerResult:
        return [
            p,  # the stage's output topic, under the input key
            Emit("audit", audit),  # another topic, the input key
            Emit("deadletter.review", p, key="1.2.3.4"),  # an identity: keyed-hashed
            Emit("series", p, key=b"raw-key"),  # bytes: as they are
        ]

    harness = StageHarness(probe_spec(fan_out), settings)
    result = harness.send(Probe(id="a", seq=1), key=b"in-key")
    routed = [(p.topic, p.key) for p in result.produced]
    assert routed == [
        ("volumes", b"in-key"),
        ("audit", b"in-key"),
        ("deadletter.review", harness.keyring.keyed_hash("1.2.3.4")),
        ("series", b"raw-key"),
    ]
    assert result.outputs["audit"] == [audit]
    assert b"1.2.3.4" not in b"".join(p.key or b"" for p in result.produced)
    assert sample(harness.registry, "radstream_output_records_total") == 4


def test_a_bare_record_without_an_output_topic_is_a_handler_error(settings: Settings) -> None:
    harness = StageHarness(probe_spec(lambda p, ctx: p, output=None), settings)
    result = harness.send(Probe(id="a", seq=1), key=b"k")
    assert [d.reason for d in result.dead_letters] == [Reason.HANDLER_ERROR]


def test_async_handlers_run_too(settings: Settings) -> None:
    async def handler(p: Probe, ctx: Context) -> Probe:
        return p.model_copy(update={"seq": p.seq + 1})

    harness = StageHarness(probe_spec(handler), settings)
    assert [p.seq for p in harness.send(Probe(id="a", seq=1)).outputs["volumes"]] == [2]  # type: ignore[attr-defined]


# ---- ticks -------------------------------------------------------------------------------
def test_ticks_fire_every_interval_on_the_fake_clock_and_commit_state(settings: Settings) -> None:
    seen: list[float] = []

    def tick(ctx: Context, now: float) -> HandlerResult:
        assert ctx.state is not None
        seen.append(now)
        if len(seen) == 2:
            raise ValueError(PHI)  # a timer bug: logged, rolled back, the next tick goes on
        ctx.state.put(b"ticks", len(seen))
        return Emit("audit", AuditEvent(actor="t", action="tick", resource="r", outcome="success"))

    spec = StageSpec(
        name="preprocess",
        input_topic="series",
        input_type=Probe,
        output_topic=None,
        handler=lambda p, ctx: None,
        stateful=True,
        tick=tick,
        tick_interval_s=5.0,
    )
    clock = FakeClock(start=1000.0)
    harness = StageHarness(spec, settings, clock=clock)
    assert harness.advance(4.9).produced == []
    result = harness.advance(10.2)  # t = 1015.1: ticks at 1005, 1010, 1015
    assert seen == [1005.0, 1010.0, 1015.0]
    assert len(result.outputs["audit"]) == 2
    assert [c.value for c in result.state_changes] == [1, 3]
    assert sample(harness.registry, "radstream_tick_errors_total") == 1
    assert clock.time() == pytest.approx(1015.1)


# ---- real services -----------------------------------------------------------------------
def _ingest(settings: Settings, keyring: Keyring) -> tuple[StageHarness[object], CollectorRegistry]:
    from services.ingest.main import build

    registry = CollectorRegistry()
    return StageHarness(build(settings, keyring, registry), settings, keyring), registry


def test_ingest_assembles_a_series_end_to_end(tmp_path: Path, settings: Settings) -> None:
    from shared.dicom import phantom
    from shared.storage import local_store

    keyring = Keyring.generate()
    harness, _ = _ingest(settings, keyring)
    ph = phantom.chest_ct(tmp_path / "ph", seed=3, size=16, slices=4, nodules_mm=())
    uid = ph.series_instance_uid
    datas = [f.read_bytes() for f in ph.files]
    for data in reversed(datas):
        assert harness.send(InstanceData(source="t", data=data), key=uid).produced[0].topic == (
            "ingest.state"
        )
    harness.send(InstanceData(source="t", data=datas[0]), key=uid)  # a duplicate: no change
    marker = EndOfSeries(source="t", series_instance_uid=uid, expected_count=4)
    result = harness.send(marker, key=uid)
    (ready,) = result.outputs["series"]
    assert isinstance(ready, SeriesReady)
    assert ready.series_instance_uid == uid and ready.revision == 1
    assert ready.completed_by == "marker" and ready.instance_count == 4
    assert [r.instance_number for r in ready.instances] == [1, 2, 3, 4]
    (produced,) = [p for p in result.produced if p.topic == "series"]
    assert produced.key == keyring.keyed_hash(uid)
    # the state the changelog got is keyed by the hash, and the blobs hold the instances
    assert {c.key for c in result.state_changes} == {keyring.keyed_hash(uid)}
    store = local_store(settings.blob_path, keyring)
    assert sorted(store.get(r.blob) for r in ready.instances) == sorted(datas)
    # the same series sent again (a PACS forward): no second SeriesReady
    for data in datas:
        harness.send(InstanceData(source="t", data=data), key=uid)
    harness.send(marker, key=uid)
    assert len(harness.outputs("series")) == 1
    # a bad instance is a dead letter with ingest's reason; nothing is stored for it
    (letter,) = harness.send(InstanceData(source="t", data=b"x" * 200), key=uid).dead_letters
    assert letter.reason == Reason.NOT_DICOM and letter.stage == "ingest"
    # and an instance keyed with anything but its series' hash is refused
    (letter,) = harness.send(InstanceData(source="t", data=datas[0]), key="other").dead_letters
    assert letter.reason == Reason.KEY_MISMATCH


def test_ingest_syncs_the_batchs_instances_after_handling_before_the_commit(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fsync on the handler's path: the instances a batch stored are made durable together
    (file and folder) by the spec's before_commit, after the handler and before the commit."""
    from shared.dicom import phantom
    from shared.storage import blobs

    keyring = Keyring.generate()
    harness, _ = _ingest(settings, keyring)
    events: list[object] = []
    real_fsync, real_handle = os.fsync, harness.dispatcher.handle
    monkeypatch.setattr(blobs.os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))  # fmt: skip
    monkeypatch.setattr(harness.dispatcher, "handle", lambda *a: events.append("handled") or real_handle(*a))  # fmt: skip
    ph = phantom.chest_ct(tmp_path / "ph", seed=3, size=16, slices=2, nodules_mm=())
    datas = [f.read_bytes() for f in ph.files]
    harness.send(InstanceData(source="t", data=datas[0]), key=ph.series_instance_uid)
    digest = hashlib.sha256(datas[0]).hexdigest()
    path = settings.blob_path / keyring.blob_name(digest)[:2] / keyring.blob_name(digest)
    # the file and its folder are synced in parallel: both after the handler, in either order
    assert events[0] == "handled" and sorted(events[1:]) == sorted([str(path), str(path.parent)])
    assert path.exists()
    # a blob deleted before its sync (retention) needs none; the folder is still synced
    store = blobs.local_store(tmp_path / "other", keyring)
    ref = store.put(b"x" * 100, "instances", durable=False)
    store.delete(ref)
    events.clear()
    store.sync()
    assert len(events) == 1 and events[0] == str(tmp_path / "other" / keyring.blob_name(ref.digest)[:2])  # fmt: skip
    store.sync()  # nothing pending: nothing to do
    assert len(events) == 1


def test_ingest_inactivity_timeout_through_the_harness(tmp_path: Path) -> None:
    from shared.config import IngestSettings
    from shared.dicom import phantom

    settings = Settings(home=tmp_path, ingest=IngestSettings(inactivity_timeout_s=30.0))
    keyring = Keyring.generate()
    harness, registry = _ingest(settings, keyring)
    ph = phantom.head_ct(tmp_path / "h", seed=2, size=16, slices=3, bleed_ml=0)
    for f in ph.files:
        harness.send(InstanceData(source="t", data=f.read_bytes()), key=ph.series_instance_uid)
    assert harness.advance(29.0).outputs == {}  # 29 ticks, no marker, not quiet long enough
    assert registry.get_sample_value("radstream_series_in_assembly", {"partition": "0"}) == 1
    result = harness.advance(2.0)
    (ready,) = result.outputs["series"]
    assert isinstance(ready, SeriesReady)
    assert ready.completed_by == "timeout" and ready.instance_count == 3
    assert harness.advance(60.0).outputs == {}  # completed once, never again
    assert registry.get_sample_value("radstream_series_in_assembly", {"partition": "0"}) == 0


def _finding(kind: str, **measures: float) -> Finding:
    return Finding(
        type=kind,
        label=f"{kind}-{len(measures)}-{sorted(measures.items())}",
        confidence=0.9,  # above the default rules' operating point
        **measures,
    )  # type: ignore[arg-type]


def _segmentation(findings: list[Finding], modality: str = "CT") -> SegmentationDone:
    return SegmentationDone(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        revision=1,
        modality=modality,
        task="chest_ct",
        findings=findings,
        algorithm="test",
        algorithm_version="1",
        source_offset=0,
        source_partition=0,
        last_published_at=datetime.now(UTC),
    )


def test_alert_rules_through_the_alert_services_build(settings: Settings) -> None:
    from services.alert.main import build

    keyring = Keyring.generate()
    harness = StageHarness(build(settings, keyring, CollectorRegistry()), settings, keyring)
    findings = [
        _finding("haemorrhage", volume_ml=1.2),  # critical: pager + worklist
        _finding("haemorrhage", volume_ml=0.2),  # below the paging size: worklist, low
        _finding("nodule", diameter_mm=9.0),  # large-nodule, high
        _finding("nodule", diameter_mm=7.0),  # nodule, medium
        _finding("nodule", diameter_mm=4.0),  # worklist, low
        _finding("lung", volume_ml=2500.0),  # not alertable
    ]
    result = harness.send(_segmentation(findings), key="1.2.3.4")
    alerts = result.outputs["alerts"]
    assert all(isinstance(a, Alert) for a in alerts)
    got = [(a.rule, a.severity, a.routes, a.finding_label) for a in alerts]  # type: ignore[attr-defined]
    assert got == [
        ("acute-haemorrhage", "critical", ["pager", "worklist"], findings[0].label),
        ("haemorrhage-review", "low", ["worklist"], findings[1].label),
        ("large-nodule", "high", ["worklist"], findings[2].label),
        ("nodule", "medium", ["worklist"], findings[3].label),
        ("nodule-review", "low", ["worklist"], findings[4].label),
    ]
    assert {p.key for p in result.produced} == {keyring.keyed_hash("1.2.3.4")}
    # the same revision again (a replay of findings): the same ids, never published twice
    again = harness.send(_segmentation(findings), key="1.2.3.4").outputs
    assert "alerts" not in again
    (audit,) = again["audit"]
    assert isinstance(audit, AuditEvent) and audit.action == "alert_duplicate"
    # a new revision of the series: new ids, alerts again
    revised = _segmentation(findings).model_copy(update={"revision": 2})
    new = harness.send(revised, key="1.2.3.4").outputs["alerts"]
    assert len(new) == 5
    assert not {a.alert_id for a in new} & {a.alert_id for a in alerts}  # type: ignore[attr-defined]
    # rules are per modality: an MR series raises nothing
    assert harness.send(_segmentation(findings, "MR"), key="1.2.3.4").outputs == {}
