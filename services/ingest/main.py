"""Ingest service: instances → validated, stored, assembled → SeriesReady."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry, Gauge

from services.ingest.core import IngestCore
from shared.config import Settings
from shared.runtime.service import serve
from shared.runtime.stage import StageSpec
from shared.schemas import EndOfSeries, InstanceData, InstancesRecord
from shared.security.envelope import Keyring
from shared.storage import local_store


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[InstanceData | EndOfSeries]:
    gauge = (
        Gauge(
            "radstream_series_in_assembly",
            "Series waiting for completion",
            ["partition"],
            registry=registry,
        )
        if registry is not None
        else None
    )
    core = IngestCore(
        local_store(settings.blob_path, keyring, registry, "ingest"), settings.ingest, gauge
    )
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
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
