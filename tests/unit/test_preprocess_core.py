"""Preprocess's core without a broker: geometry, calibration, decoding, the GPU glue."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi

from services.preprocess.core import PreprocessCore
from shared.config import PreprocessSettings
from shared.dicom import phantom
from shared.imaging.backend import select_backend
from shared.imaging.packed import unpack_volume
from shared.imaging.volume import assemble, decode
from shared.runtime.errors import PoisonError
from shared.runtime.stage import Context
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend
from tests import fake_cupy
from tests.dicom_cases import real_file
from tests.pipeline import files, series_ready

NO_CHAIN = '{"CT:CHEST": [], "CT:HEAD": [], "CT": []}'


@pytest.fixture
def store(tmp_path: Path) -> tuple[BlobStore, Keyring]:
    ring = Keyring.generate()
    return BlobStore(LocalDirBackend(tmp_path / "blobs"), ring), ring


def ctx(ring: Keyring) -> Context:
    return Context("t.series", 0, 0, b"k", 0, None, ring)


def rewrite(data: bytes, **attrs: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for k, v in attrs.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_calibrated_hu_within_one_hu_of_truth(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    st, ring = store
    ph = phantom.chest_ct(tmp_path / "c", seed=3, size=96, slices=12, noise=0.0, nodules_mm=(10.0,))
    core = PreprocessCore(st, select_backend("cpu"), PreprocessSettings(chains=NO_CHAIN))
    out = core.handle(series_ready(files(ph.files), st, ring), ctx(ring))
    vol = unpack_volume(st.get(out.volume)).astype(np.float64)
    assert out.dtype == "int16" and vol.shape == (12, 96, 96)
    truth = ph.truth
    lungs = ndi.binary_erosion(truth["lung_left"] | truth["lung_right"], iterations=2)
    nod = ndi.binary_erosion(truth["nodules"], iterations=1)
    body_only = ndi.binary_erosion(truth["body"], iterations=2) & ~ndi.binary_dilation(
        truth["lung_left"] | truth["lung_right"], iterations=3
    )
    # lung parenchyma (vessels run through it)
    lung_vals = vol[lungs]
    assert np.all(
        (np.abs(lung_vals - phantom.HU["lung"]) <= 1.0)
        | (np.abs(lung_vals - phantom.HU["vessel"]) <= 1.0)
    )
    assert np.mean(np.abs(lung_vals - phantom.HU["lung"]) <= 1.0) > 0.9
    assert np.abs(vol[nod] - phantom.HU["nodule"]).max() <= 1.0
    assert np.abs(vol[~truth["body"]] - phantom.HU["air"]).max() <= 1.0
    values = set(np.unique(vol[body_only]).tolist())
    assert values <= {phantom.HU[t] for t in ("fat", "soft", "bone", "vessel")}
    assert out.spacing_mm[0] == pytest.approx(2.5) and out.backend == "cpu"
    assert out.stats["p1"] == pytest.approx(-1000, abs=1) and out.stats["noise"] < 5


def _slices(tmp_path: Path, orientation: list[float] | None = None) -> list[bytes]:
    ph = phantom.head_ct(tmp_path / "h", seed=4, size=16, slices=6, bleed_ml=0)
    datas = files(ph.files)
    if orientation is None:
        return datas
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    return [
        rewrite(
            d,
            ImageOrientationPatient=orientation,
            ImagePositionPatient=list(map(float, 3.0 * i * n)),
        )
        for i, d in enumerate(datas)
    ]


@pytest.mark.parametrize("arrangement", ["shuffled", "reversed", "oblique"])
def test_slices_sorted_along_the_normal(tmp_path: Path, arrangement: str) -> None:
    a = math.radians(25)
    oblique = [1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a)] if arrangement == "oblique" else None
    datas = _slices(tmp_path, oblique)
    expected = [decode(d).stored for d in datas]
    order = {
        "shuffled": [3, 0, 5, 1, 4, 2],
        "reversed": [5, 4, 3, 2, 1, 0],
        "oblique": [2, 5, 0, 4, 1, 3],
    }[arrangement]
    # instance numbers deliberately disagree with the geometry
    scrambled = [rewrite(datas[i], InstanceNumber=k + 1) for k, i in enumerate(order)]
    asm = assemble([decode(d) for d in scrambled])
    ordered, spacing, direction = asm.slices, asm.spacing, asm.direction
    for got, want in zip(ordered, expected, strict=True):
        np.testing.assert_array_equal(got.stored, want)
    assert spacing[0] == pytest.approx(3.0)
    assert np.allclose(direction[6:], np.cross(direction[:3], direction[3:6]))


def test_inconsistent_series_are_rejected_with_reasons(tmp_path: Path) -> None:
    datas = _slices(tmp_path)
    s = [decode(d) for d in datas]
    with pytest.raises(PoisonError) as dup:
        assemble([s[0], s[1], decode(rewrite(datas[2], ImagePositionPatient=list(s[1].position)))])  # type: ignore[arg-type]
    assert dup.value.reason == "duplicate_slices"
    with pytest.raises(PoisonError) as gap:
        assemble([s[0], s[1], s[3], s[4]])  # a gap inside the stack, no clear majority run
    assert gap.value.reason == "inconsistent_spacing"
    # a stray slice far from an even stack (a localizer): kept out, explicitly
    stray = decode(
        rewrite(datas[5], ImagePositionPatient=[s[0].position[0], s[0].position[1], 400.0])
    )  # type: ignore[index]
    asm = assemble([s[2], stray, s[0], s[1], s[3]])
    assert asm.excluded == [1] and [x.position for x in asm.slices] == [
        s[i].position for i in range(4)
    ]
    small = phantom.head_ct(tmp_path / "small", seed=4, size=8, slices=2, bleed_ml=0)
    with pytest.raises(PoisonError) as mixed:
        assemble([s[0], decode(small.files[1].read_bytes())])
    assert mixed.value.reason == "mixed_geometry"
    with pytest.raises(PoisonError) as turned:
        assemble(
            [
                s[0],
                decode(rewrite(datas[1], ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, 1.0])),
            ]
        )
    assert turned.value.reason == "mixed_geometry"


def test_every_grayscale_transfer_syntax_decodes_to_the_same_pixels() -> None:
    ref = decode(real_file("MR_small.dcm")).stored
    for name in (
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ):
        np.testing.assert_array_equal(decode(real_file(name)).stored, ref, err_msg=name)
    for name, shape in (
        ("693_J2KI.dcm", (512, 512)),
        ("J2K_pixelrep_mismatch.dcm", (512, 512)),
        ("CT_small.dcm", (128, 128)),
        ("JPGExtended.dcm", (1024, 256)),
    ):
        assert decode(real_file(name)).stored.shape == shape, name
    multi = decode(real_file("SC_rgb_rle_2frame.dcm"))
    assert multi.stored.shape == (2, 100, 100)  # frames, colour → luminance
    with pytest.raises(PoisonError) as not_image:
        decode(real_file("test-SR.dcm"))
    assert not_image.value.reason == "not_an_image"


def test_gpu_branch_gives_the_cpu_result_and_uploads_int16(
    monkeypatch: pytest.MonkeyPatch, store, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    st, ring = store
    ph = phantom.chest_ct(tmp_path / "g", seed=6, size=48, slices=8, nodules_mm=(8.0,))
    msg = series_ready(files(ph.files), st, ring)
    cpu = PreprocessCore(st, select_backend("cpu"), PreprocessSettings()).handle(msg, ctx(ring))
    cp = fake_cupy.make()
    fake_cupy.install(monkeypatch, cp)
    backend = select_backend("auto", memory_limit_bytes=1 << 30)
    core = PreprocessCore(st, backend, PreprocessSettings(warmup_shapes="48x48,512x512"))
    warmed = core.warm_up()
    assert {(r, c) for r, c, _ in warmed} == {(48, 48), (512, 512)}
    assert core.warm_up() == []  # compiled once
    gpu = core.handle(msg, ctx(ring))
    assert gpu.backend == "gpu" and np.int16 in cp.uploads and np.float64 not in cp.uploads
    assert "gaussian_filter" in cp.ndi_calls
    np.testing.assert_array_equal(
        unpack_volume(st.get(gpu.volume)), unpack_volume(st.get(cpu.volume))
    )
    assert cp.get_default_memory_pool().freed >= 1  # memory released after the series
