"""A GPU failure that is not bad input is never a dead letter: the record is redone on the CPU,
counted in ``radstream_gpu_fallbacks_total{stage,reason}`` and logged once per cause; out of
memory frees the pools and retries on the device first. Bad input still dead-letters with its
usual reason. Failures are planted in the strict CuPy stand-in where a real device fails."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry

from services.preprocess.core import PreprocessCore
from services.segmentation.core import SegmentationCore
from shared.config import PreprocessSettings, Settings
from shared.dicom import phantom
from shared.imaging.backend import (
    FALLBACK_CAUSES,
    DeviceRunner,
    count_downloads,
    device_failure_cause,
    select_backend,
)
from shared.imaging.masks import unpack_masks
from shared.imaging.packed import unpack_volume
from shared.runtime.errors import PoisonError, RetriableError
from shared.runtime.harness import StageHarness
from shared.runtime.stage import Context
from shared.schemas import SeriesReady, VolumePrepared
from shared.security.envelope import Keyring
from shared.storage import BlobStore, local_store
from tests import fake_cupy
from tests.pipeline import files, series_ready

OOM = fake_cupy.OutOfMemoryError(1 << 33, 1 << 34)


def fallbacks(registry: CollectorRegistry, stage: str) -> dict[str, float]:
    return {
        cause: registry.get_sample_value(
            "radstream_gpu_fallbacks_total", {"stage": stage, "reason": cause}
        )
        or 0.0
        for cause in FALLBACK_CAUSES
    }


# ---- the runner ----------------------------------------------------------------------------
@pytest.fixture
def gpu(strict_cupy: Any) -> Any:
    return select_backend("gpu")


@pytest.mark.parametrize(
    "exc,cause",
    [
        (fake_cupy.CUDARuntimeError(700), "cuda_error"),
        (fake_cupy.CUDARuntimeError(2), "out_of_memory"),
        (OOM, "out_of_memory"),
        (NotImplementedError("only brute_force iteration has been implemented"), "not_implemented"),
        (TypeError("Implicit conversion to a NumPy array is not allowed. ..."), "host_conversion"),
        (ValueError("a bug only the device path has"), "other"),
        (PoisonError("undecodable", "bad input"), None),
        (RetriableError("dependency down"), None),
    ],
)
def test_device_failures_are_classified_by_bounded_causes(
    exc: BaseException, cause: str | None
) -> None:
    assert device_failure_cause(exc) == cause


def test_a_device_failure_is_redone_on_the_cpu_counted_and_logged_once(
    strict_cupy: Any, gpu: Any, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    runner = DeviceRunner(gpu, stage="segmentation", registry=registry)
    ran_on: list[str] = []

    def work(be: Any) -> float:
        ran_on.append(be.name)
        x = be.upload(np.arange(10.0))
        if be.name == "gpu":
            np.asarray(x)  # what the radiograph task did: CuPy refuses it
        return float(be.download(x, why="result").sum())

    with caplog.at_level(logging.WARNING, logger="radstream.imaging"):
        assert runner.run(work) == 45.0 and runner.run(work) == 45.0
    assert ran_on == ["gpu", "cpu", "gpu", "cpu"]
    assert fallbacks(registry, "segmentation")["host_conversion"] == 2.0
    assert sum(fallbacks(registry, "segmentation").values()) == 2.0
    warned = [r for r in caplog.records if "redone on the cpu" in r.getMessage()]
    assert len(warned) == 1 and "host_conversion" in warned[0].getMessage()
    assert "45" not in warned[0].getMessage()  # type and place only, never values
    assert strict_cupy.get_default_memory_pool().freed >= 2


def test_out_of_memory_frees_the_pool_and_retries_on_the_device_first(
    strict_cupy: Any, gpu: Any
) -> None:
    registry = CollectorRegistry()
    runner = DeviceRunner(gpu, stage="preprocess", registry=registry)
    pool = strict_cupy.get_default_memory_pool()

    def work(be: Any) -> str:
        be.upload(np.zeros(4))
        return str(be.name)

    strict_cupy.faults.add("cupy.asarray", OOM, times=1)
    assert runner.run(work) == "gpu" and pool.freed == 1  # freed, retried, done on the device
    assert sum(fallbacks(registry, "preprocess").values()) == 0.0
    strict_cupy.faults.add("cupy.asarray", OOM, times=2)
    assert runner.run(work) == "cpu" and pool.freed == 3  # the retry failed too: cpu
    assert fallbacks(registry, "preprocess")["out_of_memory"] == 1.0


def test_bad_input_is_not_redone_on_the_cpu(strict_cupy: Any, gpu: Any) -> None:
    registry = CollectorRegistry()
    runner = DeviceRunner(gpu, stage="preprocess", registry=registry)
    ran_on: list[str] = []

    def work(be: Any) -> None:
        ran_on.append(be.name)
        raise PoisonError("volume_too_large", "too many voxels")

    with pytest.raises(PoisonError) as info:
        runner.run(work)
    assert info.value.reason == "volume_too_large" and ran_on == ["gpu"]
    assert sum(fallbacks(registry, "preprocess").values()) == 0.0


def test_on_the_cpu_backend_the_runner_is_transparent() -> None:
    registry = CollectorRegistry()
    runner = DeviceRunner(select_backend("cpu"), stage="preprocess", registry=registry)
    with pytest.raises(ValueError, match="a cpu bug"):
        runner.run(lambda be: (_ for _ in ()).throw(ValueError("a cpu bug")))
    assert sum(fallbacks(registry, "preprocess").values()) == 0.0


# ---- through the stages (the runtime's dispatcher, in memory) -------------------------------
@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path, device="gpu", preprocess=PreprocessSettings(warmup_shapes="48x48")
    )


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def store(settings: Settings, keyring: Keyring) -> BlobStore:
    return local_store(settings.blob_path, keyring)


@pytest.fixture
def chest_series(tmp_path: Path, store: BlobStore, keyring: Keyring) -> SeriesReady:
    ph = phantom.chest_ct(tmp_path / "c", seed=3, size=96, slices=12, nodules_mm=(8.0,))
    return series_ready(files(ph.files), store, keyring)


def ctx(keyring: Keyring) -> Context:
    return Context("t.in", 0, 0, b"k", 0, None, keyring)


def stage(name: str, settings: Settings, keyring: Keyring) -> tuple[Any, CollectorRegistry]:
    import importlib

    registry = CollectorRegistry()
    spec = importlib.import_module(f"services.{name}.main").build(settings, keyring, registry)
    return StageHarness(spec, settings, keyring), registry


@pytest.mark.parametrize(
    "point,exc,cause",
    [
        ("ndimage.gaussian_filter", fake_cupy.CUDARuntimeError(700), "cuda_error"),
        ("cupy.histogram", NotImplementedError("string bins"), "not_implemented"),
        ("download", OOM, "out_of_memory"),
    ],
)
def test_preprocess_redoes_a_failed_record_on_the_cpu_with_the_cpu_output(
    strict_cupy: Any,
    settings: Settings,
    keyring: Keyring,
    store: BlobStore,
    chest_series: SeriesReady,
    point: str,
    exc: BaseException,
    cause: str,
) -> None:
    cpu = PreprocessCore(store, select_backend("cpu"), settings.preprocess).handle(
        chest_series, ctx(keyring)
    )
    harness, registry = stage("preprocess", settings, keyring)
    times = 2 if cause == "out_of_memory" else 1  # out of memory: the retry fails too
    strict_cupy.faults.add(point, exc, times=times)
    result = harness.send(chest_series, key=chest_series.series_instance_uid)
    assert result.dead_letters == [] and strict_cupy.faults.fired == [point] * times
    (out,) = result.outputs["volumes"]
    assert out.backend == "cpu" and out.stats == cpu.stats
    np.testing.assert_array_equal(
        unpack_volume(store.get(out.volume)), unpack_volume(store.get(cpu.volume))
    )
    assert fallbacks(registry, "preprocess") == {c: float(c == cause) for c in FALLBACK_CAUSES}
    # the next record runs on the device again
    again = harness.send(chest_series, key=chest_series.series_instance_uid)
    assert again.outputs["volumes"][0].backend == "gpu"  # type: ignore[attr-defined]
    assert sum(fallbacks(registry, "preprocess").values()) == 1.0


def test_preprocess_on_the_device_downloads_the_volume_and_the_stats_only(
    strict_cupy: Any,
    settings: Settings,
    keyring: Keyring,
    store: BlobStore,
    chest_series: SeriesReady,
) -> None:
    cpu = PreprocessCore(store, select_backend("cpu"), settings.preprocess).handle(
        chest_series, ctx(keyring)
    )
    core = PreprocessCore(store, select_backend("gpu"), settings.preprocess)
    strict_cupy.transfers.clear()
    with count_downloads() as log:
        gpu = core.handle(chest_series, ctx(keyring))
    assert gpu.backend == "gpu" and gpu.stats == cpu.stats
    assert [why for why, _ in log.downloads] == ["stats", "volume"]
    assert log.downloads[1][1] == 2 * int(np.prod(gpu.shape))  # int16 crossed back, not float32
    assert strict_cupy.transfers.scalars == []
    np.testing.assert_array_equal(
        unpack_volume(store.get(gpu.volume)), unpack_volume(store.get(cpu.volume))
    )


def test_bad_input_on_the_gpu_path_still_dead_letters_with_its_reason(
    strict_cupy: Any, tmp_path: Path, settings: Settings, keyring: Keyring, store: BlobStore
) -> None:
    ph = phantom.chest_ct(tmp_path / "m", seed=4, size=48, slices=6, nodules_mm=())
    datas = files(ph.files)
    ds = pydicom.dcmread(io.BytesIO(datas[2]))
    ds.ImagePositionPatient = [
        float(v) for v in pydicom.dcmread(io.BytesIO(datas[1])).ImagePositionPatient
    ]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    datas[2] = buf.getvalue()
    msg = series_ready(datas, store, keyring)
    harness, registry = stage("preprocess", settings, keyring)
    (letter,) = harness.send(msg, key=msg.series_instance_uid).dead_letters
    assert letter.reason == "duplicate_slices" and letter.stage == "preprocess"
    assert sum(fallbacks(registry, "preprocess").values()) == 0.0
    seg, seg_registry = stage("segmentation", settings, keyring)
    corrupt = VolumePrepared.model_validate(
        {
            **_volume(store, keyring, tmp_path).model_dump(),
            "volume": store.put(b"not a volume", "volumes"),
        }
    )
    (letter,) = seg.send(corrupt, key=corrupt.series_instance_uid).dead_letters
    assert letter.reason == "undecodable" and letter.stage == "segmentation"
    assert sum(fallbacks(seg_registry, "segmentation").values()) == 0.0


def _volume(store: BlobStore, keyring: Keyring, tmp_path: Path) -> VolumePrepared:
    ph = phantom.radiograph(tmp_path / "dx", seed=2, size=192, spacing=0.6)
    msg = series_ready(files(ph.files), store, keyring)
    return PreprocessCore(store, select_backend("cpu"), PreprocessSettings()).handle(
        msg, ctx(keyring)
    )


def test_segmentation_redoes_a_failed_record_on_the_cpu_with_the_cpu_findings(
    strict_cupy: Any, tmp_path: Path, settings: Settings, keyring: Keyring, store: BlobStore
) -> None:
    vp = _volume(store, keyring, tmp_path)
    cpu = SegmentationCore(store, select_backend("cpu")).handle(vp, ctx(keyring))
    harness, registry = stage("segmentation", settings, keyring)
    strict_cupy.faults.add("ndimage.label", NotImplementedError("planted"))
    result = harness.send(vp, key=vp.series_instance_uid)
    assert result.dead_letters == [] and strict_cupy.faults.fired == ["ndimage.label"]
    (done,) = result.outputs["findings"]
    assert done.findings == cpu.findings and done.task == "radiograph"
    masks, cpu_masks = (unpack_masks(store.get(d.masks)) for d in (done, cpu))  # type: ignore[arg-type]
    assert sorted(masks) == sorted(cpu_masks)
    for name in masks:
        np.testing.assert_array_equal(masks[name], cpu_masks[name])
    assert fallbacks(registry, "segmentation") == {
        c: float(c == "not_implemented") for c in FALLBACK_CAUSES
    }
    # and without a fault the device gives the same findings, downloading only results
    with count_downloads() as log:
        again = harness.send(vp, key=vp.series_instance_uid)
    assert again.outputs["findings"][0].findings == cpu.findings  # type: ignore[attr-defined]
    assert sum(fallbacks(registry, "segmentation").values()) == 1.0
    assert [why for why, _ in log.downloads] == ["canny (host)", "structure ranking"] + [
        "structure mask"
    ] * 2


def test_a_warm_up_the_device_fails_does_not_stop_the_service(
    strict_cupy: Any, store: BlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    core = PreprocessCore(
        store, select_backend("gpu"), PreprocessSettings(warmup_shapes="32x32,48x48")
    )
    strict_cupy.faults.add("ndimage.gaussian_filter", fake_cupy.CUDARuntimeError(700))
    with caplog.at_level(logging.WARNING, logger="radstream.preprocess"):
        warmed = core.warm_up()
    assert strict_cupy.faults.fired == ["ndimage.gaussian_filter"]  # it failed, and went on
    assert len(warmed) == len(strict_cupy.ndi_calls)  # every step that ran is warm
    assert any(
        "warm-up" in r.getMessage() and "cuda_error" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(PoisonError):  # anything that is not the device's still stops it
        strict_cupy.faults.add("ndimage.gaussian_filter", PoisonError("undecodable", "x"))
        PreprocessCore(
            store, select_backend("gpu"), PreprocessSettings(warmup_shapes="64x64")
        ).warm_up()


def test_segmentation_warms_its_tasks_on_the_device_and_survives_a_device_failure(
    strict_cupy: Any, store: BlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The chest and head tasks run once on the device before the first series (CuPy compiles
    a kernel on first use: 17-78 s for the first series on a fresh H200), once per process; a
    device failure is logged and the service starts; on the CPU nothing runs."""
    assert SegmentationCore(store, select_backend("cpu")).warm_up() == []
    core = SegmentationCore(store, select_backend("gpu"))
    assert core.warm_up() == ["chest_ct", "head_ct"]
    assert strict_cupy.uploads and "label" in strict_cupy.ndi_calls  # ran on the device
    calls = len(strict_cupy.ndi_calls)
    assert core.warm_up() == [] and len(strict_cupy.ndi_calls) == calls  # warm already

    failing = SegmentationCore(store, select_backend("gpu"))
    strict_cupy.faults.add("ndimage.label", fake_cupy.CUDARuntimeError(700))
    with caplog.at_level(logging.WARNING, logger="radstream.segmentation"):
        assert failing.warm_up() == ["head_ct"]
    assert strict_cupy.faults.fired == ["ndimage.label"]
    assert any(
        "warm-up of chest_ct" in r.getMessage() and "cuda_error" in r.getMessage()
        for r in caplog.records
    )
