"""Every array function against a plain SciPy / scikit-image reference (float64), and the
GPU glue against the strict CuPy stand-in; device parity (stand-in and real GPU, ``-m gpu``)
is in test_device_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage import exposure

from shared.imaging import ops
from shared.imaging.backend import BackendUnavailable, select_backend
from tests import fake_cupy

RNG = np.random.default_rng(0)
VOL = (RNG.normal(0, 50, (12, 40, 36)) + np.linspace(-1000, 400, 36)).astype(np.float32)


@pytest.mark.parametrize("sigma", [1.0, [0.0, 0.7, 0.7], [1.5, 0.5, 2.0]])
def test_gaussian_matches_scipy_float64(sigma) -> None:  # type: ignore[no-untyped-def]
    ref = ndi.gaussian_filter(VOL.astype(np.float64), sigma=sigma, mode="nearest")
    np.testing.assert_allclose(ops.gaussian(VOL, sigma=sigma), ref, atol=1e-2)


@pytest.mark.parametrize("size", [3, [1, 3, 3]])
def test_median_and_mean_match_scipy(size) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_allclose(
        ops.median(VOL, size=size),
        ndi.median_filter(VOL.astype(np.float64), size=size, mode="nearest"),
        atol=1e-3,
    )
    np.testing.assert_allclose(
        ops.mean(VOL, size=size),
        ndi.uniform_filter(VOL.astype(np.float64), size=size, mode="nearest"),
        atol=1e-2,
    )


def test_window_presets_match_the_dicom_linear_function() -> None:
    for center, width in ops.WINDOWS.values():
        ref = np.clip((VOL.astype(np.float64) - (center - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(ops.window(VOL, center=center, width=width), ref, atol=1e-6)


def test_histogram_equalization_matches_scikit_image() -> None:
    ref = exposure.equalize_hist(VOL.astype(np.float64), nbins=256)
    np.testing.assert_allclose(ops.equalize_histogram(VOL, bins=256), ref, atol=2e-3)


def test_log_normalize_rescale() -> None:
    np.testing.assert_allclose(
        ops.log_transform(VOL), np.log1p(VOL.astype(np.float64) - VOL.min()), rtol=1e-5
    )
    z = ops.normalize(VOL, method="zscore")
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-4
    m = ops.normalize(VOL, method="minmax")
    assert float(m.min()) == 0.0 and abs(float(m.max()) - 1) < 1e-6
    stored = RNG.integers(0, 4096, (4, 8, 8)).astype(np.uint16)
    np.testing.assert_allclose(ops.rescale(stored, slope=0.5, intercept=-1024), stored * 0.5 - 1024)


def test_resample_to_target_spacing_matches_scipy_zoom() -> None:
    out, spacing = ops.resample(VOL, spacing=(2.5, 0.7, 0.7), target=1.4)
    assert out.shape == (21, 20, 18)
    assert np.allclose(spacing, (2.5 * 12 / 21, 0.7 * 40 / 20, 0.7 * 36 / 18))
    ref = ndi.zoom(
        VOL.astype(np.float64),
        [21 / 12, 20 / 40, 18 / 36],
        order=1,
        mode="nearest",
        grid_mode=False,
    )
    np.testing.assert_allclose(out, ref, atol=1e-2)


def test_histogram_percentiles_within_one_hu_of_numpy() -> None:
    vol = RNG.normal(-300, 400, 200_000).clip(-1024, 3000).astype(np.float32)
    qs = (1, 5, 50, 95, 99)
    for got, ref in zip(
        ops.percentiles_from_histogram(vol, qs), np.percentile(vol, qs), strict=True
    ):
        assert abs(got - ref) <= 1.0


def test_noise_estimate_recovers_known_sigma() -> None:
    flat = RNG.normal(40, 12.0, (3, 256, 256)).astype(np.float32)
    assert abs(ops.noise_estimate(flat) - 12.0) < 1.5


# ---- the GPU branch's glue, against the stand-in -------------------------------------------


def test_auto_picks_the_gpu_when_a_device_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    cp = fake_cupy.make(available=True)
    fake_cupy.install(monkeypatch, cp)
    be = select_backend("auto", memory_limit_bytes=2**30)
    assert be.name == "gpu" and be.device == "cuda:0"
    assert cp.get_default_memory_pool().limit == 2**30  # pool bounded
    dev = be.upload(VOL.astype(np.int16))
    assert isinstance(dev, cp.ndarray) and cp.uploads[-1] == np.int16  # compact upload
    # the same functions run on device arrays and give the CPU result
    out = ops.gaussian(dev.astype(cp.float32), sigma=[0.0, 0.7, 0.7])
    assert isinstance(out, cp.ndarray) and cp.ndi_calls == ["gaussian_filter"]
    host = be.download(out)
    assert type(host) is np.ndarray
    np.testing.assert_allclose(
        host, ops.gaussian(VOL.astype(np.int16).astype(np.float32), sigma=[0.0, 0.7, 0.7])
    )
    calls = []
    assert be.warm_up(("k",), lambda: calls.append(1)) is True
    assert be.warm_up(("k",), lambda: calls.append(1)) is False and calls == [1]
    be.free()
    assert cp.get_default_memory_pool().freed == 1 and be.memory_in_use() == 1234


@pytest.mark.parametrize("available,fails", [(False, False), (True, True)])
def test_auto_falls_back_to_cpu_when_no_device_answers(
    monkeypatch: pytest.MonkeyPatch, available: bool, fails: bool
) -> None:
    fake_cupy.install(monkeypatch, fake_cupy.make(available=available, allocation_fails=fails))
    assert select_backend("auto").name == "cpu"
    with pytest.raises(BackendUnavailable):
        select_backend("gpu")


def test_cpu_mode_never_touches_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    cp = fake_cupy.make()
    fake_cupy.install(monkeypatch, cp)
    be = select_backend("cpu")
    assert be.name == "cpu" and cp.uploads == []


def test_without_cupy_installed_auto_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails
    assert select_backend("auto").name == "cpu"
