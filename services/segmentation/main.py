"""Segmentation service: VolumePrepared → findings and masks → SegmentationDone (the SEG, SR and
pictures follow from the results service)."""

from __future__ import annotations

from shared.runtime.graceful import exit_on_sigterm

exit_on_sigterm(__name__)  # first: a SIGTERM during the heavy imports below exits 0

import sys  # noqa: E402

from prometheus_client import CollectorRegistry  # noqa: E402

from services.segmentation.core import SegmentationCore  # noqa: E402
from services.segmentation.onnx_plugin import ModelSpec, OnnxSegmenter  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.imaging.backend import DeviceRunner, select_backend  # noqa: E402
from shared.runtime.service import serve  # noqa: E402
from shared.runtime.stage import StageSpec  # noqa: E402
from shared.schemas import VolumePrepared  # noqa: E402
from shared.security.envelope import Keyring  # noqa: E402
from shared.storage import local_store  # noqa: E402


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[VolumePrepared]:
    plugin = None
    if settings.segmentation.onnx_model is not None:
        spec = ModelSpec.from_json(settings.segmentation.onnx_config)
        plugin = OnnxSegmenter(settings.segmentation.onnx_model, spec)
    backend = select_backend(settings.device)
    core = SegmentationCore(
        local_store(settings.blob_path, keyring, registry, "segmentation"),
        backend,
        plugin,
        runner=DeviceRunner(backend, stage="segmentation", registry=registry),
    )
    core.warm_up()  # on a GPU: the tasks' kernels compiled before the first series
    return StageSpec(
        name="segmentation",
        input_topic="volumes",
        input_type=VolumePrepared,
        output_topic="findings",
        handler=core.handle,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
