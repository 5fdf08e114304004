"""Ingest service: instances → validated, stored, assembled → SeriesReady."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import sys  # noqa: E402

from prometheus_client import CollectorRegistry, Counter, Gauge  # noqa: E402

from services.ingest.core import IngestCore  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import EndOfSeries, InstanceData, InstancesRecord  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.storage import local_store  # noqa: E402
from shared.topology import stage  # noqa: E402

STAGE = stage("ingest")


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
    duplicates = (
        Counter(
            "radstream_series_duplicates",
            "Re-sends of a completed series that changed nothing (no new revision)",
            registry=registry,
        )
        if registry is not None
        else None
    )
    raw_deleted = (
        Counter(
            "radstream_raw_blobs_deleted",
            "Raw instance blobs deleted by retention (compaction, refusal, duplicate re-send)",
            registry=registry,
        )
        if registry is not None
        else None
    )
    core = IngestCore(
        local_store(settings.blob_path, keyring, registry, STAGE.name),
        settings.ingest,
        gauge,
        duplicates,
        raw_deleted,
    )
    return StageSpec(
        name=STAGE.name,
        input_topic=STAGE.input,
        input_type=InstancesRecord,
        output_topic=STAGE.output,
        handler=core.handle,
        stateful=STAGE.stateful,
        tick=core.tick,
        tick_interval_s=1.0,
        before_commit=core.sync,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
