"""Alert service: SegmentationDone → Alerts (declarative rules) and SEG → PACS."""

from __future__ import annotations

import sys

from prometheus_client import CollectorRegistry

from services.alert.core import AlertCore
from services.alert.rules import RuleSet
from shared.config import Settings
from shared.dicom.pacs import Pacs
from shared.runtime.service import serve
from shared.runtime.stage import StageSpec
from shared.schemas import SegmentationDone
from shared.security.envelope import Keyring
from shared.storage import BlobStore, LocalDirBackend


def build(
    settings: Settings, keyring: Keyring, registry: CollectorRegistry | None = None
) -> StageSpec[SegmentationDone]:
    cfg = settings.alert
    pacs = (
        Pacs(
            cfg.pacs_host,
            cfg.pacs_port,
            cfg.pacs_ae_title,
            cfg.calling_ae_title,
            cfg.pacs_timeout_s,
        )
        if cfg.pacs_host
        else None
    )
    core = AlertCore(
        RuleSet.load(cfg.rules_file), BlobStore(LocalDirBackend(settings.blob_path), keyring), pacs
    )
    return StageSpec(
        name="alert",
        input_topic="findings",
        input_type=SegmentationDone,
        output_topic="alerts",
        handler=core.handle,
    )


def main() -> int:
    return serve(build)


if __name__ == "__main__":
    sys.exit(main())
