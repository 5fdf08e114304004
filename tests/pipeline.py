"""Run pure cores offline (no broker) to build realistic stage inputs for tests."""

from __future__ import annotations

from pathlib import Path

from services.ingest.core import IngestCore
from shared.config import IngestSettings
from shared.runtime.stage import Context
from shared.runtime.state import PartitionState
from shared.schemas import EndOfSeries, InstanceData, SeriesReady
from shared.security.envelope import Keyring
from shared.storage import BlobStore


def series_ready(datas: list[bytes], store: BlobStore, ring: Keyring) -> SeriesReady:
    """What ingest would publish for these instances (one series), via its own core."""
    from shared.dicom.safe import inspect_instance

    uid = inspect_instance(datas[0]).series_instance_uid
    core = IngestCore(store, IngestSettings())
    state = PartitionState()
    ctx = Context("offline.instances", 0, 0, ring.keyed_hash(uid), 0, state, ring)
    emit = None
    for data in datas:  # an enhanced multi-frame instance completes its series by itself
        emit = core.on_instance(InstanceData(source="offline", data=data), ctx, 1.0) or emit
    if emit is not None:
        return emit.record  # type: ignore[union-attr,return-value]
    emit = core.on_marker(
        EndOfSeries(source="offline", series_instance_uid=uid, expected_count=len(datas)), ctx, 2.0
    )
    if emit is None:  # duplicates among the files: complete on the timer
        emit = core.tick(ctx, 10_000.0)[0]  # type: ignore[index]
    return emit.record  # type: ignore[union-attr,return-value]


def files(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]
