"""Segmentation service: VolumePrepared → findings, DICOM SEG, overlays → SegmentationDone."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry

from services.segmentation.core import SegmentationCore
from services.segmentation.onnx_plugin import ModelSpec, OnnxSegmenter
from shared.config import Settings
from shared.imaging.backend import DeviceRunner, select_backend
from shared.runtime.service import serve
from shared.runtime.stage import StageSpec
from shared.schemas import VolumePrepared
from shared.security.envelope import Keyring
from shared.storage import local_store


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
