"""Ingest service: instances → validated, stored, assembled → SeriesReady."""

from __future__ import annotations

import sys

from services.ingest.core import IngestCore
from shared.config import Settings
from shared.runtime.service import run_stage
from shared.runtime.stage import StageSpec
from shared.schemas import EndOfSeries, InstanceData, InstancesRecord
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend


def build(settings: Settings, keyring: Keyring) -> StageSpec[InstanceData | EndOfSeries]:
    core = IngestCore(BlobStore(LocalDirBackend(settings.blob_path), keyring), settings.ingest)
    return StageSpec(
        name="ingest",
        input_topic="instances",
        input_type=InstancesRecord,
        output_topic="series",
        handler=core.handle,
        stateful=True,
        tick=core.tick,
        tick_interval_s=1.0,
    )


def main() -> int:
    settings = Settings()
    return run_stage(lambda keyring, _registry: build(settings, keyring), settings)


if __name__ == "__main__":
    sys.exit(main())
