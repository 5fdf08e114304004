"""Attack tests, in process: decompression and parser bombs against every reader of untrusted
DICOM bytes (ingest's judge, the publisher's key, preprocess's decoder, the SEG's source
headers), each refused with its own reason while memory stays flat (the process's
peak, printed). The same bombs against the real ingest and gateway processes, with their
peak RSS, are in tests/integration/test_bombs.py."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.preprocess.core import PreprocessCore
from shared.config import IngestSettings, PreprocessSettings, Settings
from shared.dicom import bounded
from shared.dicom.bounded import Bounds, InvalidInstance
from shared.dicom.safe import Limits, inspect_instance, series_uid_or_none
from shared.dicom.seg import source_headers
from shared.imaging.backend import select_backend
from shared.imaging.volume import decode
from shared.runtime.errors import PoisonError
from shared.runtime.harness import StageHarness
from shared.runtime.stage import Context
from shared.runtime.state import PartitionState
from shared.schemas import BlobRef, EndOfSeries, InstanceData, InstanceRef, Reason, SeriesReady
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend
from tests import bombs
from tests.dicom_cases import REAL_FILES, real_file

MiB = 1024 * 1024
FLAT = 24 * MiB  # RSS growth while refusing one bomb (the bomb's own bytes were there before)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bombs")


@pytest.fixture(scope="module")
def gigabyte(tmp: Path) -> bytes:
    """1 MiB on the wire, 1 GiB inflated."""
    return bombs.deflate_bomb(tmp)


@pytest.fixture(scope="module")
def million_items(tmp: Path) -> bytes:
    """A million empty items, deflated."""
    return bombs.items_bomb(tmp)


def costs(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """(what ``fn`` returned or raised, how far the process's peak RSS rose above its RSS
    before the call, in bytes, seconds)."""
    before = bombs.rss()
    bombs.reset_peak_rss()
    t0 = time.perf_counter()
    try:
        result: Any = fn()
    except (InvalidInstance, PoisonError) as exc:
        result = exc
    return result, bombs.peak_rss() - before, time.perf_counter() - t0


def refused(fn: Callable[[], Any], reason: str, what: str) -> None:
    result, peak, seconds = costs(fn)
    print(f"{what}: {reason}, peak RSS +{peak / MiB:.1f} MiB, {seconds:.2f} s")
    assert isinstance(result, InvalidInstance | PoisonError), f"{what} was accepted"
    assert result.reason == reason
    assert peak < FLAT
    assert seconds < 5  # was ~21 s for the million items


def test_the_bombs_are_what_the_review_found(gigabyte: bytes, million_items: bytes) -> None:
    assert len(gigabyte) < 1.1 * MiB
    assert bounded.inflate_prefix(gigabyte[bombs.meta_end(gigabyte) :], 4 * MiB) != b""
    assert len(million_items) < 40 * 1024
    body = bounded.inflate(million_items[bombs.meta_end(million_items) :], 64 * MiB)
    assert body.count(struct.pack("<HHI", 0xFFFE, 0xE000, 0)) == 1_000_000


def test_ingest_refuses_the_deflate_bomb_having_held_nothing(gigabyte: bytes) -> None:
    refused(lambda: inspect_instance(gigabyte), "inflated_too_large", "1 GiB deflate bomb")


def test_ingest_refuses_a_million_items_at_the_item_cap(million_items: bytes, tmp: Path) -> None:
    refused(lambda: inspect_instance(million_items), "too_many_items", "1M items, deflated")
    plain = bombs.items_bomb(tmp, deflated=False)
    refused(lambda: inspect_instance(plain), "too_many_items", "1M items, plain")


def test_ingest_refuses_too_many_elements(tmp: Path) -> None:
    good = bombs.base_instance(tmp)
    # 300 000 empty private elements (each a Python object for a parser that builds them)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"BOMB"
    many = b"".join(
        struct.pack("<HH2sH", 0x0009, 0x1000 + (i & 0xFF), b"SH", 0) for i in range(300_000)
    )
    at = good.index(b"\x10\x00\x10\x00")  # PatientName (0010,0010): group 0009 goes before it
    bomb = good[:at] + creator + many + good[at:]
    refused(lambda: inspect_instance(bomb), "too_many_elements", "300k elements")


def test_a_lying_jpeg_2000_codestream_is_refused_before_any_decode(tmp: Path) -> None:
    lie = bombs.j2k_bomb(tmp, honest=False)  # says 64², its SIZ says 8192²
    honest = bombs.j2k_bomb(tmp, honest=True)  # says 8192² in 1.6 KB
    refused(lambda: inspect_instance(lie), "codestream_mismatch", "J2K 64² header, 8192² SIZ")
    refused(lambda: inspect_instance(honest), "pixel_size_implausible", "J2K 8192², ingest")
    # preprocess's decoder judges the same before decoding (a blob written before this check)
    refused(lambda: decode(lie), "codestream_mismatch", "J2K lie, preprocess decode")
    refused(lambda: decode(honest), "pixel_size_implausible", "J2K 8192², preprocess decode")
    # within a frame cap that admits 8192², the volume cap still refuses it before decoding
    refused(
        lambda: decode(honest, max_frame_pixels=1 << 27, max_voxels=8000 * 8000),
        "volume_too_large",
        "J2K 8192², voxel cap",
    )
    refused(
        lambda: decode(honest, max_frame_pixels=1 << 27, shape=(64, 64)),
        "mixed_geometry",
        "J2K 8192² in a 64² series",
    )


def test_the_publishers_key_reads_a_bounded_prefix_without_pydicom(
    gigabyte: bytes, million_items: bytes, tmp: Path
) -> None:
    uid = bombs.series_uid_of(bombs.base_instance(tmp))
    for what, data in (("deflate bomb", gigabyte), ("items bomb", million_items)):
        result, peak, seconds = costs(lambda data=data: series_uid_or_none(data))
        print(f"publisher key of the {what}: peak RSS +{peak / MiB:.1f} MiB, {seconds:.2f} s")
        assert result == uid and peak < FLAT and seconds < 5
    # items before the series UID: the walk stops at the item cap, the key falls back
    early = bombs.items_bomb(tmp, deflated=False, before_uid=True)
    result, peak, _ = costs(lambda: series_uid_or_none(early))
    assert result is None and peak < FLAT
    # the real files' keys are what pydicom reads
    import io

    import pydicom

    for name in REAL_FILES:
        data = real_file(name)
        assert series_uid_or_none(data) == str(pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID)


def test_seg_source_headers_are_read_within_bounds(million_items: bytes, tmp: Path) -> None:
    good = bombs.base_instance(tmp)
    assert [str(ds.Modality) for ds in source_headers([good])] == ["CT"]
    refused(lambda: source_headers([million_items]), "too_many_items", "SEG source headers")


def test_preprocess_judges_the_declared_volume_before_fetching_a_byte(tmp_path: Path) -> None:
    ring = Keyring.generate()
    store = BlobStore(LocalDirBackend(tmp_path / "blobs"), ring)
    core = PreprocessCore(
        store, select_backend("cpu"), PreprocessSettings(max_voxels=512 * 512 * 10)
    )
    refs = [
        InstanceRef(
            blob=BlobRef(digest=f"{i:064x}", size=1, key_id="k"),  # in no store: never fetched
            sop_instance_uid=f"1.2.{i}",
        )
        for i in range(11)
    ]
    msg = SeriesReady.model_construct(
        study_instance_uid="1.2", series_instance_uid="1.3", revision=1, modality="CT",
        body_part=None, instances=refs, instance_count=11, rows=512, columns=512,
    )  # fmt: skip
    context = Context("t.series", 0, 0, b"k", 0, None, ring)
    with pytest.raises(PoisonError) as info:
        core.handle(msg, context)
    assert info.value.reason == "volume_too_large"


# ---- per-series caps in ingest ---------------------------------------------------------------
def test_a_series_past_its_instance_cap_is_refused_whole_and_never_published(
    tmp_path: Path,
) -> None:
    from services.ingest.main import build
    from shared.dicom import phantom

    settings = Settings(
        home=tmp_path,
        ingest=IngestSettings(inactivity_timeout_s=5, retention_s=100, max_series_instances=3),
    )
    keyring = Keyring.generate()
    harness = StageHarness(build(settings, keyring), settings, keyring)
    ph = phantom.chest_ct(tmp_path / "big", seed=9, size=16, slices=5, nodules_mm=())
    uid = ph.series_instance_uid
    datas = [f.read_bytes() for f in ph.files]
    for data in datas[:3]:
        assert harness.send(InstanceData(source="t", data=data), key=uid).dead_letters == []
    # the 4th passes the cap: dead letter, and the series is marked refused (state kept)
    result = harness.send(InstanceData(source="t", data=datas[3]), key=uid)
    (letter,) = result.dead_letters
    assert letter.reason == Reason.SERIES_TOO_LARGE and letter.stage == "ingest"
    state = harness.state().get(keyring.keyed_hash(uid))
    assert state["refused"] is True and state["instances"] == {}
    assert uid not in letter.message
    # every later instance of it is refused at once; its marker and the timer publish nothing
    (letter,) = harness.send(InstanceData(source="t", data=datas[4]), key=uid).dead_letters
    assert letter.reason == Reason.SERIES_TOO_LARGE
    harness.send(EndOfSeries(source="t", series_instance_uid=uid, expected_count=5), key=uid)
    assert harness.advance(60).outputs == {}
    assert harness.outputs("series") == []
    # the refusal is forgotten after retention_s; another small series is not affected
    harness.advance(100)
    assert harness.state().get(keyring.keyed_hash(uid)) is None
    small = phantom.chest_ct(tmp_path / "small", seed=10, size=16, slices=2, nodules_mm=())
    for f in small.files:
        harness.send(InstanceData(source="t", data=f.read_bytes()), key=small.series_instance_uid)
    marker = EndOfSeries(
        source="t", series_instance_uid=small.series_instance_uid, expected_count=2
    )
    (ready,) = harness.send(marker, key=small.series_instance_uid).outputs["series"]
    assert isinstance(ready, SeriesReady) and ready.instance_count == 2


def test_a_series_past_its_byte_cap_is_refused(tmp_path: Path) -> None:
    from services.ingest.core import IngestCore
    from shared.dicom import phantom

    ring = Keyring.generate()
    ph = phantom.chest_ct(tmp_path / "b", seed=8, size=16, slices=3, nodules_mm=())
    datas = [f.read_bytes() for f in ph.files]
    cap = len(datas[0]) + len(datas[1]) + 10
    core = IngestCore(
        BlobStore(LocalDirBackend(tmp_path / "blobs"), ring),
        IngestSettings(max_series_bytes=cap),
    )
    state = PartitionState()
    key = ring.keyed_hash(ph.series_instance_uid)
    c = Context("t.instances", 0, 0, key, 0, state, ring)
    for data in datas[:2]:
        core.on_instance(InstanceData(source="t", data=data), c, 1.0)
    with pytest.raises(PoisonError) as info:
        core.on_instance(InstanceData(source="t", data=datas[2]), c, 2.0)
    assert info.value.reason == "series_too_large" and info.value.keep_state


def test_the_largest_series_state_stays_far_below_the_message_cap() -> None:
    """The instance cap keeps the changelog record (and the SeriesReady) under the producer's
    cap: a series that reached it can never wedge its partition."""
    import json

    from services.ingest.state import SeriesState, StoredInstance
    from shared.config import KafkaSettings

    cap = IngestSettings().max_series_instances
    st = SeriesState.new(0.0, "1." * 31 + "9")
    stored = StoredInstance(
        digest="f" * 64,
        size=1 << 20,
        key_id="k" * 32,
        instance_number=99999,
        position=(-123.456789, -234.56789, 1234.56789),
        content="e" * 64,
    )
    st.instances = {f"1.2.{'9' * 50}.{i}": stored for i in range(cap)}  # 64-character UIDs
    size = len(json.dumps(st.dump(), separators=(",", ":")))
    assert size < KafkaSettings().max_message_bytes // 2, size


# ---- the walk itself ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real() -> Iterator[tuple[str, bytes]]:
    return iter([(name, real_file(name)) for name in REAL_FILES])


def test_every_real_file_passes_the_walk_and_its_pixel_data_is_found(real: Any) -> None:
    for name, data in real:
        lay = bounded.layout(data, Bounds())
        assert lay.scan.pixel is not None, name
        assert lay.scan.elements > 10 and lay.scan.depth <= 3, name


def test_caps_are_exact(tmp: Path) -> None:
    plain = bombs.items_bomb(tmp, n=100, deflated=False)
    assert bounded.layout(plain, Bounds(max_items=100)).scan.items == 100
    with pytest.raises(InvalidInstance, match="too_many_items"):
        bounded.layout(plain, Bounds(max_items=99))
    small = bombs.deflate(bombs.base_instance(tmp), padding=1000)
    inflated = len(bounded.inflate(small[bombs.meta_end(small) :], 10 * MiB))
    assert bounded.layout(small, Bounds(max_inflated_bytes=inflated)).inflated
    with pytest.raises(InvalidInstance, match="inflated_too_large"):
        bounded.layout(small, Bounds(max_inflated_bytes=inflated - 1))
    with pytest.raises(InvalidInstance, match="truncated"):
        bounded.layout(small[:-20], Bounds())
    assert Limits().max_inflated_bytes == IngestSettings().max_inflated_bytes


def test_multi_frame_instances_cannot_together_decode_past_the_series_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each enhanced instance is within ``max_voxels``, the series' header-level check counts
    one frame per instance; the voxel budget stops the second before its pixels are decoded."""
    import numpy as np
    import pydicom.dataset

    from tests.enhanced import enhanced

    ring = Keyring.generate()
    store = BlobStore(LocalDirBackend(tmp_path / "blobs"), ring)
    core = PreprocessCore(
        store, select_backend("cpu"), PreprocessSettings(max_voxels=3000, threads=1)
    )
    hu = np.zeros((8, 16, 16))
    series = "1.2.826.0.1.3680043.8.498.77"
    refs = []
    for i in range(2):
        data = enhanced(hu, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 10.0 * i), series_uid=series)
        refs.append(InstanceRef(blob=store.put(data, "instances"), sop_instance_uid=f"1.2.{i}"))
    decoded = []
    original = pydicom.dataset.Dataset.pixel_array

    def counting(self: pydicom.dataset.Dataset) -> Any:
        decoded.append(1)
        return original.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(counting))
    msg = SeriesReady.model_construct(
        study_instance_uid="1.2", series_instance_uid=series, revision=1, modality="CT",
        body_part=None, instances=refs, instance_count=2, rows=16, columns=16,
    )  # fmt: skip
    with pytest.raises(PoisonError) as info:
        core.handle(msg, Context("t.series", 0, 0, b"k", 0, None, ring))
    assert info.value.reason == "volume_too_large"
    assert len(decoded) <= 1  # the second instance's pixels were never decoded
