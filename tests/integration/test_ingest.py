"""Ingest against the real broker: assembly, revisions, timeouts, bad input, real files, PHI."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.ingest.main import build
from shared.config import IngestSettings
from shared.dicom import phantom
from shared.ingress.publisher import Publisher, PublishError
from shared.runtime.stage import StageRunner
from shared.schemas import DeadLetter, SeriesReady
from shared.stack.broker import free_port
from tests.dicom_cases import REAL_FILES, bad_inputs, dicomdir_ct_series, real_file
from tests.helpers import REPO, Env, Reader, StageProcess, running, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def ingest(env: Env) -> AsyncIterator[StageRunner[object]]:
    settings = env.settings(
        "ingest",
        metrics_port=free_port(),
        ingest=IngestSettings(
            inactivity_timeout_s=3.0, late_quiet_s=1.0, max_instance_bytes=1024 * 1024
        ),
    )
    runner: StageRunner[object] = StageRunner(build(settings, env.keyring), settings, env.keyring)
    task = asyncio.create_task(runner.run())

    async def ready() -> bool:
        return runner.ready

    await wait_until(ready, 60, "ingest ready")
    yield runner
    runner.stop()
    await asyncio.wait_for(task, 30)


def publisher(env: Env, principal: str = "scanner") -> Publisher:
    return Publisher(
        env.broker.settings_for(principal), env.keyring, source="test", topic=env.topic("instances")
    )


def moved_copy(data: bytes, sop_uid: str, z: float) -> bytes:
    """Another instance of the same series (new SOP Instance UID and position)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def test_series_assembled_once_in_order_then_late_revision(
    env: Env, ingest: StageRunner[object], tmp_path: Path
) -> None:
    ph = phantom.chest_ct(tmp_path / "chest", seed=11, size=64, slices=24, nodules_mm=())
    files = [f.read_bytes() for f in ph.files]
    shuffled = files[:]
    random.Random(3).shuffle(shuffled)
    async with publisher(env) as pub:
        for data in shuffled:
            await pub.publish(data)
        await pub.end_series(ph.series_instance_uid, len(files))
    async with Reader(env, "series", SeriesReady) as out:
        (ready,) = await out.wait_for(1)
        assert ready.series_instance_uid == ph.series_instance_uid
        assert ready.study_instance_uid == ph.study_instance_uid
        assert ready.revision == 1 and ready.completed_by == "marker"
        assert ready.instance_count == 24 and ready.expected_count == 24
        zs = [ref.position[2] for ref in ready.instances if ref.position]
        assert zs == sorted(zs) and len(zs) == 24  # ordered along the slice normal
        assert (ready.rows, ready.columns, ready.modality, ready.body_part) == (
            64,
            64,
            "CT",
            "CHEST",
        )
        # the blobs are in the store, encrypted, and give back the exact bytes
        from shared.storage import BlobStore, LocalDirBackend

        store = BlobStore(LocalDirBackend(env.settings("ingest").blob_path), env.keyring)
        assert {store.get(ref.blob) for ref in ready.instances} == set(files)

        # duplicates change nothing; a new instance after completion makes revision 2
        async with publisher(env) as pub:
            for data in files[:3]:
                await pub.publish(data)
            await pub.publish(moved_copy(files[0], pydicom.uid.generate_uid(), 500.0))
        await out.wait_for(2)
        await out.drain(2.0)
        assert [r.revision for r in out.records] == [1, 2]
        late = out.records[1]
        assert late.completed_by == "late" and late.instance_count == 25
        assert late.instances[-1].position is not None and late.instances[-1].position[2] == 500.0


async def test_series_without_marker_completes_on_inactivity(
    env: Env, ingest: StageRunner[object], tmp_path: Path
) -> None:
    ph = phantom.head_ct(tmp_path / "head", seed=12, size=32, slices=5, bleed_ml=0)
    async with publisher(env) as pub:
        for f in ph.files:
            await pub.publish(f.read_bytes())
    async with Reader(env, "series", SeriesReady) as out:
        (ready,) = await out.wait_for(1, timeout=30)
    assert (
        ready.completed_by == "timeout"
        and ready.instance_count == 5
        and ready.expected_count is None
    )


async def test_bad_input_dead_lettered_with_reason_and_ingest_carries_on(
    env: Env, ingest: StageRunner[object], tmp_path: Path
) -> None:
    cases = bad_inputs(tmp_path)
    async with publisher(env) as pub:
        for data, _ in cases.values():
            await pub.publish(data)
        good = phantom.chest_ct(tmp_path / "after", seed=13, size=32, slices=3, nodules_mm=())
        for f in good.files:
            await pub.publish(f.read_bytes())
        await pub.end_series(good.series_instance_uid, 3)
        # a message over the broker's cap is refused at the client with a clear error
        with pytest.raises(PublishError, match="exceeds"):
            await pub.publish(b"\0" * (env.broker.settings_for("scanner").max_message_bytes + 1))
    async with (
        Reader(env, "deadletter", DeadLetter) as dlq,
        Reader(env, "series", SeriesReady) as out,
    ):
        await dlq.wait_for(len(cases))
        (ready,) = await out.wait_for(1)
        await dlq.drain(1.0)
    assert ready.series_instance_uid == good.series_instance_uid and ready.instance_count == 3
    assert sorted(letter.reason for letter in dlq.records) == sorted(
        reason for _, reason in cases.values()
    )
    assert all(
        letter.stage == "ingest" and letter.source_topic == env.topic("instances")
        for letter in dlq.records
    )
    # every rejection took well under a second
    reg = ingest.registry
    total = reg.get_sample_value("radstream_handler_seconds_count", {"stage": "ingest"})
    under_1s = reg.get_sample_value(
        "radstream_handler_seconds_bucket", {"stage": "ingest", "le": "1.0"}
    )
    assert total is not None and total >= len(cases) and under_1s == total


async def test_real_pydicom_files_pass_ingest(env: Env, ingest: StageRunner[object]) -> None:
    from shared.dicom.safe import inspect_instance

    files = [real_file(name) for name in REAL_FILES]
    ct = dicomdir_ct_series()
    sent: dict[str, int] = {}
    unique: dict[str, set[str]] = {}
    async with publisher(env) as pub:
        for data in files + ct:
            p = await pub.publish(data)
            assert p.series_instance_uid is not None
            sent[p.series_instance_uid] = sent.get(p.series_instance_uid, 0) + 1
            info = inspect_instance(data)
            unique.setdefault(info.series_instance_uid, set()).add(info.sop_instance_uid)
        for uid, count in sent.items():
            await pub.end_series(uid, count)
    async with (
        Reader(env, "series", SeriesReady) as out,
        Reader(env, "deadletter", DeadLetter) as dlq,
    ):
        await out.wait_for(len(sent), timeout=60)
        await dlq.drain(1.0)
    assert dlq.records == []  # every syntax among them passes ingest
    got = {r.series_instance_uid: r.instance_count for r in out.records}
    # several sample files are the same instance in other transfer syntaxes (same SOP UID):
    # ingest keeps one of each
    assert got == {uid: len(sops) for uid, sops in unique.items()}
    assert len(ct) == 4 and any(count == 4 for count in got.values())


async def test_no_patient_data_in_clear_on_kafka_or_disk(
    env: Env, ingest: StageRunner[object], tmp_path: Path
) -> None:
    ph = phantom.chest_ct(tmp_path / "phi", seed=14, size=32, slices=4, nodules_mm=())
    async with publisher(env) as pub:
        for f in ph.files:
            await pub.publish(f.read_bytes())
        await pub.end_series(ph.series_instance_uid, 4)
    async with Reader(env, "series", SeriesReady) as out:
        await out.wait_for(1)
    ds = pydicom.dcmread(ph.files[0])
    secrets_in_clear = [
        str(ds.PatientName).encode(),
        str(ds.PatientID).encode(),
        ph.series_instance_uid.encode(),
        ph.study_instance_uid.encode(),
        str(ds.SOPInstanceUID).encode(),
        str(ds.AccessionNumber).encode(),
    ]
    # every byte on every topic ingest touched, read raw (keys, values, headers)
    consumer = AIOKafkaConsumer(
        isolation_level="read_uncommitted", auto_offset_reset="earliest", **env.kafka()
    )
    await consumer.start()
    blobs: list[bytes] = []
    try:
        for topic in ("instances", "series", "ingest.state", "deadletter"):
            tps = [TopicPartition(env.topic(topic), p) for p in range(env.partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)

            async def behind(
                tps: list[TopicPartition] = tps, ends: dict[TopicPartition, int] = ends
            ) -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in tps])

            while await behind():
                for recs in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in recs:
                        blobs.append(
                            (rec.key or b"")
                            + (rec.value or b"")
                            + b"".join(k.encode() + v for k, v in rec.headers)
                        )
    finally:
        await consumer.stop()
    assert len(blobs) >= 4 + 1 + 1
    for path in env.settings("ingest").blob_path.rglob("*"):
        if path.is_file():
            blobs.append(path.read_bytes())
            blobs.append(path.name.encode())
    for raw in blobs:
        for secret in secrets_in_clear:
            assert secret not in raw


async def test_ingest_killed_repeatedly_loses_and_duplicates_no_series(
    env: Env, tmp_path: Path
) -> None:
    n_series, n_slices = 20, 8
    phantoms = [
        phantom.chest_ct(tmp_path / f"s{i}", seed=100 + i, size=32, slices=n_slices, nodules_mm=())
        for i in range(n_series)
    ]
    async with publisher(env) as pub:
        # interleaved: slice k of every series, series i closes after its last slice
        for k in range(n_slices):
            for ph in phantoms:
                await pub.publish(ph.files[k].read_bytes())
        for ph in phantoms:
            await pub.end_series(ph.series_instance_uid, n_slices)
    env_vars = env.service_env(
        "ingest", RADSTREAM_INGEST__INACTIVITY_TIMEOUT_S="600", RADSTREAM_SESSION_TIMEOUT_S="6"
    )
    rng = random.Random(7)
    kills = 0
    async with Reader(env, "series", SeriesReady) as out:
        for threshold in sorted(rng.sample(range(1, n_series - 2), 3)):
            proc = StageProcess(
                env_vars, "services.ingest.main", tmp_path / f"ingest{kills}.log"
            ).start()

            async def reached(t: int = threshold) -> bool:
                await out.poll()
                return len(out.records) >= t

            await wait_until(reached, 120, f"{threshold} series ready")
            proc.kill()
            kills += 1
        last = StageProcess(env_vars, "services.ingest.main", tmp_path / "ingest-last.log").start()
        await out.wait_for(n_series, timeout=120)
        await out.drain(3.0)
        assert last.terminate() == 0
    assert kills == 3
    logs = "".join(p.read_text() for p in tmp_path.glob("ingest*.log"))
    assert all(
        ph.series_instance_uid not in logs and ph.study_instance_uid not in logs for ph in phantoms
    )
    by_series: dict[str, list[SeriesReady]] = {}
    for r in out.records:
        by_series.setdefault(r.series_instance_uid, []).append(r)
    assert set(by_series) == {ph.series_instance_uid for ph in phantoms}
    for readies in by_series.values():
        assert len(readies) == 1, "a series was published twice"
        assert readies[0].instance_count == n_slices and readies[0].revision == 1


@pytest.mark.slow
async def test_cli_publish_of_a_300_slice_512_phantom_gives_one_series_ready(
    env: Env, tmp_path: Path
) -> None:
    ph = await asyncio.to_thread(
        phantom.chest_ct, tmp_path / "big", seed=31, size=512, slices=300, nodules_mm=(6.0, 10.0)
    )
    settings = env.settings(
        "ingest", metrics_port=free_port(), ingest=IngestSettings(inactivity_timeout_s=600)
    )
    async with running(StageRunner(build(settings, env.keyring), settings, env.keyring)):
        cli = str(REPO / ".venv" / "bin" / "radstream")
        proc = await asyncio.create_subprocess_exec(
            cli,
            "publish",
            str(ph.out),
            "--source",
            "ct-300",
            env=env.service_env("scanner"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        # truth.npz is in the folder too: sent as it is, and ingest dead-letters it
        assert "published 301 instance(s) in 1 series" in stdout.decode()
        async with (
            Reader(env, "series", SeriesReady) as out,
            Reader(env, "deadletter", DeadLetter) as dlq,
        ):
            (ready,) = await out.wait_for(1, timeout=240)
            await dlq.wait_for(1)
            await out.drain(2.0)
    assert len(out.records) == 1
    assert (
        ready.instance_count == 300
        and ready.expected_count == 300
        and ready.completed_by == "marker"
    )
    assert (ready.rows, ready.columns) == (512, 512)
    assert [letter.reason for letter in dlq.records] == ["not_dicom"]
