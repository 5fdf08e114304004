"""Preprocess service: SeriesReady → calibrated, processed volume → VolumePrepared."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry

from services.preprocess.core import PreprocessCore, PreprocessMetrics
from shared.config import Settings
from shared.imaging.backend import DeviceRunner, select_backend
from shared.runtime.service import serve
from shared.runtime.stage import StageSpec
from shared.schemas import SeriesReady
from shared.security.envelope import Keyring
from shared.storage import local_store


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[SeriesReady]:
    backend = select_backend(
        settings.device, memory_limit_bytes=settings.preprocess.gpu_memory_limit_bytes
    )
    core = PreprocessCore(
        local_store(settings.blob_path, keyring, registry, "preprocess"),
        backend,
        settings.preprocess,
        PreprocessMetrics(registry, backend) if registry is not None else None,
        runner=DeviceRunner(backend, stage="preprocess", registry=registry),
    )
    core.warm_up()
    return StageSpec(
        name="preprocess",
        input_topic="series",
        input_type=SeriesReady,
        output_topic="volumes",
        handler=core.handle,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
