"""Preprocess against the real broker: real samples, bad series, kills, metrics."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.preprocess.main import build
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.runtime.stage import StageRunner
from shared.schemas import BlobRef, DeadLetter, SeriesReady, VolumePrepared
from shared.stack.broker import free_port
from shared.storage import BlobStore, LocalDirBackend
from tests.dicom_cases import dicomdir_ct_series, real_file
from tests.helpers import Env, Reader, StageProcess, running, wait_until
from tests.pipeline import files, series_ready

pytestmark = pytest.mark.integration


def store_of(env: Env) -> BlobStore:
    return BlobStore(LocalDirBackend(env.settings("preprocess").blob_path), env.keyring)


def runner(env: Env) -> StageRunner[SeriesReady]:
    from prometheus_client import CollectorRegistry

    settings = env.settings(
        "preprocess", metrics_port=free_port(), device="cpu", preprocess=PreprocessSettings()
    )
    registry = CollectorRegistry()
    return StageRunner(build(settings, env.keyring, registry), settings, env.keyring, registry)


async def test_real_samples_decode_and_produce_volumes(env: Env) -> None:
    st = store_of(env)
    names = [
        "CT_small.dcm",
        "693_J2KI.dcm",
        "J2K_pixelrep_mismatch.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPGExtended.dcm",
        "SC_rgb_rle_2frame.dcm",
    ]
    inputs = [series_ready([real_file(n)], st, env.keyring) for n in names]
    inputs.append(series_ready(dicomdir_ct_series(), st, env.keyring))
    await env.produce(
        "series", [(env.keyring.keyed_hash(m.series_instance_uid), m) for m in inputs]
    )
    async with running(runner(env)) as stage:
        async with (
            Reader(env, "volumes", VolumePrepared) as out,
            Reader(env, "deadletter", DeadLetter) as dlq,
        ):
            await out.wait_for(len(inputs), timeout=120)
            await dlq.drain(1.0)
        assert dlq.records == []
        shapes = sorted(v.shape for v in out.records)
        assert shapes.count((1, 64, 64)) == 7  # MR_small in seven transfer syntaxes
        assert (1, 512, 512) in shapes and (2, 100, 100) in shapes
        # the dicomdir CT series: three even slices and one far away, left out explicitly
        (ct_series,) = [v for v in out.records if v.excluded_instances]
        assert ct_series.shape[0] == 3 and len(ct_series.source_instances) == 3
        assert len(ct_series.excluded_instances) == 1
        text = stage.registry.get_sample_value(
            "radstream_backend_info", {"stage": "preprocess", "backend": "cpu"}
        )
        assert text == 1.0
        assert (
            stage.registry.get_sample_value(
                "radstream_image_intensity", {"modality": "CT", "q": "p50"}
            )
            is not None
        )


async def test_bad_series_are_dead_lettered_and_the_stage_goes_on(env: Env, tmp_path: Path) -> None:
    st = store_of(env)
    sr = series_ready([real_file("test-SR.dcm")], st, env.keyring)
    good = series_ready(
        files(phantom.head_ct(tmp_path / "h", seed=8, size=32, slices=4, bleed_ml=0).files),
        st,
        env.keyring,
    )
    missing = good.model_copy(
        update={
            "instances": [
                good.instances[0].model_copy(
                    update={"blob": BlobRef(digest="f" * 64, size=10, key_id="k")}
                )
            ]
        }
    )
    ph = phantom.head_ct(tmp_path / "d", seed=9, size=32, slices=3, bleed_ml=0)
    import io

    import pydicom

    datas = files(ph.files)
    ds = pydicom.dcmread(io.BytesIO(datas[2]))
    ds.ImagePositionPatient = list(pydicom.dcmread(io.BytesIO(datas[1])).ImagePositionPatient)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dup = series_ready([datas[0], datas[1], buf.getvalue()], st, env.keyring)
    await env.produce("series", [(b"k1", sr), (b"k1", missing), (b"k1", dup), (b"k1", good)])
    async with running(runner(env)):
        async with (
            Reader(env, "volumes", VolumePrepared) as out,
            Reader(env, "deadletter", DeadLetter) as dlq,
        ):
            await dlq.wait_for(3)
            (volume,) = await out.wait_for(1)
    assert [letter.reason for letter in dlq.records] == [
        "not_an_image",
        "blob_missing",
        "duplicate_slices",
    ]
    assert volume.series_instance_uid == good.series_instance_uid and volume.shape == (4, 32, 32)


async def test_killed_mid_stream_exactly_one_volume_per_series(env: Env, tmp_path: Path) -> None:
    st = store_of(env)
    inputs = [
        series_ready(
            files(
                phantom.chest_ct(
                    tmp_path / f"c{i}", seed=200 + i, size=128, slices=24, nodules_mm=()
                ).files
            ),
            st,
            env.keyring,
        )
        for i in range(12)
    ]
    await env.produce(
        "series", [(env.keyring.keyed_hash(m.series_instance_uid), m) for m in inputs]
    )
    env_vars = env.service_env(
        "preprocess", RADSTREAM_DEVICE="cpu", RADSTREAM_SESSION_TIMEOUT_S="6"
    )
    rng = random.Random(5)
    async with Reader(env, "volumes", VolumePrepared) as out:
        for k, threshold in enumerate(sorted(rng.sample(range(1, 10), 3))):
            proc = StageProcess(
                env_vars, "services.preprocess.main", tmp_path / f"pp{k}.log"
            ).start()

            async def reached(t: int = threshold) -> bool:
                await out.poll()
                return len(out.records) >= t

            await wait_until(reached, 120, f"{threshold} volumes")
            proc.kill()
        last = StageProcess(env_vars, "services.preprocess.main", tmp_path / "pp-last.log").start()
        await out.wait_for(len(inputs), timeout=180)
        await out.drain(3.0)
        assert last.terminate() == 0
    got = [v.series_instance_uid for v in out.records]
    assert sorted(got) == sorted(m.series_instance_uid for m in inputs)  # each exactly once
