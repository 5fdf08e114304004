"""Raw blob retention (issue 14, low): raw DICOM blobs were never deleted. Ingest now deletes a
series' raw instance blobs ``retention_s`` after its last change (when its instance list is
compacted to a fingerprint), at once when the series is refused, and whatever a duplicate
re-send stored after compaction; re-sends are still recognised by the fingerprint, and
nothing is deleted before its time (preprocess reads the blobs after SeriesReady)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from services.ingest.main import build
from shared.config import IngestSettings, Settings
from shared.dicom import phantom
from shared.runtime.harness import StageHarness
from shared.schemas import EndOfSeries, InstanceData, SeriesReady
from shared.security.envelope import Keyring
from shared.storage import LocalDirBackend

RETENTION_S = 600.0


def harness(
    tmp_path: Path, **ingest: float | bool
) -> tuple[StageHarness[object], Settings, CollectorRegistry]:
    settings = Settings(
        home=tmp_path,
        ingest=IngestSettings(
            inactivity_timeout_s=30.0,
            late_quiet_s=5.0,
            retention_s=RETENTION_S,
            fingerprint_retention_s=7200.0,
            **ingest,  # type: ignore[arg-type]
        ),
    )
    keyring = Keyring.generate()
    registry = CollectorRegistry()
    return StageHarness(build(settings, keyring, registry), settings, keyring), settings, registry


def stored(settings: Settings) -> int:
    return LocalDirBackend(settings.blob_path).usage()[0]


def send(h: StageHarness[object], uid: str, datas: list[bytes], marker: int | None) -> None:
    for data in datas:
        h.send(InstanceData(source="t", data=data), key=uid)
    if marker is not None:
        h.send(EndOfSeries(source="t", series_instance_uid=uid, expected_count=marker), key=uid)


def test_raw_blobs_are_deleted_retention_s_after_the_last_change(tmp_path: Path) -> None:
    h, settings, registry = harness(tmp_path)
    ph = phantom.chest_ct(tmp_path / "ph", seed=5, size=16, slices=4, nodules_mm=())
    datas = [f.read_bytes() for f in ph.files]
    send(h, ph.series_instance_uid, datas, marker=4)
    (ready,) = h.outputs("series")
    assert isinstance(ready, SeriesReady) and stored(settings) == 4
    h.advance(RETENTION_S / 2)
    assert stored(settings) == 4  # not before its time: preprocess and replays read them
    h.advance(RETENTION_S / 2 + 2)
    assert stored(settings) == 0
    assert registry.get_sample_value("radstream_raw_blobs_deleted_total") == 4
    # a re-send after that is still a duplicate by fingerprint, and keeps no blob either
    send(h, ph.series_instance_uid, datas, marker=4)
    assert len(h.outputs("series")) == 1 and stored(settings) == 0


def test_a_refused_series_leaves_no_raw_blob(tmp_path: Path) -> None:
    h, settings, _ = harness(tmp_path, max_series_instances=2)
    ph = phantom.chest_ct(tmp_path / "big", seed=6, size=16, slices=3, nodules_mm=())
    send(h, ph.series_instance_uid, [f.read_bytes() for f in ph.files], marker=None)
    assert stored(settings) == 0  # the two stored before the refusal went with it


def test_retention_can_be_turned_off(tmp_path: Path) -> None:
    h, settings, _ = harness(tmp_path, delete_raw_blobs=False)
    ph = phantom.chest_ct(tmp_path / "ph", seed=7, size=16, slices=2, nodules_mm=())
    send(h, ph.series_instance_uid, [f.read_bytes() for f in ph.files], marker=2)
    h.advance(RETENTION_S + 2)
    assert stored(settings) == 2
