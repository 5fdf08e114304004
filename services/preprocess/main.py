"""Preprocess service: SeriesReady → calibrated, processed volume → VolumePrepared."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import sys  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.preprocess.core import PreprocessCore, PreprocessMetrics  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.imaging.backend import DeviceRunner, select_backend  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import SeriesReady  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.storage import local_store  # noqa: E402
from shared.topology import stage  # noqa: E402

STAGE = stage("preprocess")


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[SeriesReady]:
    backend = select_backend(
        settings.device, memory_limit_bytes=settings.preprocess.gpu_memory_limit_bytes
    )
    core = PreprocessCore(
        local_store(settings.blob_path, keyring, registry, STAGE.name),
        backend,
        settings.preprocess,
        PreprocessMetrics(registry, backend) if registry is not None else None,
        runner=DeviceRunner(backend, stage="preprocess", registry=registry),
    )
    core.warm_up()
    return StageSpec(
        name=STAGE.name,
        input_topic=STAGE.input,
        input_type=SeriesReady,
        output_topic=STAGE.output,
        handler=core.handle,
        stateful=STAGE.stateful,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
